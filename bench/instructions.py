#!/usr/bin/env python3
"""Instructions per forwarded request, counted by valgrind's callgrind
(repeatable, unlike timings on a shared machine; `perf stat -e
instructions` is not available in this VM).

The server under test runs under callgrind with one worker; the upstream
is a plain `gateway counter` (not measured). A client sends N keep-alive
`GET /` on a few connections, twice (N1 and N2 requests, separate runs),
and the per-request cost is (I(N2) - I(N1)) / (N2 - N1), which cancels
start-up and shutdown.

  bench/instructions.py --gateway target/release/gateway --backend tokio
  bench/instructions.py --nginx /usr/sbin/nginx
"""
import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, limit=60):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listening on {port}")


def drive(port, total, connections=4):
    """Sends `total` keep-alive GETs over `connections` connections."""
    request = b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n"
    errors = []

    def one(count):
        try:
            run(count)
        except Exception as e:  # a thread's exception must fail the run
            errors.append(repr(e))

    def run(count):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        for _ in range(count):
            s.sendall(request)
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    head = buf[:head_end].decode("latin1")
                    m = re.search(r"(?i)content-length:\s*(\d+)", head)
                    length = int(m.group(1)) if m else 0
                    if len(buf) >= head_end + 4 + length:
                        if not head.startswith("HTTP/1.1 200"):
                            errors.append(head.splitlines()[0])
                        buf = buf[head_end + 4 + length:]
                        break
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError("server closed the connection")
                buf += chunk
        s.close()

    threads = [threading.Thread(target=one, args=(total // connections,)) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"{len(errors)} failed requests or connections, e.g. {errors[0]}")


def callgrind_total(out_file):
    with open(out_file) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    sys.exit(f"no totals in {out_file}")


def measure(args, counter_port, requests, workdir):
    port = free_port()
    out = os.path.join(workdir, f"callgrind.{requests}.out")
    if args.nginx:
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 1; master_process off; daemon off;
pid {workdir}/nginx.pid; error_log {workdir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/b; proxy_temp_path {workdir}/p;
  fastcgi_temp_path {workdir}/f; uwsgi_temp_path {workdir}/u; scgi_temp_path {workdir}/s;
  upstream counter {{ server 127.0.0.1:{counter_port}; keepalive 64; keepalive_requests 1000000; }}
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port};
    location = / {{
      proxy_pass http://counter/counter; proxy_method POST; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_pass_request_body off;
      proxy_set_header Content-Length 0;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
""")
        command = [args.nginx, "-c", conf, "-p", workdir]
    else:
        conf = os.path.join(workdir, "gateway.toml")
        with open(conf, "w") as f:
            f.write(f"""
[runtime]
backend = "{args.backend}"
workers = 1
[server]
listen = "127.0.0.1:{port}"
[upstream]
url = "http://127.0.0.1:{counter_port}/counter"
[log]
level = "warn"
""")
        command = [args.gateway, "--config", conf]
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    drive(port, requests)
    server.send_signal(signal.SIGTERM if not args.nginx else signal.SIGQUIT)
    server.wait(timeout=120)
    return callgrind_total(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="gateway binary to measure")
    parser.add_argument("--backend", default="tokio")
    parser.add_argument("--nginx", help="nginx binary to measure instead")
    parser.add_argument("--counter", help="gateway binary to run the counter (default: --gateway)")
    parser.add_argument("--requests", type=int, nargs=2, default=[2000, 12000])
    args = parser.parse_args()
    counter_binary = args.counter or args.gateway
    if not counter_binary:
        sys.exit("--counter (a gateway binary) is needed with --nginx")
    counter_port = free_port()
    counter = subprocess.Popen(
        [counter_binary, "counter", "--listen", f"127.0.0.1:{counter_port}", "--workers", "1",
         "--store", "memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(counter_port)
        with tempfile.TemporaryDirectory() as workdir:
            low, high = args.requests
            i_low = measure(args, counter_port, low, workdir)
            i_high = measure(args, counter_port, high, workdir)
    finally:
        counter.terminate()
        counter.wait()
    per_request = (i_high - i_low) / (high - low)
    name = "nginx" if args.nginx else f"gateway ({args.backend})"
    print(f"{name}: {per_request:,.0f} instructions per request "
          f"({i_low:,} for {low}, {i_high:,} for {high})")


if __name__ == "__main__":
    main()
