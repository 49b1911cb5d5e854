#!/usr/bin/env bash
# The cost of exporting spans: `lockstep serve` on SQLite with and without --otlp-endpoint
# (towards bench/otlp_collector.py, a collector that counts spans, on the same cores),
# driven by `lockstep bench --addr` with 16 callers; twice each, alternating. Figures only.
# Usage: bench/otlp.sh [SECONDS]  (needs a release build, and python3 with grpcio and
# opentelemetry-proto: pip install grpcio opentelemetry-proto)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
bin=target/release/lockstep
[ -x "$bin" ] || { echo "cargo build --release first"; exit 1; }
work=$(mktemp -d)
python3 bench/otlp_collector.py 4399 > "$work/collector.out" 2>&1 & C=$!
trap 'kill -TERM $C 2>/dev/null; wait $C 2>/dev/null; cat "$work/collector.out"; rm -rf "$work"' EXIT
sleep 1
for mode in off on off on; do
  rm -f "$work"/b.db*
  extra=(); [ "$mode" = on ] && extra=(--otlp-endpoint http://127.0.0.1:4399)
  "$bin" serve --listen 127.0.0.1:50155 --database "sqlite://$work/b.db" "${extra[@]}" 2>"$work/serve.err" & S=$!
  sleep 1
  echo "== spans exported: $mode"
  "$bin" bench --addr 127.0.0.1:50155 --database "sqlite://$work/b.db" --callers 16 --seconds "$secs" \
    --calls commit,authorize 2>/dev/null | grep -v "^#"
  kill -TERM $S; wait $S || true
done
