# Sourced by the scripts here: starts `lockstep demo` on a free loopback port in a temp
# dir and sets $bin, $work, $port and $db; stops it and cleans up on exit.
bin="$(pwd)/${LOCKSTEP_BIN:-target/debug/lockstep}"
[ -x "$bin" ] || { echo "no binary at $bin: cargo build first"; exit 1; }
work=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
(cd "$work" && exec "$bin" demo --listen "127.0.0.1:$port" > demo.out 2> demo.err) &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do grep -q "export CAROL" "$work/demo.out" 2>/dev/null && break; sleep 0.1; done
grep -q "export CAROL" "$work/demo.out" || { cat "$work/demo.err"; echo "lockstep demo did not start"; exit 1; }
db="sqlite://$work/lockstep.db"
