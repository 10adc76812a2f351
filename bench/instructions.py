#!/usr/bin/env python3
"""Instructions per forwarded request, counted by valgrind's callgrind
(repeatable, unlike timings on a shared machine; `perf stat -e
instructions` is not available in this VM).

The server under test runs under callgrind with one worker; the upstream
is a plain `gateway counter` (not measured). A client sends N keep-alive
`GET /` on a few connections, twice (N1 and N2 requests, separate runs),
and the per-request cost is (I(N2) - I(N1)) / (N2 - N1), which cancels
start-up and shutdown.

With --tls the server under test serves HTTPS (TLS 1.3, an ECDSA P-256
certificate made with openssl for the run) and the client speaks it; with
--upstream-tls NGINX the gateway reaches its counter over https, through
that nginx terminating TLS in front of the counter (not measured either).

  bench/instructions.py --gateway target/release/gateway --backend tokio
  bench/instructions.py --nginx /usr/sbin/nginx
  bench/instructions.py --gateway target/release/gateway --tls
  bench/instructions.py --gateway target/release/gateway --upstream-tls /usr/sbin/nginx
  bench/instructions.py --gateway target/release/gateway --idle 15000

With --idle N, N keep-alive connections are opened before the measured
requests of both runs, each answered one `GET /`, and left idle
(parked) through them: whether a crowd of idle connections costs the busy
ones instructions. Opening them costs the same in both runs and cancels
out. Each needs a descriptor here and in the server (`ulimit -n`).
"""
import argparse
import os
import re
import signal
import socket
import ssl
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


def make_certificates(workdir):
    """A CA and an ECDSA P-256 leaf for localhost and 127.0.0.1, by openssl;
    returns (ca, leaf chain, key) paths."""
    ca, ca_key = f"{workdir}/ca.pem", f"{workdir}/ca.key"
    leaf, key, csr = f"{workdir}/leaf.pem", f"{workdir}/leaf.key", f"{workdir}/leaf.csr"
    ext = f"{workdir}/leaf.ext"
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bench CA"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", leaf, "-days", "2", "-extfile", ext],
    ):
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return ca, leaf, key


def drive(port, total, connections=4, tls=None):
    """Sends `total` keep-alive GETs over `connections` connections (TLS,
    with the client context `tls`, when given)."""
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
        if tls:
            s = tls.wrap_socket(s, server_hostname="localhost")
        buf = b""
        for _ in range(count):
            s.sendall(request)
            head, buf = read_answer(s, buf)
            if not head.startswith("HTTP/1.1 200"):
                errors.append(head.splitlines()[0])
        s.close()

    threads = [threading.Thread(target=one, args=(total // connections,)) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        sys.exit(f"{len(errors)} failed requests or connections, e.g. {errors[0]}")


def read_answer(s, buf):
    """Reads one whole answer (a Content-Length body) from `s` after what
    `buf` holds; returns (its head, what was read past it)."""
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].decode("latin1")
            m = re.search(r"(?i)content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(buf) >= head_end + 4 + length:
                return head, buf[head_end + 4 + length:]
        chunk = s.recv(65536)
        if not chunk:
            raise RuntimeError("server closed the connection")
        buf += chunk


def hold_idle(port, count, tls=None):
    """Opens `count` keep-alive connections, one answered `GET /` each, and
    returns them open, idle."""
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = tls.wrap_socket(s, server_hostname="localhost")
        s.sendall(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
        head, _ = read_answer(s, b"")
        if not head.startswith("HTTP/1.1 200"):
            sys.exit(f"an idle connection's request failed: {head.splitlines()[0]}")
        held.append(s)
    return held


def callgrind_total(out_file):
    with open(out_file) as f:
        for line in f:
            if line.startswith("totals:") or line.startswith("summary:"):
                return int(line.split()[1])
    sys.exit(f"no totals in {out_file}")


def measure(args, counter_port, requests, workdir, certificates):
    port = free_port()
    ca, leaf, key = certificates
    ssl_directives = f"ssl_certificate {leaf}; ssl_certificate_key {key}; ssl_protocols TLSv1.3;"
    out = os.path.join(workdir, f"callgrind.{requests}.out")
    # Idle connections must outlast both runs, slow as they are under
    # callgrind: no idle timeout may close them in one and not the other.
    idle_timeout = 3600 if args.idle else None
    if args.nginx:
        conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(f"""
worker_processes 1; master_process off; daemon off;
pid {workdir}/nginx.pid; error_log {workdir}/error.log warn;
events {{ worker_connections {1024 + args.idle}; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/b; proxy_temp_path {workdir}/p;
  fastcgi_temp_path {workdir}/f; uwsgi_temp_path {workdir}/u; scgi_temp_path {workdir}/s;
  upstream counter {{ server 127.0.0.1:{counter_port}; keepalive 64; keepalive_requests 1000000; }}
  keepalive_requests 1000000;
  {f"keepalive_timeout {idle_timeout}s;" if idle_timeout else ""}
  server {{
    listen 127.0.0.1:{port}{" ssl" if args.tls else ""};
    {ssl_directives if args.tls else ""}
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
{f'tls_cert = "{leaf}"' if args.tls else ""}
{f'tls_key = "{key}"' if args.tls else ""}
{f"idle_timeout_ms = {idle_timeout * 1000}" if idle_timeout else ""}
[upstream]
{f'url = "https://localhost:{counter_port}/counter"' if args.upstream_tls else f'url = "http://127.0.0.1:{counter_port}/counter"'}
{f'tls_ca = "{ca}"' if args.upstream_tls else ""}
[log]
level = "warn"
""")
        command = [args.gateway, "--config", conf]
    server = subprocess.Popen(
        ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *command],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    tls = None
    if args.tls:
        tls = ssl.create_default_context(cafile=ca)
        tls.minimum_version = ssl.TLSVersion.TLSv1_3
    idle = hold_idle(port, args.idle, tls)
    drive(port, requests, tls=tls)
    server.send_signal(signal.SIGTERM if not args.nginx else signal.SIGQUIT)
    server.wait(timeout=300)
    for s in idle:
        s.close()
    return callgrind_total(out)


def tls_terminator(nginx, counter_port, workdir, certificates):
    """An nginx serving https on a new port in front of the counter, with
    keep-alive both ways; returns the process and its port."""
    ca, leaf, key = certificates
    port = free_port()
    conf = os.path.join(workdir, "terminator.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1; master_process off; daemon off;
pid {workdir}/terminator.pid; error_log {workdir}/terminator.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off; keepalive_requests 1000000;
  client_body_temp_path {workdir}/tb; proxy_temp_path {workdir}/tp;
  fastcgi_temp_path {workdir}/tf; uwsgi_temp_path {workdir}/tu; scgi_temp_path {workdir}/ts;
  upstream counter {{ server 127.0.0.1:{counter_port}; keepalive 64; keepalive_requests 1000000; }}
  server {{
    listen 127.0.0.1:{port} ssl; ssl_certificate {leaf}; ssl_certificate_key {key};
    location / {{ proxy_pass http://counter; proxy_http_version 1.1; proxy_set_header Connection ""; }}
  }}
}}
""")
    process = subprocess.Popen([nginx, "-c", conf, "-p", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return process, port


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", help="gateway binary to measure")
    parser.add_argument("--backend", default="tokio")
    parser.add_argument("--nginx", help="nginx binary to measure instead")
    parser.add_argument("--counter", help="gateway binary to run the counter (default: --gateway)")
    parser.add_argument("--requests", type=int, nargs=2, default=[2000, 12000])
    parser.add_argument("--tls", action="store_true", help="the server under test serves HTTPS")
    parser.add_argument("--idle", type=int, default=0, metavar="N",
                        help="N keep-alive connections left idle through the measured requests")
    parser.add_argument("--upstream-tls", metavar="NGINX",
                        help="reach the counter over https, through this nginx (the gateway only)")
    args = parser.parse_args()
    if args.upstream_tls and args.nginx:
        sys.exit("--upstream-tls measures the gateway's https client; not with --nginx")
    counter_binary = args.counter or args.gateway
    if not counter_binary:
        sys.exit("--counter (a gateway binary) is needed with --nginx")
    counter_port = free_port()
    counter = subprocess.Popen(
        [counter_binary, "counter", "--listen", f"127.0.0.1:{counter_port}", "--workers", "1",
         "--store", "memory"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    terminator = None
    try:
        wait_port(counter_port)
        with tempfile.TemporaryDirectory() as workdir:
            certificates = make_certificates(workdir)
            if args.upstream_tls:
                terminator, counter_port = tls_terminator(args.upstream_tls, counter_port, workdir, certificates)
            low, high = args.requests
            i_low = measure(args, counter_port, low, workdir, certificates)
            i_high = measure(args, counter_port, high, workdir, certificates)
    finally:
        for process in (terminator, counter):
            if process:
                process.terminate()
                process.wait()
    per_request = (i_high - i_low) / (high - low)
    name = "nginx" if args.nginx else f"gateway ({args.backend})"
    name += " over TLS" if args.tls else ""
    name += ", https upstream" if args.upstream_tls else ""
    name += f", {args.idle:,} idle connections open" if args.idle else ""
    print(f"{name}: {per_request:,.0f} instructions per request "
          f"({i_low:,} for {low}, {i_high:,} for {high})")


if __name__ == "__main__":
    main()
