#!/usr/bin/env bash
# One run: the raw limit (pgbench running exactly the store's statements for one
# AuthorizeAndCommit; the same transaction on bare SQLite) beside Lockstep on SQLite and
# PostgreSQL at 1, 16 and 64 callers, and each Lockstep/raw ratio; then the same with
# the entities in the application's own tables (--mapped) and the cost ratio; and, from the
# same Lockstep run on PostgreSQL, issue 12's comparison with the job done without Lockstep
# (bench/floor.sh: pgbench on the 6-statement correctly locked transaction, the one-statement
# floor and a read-only decision on a schema of their own; the naive FastAPI peer over HTTP).
# Figures only.
# Usage: bench/run.sh [SECONDS]   (needs a release build: cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
bin=target/release/lockstep
[ -x "$bin" ] || { echo "cargo build --release first"; exit 1; }
admin=${LOCKSTEP_TEST_PG:-postgres://postgres@127.0.0.1:5432/test}
base=${admin%/*}
pgdb=lockstep_bench
subjects=1000
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

psql -q "$admin" -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)" -c "CREATE DATABASE $pgdb"
sqlite="sqlite://$work/bench.db"

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; commit $(git rev-parse --short HEAD)"
declare -A ls_rate ls_p99 raw_rate raw_p99
for backend in sqlite postgres; do
  url=$sqlite; [ "$backend" = postgres ] && url="$base/$pgdb"
  echo "== lockstep bench on $backend"
  "$bin" bench --database "$url" --callers 1,16,64 --seconds "$secs" --calls commit,authorize,get --subjects $subjects 2>/dev/null \
    | tee "$work/$backend.txt"
  while read -r call callers rate p50 p99 p999 rest; do
    [ "$call" = commit ] || continue
    ls_rate[$backend,$callers]=$rate; ls_p99[$backend,$callers]=$p99
  done < "$work/$backend.txt"
  if [ "$backend" = sqlite ]; then
    # The same server with one transaction (one fsync) per call, for comparison.
    echo "== lockstep bench on sqlite, group commit off"
    "$bin" bench --database "sqlite://$work/nogroup.db" --sqlite-group-commit false --callers 1,16,64 --seconds "$secs" \
      --calls commit --subjects $subjects 2>/dev/null
  fi
done

# Issue 12: the same job without Lockstep, beside this run's PostgreSQL figures.
out=${BENCH_OUT:-bench/out}
mkdir -p "$out"
BENCH_OUT=$out bench/floor.sh "$secs" "$work/postgres.txt"

# The same commits with users and items in the application's own tables (--mapped,
# docs/mapping.md), in the same sitting: own store and mapped tables alternate, three rounds
# each (the machine's noise between two 5 s runs is ±15 %), and the means are compared.
declare -A mp_rate mp_p99 own_sum map_sum
rounds=${MAPPED_ROUNDS:-3}
for backend in sqlite postgres; do
  for c in 1 16 64; do own_sum[$backend,$c]=0; map_sum[$backend,$c]=0; done
  for r in $(seq 1 "$rounds"); do
    for kind in own mapped; do
      url="sqlite://$work/$kind-$r.db"; flag=""; [ "$kind" = mapped ] && flag=--mapped
      if [ "$backend" = postgres ]; then
        psql -q "$admin" -c "DROP DATABASE IF EXISTS ${pgdb}_$kind WITH (FORCE)" -c "CREATE DATABASE ${pgdb}_$kind"
        url="$base/${pgdb}_$kind"
      fi
      "$bin" bench $flag --database "$url" --callers 1,16,64 --seconds "$secs" --calls commit --subjects $subjects 2>/dev/null \
        > "$work/$backend-$kind-$r.txt"
      while read -r call callers rate p50 p99 p999 rest; do
        [ "$call" = commit ] || continue
        if [ "$kind" = own ]; then own_sum[$backend,$callers]=$(( ${own_sum[$backend,$callers]} + rate ))
        else map_sum[$backend,$callers]=$(( ${map_sum[$backend,$callers]} + rate )); mp_p99[$backend,$callers]=$p99; fi
      done < "$work/$backend-$kind-$r.txt"
    done
  done
  [ "$backend" = postgres ] && psql -q "$admin" -c "DROP DATABASE IF EXISTS ${pgdb}_own WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${pgdb}_mapped WITH (FORCE)"
done

for c in 1 16 64; do
  PGOPTIONS="-c search_path=lockstep -c plan_cache_mode=force_generic_plan" pgbench -n -M prepared -f bench/pgbench-commit.sql -D subjects=$subjects -c $c -j $(( c < 2 ? c : 2 )) -T "$secs" -l --log-prefix="$work/pgb$c" "$base/$pgdb" > "$work/pgbench$c.txt" 2>&1
  raw_rate[postgres,$c]=$(awk '/^tps/ {printf "%.0f", $3}' "$work/pgbench$c.txt")
  raw_p99[postgres,$c]=$(cat "$work"/pgb$c* | awk '{print $3/1000}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f", a[int(NR*0.99)]}')
  read -r r _ p99 < <(python3 bench/sqlite_raw.py "$work/bench.db" $c "$secs" $subjects)
  raw_rate[sqlite,$c]=$r; raw_p99[sqlite,$c]=$p99
done

echo backend,callers,lockstep_rate,raw_rate,lockstep_p99_ms,raw_p99_ms > "$out/results.csv"
printf '\nAuthorizeAndCommit, Lockstep beside the raw limit\n'
printf '%-10s %7s %14s %14s %8s %12s %12s\n' backend callers lockstep/s raw/s ratio "p99 ls ms" "p99 raw ms"
for backend in sqlite postgres; do
  for c in 1 16 64; do
    l=${ls_rate[$backend,$c]}; r=${raw_rate[$backend,$c]}
    printf '%-10s %7s %14s %14s %8s %12s %12s\n' $backend $c "$l" "$r" "$(python3 -c "print(f'{$l/$r:.2f}')")" "${ls_p99[$backend,$c]}" "${raw_p99[$backend,$c]}"
    echo "$backend,$c,$l,$r,${ls_p99[$backend,$c]},${raw_p99[$backend,$c]}" >> "$out/results.csv"
  done
done
printf '\nAuthorizeAndCommit on the application'"'"'s tables (--mapped) beside Lockstep'"'"'s own store, mean of %s alternating rounds\n' "$rounds"
printf '%-10s %7s %12s %12s %16s %12s\n' backend callers own/s mapped/s "mapped cost" "p99 map ms"
for backend in sqlite postgres; do
  for c in 1 16 64; do
    o=$(( ${own_sum[$backend,$c]} / rounds )); m=$(( ${map_sum[$backend,$c]} / rounds ))
    printf '%-10s %7s %12s %12s %16s %12s\n' $backend $c "$o" "$m" "$(python3 -c "print(f'{$o/$m:.2f}x')")" "${mp_p99[$backend,$c]}"
  done
done
echo; cat "$out/floor.txt"
python3 bench/plot.py "$out/results.csv" "$out/bench.svg"
echo "plot: $out/bench.svg (data: $out/results.csv)"
psql -q "$admin" -c "DROP DATABASE IF EXISTS $pgdb WITH (FORCE)"
