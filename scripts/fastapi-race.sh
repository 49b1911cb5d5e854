#!/usr/bin/env bash
# Races logouts, ownership transfers and bans (a plain SQL insert into memberships)
# against writes through examples/fastapi — the naive FastAPI service (decode, check,
# write) beside the same service over Lockstep — on SQLite and on PostgreSQL, and prints
# for each the writes that landed after the revoking change had returned: naive > 0,
# Lockstep 0 (else this exits 1).
#
# Builds nothing: uses target/debug/lockstep (or $LOCKSTEP_BIN). Python packages go to
# examples/fastapi/.venv (reinstalled when requirements.txt changes). Each backend gets a
# fresh database: a temp SQLite file, and a PostgreSQL database on 127.0.0.1:5432 (user
# postgres) dropped at exit. Without PostgreSQL its half prints SKIPPED; under CI=true it
# fails instead. NAIVE_WORK_MS (default 50) is the pause both paths take between deciding
# and writing (see examples/fastapi/app.py). Takes about 15 seconds (plus the venv, once).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
case "${LOCKSTEP_BIN:=target/debug/lockstep}" in
  /*) bin=$LOCKSTEP_BIN ;;
  *) bin="$root/$LOCKSTEP_BIN" ;;
esac
[ -x "$bin" ] || { echo "no binary at $bin: cargo build first"; exit 1; }
ex="$root/examples/fastapi"
pg_host=${PGHOST:-127.0.0.1} pg_port=${PGPORT:-5432} pg_user=${PGUSER:-postgres}
export NAIVE_WORK_MS="${NAIVE_WORK_MS:-50}"

venv="$ex/.venv"
want=$(sha256sum "$ex/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "== installing examples/fastapi/requirements.txt into $venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet -r "$ex/requirements.txt"
  echo "$want" > "$venv/.requirements.sha256"
fi
py="$venv/bin/python"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Waits up to 15 s for a TCP port to accept; on failure prints the log and fails.
wait_port() {
  for _ in $(seq 1 150); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "$2 did not start; its log:"; cat "$3"; return 1
}

# One backend, from an empty database to the race table. A subshell: `set -e` holds in it
# (it would not in a function called with ||), and its trap stops what it started.
run() (
  backend=$1 dir="$work/$1" pids=() pgdb=
  stop() {
    for p in ${pids[@]+"${pids[@]}"}; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    [ -z "$pgdb" ] || dropdb -h "$pg_host" -p "$pg_port" -U "$pg_user" --if-exists "$pgdb" || true
  }
  trap stop EXIT
  trap 'exit 130' INT TERM
  set -e
  mkdir -p "$dir"
  echo "== $backend"
  if [ "$backend" = sqlite ]; then
    db="sqlite://$dir/app.db"
    "$py" -c 'import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); [c.executescript(open(f).read()) for f in sys.argv[2:]]' \
      "$dir/app.db" "$ex/schema.sqlite.sql" "$ex/seed.sql"
  else
    pgdb="lockstep_fastapi_$$"
    createdb -h "$pg_host" -p "$pg_port" -U "$pg_user" "$pgdb"
    psql -q -h "$pg_host" -p "$pg_port" -U "$pg_user" -d "$pgdb" -v ON_ERROR_STOP=1 \
      -f "$ex/schema.postgres.sql" -f "$ex/seed.sql"
    db="postgres://$pg_user@$pg_host:$pg_port/$pgdb"
  fi
  export LOCKSTEP_DATABASE_URL="$db" LOCKSTEP_MAPPING="$ex/mapping.toml"
  head -c 32 /dev/urandom > "$dir/secret"
  # The application's tables exist and hold rows; now Lockstep's part (warnings only: the
  # CLI's INFO lines are sqlx's "already exists, skipping" notices on PostgreSQL).
  LOCKSTEP_LOG=warn "$bin" policies put --policies "$ex/policies.cedar" --schema "$ex/schema.cedarschema"
  LOCKSTEP_LOG=warn "$bin" keys add --kid app --alg HS256 --secret-file "$dir/secret"
  LOCKSTEP_LOG=warn "$bin" mapping install   # and checks the mapping against the tables and the schema

  lport=$(free_port)
  "$bin" serve --listen "127.0.0.1:$lport" > "$dir/lockstep.log" 2>&1 &
  pids+=($!)
  wait_port "$lport" "lockstep serve" "$dir/lockstep.log"
  aport=$(free_port)
  DATABASE_URL="$db" LOCKSTEP_ADDR="127.0.0.1:$lport" JWT_SECRET_FILE="$dir/secret" \
    "$venv/bin/uvicorn" app:app --app-dir "$ex" --host 127.0.0.1 --port "$aport" --no-access-log \
    > "$dir/app.log" 2>&1 &
  pids+=($!)
  wait_port "$aport" "the FastAPI app" "$dir/app.log"

  rc=0
  timeout 120 "$py" "$ex/race.py" --app "http://127.0.0.1:$aport" --database "$db" --secret-file "$dir/secret" --kid app \
    | tee "$dir/race.out" || rc=$?
  grep -E "^$backend " "$dir/race.out" >> "$work/table" || true
  if [ "$rc" != 0 ]; then
    echo "-- lockstep serve log (last 30 lines):"; tail -n 30 "$dir/lockstep.log"
    echo "-- FastAPI app log (last 30 lines):"; tail -n 30 "$dir/app.log"
  fi
  exit "$rc"
)

failed=()
for backend in sqlite postgres; do
  if [ "$backend" = postgres ] && ! { command -v pg_isready >/dev/null && pg_isready -h "$pg_host" -p "$pg_port" -q; }; then
    if [ "${CI:-}" = true ]; then
      echo "FAILED: no PostgreSQL at $pg_host:$pg_port (CI=true: the PostgreSQL half is required)"
      failed+=(postgres)
    else
      echo "SKIPPED: postgres — no PostgreSQL at $pg_host:$pg_port (under CI=true this fails)"
    fi
    continue
  fi
  set +e
  run "$backend"
  rc=$?
  set -e
  [ "$rc" = 0 ] || failed+=("$backend")
done

echo
echo "== writes that landed after the revoking call returned (NAIVE_WORK_MS=$NAIVE_WORK_MS)"
printf '%-9s%-10s%-10s%7s%6s  %-14s%12s%21s\n' backend path change writes ok refused overlapping "landed after revoke"
cat "$work/table" 2>/dev/null || true
if [ ${#failed[@]} -gt 0 ]; then
  echo "fastapi race: FAILED on ${failed[*]} (${SECONDS}s)"
  exit 1
fi
echo "fastapi race: Lockstep let no write land after a revocation (${SECONDS}s)"
