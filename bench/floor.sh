#!/usr/bin/env bash
# PostgreSQL at the floor (issue 12): Lockstep's AuthorizeAndCommit and Authorize beside the
# same job done without Lockstep, in one sitting, at 16 and 64 callers:
#   - pgbench -M prepared on bench/floor-commit.sql: the write with correct locking in six
#     statements (the reference floor; schema bench/floor-schema.sql, its own database);
#   - pgbench on bench/floor-one-statement.sql: the same work as one statement (not safe
#     under READ COMMITTED: a floor of cost only);
#   - the naive peer bench/naive/app.py (FastAPI + asyncpg, 2 uvicorn workers, racy),
#     installed into bench/.venv, driven over HTTP by wrk (bench/naive/wrk.lua);
#   - pgbench on bench/floor-decide.sql: a read-only decision's transaction (it reads the item's
#     row too: the floor of Authorize and of GetEntity);
#   - Lockstep (`lockstep bench` on PostgreSQL, commit, authorize and get rows): read from
#     LOCKSTEP_OUTPUT when given (bench/run.sh passes its own run), else run here.
# Prints one table with rates, p99s and the issue's ratios; writes $BENCH_OUT/floor.txt and
# floor.csv. Figures only.
# Usage: bench/floor.sh [SECONDS] [LOCKSTEP_OUTPUT]   (env: FLOOR_CALLERS="16 64")
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
ls_out=${2:-}
callers=${FLOOR_CALLERS:-16 64}
subjects=1000
bin=target/release/lockstep
admin=${LOCKSTEP_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}
base=${admin%/*}
db=lockstep_floor
out=${BENCH_OUT:-bench/out}
venv=bench/.venv
work=$(mktemp -d)
app_pid=""
cleanup() {
  if [ -n "$app_pid" ]; then kill "$app_pid" 2>/dev/null || true; wait "$app_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$out"
declare -A rate p99
q() { PGOPTIONS="-c client_min_messages=warning" psql -q "$@"; }

# p99 in ms of pgbench -l logs (third field: latency in µs).
log_p99() { cat "$@" | awk '{print $3/1000}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int(NR*0.99)]}'; }

# pgbench NAME SCRIPT CALLERS: one phase; fills rate[NAME,C] and p99[NAME,C].
pgb() {
  local name=$1 script=$2 c=$3 f="$work/$1-$3"
  if ! pgbench -n -M prepared -f "$script" -D subjects=$subjects -c "$c" -j $(( c < 2 ? c : 2 )) -T "$secs" -l --log-prefix="$f" \
      "$base/$db" > "$f.txt" 2>&1; then
    cat "$f.txt" >&2; echo "pgbench $script failed" >&2; exit 1
  fi
  if grep -q '^number of failed transactions: [1-9]' "$f.txt"; then echo "warning: $(grep '^number of failed' "$f.txt") ($script, $c)" >&2; fi
  rate[$name,$c]=$(awk '/^tps/ {printf "%.0f", $3}' "$f.txt")
  p99[$name,$c]=$(log_p99 "$f".[0-9]*)
  echo "$name $c: ${rate[$name,$c]} tx/s, p99 ${p99[$name,$c]} ms"
}

echo "== the floor: pgbench on its own schema ($db), ${secs} s per phase"
q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
q -v ON_ERROR_STOP=1 -v subjects=$subjects -f bench/floor-schema.sql "$base/$db"
audit0=$(psql -At "$base/$db" -c "SELECT count(*) FROM audit")
written=0
for c in $callers; do
  pgb six bench/floor-commit.sql "$c"
  pgb one bench/floor-one-statement.sql "$c"
  pgb decide bench/floor-decide.sql "$c"
  for name in six one; do
    written=$(( written + $(awk '/^number of transactions actually processed/ {print $NF}' "$work/$name-$c.txt") ))
  done
done
audit1=$(psql -At "$base/$db" -c "SELECT count(*) FROM audit")
# Every commit transaction is allowed: each must have written its audit record.
[ $(( audit1 - audit0 )) -eq "$written" ] || echo "warning: $written commit transactions, $(( audit1 - audit0 )) audit records" >&2

echo "== the naive peer: FastAPI + asyncpg, 2 uvicorn workers, wrk"
if ! cmp -s bench/naive/requirements.txt "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check -r bench/naive/requirements.txt
  cp bench/naive/requirements.txt "$venv/requirements.txt"
fi
if ! command -v wrk > /dev/null; then
  echo "installing wrk (Debian package)"
  { apt-get install -y wrk || { apt-get update && apt-get install -y wrk; }; } > "$work/apt.log" 2>&1 \
    || { cat "$work/apt.log" >&2; echo "wrk is needed: apt-get install wrk" >&2; exit 1; }
fi
head -c 32 /dev/urandom > "$work/secret"
"$venv/bin/python" bench/naive/tokens.py "$work/secret" $subjects "$work/tokens.lua"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
DATABASE_URL="$base/$db" JWT_SECRET_FILE="$work/secret" "$venv/bin/uvicorn" app:app --app-dir bench/naive \
  --host 127.0.0.1 --port "$port" --workers 2 --no-access-log --log-level warning > "$work/uvicorn.log" 2>&1 &
app_pid=$!
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$port/healthz" > /dev/null && break
  kill -0 "$app_pid" 2>/dev/null || { cat "$work/uvicorn.log" >&2; echo "the naive app did not start" >&2; exit 1; }
  sleep 0.2
done
curl -sf "http://127.0.0.1:$port/healthz" > /dev/null || { cat "$work/uvicorn.log" >&2; echo "the naive app does not answer" >&2; exit 1; }
# Warm-up: both workers up, their pools connected and statements prepared.
wrk -t2 -c64 -d2s -s bench/naive/wrk.lua "http://127.0.0.1:$port" -- "$work/tokens.lua" > /dev/null
for c in $callers; do
  wrk -t$(( c < 2 ? c : 2 )) -c"$c" -d"${secs}s" -s bench/naive/wrk.lua "http://127.0.0.1:$port" -- "$work/tokens.lua" > "$work/wrk-$c.txt"
  grep -q '^wrk ' "$work/wrk-$c.txt" || { cat "$work/wrk-$c.txt" >&2; echo "wrk printed no figures" >&2; exit 1; }
  read -r _ r _ p non2xx errs < <(grep '^wrk ' "$work/wrk-$c.txt")
  rate[naive,$c]=$r; p99[naive,$c]=$p
  [ "$non2xx" = 0 ] && [ "$errs" = 0 ] || echo "warning: naive at $c: $non2xx non-2xx answers, $errs socket errors" >&2
  echo "naive $c: $r req/s, p99 $p ms"
done
kill "$app_pid"; wait "$app_pid" 2>/dev/null || true; app_pid=""

if [ -z "$ls_out" ]; then
  echo "== lockstep bench on postgres"
  q "$admin" -c "DROP DATABASE IF EXISTS ${db}_ls WITH (FORCE)" -c "CREATE DATABASE ${db}_ls"
  "$bin" bench --database "$base/${db}_ls" --callers "${callers// /,}" --seconds "$secs" --calls commit,authorize,get \
    --subjects $subjects 2>/dev/null | tee "$work/lockstep.txt"
  q "$admin" -c "DROP DATABASE IF EXISTS ${db}_ls WITH (FORCE)"
  ls_out=$work/lockstep.txt
fi
while read -r call c r p50 p rest; do
  case $call in commit|authorize|get) rate[ls_$call,$c]=$r; p99[ls_$call,$c]=$p ;; esac
done < "$ls_out"
q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"

# The table.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "" || b == "" || b == 0) print "-"; else printf "%.2f", a / b }'; }
{
  printf 'PostgreSQL at the floor (issue 12), one sitting, %s s per phase; rates per second, p99 in ms\n' "$secs"
  printf '%-58s' workload; for c in $callers; do printf ' %9s %8s' "$c: /s" p99; done; printf '\n'
  for row in "six|pgbench 6-statement commit tx (floor-commit.sql)" \
             "one|pgbench one-statement commit (floor-one-statement.sql)" \
             "naive|naive FastAPI+asyncpg, 2 workers (wrk, HTTP)" \
             "ls_commit|Lockstep AuthorizeAndCommit" \
             "decide|pgbench read-only decision tx (floor-decide.sql)" \
             "ls_authorize|Lockstep Authorize" \
             "ls_get|Lockstep GetEntity"; do
    k=${row%%|*}; printf '%-58s' "${row#*|}"
    for c in $callers; do printf ' %9s %8s' "${rate[$k,$c]:--}" "${p99[$k,$c]:--}"; done; printf '\n'
  done
  printf '%-58s' "ratio (target)"; for c in $callers; do printf ' %18s' "$c callers"; done; printf '\n'
  for row in "rate|ls_commit|six|Lockstep commit / 6-statement (>= 0.8)" \
             "rate|ls_commit|naive|Lockstep commit / naive (>= 2)" \
             "rate|ls_commit|one|Lockstep commit / one-statement (stretch >= 0.5)" \
             "rate|ls_authorize|decide|Lockstep authorize / read-only decision (>= 0.8)" \
             "rate|ls_get|decide|Lockstep get / read-only decision (>= 0.8)" \
             "p99|ls_commit|six|p99 Lockstep commit / p99 6-statement (<= 2)" \
             "p99|ls_authorize|decide|p99 Lockstep authorize / p99 read-only decision"; do
    IFS='|' read -r what a b label <<< "$row"
    printf '%-58s' "$label"
    for c in $callers; do
      if [ "$what" = rate ]; then x=$(ratio "${rate[$a,$c]:-}" "${rate[$b,$c]:-}"); else x=$(ratio "${p99[$a,$c]:-}" "${p99[$b,$c]:-}"); fi
      printf ' %18s' "$x"
    done
    printf '\n'
  done
} > "$out/floor.txt"
echo workload,callers,rate,p99_ms > "$out/floor.csv"
for k in six one naive ls_commit decide ls_authorize ls_get; do
  for c in $callers; do echo "$k,$c,${rate[$k,$c]:-},${p99[$k,$c]:-}" >> "$out/floor.csv"; done
done
echo; cat "$out/floor.txt"
