"""`proxy.workers = 2`: two real proxy processes on one listen address (SO_REUSEPORT),
one admin view with the counters of both, and a worker killed -9 replaced by its parent."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any

from tests.cluster import ROOT, Client, get_json


def _status(cluster: Any) -> dict[str, Any]:
    return get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")


def _requests_2xx(cluster: Any) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.admin_port}/__tandem/metrics",
                                timeout=5) as resp:
        text = resp.read().decode()
    m = re.search(r'^tandem_proxy_requests_total\{class="2xx"\} (\S+)$', text, re.M)
    assert m, text
    return int(float(m.group(1)))


def _until(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _workers(cluster: Any) -> dict[int, dict[str, Any]]:
    return {w["index"]: w for w in _status(cluster).get("workers", [])}


def test_two_workers_share_the_port_sum_their_counters_and_are_restarted(make_cluster):
    cluster = make_cluster(proxy={"workers": 2})
    try:
        cluster.start()
        assert _until(lambda: len(_workers(cluster)) == 2), _status(cluster)
        for _ in range(60):  # a new connection each (urllib), a new session each
            status, body = Client(cluster.proxy_url).get("/count")
            assert status == 200 and body["counter"] == 1

        # every 2xx counted once, over both workers; both served some
        assert _until(lambda: _requests_2xx(cluster) == 60), _requests_2xx(cluster)
        workers = _workers(cluster)
        assert sorted(workers) == [0, 1]
        assert all(w["requests"] > 0 for w in workers.values()), workers
        assert sum(w["requests"] for w in workers.values()) == 60
        pids = {i: w["pid"] for i, w in workers.items()}
        assert len(set(pids.values())) == 2 and cluster.proxy_proc.pid not in pids.values()

        # an operator's state, set at worker 0's admin listener, holds in both workers
        req = urllib.request.Request(
            f"http://127.0.0.1:{cluster.admin_port}/__tandem/backends/s1/state",
            data=b"down", method="POST")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
        assert cluster.wait_event("proxy", "backend_state_changed")
        assert _until(lambda: any(e.get("by") == "admin (worker 0)"
                                  for e in cluster.events("proxy")))
        served = {Client(cluster.proxy_url).get("/count")[1]["server"] for _ in range(30)}
        assert "s1" not in served, served
        assert _until(lambda: _requests_2xx(cluster) == 90), _requests_2xx(cluster)
        assert all(w["requests"] > 0 for w in _workers(cluster).values())

        # kill -9 of the worker that does not serve the admin listener: the service goes
        # on (the other takes the new connections; those the dead one had accepted or had
        # in its queue are reset, as with any process killed), and the parent starts a
        # new worker 1
        os.kill(pids[1], signal.SIGKILL)
        assert cluster.wait_event("proxy", "proxy_worker_exited")
        for _ in range(20):
            status, _body = Client(cluster.proxy_url).get("/count")
            assert status == 200
        assert cluster.wait_event("proxy", "proxy_worker_restarted")
        assert _until(lambda: _workers(cluster).get(1, {}).get("pid") not in (None, pids[1]))

        def new_worker_serves() -> bool:
            assert Client(cluster.proxy_url).get("/count")[0] == 200
            return bool(_workers(cluster)[1]["requests"] > 0)

        assert _until(new_worker_serves, timeout=15), _workers(cluster)
        assert cluster.proxy_proc.poll() is None
    finally:
        if cluster.proxy_proc is not None and cluster.proxy_proc.poll() is None:
            cluster.proxy_proc.send_signal(signal.SIGTERM)
            assert cluster.proxy_proc.wait(timeout=20) == 0


def test_a_worker_that_cannot_start_stops_the_proxy_with_its_one_line(make_cluster):
    cluster = make_cluster(n=1, proxy={"workers": 2})
    taken = socket.socket()
    taken.bind(("127.0.0.1", cluster.admin_port))
    taken.listen()
    try:
        proc = subprocess.run([sys.executable, "-m", "proxy.cli", "proxy", "--config",
                               str(cluster.config_path)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60,
                              env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                   "TANDEM_LOG_LEVEL": "ERROR"})
    finally:
        taken.close()
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("tandem:")]
    assert len(lines) == 1 and f"127.0.0.1:{cluster.admin_port}" in lines[0], proc.stderr
