#!/usr/bin/env bash
# Runs the Python and Node example clients (examples/python, examples/node) against a
# real `lockstep demo` server. Needs python3 with pip and node with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
bin="$(pwd)/${LOCKSTEP_BIN:-target/debug/lockstep}"
[ -x "$bin" ] || { echo "no binary at $bin: cargo build first"; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && exec "$bin" demo --listen "127.0.0.1:$port" > demo.out 2> demo.err) &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q "export CAROL" "$work/demo.out" 2>/dev/null && break; sleep 0.1; done
db="sqlite://$work/lockstep.db"
token() { "$bin" token issue --database "$db" --kid demo --sub "$1" --ttl 10m; }
export LOCKSTEP_ADDR="127.0.0.1:$port"

echo "== Python (grpcio)"
python3 -m pip install --quiet -r examples/python/requirements.txt
ALICE=$(token alice) BOB=$(token bob) python3 examples/python/client.py

echo "== Node (@grpc/grpc-js)"
(cd examples/node && npm ci --no-audit --no-fund --silent)
ALICE=$(token alice) BOB=$(token bob) node examples/node/client.js
