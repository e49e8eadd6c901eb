"""kill -9 of a primary holding 20,000 sessions, three real servers and the proxy: every
session is promoted on its secondary and re-protected on the third server (in slices and
batched frames: backends/sessions/promotion.py), and the requests sent meanwhile are all
answered, with the session's state.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.memory import SERVERS, create_sessions, read_sessions
from tests.cluster import Cluster

N = 20_000


def _wait(ok: Any, what: str, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return time.monotonic()


def test_kill_9_of_a_primary_with_20000_sessions(make_cluster: type[Cluster]) -> None:
    cluster = make_cluster(servers=[dict(s) for s in SERVERS], log_level="INFO").start()
    cluster.wait_formed()
    s1 = cluster.servers["s1"]
    tokens = asyncio.run(create_sessions(s1["host"], s1["http"], N, path="/count"))
    assert cluster.health("s1")["primaries"] == N
    _wait(lambda: cluster.health("s2")["replicas"] == N, "s1's replicas on s2")
    assert cluster.health("s3")["replicas"] == 0  # (s1 prefers s2's group)
    probes = tokens[:300]

    async def killed_under_load() -> tuple[float, float, list[Any]]:
        stop = asyncio.Event()
        load = asyncio.create_task(read_sessions("127.0.0.1", cluster.proxy_port, probes,
                                                 conns=4, stop=stop))
        await asyncio.sleep(0.5)
        killed = time.monotonic()
        cluster.kill("s1")
        done = await asyncio.to_thread(
            _wait, lambda: cluster.health("s2")["stats"]["promoted"] == N
            and cluster.health("s3")["replicas"] == N, "promoted and re-protected")
        await asyncio.sleep(0.3)
        stop.set()
        return killed, done, await load

    killed, done, results = asyncio.run(killed_under_load())
    during = [r for r in results if killed <= r[0] <= done]
    assert during, "no request was sent during the promotion"
    failed = [r for r in results if r[2] != 200 or r[3]["counter"] != 1]
    assert not failed, failed[:5]
    h2, h3 = cluster.health("s2"), cluster.health("s3")
    assert h2["primaries"] == N and h2["replicas"] == 0 and h3["replicas"] == N
    events = cluster.events("s2")
    assert sum(e["sessions"] for e in events if e.get("event") == "promoted") == N
    assert sum(e["sessions"] for e in events if e.get("event") == "reprotected") == N
    assert h2["loop"]["per_second"], h2["loop"]  # (the monitor ran)
    # Every session is still there, on s2 now, its state intact (a sample: 1 in 10).
    sample = asyncio.run(read_sessions("127.0.0.1", cluster.proxy_port, tokens[::10]))
    assert len(sample) == N // 10
    assert all(r[2] == 200 and r[3]["counter"] == 1 and r[3]["server"] == "s2"
               for r in sample), [r for r in sample if r[2] != 200][:5]
