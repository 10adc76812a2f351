#!/usr/bin/env python3
"""Memory per idle keep-alive connection of a running server.

Opens N connections to 127.0.0.1:PORT, sends one `GET /` on each, reads
each answer, leaves them all open and idle, and reports the growth of the
resident memory of PID and its children (nginx: master and worker) divided
by N. Needs N + a few file descriptors here, and about 2N in the server if
it proxies each request on a connection of its own.

  bench/idle-memory.py 10000 3000 "$(pgrep -f 'gateway --config')"
"""
import resource
import socket
import sys
import time

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
N = int(sys.argv[1]); port = int(sys.argv[2]); pid = int(sys.argv[3])
def rss(pid):
    # the whole process tree (nginx has a master and a worker)
    total = 0
    pids = [pid] + [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    for p in pids:
        for line in open(f"/proc/{p}/status"):
            if line.startswith("VmRSS:"): total += int(line.split()[1])
    return total
time.sleep(0.5)
before = rss(pid)
socks = []
errors = 0
for i in range(N):
    s = socket.create_connection(("127.0.0.1", port)); socks.append(s)
for s in socks:
    s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
ok = 0
for s in socks:
    s.settimeout(30); buf = b""
    while b"\r\n\r\n" not in buf:
        c = s.recv(4096)
        if not c: break
        buf += c
    if buf.startswith(b"HTTP/1.1 200"): ok += 1
    else: errors += 1
time.sleep(1.0)
after = rss(pid)
print(f"{N} connections: {ok} ok, {errors} errors; RSS {before} -> {after} KiB: {(after-before)/N:.2f} KiB per idle connection")
