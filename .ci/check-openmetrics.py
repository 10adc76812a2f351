#!/usr/bin/env python3
"""Scrapes a running gateway's /metrics after known traffic and parses it
with the Prometheus client library's OpenMetrics parser, the reference for
what Prometheus accepts. Usage: check-openmetrics.py path/to/gateway"""
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

binary = sys.argv[1]
config = """
[runtime]
workers = 2
[server]
listen = "127.0.0.1:0"
[upstream]
url = "http://127.0.0.1:{counter}/counter"
[counter]
listen = "127.0.0.1:0"
store = "memory"
[admin]
listen = "127.0.0.1:0"
"""
with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
    # The counter's port is not known before it binds: reserve one.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    counter_port = s.getsockname()[1]
    s.close()
    f.write(config.format(counter=counter_port).replace(
        '[counter]\nlisten = "127.0.0.1:0"', f'[counter]\nlisten = "127.0.0.1:{counter_port}"'))
    path = f.name

proc = subprocess.Popen([binary, "--config", path], stderr=subprocess.PIPE, text=True)
listeners = {}
try:
    deadline = time.time() + 20
    while len(listeners) < 3 and time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"listening on (\S+) \((\w+)\)", line)
        if m:
            listeners[m.group(2)] = m.group(1)
    assert len(listeners) == 3, listeners

    def get(addr, path, method="GET"):
        req = urllib.request.Request(f"http://{addr}{path}", method=method)
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.headers, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    sent = {"200": 0, "404": 0, "405": 0}
    for _ in range(10):
        assert get(listeners["public"], "/")[0] == 200
        sent["200"] += 1
    for _ in range(4):
        assert get(listeners["public"], "/missing")[0] == 404
        sent["404"] += 1
    for _ in range(3):
        assert get(listeners["public"], "/", "POST")[0] == 405
        sent["405"] += 1

    status, headers, text = get(listeners["admin"], "/metrics")
    assert status == 200, status
    assert headers["content-type"].startswith("application/openmetrics-text"), headers
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {s.labels["status"]: s.value for s in families["gateway_requests"].samples
                if s.name == "gateway_requests_total" and s.labels["protocol"] == "http/1.1"}
    for code, n in sent.items():
        assert requests[code] == n, (code, requests)
    histogram = {s.name: s.value for s in families["gateway_request_duration_seconds"].samples
                 if "le" not in s.labels or s.labels["le"] == "+Inf"}
    assert histogram["gateway_request_duration_seconds_count"] == sum(sent.values()), histogram
    upstream = {s.labels["outcome"]: s.value for s in families["gateway_upstream_requests"].samples
                if s.name == "gateway_upstream_requests_total"}
    assert upstream["ok"] == 10, upstream
    info = [s for s in families["gateway_build"].samples][0]
    assert info.labels["backend"] == "tokio" and info.labels["workers"] == "2", info
    print(f"openmetrics: {len(families)} families parsed; counters match the traffic sent")
finally:
    proc.terminate()
    proc.wait(timeout=15)
    os.unlink(path)
