# Canopy's tasks. `./dev RECIPE` installs `just` first if needed.
set shell := ["bash", "-euo", "pipefail", "-c"]

# One persistent build folder outside the clone: burn takes ~13 minutes to build cold.
export CARGO_TARGET_DIR := env_var_or_default("CARGO_TARGET_DIR", home_directory() / ".cache/canopy/target")
export PATH := home_directory() / ".cargo/bin:" + env_var("PATH")

# Start the demo: server on localhost with the client page and live dashboard.
demo *ARGS: setup
    bash scripts/build-wasm.sh
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" serve --config configs/demo.toml {{ARGS}}

# Run every test: formatting and lints, the book's links, unit, native federation, and
# headless-browser tests.
test: setup lint
    mdbook build docs
    node scripts/check-links.mjs docs/book README.md
    bash scripts/build-wasm.sh
    cargo build -p canopy-server --bin canopy
    cargo test -p canopy-core -p canopy-server
    node --test tests/web/
    node --test --test-concurrency=1 tests/browser/

# The book (docs/, mdBook): rewrite the generated configuration reference, build docs/book and
# check every link of the book and the README. Open docs/book/index.html.
docs: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" config-reference > docs/src/reference/config.md
    mdbook build docs
    node scripts/check-links.mjs docs/book README.md

# rustfmt (rustfmt.toml) and clippy with every warning an error, on the native crates.
lint:
    cargo fmt --all -- --check
    cargo clippy -p canopy-core -p canopy-server --all-targets -- -D warnings

# Install what the project needs (idempotent): wasm target, wasm-bindgen-cli, Chromium, npm packages, datasets.
setup:
    bash scripts/setup.sh

# Build the wasm bundles into web/pkg and web/pkg-mt, the threaded one (--optimize: wasm-opt, slower; --single: web/pkg only).
wasm *ARGS:
    bash scripts/build-wasm.sh {{ARGS}}

# Native simulated clients against a running server.
sim URL="ws://127.0.0.1:8080/ws" N="5":
    cargo run -p canopy-server --bin canopy -- sim --url {{URL}} --clients {{N}}

# Speed figures (native training, wire format, aggregation), each against a baseline.
bench *ARGS:
    cargo run -p canopy-server --bin canopy -- bench {{ARGS}}

# FedAvg, FedAvgM with AutoFLIP's ×0.99 lr decay, AutoFLIP with q = 0 (exploration and
# compression, no pruning) and AutoFLIP, on the same splits; prints and saves a table.
compare *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/compare.toml --strategies 'fedavg,fedavgm{lr_decay=0.99},autoflip{q=0},autoflip' {{ARGS}}

# Attacks × defences (MLP, MNIST digits, 10 native clients, 1 and 3 attackers); prints final accuracy.
attack-table *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" attack {{ARGS}}

# The paper's structured pruning (L1 scores, both tails, re-initialised after each cut, conv
# filters only, at least 1 unit, prune_until 50, patience 3) and Canopy's (weights kept,
# movement scores) against FedAvg on the paper's CNN; prints and saves a table.
compare-structured *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/structured.toml --partitions dirichlet:0.1,shards:2 --strategies 'fedavg,structured{reinit=true;score="l1";upper_tail=true;log_scores=false;conv_only=true;min_units=1;prune_until=50;patience=3;lambda=2.2},structured' {{ARGS}}

# FedAvg, AutoFLIP, HideNseek and the binary supermask on the same splits; prints and saves a table.
compare-supermask *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/hidenseek.toml --strategies fedavg,autoflip,hidenseek,supermask --datasets mnist-digits,fashion-mnist --partitions dirichlet:0.1,shards:2 --max-train 20000 {{ARGS}}

# The FL methods users expect on the same splits: FedAvg, FedAvgM, FedProx, FedAdagrad, FedAdam,
# FedYogi and DP-FedAvg at ε ≈ 1, 4, 8 (δ = 1e-5 after 30 rounds), on the MLP (configs/compare.toml)
# and on the paper's small CNN (configs/compare-cnn.toml, about 45 minutes on two cores), then
# lock-step FedAvg against FedBuff with a third of the clients 5× slower on the CNN
# (docs/src/methods/fedprox-fedopt-dp.md, fedbuff.md).
compare-fl *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/compare.toml --datasets mnist-digits,fashion-mnist --partitions iid,dirichlet:0.1 --rounds 30 --strategies 'fedavg,fedavgm,fedprox{mu=0.01},fedadagrad,fedadam,fedyogi,dpfedavg{clip=0.5;noise=5.84;noise_seed=1},dpfedavg{clip=0.5;noise=1.93;noise_seed=1},dpfedavg{clip=0.5;noise=1.22;noise_seed=1}' {{ARGS}}
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/compare-cnn.toml --datasets mnist-digits,fashion-mnist --partitions iid,dirichlet:0.1 --strategies 'fedavg,fedavgm,fedprox{mu=0.01},fedadagrad,fedadam,fedyogi,dpfedavg{clip=0.5;noise=5.84;noise_seed=1},dpfedavg{clip=0.5;noise=1.93;noise_seed=1},dpfedavg{clip=0.5;noise=1.22;noise_seed=1}' {{ARGS}}
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/compare-cnn.toml --datasets mnist-digits,fashion-mnist --partitions iid,dirichlet:0.1 --slow 0.33:5 --table time --strategies 'fedavg{run.rounds=30},fedavg{buffered.buffer=5;buffered.concurrency=5;run.rounds=30}' {{ARGS}}

# FedAvg against split learning (cuts, gradient bits b, activation keep κ, a pruned front) on
# the MLP (digits and Fashion-MNIST) and on the small CNN (digits; CNN training is slow on two
# cores), Dirichlet(0.1); prints and saves two tables with the simulated time per round on a
# 10 Mbit/s, 20 ms link.
compare-split *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/split.toml --table split --partitions dirichlet:0.1 --max-train 20000 --strategies 'fedavg,split{cut=1;bits=32},split{cut=1;bits=8},split{cut=1;bits=4},split{cut=1;bits=8;keep=0.5},split{cut=2;bits=32},split{cut=2;bits=8},split{cut=2;bits=8;keep=0.5},split{cut=1;bits=8;prune=0.5},split{cut=1;bits=8;prune=0.5;prune_kind="magnitude"}' {{ARGS}}
    "$CARGO_TARGET_DIR/debug/canopy" compare --config configs/split.toml --table split --datasets mnist-digits --partitions dirichlet:0.1 --max-train 3000 --rounds 12 --model cnn-small --strategies 'fedavg{strategy.lr=0.1},split{cut=2;bits=8;strategy.lr=0.1},split{cut=2;bits=8;keep=0.5;strategy.lr=0.1}'

# A run spread over servers on this machine: nats-server (JetStream), a root with the dashboard
# and two edges with their own client pages (docs/src/operating/scale-out.md). SIM=N just scale-demo
# adds N native clients per edge.
scale-demo *ARGS: setup
    bash scripts/build-wasm.sh
    cargo build -p canopy-server --bin canopy
    bash scripts/scale-demo.sh {{ARGS}}

# The server alone under 100 / 1,000 / 10,000 synthetic clients (tokio tasks, no training):
# round time, server CPU, peak server RSS, frames/s, result waits; streaming vs buffered.
load *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" load {{ARGS}}

# 20 minutes of 2,000 synthetic clients coming and going over 3 edges and a root, 6 of them
# hostile, one edge and then NATS killed and restarted; ends with a report (runs/soak/soak-report.md)
# and fails if an honest result was lost with no killed process to blame. Not part of `just test`.
soak *ARGS: setup
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" soak {{ARGS}}

# Training speed in headless Chromium tabs (CPU in the worker and on the main thread, WebGPU; each bundle; a page opened as localhost, https LAN and plain-http LAN),
# full vs pruned widths, against native `canopy bench` in the same run; prints a table.
bench-browser: setup
    bash scripts/build-wasm.sh
    cargo build -p canopy-server --bin canopy
    node tests/browser/bench.mjs

# Classroom mode: the demo on every network interface (join URLs and a QR code are printed),
# held until the teacher presses Start on the dashboard. Over https with a self-signed
# certificate kept and reused in ~/.local/state/canopy/tls (LAN tabs then get WebGPU and
# threads); plain http on port 8080 redirects to https on 8443.
classroom *ARGS: setup
    bash scripts/build-wasm.sh
    cargo build -p canopy-server --bin canopy
    "$CARGO_TARGET_DIR/debug/canopy" serve --config configs/demo.toml --bind 0.0.0.0 --hold --tls self-signed --port 8443 --http-port 8080 {{ARGS}}

# Fuzz frame decoding and result acceptance with cargo-fuzz for SECONDS (nightly Rust and
# cargo-fuzz are installed on demand; not part of `just test`). Crashes land in fuzz/artifacts/.
fuzz SECONDS="60":
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
    CANOPY_FUZZ_SEEDS="$PWD/fuzz/corpus/frames" cargo test -p canopy-core --test frames
    cd fuzz && cargo +nightly fuzz run frames corpus/frames -- -max_total_time={{SECONDS}} -max_len=65536
