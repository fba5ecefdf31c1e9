#!/usr/bin/env bash
# Builds the browser client's three bundles and pre-compresses them: brotli (-q 11), zstd (-19,
# an 8 MiB window, the most browsers accept for Content-Encoding: zstd) and gzip (-9) beside each
# file; the server sends the smallest the browser accepts (server/src/serve/precompressed.rs).
# web/bundle.js picks one per tab:
#   web/pkg      single-threaded with WebGPU (burn's wgpu backend) and the CPU backend, stable
#                Rust: a tab with a hardware WebGPU adapter.
#   web/pkg-mt   threaded (wasm threads, burn's CPU backend on a rayon pool of Web Workers):
#                nightly Rust, `+atomics,+bulk-memory,+mutable-globals`, std rebuilt with
#                `-Z build-std`. Needs SharedArrayBuffer, so a cross-origin isolated page
#                (COOP/COEP headers on localhost or https).
#   web/pkg-cpu  single-threaded, CPU only (no wgpu compiled in: smaller and faster on the CPU
#                backend), stable Rust: every other page, a plain-http LAN above all.
# --optimize also runs wasm-opt -Os (2–4 minutes); measured on this bundle it cuts the raw size
# 15% but makes the gzipped download 8% larger, so the demo does not use it.
# --single builds web/pkg only.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${CARGO_TARGET_DIR:=$HOME/.cache/canopy/target}"
optimize=0
single=0
for a in "$@"; do
  case "$a" in
    --optimize) optimize=1 ;;
    --single) single=1 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done

# bundle OUT_DIR RAW_WASM
bundle() {
  local out="$1" raw="$2"
  mkdir -p "$out"
  local stamp="$out/.built-from"
  local sig
  # The content, not the time: web/pkg and web/pkg-cpu are two feature sets of one crate, and
  # cargo copies whichever it built last to the same path.
  sig="$(sha256sum "$raw" | cut -c1-16)-$optimize"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sig" ] && [ -f "$out/canopy_client_bg.wasm.br" ] && [ -f "$out/canopy_client_bg.wasm.zst" ]; then
    echo "$out is up to date"
    return
  fi
  rm -rf "$out/snippets"
  wasm-bindgen "$raw" --target web --out-dir "$out" --remove-name-section
  if [ "$optimize" = 1 ]; then
    echo "==> wasm-opt -Os on $out (takes a few minutes)"
    node_modules/.bin/wasm-opt -Os --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext --enable-mutable-globals --enable-simd --enable-threads \
      "$out/canopy_client_bg.wasm" -o "$out/canopy_client_bg.opt.wasm"
    mv "$out/canopy_client_bg.opt.wasm" "$out/canopy_client_bg.wasm"
  fi
  echo "==> compressing $out (brotli -q 11 takes about half a minute)"
  for f in "$out/canopy_client_bg.wasm" "$out/canopy_client.js"; do
    gzip -9 -k -f "$f" &
    zstd -19 -q -f --zstd=wlog=23 "$f" -o "$f.zst" &
    brotli -q 11 -f "$f" -o "$f.br"
    wait
  done
  echo "$sig" > "$stamp"
  size() { stat -c %s "$out/canopy_client_bg.wasm$1"; }
  echo "$out: $(size '') bytes raw, $(size .br) brotli, $(size .zst) zstd, $(size .gz) gzip"
}

raw="$CARGO_TARGET_DIR/wasm32-unknown-unknown/wasm/canopy_client.wasm"
cargo build -p canopy-client --target wasm32-unknown-unknown --profile wasm
bundle web/pkg "$raw"
[ "$single" = 1 ] && exit 0

cargo build -p canopy-client --target wasm32-unknown-unknown --profile wasm --no-default-features
bundle web/pkg-cpu "$raw"

# The threaded build has its own target folder: other RUSTFLAGS and a rebuilt std would
# otherwise invalidate the single-threaded build's artefacts every time. RUSTFLAGS replaces
# .cargo/config.toml's rustflags, so simd128 is repeated here. Since nightly-2025-10-03
# (rust-lang/rust#147225) rustc no longer asks the linker for a shared memory when atomics are
# on: the link arguments below do (an imported shared memory of at most 4 GiB, as much as the
# single-threaded bundle may grow to, and the TLS symbols wasm-bindgen's thread support needs).
# They go to the final crate only (`cargo rustc`), so changing them does not rebuild burn.
mt_dir="$CARGO_TARGET_DIR/threads"
link=(--shared-memory --import-memory --max-memory=4294967296 --export=__wasm_init_tls --export=__tls_size --export=__tls_align --export=__tls_base)
RUSTFLAGS='-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128' \
  CARGO_TARGET_DIR="$mt_dir" \
  cargo "+${CANOPY_NIGHTLY:-nightly-2026-05-20}" rustc -p canopy-client --lib --no-default-features --features threads \
  --target wasm32-unknown-unknown --profile wasm -Z build-std=panic_abort,std \
  -- "${link[@]/#/-Clink-arg=}"
bundle web/pkg-mt "$mt_dir/wasm32-unknown-unknown/wasm/canopy_client.wasm"
