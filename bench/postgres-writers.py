#!/usr/bin/env python3
"""Commits per second on one PostgreSQL as counter processes are added.

Each writer is a `gateway counter --store postgres` process on the same
database, under the same load: `h2load --h1` holding --clients keep-alive
connections, each POSTing /counter again as soon as it is answered
(closed loop), for --seconds. For 1, 2, 4 and 8 writers (--writers), and
for each gateway binary given (--build NAME=PATH, e.g. the code before
and after a change), in a rotated order each round:

1. A fresh database: the counter's tables dropped, so every run starts
   from the schema its binary makes.
2. `xact_commit` of the database (pg_stat_database) read, the writers
   started and waited for, the loads run side by side, the writers
   stopped (a backend's statistics are flushed when it exits), and
   `xact_commit` read again: commits/s is the difference over the load's
   seconds (the few transactions of the writers' start included).
3. Every 2xx h2load saw must be in the count: the database's count must
   have grown by at least the 2xx seen, and by no more than the requests
   still in flight when h2load stopped (h2load's -D drops their answers,
   which the counter may have committed).

POSTs/s is the 2xx over the load's seconds; p50 and p99 are of every
POST's latency in h2load's request log. The PostgreSQL server is one
the script makes (initdb in a temporary folder, run as the `postgres`
account when run as root), with PostgreSQL's defaults (fsync on,
synchronous_commit on), on a free port, listening on 127.0.0.1 only.

Usage (from the repository root, after building each binary in release):

    python3 bench/postgres-writers.py --build before=/path/to/old/gateway \\
        --build after=target/release/gateway [--writers 1,2,4,8] \\
        [--clients 8] [--seconds 5] [--rounds 1] [--backend tokio]
"""

import argparse
import glob
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, seconds=10.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {seconds} s")


class Database:
    """A PostgreSQL cluster of the script's own, removed at the end."""

    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        if not bins:
            sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
        self.bin = os.path.dirname(bins[-1])
        self.folder = tempfile.mkdtemp(prefix="pg-writers-")
        self.account = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            self.account = (entry.pw_uid, entry.pw_gid)
            os.chown(self.folder, *self.account)
        self.port = free_port()
        self.data = os.path.join(self.folder, "data")
        self.run("initdb", "-D", self.data, "-U", "gateway", "--auth=trust", "-E", "UTF8")
        self.run("pg_ctl", "-D", self.data, "-l", os.path.join(self.folder, "log"),
                 "-o", f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1",
                 "-w", "start")
        self.url = f"postgres://gateway@127.0.0.1:{self.port}/postgres"

    def run(self, program, *args):
        def demote():
            if self.account:
                os.setgid(self.account[1])
                os.setuid(self.account[0])
        subprocess.run([os.path.join(self.bin, program), *args], check=True,
                       preexec_fn=demote, cwd=self.folder, stdout=subprocess.DEVNULL)

    def query(self, sql):
        out = subprocess.run(
            [os.path.join(self.bin, "psql"), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-c", sql, f"host={self.folder} port={self.port} user=gateway dbname=postgres"],
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def commits(self):
        return int(self.query(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'"))

    def total(self):
        # Either schema: one row, or the base row and every writer's part.
        parts = self.query("SELECT to_regclass('gateway_counter_parts') IS NOT NULL") == "t"
        if parts:
            return int(self.query(
                "SELECT c.total + (SELECT coalesce(sum(total), 0) FROM gateway_counter_parts) "
                "FROM gateway_counter c"))
        return int(self.query("SELECT total FROM gateway_counter"))

    def reset(self):
        self.query("DROP TABLE IF EXISTS gateway_counter, gateway_counter_writers, "
                   "gateway_counter_parts")

    def stop(self):
        self.run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


def run(db, binary, writers, args, scratch):
    db.reset()
    before = db.commits()
    ports = [free_port() for _ in range(writers)]
    counters = [
        subprocess.Popen([binary, "counter", "--backend", args.backend, "--store", "postgres",
                          "--postgres-url", db.url, "--listen", f"127.0.0.1:{port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_port(port)
        start_total = db.total()
        # A body of "1": one visit (h2load cannot send an empty one).
        body = os.path.join(scratch, "one-visit")
        with open(body, "w") as f:
            f.write("1")
        # New files each run: h2load appends to a log that exists.
        logs = [tempfile.mkstemp(dir=scratch, prefix="log-")[1] for _ in range(writers)]
        for log in logs:
            os.remove(log)
        loads = [
            subprocess.Popen(["h2load", "--h1", "-c", str(args.clients), "-t", "1",
                              "-D", str(args.seconds), "-d", body, "--log-file", log,
                              f"http://127.0.0.1:{port}/counter"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for port, log in zip(ports, logs)
        ]
        outputs = [load.communicate()[0] for load in loads]
    finally:
        for counter in counters:
            counter.send_signal(signal.SIGTERM)
        for counter in counters:
            counter.wait(timeout=30)
    time.sleep(0.5)
    commits = db.commits() - before
    counted = db.total() - start_total
    latencies, ok = [], 0
    for log in logs:
        with open(log) as f:
            for line in f:
                _, status, micros = line.split("\t")[:3]
                if 200 <= int(status) < 300:
                    ok += 1
                latencies.append(int(micros))
    if not counted >= ok or counted - ok > writers * args.clients:
        print("\n".join(outputs), file=sys.stderr)
        raise RuntimeError(f"{ok} 2xx seen, the count grew by {counted}")
    latencies.sort()
    return {
        "commits_per_s": commits / args.seconds,
        "posts_per_s": ok / args.seconds,
        "p50_ms": latencies[len(latencies) // 2] / 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] / 1000,
        "ok": ok,
        "counted": counted,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build", action="append", required=True,
                        help="NAME=PATH of a gateway binary; give several to compare")
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--backend", default="tokio")
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.build]
    writer_counts = [int(w) for w in args.writers.split(",")]
    if not shutil.which("h2load"):
        sys.exit("h2load is not installed (apt-get install nghttp2-client)")
    db = Database()
    results = {}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            for round_ in range(args.rounds):
                for writers in writer_counts:
                    order = builds[round_ % len(builds):] + builds[:round_ % len(builds)]
                    for name, binary in order:
                        result = run(db, binary, writers, args, scratch)
                        results.setdefault((name, writers), []).append(result)
                        print(f"round {round_ + 1} {name} writers={writers}: "
                              f"{result['commits_per_s']:.0f} commits/s "
                              f"{result['posts_per_s']:.0f} POSTs/s "
                              f"p50 {result['p50_ms']:.2f} ms p99 {result['p99_ms']:.2f} ms "
                              f"({result['ok']} 2xx, count +{result['counted']})", flush=True)
    finally:
        db.stop()
    print(f"\n{args.clients} clients a writer, {args.seconds} s, backend {args.backend}, "
          f"{os.cpu_count()} CPUs; medians of {args.rounds} round(s)\n")
    print("| build | writers | commits/s | vs 1 writer | POSTs/s | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, _ in builds:
        one = None
        for writers in writer_counts:
            rows = results[(name, writers)]
            median = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            one = one or median["commits_per_s"]
            print(f"| {name} | {writers} | {median['commits_per_s']:,.0f} | "
                  f"{median['commits_per_s'] / one:.2f}x | {median['posts_per_s']:,.0f} | "
                  f"{median['p50_ms']:.2f} | {median['p99_ms']:.2f} |")


if __name__ == "__main__":
    main()
