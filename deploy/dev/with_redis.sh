#!/usr/bin/env bash
# Runs a command with SYNTHPERF_TEST_REDIS_URL pointing at a real Redis: the one on
# 127.0.0.1:6379 when it answers, otherwise a private redis-server on a free loopback port,
# stopped afterwards.
set -uo pipefail
py=${PYTHON:-.venv/bin/python}
if "$py" - <<'PY' 2>/dev/null
import socket
s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
s.sendall(b"PING\r\n")
assert s.recv(16).startswith(b"+PONG")
PY
then
  export SYNTHPERF_TEST_REDIS_URL=${SYNTHPERF_TEST_REDIS_URL:-redis://127.0.0.1:6379/15}
  exec "$@"
fi
port=$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$dir" --daemonize yes \
  --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
for _ in $(seq 50); do [ -s "$dir/redis.pid" ] && break; sleep 0.1; done
export SYNTHPERF_TEST_REDIS_URL="redis://127.0.0.1:$port/0"
echo "started a private redis-server on 127.0.0.1:$port"
"$@"; rc=$?
kill "$(cat "$dir/redis.pid")" 2>/dev/null; rm -rf "$dir"
exit $rc
