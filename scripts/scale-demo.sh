#!/usr/bin/env bash
# `just scale-demo`: a run spread over servers on this machine. A local nats-server with
# JetStream, a root (the run's dashboard) and two edges (each with its own client page and
# half of the data shards). Open an edge's page in browser tabs to join; SIM=N also starts N
# native simulated clients per edge. Ctrl-C stops everything. Extra arguments go to every server.
set -euo pipefail
bin="${CARGO_TARGET_DIR:-$HOME/.cache/canopy/target}/debug/canopy"
nats=$(command -v nats-server || echo /usr/sbin/nats-server)
[ -x "$nats" ] || { echo "nats-server is not installed: run 'just setup' (Debian package nats-server)"; exit 1; }
dir=runs/scale-demo
mkdir -p "$dir"
token=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
pids=()
stop() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap stop EXIT INT TERM

"$nats" -js -a 127.0.0.1 -p 4222 -sd "$dir/nats" >"$dir/nats.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null && break; sleep 0.1; done

"$bin" serve --config configs/scale.toml --role root --port 8080 --admin-token "$token" "$@" >"$dir/root.log" 2>&1 &
pids+=($!)
for k in 1 2; do
  "$bin" serve --config configs/scale.toml --role edge --port $((8080 + k)) --edge-name "edge-$k" --edge-shards "$((k - 1))/2" "$@" >"$dir/edge-$k.log" 2>&1 &
  pids+=($!)
done
for port in 8080 8081 8082; do
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
cat <<MSG

  Canopy across servers (NATS JetStream at nats://127.0.0.1:4222)
  Root dashboard:  http://127.0.0.1:8080/dashboard#token=$token
  Edge 1, join:    http://127.0.0.1:8081/
  Edge 2, join:    http://127.0.0.1:8082/
  Logs:            $dir/{nats,root,edge-1,edge-2}.log

MSG
if [ "${SIM:-0}" -gt 0 ]; then
  for k in 1 2; do
    "$bin" sim --url "ws://127.0.0.1:$((8080 + k))/ws" --clients "$SIM" --name "sim-e$k" >"$dir/sim-$k.log" 2>&1 &
    pids+=($!)
  done
  echo "  $SIM native simulated clients joined each edge."
fi
echo "  Ctrl-C stops all of them."
wait "${pids[1]}"
echo "  The root finished the run (see $dir/root.log)."
