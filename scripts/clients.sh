#!/usr/bin/env bash
# Runs the Python and Node example clients (examples/python, examples/node) against a
# real `lockstep demo` server. Needs python3 with pip and node with npm.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/start-demo.sh
token() { "$bin" token issue --database "$db" --kid demo --sub "$1" --ttl 10m; }
export LOCKSTEP_ADDR="127.0.0.1:$port"

echo "== Python (grpcio)"
python3 -m pip install --quiet -r examples/python/requirements.txt
ALICE=$(token alice) BOB=$(token bob) python3 examples/python/client.py

echo "== Node (@grpc/grpc-js)"
(cd examples/node && npm ci --no-audit --no-fund --silent)
ALICE=$(token alice) BOB=$(token bob) node examples/node/client.js
