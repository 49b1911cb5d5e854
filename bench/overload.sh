#!/usr/bin/env bash
# Overload (issue 13): Lockstep on PostgreSQL driven open-loop at 10x the rate it sustains,
# without admission control (limits out of reach) and with it (the defaults, and a tight
# setting). Prints, per setting, the rate answered OK, the p50/p99 of those admitted calls,
# and how many calls were shed (RESOURCE_EXHAUSTED) or failed otherwise. Figures only.
# Usage: bench/overload.sh [SECONDS]   (needs a release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
bin=target/release/lockstep
[ -x "$bin" ] || { echo "cargo build --release first"; exit 1; }
admin=${LOCKSTEP_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}
base=${admin%/*}
db=lockstep_overload
url="$base/$db"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=""
stop() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=""; fi; }
trap stop EXIT
q() { PGOPTIONS="-c client_min_messages=warning" psql -q "$@"; }
q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"

serve() {
  stop
  LOCKSTEP_LOG=warn "$bin" serve --database "$url" --listen "127.0.0.1:$port" "$@" 2>/dev/null &
  server=$!
  for _ in $(seq 1 100); do
    "$bin" bench --help >/dev/null 2>&1 && python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), 0.2)" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "server did not start" >&2; exit 1
}

echo "machine: $(nproc) cores; commit $(git rev-parse --short HEAD); ${secs} s per phase"
serve --max-in-flight 1000000 --max-queue 0
echo "== sustainable rate: closed loop, 16 callers"
"$bin" bench --database "$url" --addr "127.0.0.1:$port" --calls commit --callers 16 --seconds "$secs" 2>/dev/null | tee /tmp/overload-closed.txt
rate=$(awk '$1 == "commit" {printf "%d", $3}' /tmp/overload-closed.txt)
offered=$(( rate * 10 ))
echo "== open loop at 10x: $offered calls/s offered, over 8 connections"
for setting in "--max-in-flight 1000000 --max-queue 0" "" "--max-in-flight 32 --max-queue 64"; do
  serve $setting
  label=${setting:-"defaults (--max-in-flight 256 --max-queue 256)"}
  [ "$setting" = "--max-in-flight 1000000 --max-queue 0" ] && label="admission off (--max-in-flight 1000000)"
  echo "-- $label"
  "$bin" bench --database "$url" --addr "127.0.0.1:$port" --calls commit --callers 8 --rate "$offered" --seconds "$secs" 2>/dev/null
done
stop
q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"
