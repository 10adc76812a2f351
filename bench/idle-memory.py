#!/usr/bin/env python3
"""Memory per idle keep-alive connection: the gateway (tokio, smol) and nginx.

Method, for each server and each scheme (plain HTTP, then HTTPS):

1. Start the server alone: the gateway with one worker
   (`runtime.workers = 1`), or nginx with one worker; both proxy `GET /`
   to one `gateway counter --store memory` process that the script starts
   first and whose memory is not counted.
2. Read the server's RSS (VmRSS of the process and all its descendants:
   nginx has a master and a worker).
3. Open N keep-alive connections to its public listener in waves of W:
   each wave connects (and, for HTTPS, completes the handshake) on W
   connections, sends one `GET /` on each, and reads each full answer
   (the head, then the Content-Length body) before the next wave starts,
   so that no more than W requests are ever in flight and the heap's burst
   high-water mark stays small.
4. Leave them all idle for --idle-secs, read the RSS again, and report
   (RSS after - RSS before) / N in bytes.
5. Send a second `GET /` on a sample of the idle connections (spread over
   all waves, the first, longest idle, included) and check it is answered
   200 too: an idle connection must still serve. Then close everything
   and stop the server.

Every first answer must be 200; the table's "answers ok" column gives
first answers ok / N and second answers ok / sample, per scheme.

HTTP/2 (--http2): every connection speaks HTTP/2 instead of HTTP/1.1,
with prior knowledge (h2c) on plain HTTP and by ALPN `h2` with HTTPS (a
handshake that selects anything else counts as a failed connection). A
connection sends the preface, an empty SETTINGS and `GET /` as one
HEADERS frame on stream 1 (the second `GET /` goes on stream 3),
acknowledges the server's SETTINGS, and reads frames until its stream
ends. The answer's status is its first header field, which must be
indexed in HPACK's static table (both servers send 200 so); a GOAWAY or
a reset of the stream fails the answer. nginx listens with `http2`
(1.22's `listen` parameter: without ssl, h2c by prior knowledge only).

What the figure includes: whatever one wave's requests left in the heap
(spread over N), and the upstream connections the server keeps to the
counter (up to W). nginx allocates its connection structures for all
`worker_connections` when its worker starts, so they are in its "before".
Both servers get a keep-alive idle timeout of 900 s, so that no
connection is closed while the waves are opened (HTTPS handshakes from
Python take a while), and the gateway `server.max_connections = N + 1024`.
The timeout covers HTTP/2 too: the gateway's `server.idle_timeout_ms` ends an
HTTP/2 connection with no stream open, and nginx's `keepalive_timeout`
has replaced `http2_idle_timeout` (obsolete since 1.19.7).

HTTPS: at start a CA and, signed by it, an ECDSA P-256 leaf for
`localhost` and 127.0.0.1 are made with `openssl`; both servers serve the
leaf + CA chain, TLS 1.3 only. The client (Python's ssl module) verifies
it against the CA unless --insecure.

Descriptors: the script raises its RLIMIT_NOFILE soft limit to the hard
limit, which the servers inherit (the gateway raises its own soft limit to
the hard limit anyway; nginx gets `worker_rlimit_nofile`). N connections
need N descriptors here and N in the server, plus its upstream ones.

Usage (from the repository root, after `cargo build --release -p gateway`):

  bench/idle-memory.py                       # 10,000 connections, HTTP and HTTPS
  bench/idle-memory.py --connections 2000 --no-tls --backends smol
  bench/idle-memory.py --gateway /tmp/old/gateway --out before.json
  bench/idle-memory.py --http2 --connections 5000

Options: --gateway PATH (target/release/gateway), --nginx PATH (`nginx` on
PATH or in /usr/sbin; the nginx row is skipped, with a message, if there
is none; --nginx none skips it too), --connections N (10000), --wave W
(500), --idle-secs S (3), --sample K (100), --backends tokio,smol,
--no-tls or --tls-only, --http2, --insecure, --timeout-secs T (per
measurement, 600), --out FILE (the table as JSON). Everything runs on
127.0.0.1; every process the script starts is stopped when it ends, on
error too.
Python 3.11, standard library only.
"""

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQUEST = b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n"
# HTTP/2 (--http2): what a GET / needs of it, framed by hand.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY = 0x4, 0x8, 0x20
# The statuses HPACK's static table indexes, by index.
STATIC_STATUSES = {8: 200, 9: 204, 10: 206, 11: 304, 12: 400, 13: 404, 14: 500}
# Keep-alive idle timeouts for both servers, far above a run's length, so
# that no connection is closed for idling while the waves are opened.
IDLE_TIMEOUT_SECS = 900
SOCKET_TIMEOUT_SECS = 30
START_TIMEOUT_SECS = 15


# ----------------------------------------------------------------- options


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Memory per idle keep-alive connection (see the docstring).")
    parser.add_argument("--gateway", default=str(REPO / "target/release/gateway"),
                        help="the gateway binary (default: target/release/gateway)")
    parser.add_argument("--nginx", default=None,
                        help="the nginx binary (default: nginx on PATH; 'none' skips it)")
    parser.add_argument("--connections", type=int, default=10_000, metavar="N")
    parser.add_argument("--wave", type=int, default=500, metavar="W",
                        help="connections opened and answered per wave (500)")
    parser.add_argument("--idle-secs", type=float, default=3.0,
                        help="idle time before the RSS is read (3)")
    parser.add_argument("--sample", type=int, default=100,
                        help="idle connections asked a second time (100)")
    parser.add_argument("--backends", default="tokio,smol",
                        help="gateway backends, comma-separated (tokio,smol)")
    schemes = parser.add_mutually_exclusive_group()
    schemes.add_argument("--no-tls", action="store_true", help="plain HTTP only")
    schemes.add_argument("--tls-only", action="store_true", help="HTTPS only")
    parser.add_argument("--http2", action="store_true",
                        help="connections speak HTTP/2 (h2c by prior knowledge, or ALPN h2)")
    parser.add_argument("--insecure", action="store_true",
                        help="HTTPS client does not verify the certificate")
    parser.add_argument("--timeout-secs", type=float, default=600,
                        help="limit for one measurement (600)")
    parser.add_argument("--out", help="also write the results as JSON to this file")
    args = parser.parse_args()
    args.backends = [b for b in args.backends.split(",") if b]
    for backend in args.backends:
        if backend not in ("tokio", "smol"):
            parser.error(f"--backends: {backend!r} is not tokio or smol")
    if args.connections < 1 or args.wave < 1:
        parser.error("--connections and --wave must be at least 1")
    args.sample = max(0, min(args.sample, args.connections))
    args.schemes = (["http"] if args.no_tls else ["https"] if args.tls_only
                    else ["http", "https"])
    return args


def raise_descriptor_limit(needed: int) -> int:
    """Raises the soft RLIMIT_NOFILE to the hard limit; servers inherit it."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(f"idle-memory: {needed} descriptors needed, the hard limit is {hard}; "
                 "lower --connections")
    return hard


def find_nginx(option: str | None) -> str | None:
    if option == "none":
        return None
    if option:
        return option
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


# ---------------------------------------------------------------- processes


@dataclass
class Server:
    """A process the script started (in a session of its own), and where it listens."""
    name: str
    process: subprocess.Popen
    port: int = 0
    log: Path | None = None
    error_log: Path | None = None  # nginx's own, beside its stderr

    def warnings(self) -> list[str]:
        """Its log lines of level warning or worse."""
        levels = re.compile(r"\b(WARN|ERROR)\b|\[(warn|error|crit|alert|emerg)\]")
        lines = []
        for path in (self.log, self.error_log):
            if path and path.exists():
                lines += [line for line in path.read_text(errors="replace").splitlines()
                          if levels.search(line)]
        return lines

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after 10 s."""
        if self.process.poll() is not None:
            return
        group = self.process.pid  # start_new_session: the group id is its pid
        try:
            os.killpg(group, signal.SIGTERM)
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"idle-memory: {self.name} lingered after SIGTERM; killing it",
                  file=sys.stderr)
            os.killpg(group, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass
        # A worker left behind by a master that exited (nginx) is in the group too.
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spawn(name: str, command: list[str], log: Path) -> Server:
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return Server(name, process, log=log)


def wait_for_listening_line(server: Server) -> int:
    """The port of the gateway's `listening on ADDR` log line."""
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", server.log.read_text())
        if match:
            return int(match.group(1))
        if server.process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not start listening; its log:\n"
                       f"{server.log.read_text()[-2000:]}")


def wait_for_port(server: Server) -> None:
    """Waits until a connection to its port succeeds (then closes it)."""
    deadline = time.monotonic() + START_TIMEOUT_SECS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{server.name} did not start listening; see {server.log}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_counter(gateway: str, work: Path) -> Server:
    command = [gateway, "counter", "--listen", "127.0.0.1:0", "--backend", "tokio",
               "--workers", "1", "--store", "memory"]
    server = spawn("counter", command, work / "counter.log")
    server.port = wait_for_listening_line(server)
    return server


def start_gateway(gateway: str, backend: str, counter_port: int, tls: "Certificates | None",
                  work: Path, connections: int) -> Server:
    name = f"gateway {backend}"
    # Room for every client: the default cap (65,536) would make it warn that
    # the descriptor limit is below what the cap needs.
    max_connections = connections + 1024
    tls_lines = (f'tls_cert = "{tls.chain}"\ntls_key = "{tls.key}"\n' if tls else "")
    config = (
        f'[runtime]\nbackend = "{backend}"\nworkers = 1\n\n'
        f'[server]\nlisten = "127.0.0.1:0"\nmax_connections = {max_connections}\n'
        f'idle_timeout_ms = {IDLE_TIMEOUT_SECS * 1000}\n'
        f'{tls_lines}\n'
        f'[upstream]\nurl = "http://127.0.0.1:{counter_port}/counter"\n\n'
        f'[log]\nlevel = "info"\n')
    config_path = work / f"gateway-{backend}.toml"
    config_path.write_text(config)
    server = spawn(name, [gateway, "--config", str(config_path)],
                   work / f"gateway-{backend}.log")
    server.port = wait_for_listening_line(server)
    return server


# The proxying part is bench/nginx.conf's (each GET / becomes one POST to
# the counter over a keep-alive upstream pool); the rest is sized for N.
NGINX_CONF = """\
worker_processes 1;
worker_rlimit_nofile {rlimit};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {worker_connections}; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream counter {{
    server 127.0.0.1:{counter_port};
    keepalive 1024;
    keepalive_requests 1000000;
  }}
  keepalive_requests 1000000;
  keepalive_timeout {idle_timeout}s;
  server {{
    listen 127.0.0.1:{port} backlog=4096{ssl}{http2};
    {tls}
    location = / {{
      proxy_pass http://counter/counter;
      proxy_method POST;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_pass_request_body off;
      proxy_set_header Content-Length 0;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""


def start_nginx(nginx: str, counter_port: int, tls: "Certificates | None", work: Path,
                connections: int, http2: bool) -> Server:
    directory = work / f"nginx-{'https' if tls else 'http'}"
    directory.mkdir()
    # Each client connection, plus one upstream connection per request in
    # flight (a wave's worth) and the upstream pool: 2N + some covers it.
    # But no more than the descriptors behind them, the hard limit: nginx
    # cannot raise its worker's above it (setrlimit fails even as root in a
    # container), and with waves it needs about N + W + its upstream pool.
    worker_connections = 2 * connections + 2048
    _, rlimit = resource.getrlimit(resource.RLIMIT_NOFILE)
    if rlimit == resource.RLIM_INFINITY or rlimit > worker_connections:
        rlimit = worker_connections
    worker_connections = rlimit
    config = NGINX_CONF.format(
        dir=directory, port=free_port(), counter_port=counter_port,
        worker_connections=worker_connections, rlimit=rlimit,
        idle_timeout=IDLE_TIMEOUT_SECS,
            ssl=" ssl" if tls else "",
        http2=" http2" if http2 else "",
        tls=(f'ssl_certificate "{tls.chain}";\n    ssl_certificate_key "{tls.key}";\n'
             "    ssl_protocols TLSv1.3;") if tls else "# plain HTTP")
    config_path = directory / "nginx.conf"
    config_path.write_text(config)
    port = int(re.search(r"listen 127\.0\.0\.1:(\d+)", config).group(1))
    server = spawn("nginx", [nginx, "-c", str(config_path), "-p", str(directory)],
                   directory / "stderr.log")
    server.port = port
    server.error_log = directory / "error.log"
    wait_for_port(server)
    return server


# --------------------------------------------------------------- certificates


@dataclass
class Certificates:
    chain: Path  # the leaf, then the CA
    key: Path    # the leaf's key, PKCS#8
    ca: Path


def openssl(*arguments: str) -> None:
    subprocess.run(["openssl", *arguments], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE, timeout=60)


def make_certificates(work: Path) -> Certificates:
    """A CA and, signed by it, an ECDSA P-256 leaf for localhost and 127.0.0.1."""
    tls = work / "tls"
    tls.mkdir()
    ca_key, ca, key, csr, leaf = (tls / n for n in
                                  ("ca-key.pem", "ca.pem", "key.pem", "leaf.csr", "leaf.pem"))
    p256 = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    openssl("genpkey", *p256, "-out", str(ca_key))
    openssl("req", "-x509", "-new", "-key", str(ca_key), "-sha256", "-days", "2",
            "-subj", "/CN=idle-memory CA", "-out", str(ca),
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("genpkey", *p256, "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/CN=localhost", "-out", str(csr))
    extensions = tls / "leaf.ext"
    extensions.write_text("basicConstraints=CA:FALSE\n"
                          "keyUsage=critical,digitalSignature\n"
                          "extendedKeyUsage=serverAuth\n"
                          "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-sha256", "-days", "2", "-extfile", str(extensions),
            "-out", str(leaf))
    chain = tls / "chain.pem"
    chain.write_text(leaf.read_text() + ca.read_text())
    return Certificates(chain=chain, key=key, ca=ca)


def client_context(certificates: Certificates, verify: bool, http2: bool) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"] if http2 else ["http/1.1"])
    if verify:
        context.load_verify_locations(cafile=certificates.ca)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


# ------------------------------------------------------------------ memory


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as children:
                    pending.extend(int(child) for child in children.read().split())
        except FileNotFoundError:
            pass
    return found


def rss_kib(pid: int) -> int:
    """VmRSS of pid and its descendants, in KiB."""
    total = 0
    for process in descendants(pid):
        try:
            with open(f"/proc/{process}/status") as status:
                for line in status:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


# ------------------------------------------------------------------ client


def read_response(connection: socket.socket) -> int:
    """Reads one HTTP/1.1 response (head, then the Content-Length body); its status."""
    data = bytearray()
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the head")
        data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
        elif name.strip().lower() == "transfer-encoding":
            raise ValueError(f"transfer-encoding {value.strip()} (only Content-Length is read)")
    if length is None:
        raise ValueError("no Content-Length")
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the body")
        body += chunk
    if len(body) != length:
        raise ValueError(f"{len(body) - length} bytes after the body")
    return status


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (len(payload).to_bytes(3, "big") + bytes([kind, flags])
            + stream.to_bytes(4, "big") + payload)


def http2_request(stream: int, scheme: bytes) -> bytes:
    """GET / on stream; on stream 1, after the preface and an empty SETTINGS."""
    # Literal fields without indexing, named by HPACK's static table
    # (:authority 1, :method 2, :path 4, :scheme 6): the server's decoder
    # table stays empty, so no request depends on an earlier one.
    fields = b"".join(bytes([index, len(value)]) + value for index, value in
                      ((2, b"GET"), (6, scheme), (1, b"localhost"), (4, b"/")))
    headers = frame(HEADERS, END_STREAM | END_HEADERS, stream, fields)
    return PREFACE + frame(SETTINGS, 0, 0) + headers if stream == 1 else headers


def receive_exactly(connection: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = connection.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed before the end of the answer")
        data += chunk
    return bytes(data)


def read_http2_response(connection: socket.socket, stream: int) -> int:
    """Reads frames until stream ends, acknowledging the server's SETTINGS; its status.

    Frame by frame, never past the stream's last one, so that the next
    answer's frames are read whole."""
    status = None
    while True:
        head = receive_exactly(connection, 9)
        kind, flags = head[3], head[4]
        on = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
        payload = receive_exactly(connection, int.from_bytes(head[:3], "big"))
        if kind == SETTINGS and not flags & ACK:
            connection.sendall(frame(SETTINGS, ACK, 0))
        elif kind == GOAWAY:
            last, error = (int.from_bytes(payload[i:i + 4], "big") for i in (0, 4))
            raise ConnectionError(f"GOAWAY (last stream {last & 0x7FFF_FFFF}, error {error})")
        if on != stream:
            continue
        if kind == RST_STREAM:
            raise ConnectionError(f"RST_STREAM, error {int.from_bytes(payload[:4], 'big')}")
        if kind == HEADERS and status is None:
            fields = payload[1:len(payload) - payload[0]] if flags & PADDED else payload
            fields = fields[5:] if flags & PRIORITY else fields
            status = STATIC_STATUSES.get(fields[0] ^ 0x80) if fields else None
            if status is None:
                raise ValueError("the first field is not a :status of the static table")
        elif kind == DATA and status is None:
            raise ValueError("DATA before HEADERS")
        if kind in (HEADERS, DATA) and flags & END_STREAM:
            return status


@dataclass
class Tally:
    """How requests went: ok (200), other statuses, errors by kind."""
    ok: int = 0
    asked: int = 0
    problems: dict[str, int] = field(default_factory=dict)

    def note(self, problem: str) -> None:
        self.problems[problem] = self.problems.get(problem, 0) + 1

    def text(self) -> str:
        extra = "".join(f", {count}x {problem}" for problem, count in self.problems.items())
        return f"{self.ok}/{self.asked}{extra}"


def connect(port: int, context: ssl.SSLContext | None, http2: bool) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_SECS)
    if context is None:
        return connection
    try:
        connection = context.wrap_socket(connection, server_hostname="localhost")
        # The handshake succeeds where the server ignores ALPN.
        if http2 and connection.selected_alpn_protocol() != "h2":
            raise ConnectionError(f"ALPN selected {connection.selected_alpn_protocol()}, not h2")
        return connection
    except BaseException:
        connection.close()
        raise


def ask(connections: list[socket.socket], tally: Tally, request: bytes,
        read: Callable[[socket.socket], int]) -> list[socket.socket]:
    """Sends request (a GET /) on each connection, then reads each answer
    (read returns its status); the ones that answered."""
    sent = []
    for connection in connections:
        tally.asked += 1
        try:
            connection.sendall(request)
            sent.append(connection)
        except OSError as error:
            tally.note(f"send: {type(error).__name__}")
            connection.close()
    answered = []
    for connection in sent:
        try:
            status = read(connection)
        except (OSError, ValueError) as error:
            tally.note(f"read: {type(error).__name__}: {error}"[:80])
            connection.close()
            continue
        answered.append(connection)
        if status == 200:
            tally.ok += 1
        else:
            tally.note(f"status {status}")
    return answered


def open_wave(size: int, port: int, context: ssl.SSLContext | None, http2: bool,
              tally: Tally) -> list[socket.socket]:
    wave = []
    for _ in range(size):
        try:
            wave.append(connect(port, context, http2))
        except OSError as error:
            tally.asked += 1
            tally.note(f"connect: {type(error).__name__}: {error}"[:80])
    return wave


def measure(server: Server, args: argparse.Namespace,
            context: ssl.SSLContext | None) -> dict:
    """The method of the docstring, on one started server."""
    deadline = time.monotonic() + args.timeout_secs
    if args.http2:
        scheme = b"https" if context else b"http"
        first_ask = (http2_request(1, scheme),
                     lambda connection: read_http2_response(connection, 1))
        second_ask = (http2_request(3, scheme),
                      lambda connection: read_http2_response(connection, 3))
    else:
        first_ask = second_ask = (REQUEST, read_response)
    time.sleep(0.5)
    before = rss_kib(server.process.pid)
    first, again = Tally(), Tally()
    idle: list[socket.socket] = []
    started = time.monotonic()
    try:
        while first.asked < args.connections:
            if time.monotonic() > deadline:
                raise RuntimeError("over --timeout-secs while opening waves")
            size = min(args.wave, args.connections - first.asked)
            idle += ask(open_wave(size, server.port, context, args.http2, first), first,
                        *first_ask)
        opened_in = time.monotonic() - started
        time.sleep(args.idle_secs)
        after = rss_kib(server.process.pid)
        step = max(1, len(idle) // args.sample) if args.sample else 0
        sample = idle[::step][:args.sample] if args.sample else []
        ask(sample, again, *second_ask)
    finally:
        for connection in idle:
            connection.close()
    return {
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": round((after - before) * 1024 / args.connections),
        "first_answers": first.text(),
        "first_ok": first.ok,
        "second_answers": again.text(),
        "second_ok": again.ok,
        "all_ok": first.ok == args.connections and again.ok == len(sample),
        "seconds_to_open": round(opened_in, 1),
    }


# ------------------------------------------------------------------ a run


def run_one(name: str, start, args: argparse.Namespace, context) -> dict | None:
    """Starts a server, measures it, stops it; None if it would not start or ran out of time."""
    server = None
    try:
        server = start()
        result = measure(server, args, context)
    except RuntimeError as error:
        print(f"idle-memory: {name}: {error}", file=sys.stderr)
        return None
    finally:
        if server:
            server.stop()
            for line in server.warnings():
                print(f"  {name} logged: {line}", file=sys.stderr)
    print(f"  {name:<14} {'https' if context else 'http ':<5} RSS {result['rss_before_kib']}"
          f" -> {result['rss_after_kib']} KiB: {result['bytes_per_connection']} B/connection;"
          f" answers {result['first_answers']}, again {result['second_answers']};"
          f" opened in {result['seconds_to_open']} s", file=sys.stderr)
    return result


def run_all(args, gateway: str, nginx: str | None, work: Path) -> dict[str, dict]:
    """Every server, every scheme, one at a time (the schemes alternate
    servers: HTTP for each, then HTTPS for each); one counter behind them."""
    certificates = make_certificates(work) if "https" in args.schemes else None
    counter = start_counter(gateway, work)
    results: dict[str, dict] = {}
    try:
        for scheme in args.schemes:
            tls = certificates if scheme == "https" else None
            context = (client_context(certificates, not args.insecure, args.http2)
                       if tls else None)
            starts = {f"gateway {b}": (lambda b=b, tls=tls: start_gateway(
                gateway, b, counter.port, tls, work, args.connections))
                      for b in args.backends}
            if nginx:
                starts["nginx"] = lambda tls=tls: start_nginx(
                    nginx, counter.port, tls, work, args.connections, args.http2)
            for name, start in starts.items():
                result = run_one(name, start, args, context)
                results.setdefault(name, {})[scheme] = result
    finally:
        counter.stop()
    return results


def cell(result: dict | None, key: str) -> str:
    if result is None:
        return "-"
    return f"{result[key]:,}" if isinstance(result[key], int) else str(result[key])


def print_table(results: dict[str, dict], args) -> None:
    protocol = " HTTP/2" if args.http2 else ""
    print(f"{args.connections:,} idle keep-alive{protocol} connections, waves of {args.wave},"
          f" {args.idle_secs:g} s idle; bytes of RSS growth per connection")
    print(f"{'server':<14} {'HTTP B/conn':>12} {'HTTPS B/conn':>13}  answers ok"
          " (first GET, second GET after idle)")
    for name, by_scheme in results.items():
        http, https = by_scheme.get("http"), by_scheme.get("https")
        answers = "; ".join(
            f"{scheme} {result['first_answers']}, {result['second_answers']}"
            if result else f"{scheme} did not run"
            for scheme, result in by_scheme.items())
        print(f"{name:<14} {cell(http, 'bytes_per_connection'):>12}"
              f" {cell(https, 'bytes_per_connection'):>13}  {answers}")


def machine_facts(gateway: str, nginx: str | None) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    nginx_version = None
    if nginx:
        done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
        nginx_version = done.stderr.strip()
    return {"nproc": os.cpu_count(), "cpu": cpu, "nginx": nginx_version,
            "gateway": str(Path(gateway).resolve()),
            "nofile_hard_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1]}


def main() -> None:
    args = parse_args()
    # A SIGTERM ends the run through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not os.access(args.gateway, os.X_OK):
        sys.exit(f"idle-memory: no gateway binary at {args.gateway} (--gateway PATH)")
    nginx = find_nginx(args.nginx)
    if nginx and not (shutil.which(nginx) or os.access(nginx, os.X_OK)):
        sys.exit(f"idle-memory: no nginx binary at {nginx} (--nginx PATH, or none)")
    if nginx is None:
        print("idle-memory: no nginx (not on PATH, or --nginx none): the nginx row is skipped",
              file=sys.stderr)
    if "https" in args.schemes and shutil.which("openssl") is None:
        sys.exit("idle-memory: HTTPS needs the openssl command (or pass --no-tls)")
    raise_descriptor_limit(args.connections + 64)
    with tempfile.TemporaryDirectory(prefix="idle-memory-") as temporary:
        results = run_all(args, args.gateway, nginx, Path(temporary))
    print_table(results, args)
    if args.out:
        report = {"connections": args.connections, "http2": args.http2, "wave": args.wave,
                  "idle_secs": args.idle_secs, "sample": args.sample,
                  "machine": machine_facts(args.gateway, nginx), "servers": results}
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
