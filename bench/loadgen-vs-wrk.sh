#!/usr/bin/env bash
# Checks that the bench's load generator is not the bottleneck: against the
# same target (nginx answering a fixed 200, one worker, on the first CPU),
# from the same load CPU, its requests/s should be within 10% of wrk's.
# Needs nginx and wrk (apt-get install nginx-light wrk).
set -euo pipefail
cd "$(dirname "$0")/.."
target_cpu=${TARGET_CPU:-0}
load_cpu=${LOAD_CPU:-1}
duration=${DURATION:-10s}
dir=$(mktemp -d)
trap 'kill "$nginx_pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body; proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi; uwsgi_temp_path $dir/uwsgi; scgi_temp_path $dir/scgi;
  server {
    listen 127.0.0.1:$port backlog=4096;
    location = / { default_type "text/plain; charset=utf-8"; return 200 "Welcome to my site!"; }
  }
}
CONF
taskset -c "$target_cpu" nginx -c "$dir/nginx.conf" -p "$dir" &
nginx_pid=$!
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
cargo run --release -q -p bench -- --target "127.0.0.1:$port" --wrk \
  --cpus "load=$load_cpu" --connections "${CONNECTIONS:-16,64,256}" \
  --duration "$duration" --out "${OUT:-target/bench/loadgen-vs-wrk}"
