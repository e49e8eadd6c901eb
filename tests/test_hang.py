"""A hung server (SIGSTOP): detected by the proxy's io timeout and by missed heartbeats;
idempotent requests fail over, others get 502; when it resumes it is fenced (the majority
removed it from the view meanwhile) and joins again."""

from __future__ import annotations

import signal
import threading
import time
import urllib.error
import urllib.request
from typing import Any

from tests.cluster import Client


def post(c: Client, path: str) -> tuple[int, str]:
    req = urllib.request.Request(c.base + path, data=b"x=1", method="POST",
                                 headers={"Cookie": f"JSESSIONID={c.token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sessions_on_s2(cluster: Any, n: int) -> list[Client]:
    """`n` clients whose sessions have s2 as primary (created there directly), counter 1."""
    clients = []
    for _ in range(n):
        c = Client(cluster.url("s2"))
        assert c.get("/count")[1]["counter"] == 1
        clients.append(c)
    return clients


def one_request_each(clients: list[Client]) -> tuple[list[threading.Thread],
                                                     dict[int, tuple[int, Any]]]:
    """Each client sends its next request, in a thread of its own; results by index."""
    results: dict[int, tuple[int, Any]] = {}
    threads = [threading.Thread(target=lambda i=i, c=c: results.__setitem__(i, c.get()))
               for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    return threads, results


def wait_failed(cluster: Any, victim: str, observers: tuple[str, ...]) -> None:
    deadline = time.monotonic() + 10
    while any(cluster.health(s)["peers"][victim] != "failed" for s in observers):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_hung_primary(make_cluster):
    # (io timeout 2 s: a GET failed over to the secondary waits there for the removal of
    # s1 — 3 missed heartbeats of 0.5 s, then the vote; with 1 s it raced that under load)
    cluster = make_cluster(proxy={"io_timeout_s": 2.0},
                           cluster={"replication_timeout_s": 0.5}).start()
    clients: list[Client] = []
    while sum(c.route[1] == "s1" for c in clients) < 4:
        c = Client(cluster.proxy_url)
        c.get("/count")
        clients.append(c)
    victims = [c for c in clients if c.route[1] == "s1"]
    for c in victims:
        assert c.get("/count")[1]["counter"] == 2
    stale = victims[0].token

    cluster.kill("s1", signal.SIGSTOP)
    try:
        started = time.monotonic()
        status, text = post(victims[0], "/count")
        assert status == 502 and "no response" in text, (status, text)
        for c in victims:
            _, _, secondary = c.route
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == 3, body
            assert body["server"] == secondary and c.route[1] == secondary
            assert c.route[2] not in ("s1", "NONE")
        assert time.monotonic() - started < 8
        # the peers found it dead by missed heartbeats (3 x 0.5 s)
        deadline = time.monotonic() + 5
        while any(cluster.health(s)["peers"]["s1"] != "failed" for s in ("s2", "s3")):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        cluster.kill("s1", signal.SIGCONT)

    cluster.wait_formed(["s1", "s2", "s3"])
    # s1 resumed believing it was primary of those sessions, and it processed the POST it
    # held (not acknowledged: its lease had run out); the view that removed it fenced it
    # when it learned it — every copy it held dropped — and it joined again, empty.
    deadline = time.monotonic() + 5
    while cluster.health("s1")["primaries"] > 0:
        assert time.monotonic() < deadline, cluster.health("s1")
        time.sleep(0.1)
    assert cluster.wait_event("s1", "fenced")
    replay = Client(cluster.url("s1"))
    replay.token = stale
    deadline = time.monotonic() + 5
    while True:  # (right after its stall s1 takes no session over: 503, the proxy moves on)
        status, body = replay.get("/peek")
        if status != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200 and body["counter"] == 3  # the current value, fetched back
    for c in victims[1:]:
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 4


def test_writes_a_resumed_primary_answers_are_never_lost(make_cluster):
    """Requests held by a frozen primary are processed when it resumes, while its sessions
    have meanwhile been promoted elsewhere: none may be acknowledged with a value the new
    primary lacks (the supersede message can arrive while the write is replicating)."""
    cluster = make_cluster(cluster={"replication_timeout_s": 0.5}).start()
    sessions = sessions_on_s2(cluster, 30)

    cluster.kill("s2", signal.SIGSTOP)
    try:
        # one request per session, sent to the frozen primary directly: held in its socket
        threads, results = one_request_each(sessions)
        wait_failed(cluster, "s2", ("s1", "s3"))
        time.sleep(0.5)  # the replicas are promoted when the peer fails
    finally:
        cluster.kill("s2", signal.SIGCONT)
    for t in threads:
        t.join(timeout=20)
    acked = {i: body["counter"] for i, (status, body) in results.items()
             if status == 200 and isinstance(body, dict)}
    assert all(status in (200, 503) for status, _ in results.values()), results
    for i, c in enumerate(sessions):
        # the next request, wherever the proxy sends it, sees every acknowledged write
        status, body = c.get(base=cluster.proxy_url)
        assert status == 200, body
        assert body["counter"] == acked.get(i, 1) + 1, (i, acked.get(i), body)


def test_requests_held_by_a_server_the_cluster_reports_failed_move_before_the_io_timeout(
        make_cluster):
    """Missed heartbeats, not only proxy.io_timeout_s: once a response from a live server
    brings the proxy a cluster view without the hung one, the requests waiting there fail
    over (idempotent) or get 502 (others) at once, long before the 30 s io timeout."""
    cluster = make_cluster(proxy={"io_timeout_s": 30.0}).start()
    victim = Client(cluster.url("s1"))
    assert victim.get("/count")[1]["counter"] == 1
    victim.base = cluster.proxy_url
    bystander = Client(cluster.proxy_url)
    while bystander.token is None or bystander.route[1] == "s1":
        bystander = Client(cluster.proxy_url)
        bystander.get("/count")
    stop = threading.Event()

    def traffic() -> None:  # other sessions' responses carry the cluster view to the proxy
        while not stop.wait(0.2):
            bystander.get("/count")

    cluster.kill("s1", signal.SIGSTOP)
    background = threading.Thread(target=traffic)
    background.start()
    try:
        started = time.monotonic()
        outcomes: dict[str, tuple[int, object]] = {}
        held = threading.Thread(target=lambda: outcomes.__setitem__("post", post(victim,
                                                                                 "/count")))
        held.start()
        status, body = victim.get()
        waited = time.monotonic() - started
        assert status == 200 and body["counter"] == 2 and body["server"] != "s1", body
        held.join(timeout=30)
        post_waited = time.monotonic() - started
        status, text = outcomes["post"]
        assert status == 502 and "cluster reports s1 failed" in str(text), (status, text)
        # heartbeats: 3 x 0.5 s, then the view; nowhere near the io timeout
        assert waited < 10 and post_waited < 10, (waited, post_waited)
    finally:
        stop.set()
        cluster.kill("s1", signal.SIGCONT)
        background.join()
    cluster.wait_formed(["s1", "s2", "s3"])
    status, body = victim.get()
    assert status == 200 and body["counter"] == 3, body


def test_requests_a_resumed_server_held_are_not_applied_twice(make_cluster):
    """The proxy gives up on requests held by a frozen server and sends them to the
    session's secondary, which applies them. When the server resumes it reads those
    requests: it must not take the sessions back to apply them a second time."""
    # (io timeout 2 s: the attempt at the secondary must outlast the removal of s2 — its
    # suspicion after 3 missed heartbeats of 0.5 s, then the vote — or the proxy gives up
    # on it too; with 1 s the two raced, and the test failed about one run in three)
    cluster = make_cluster(proxy={"io_timeout_s": 2.0},
                           cluster={"replication_timeout_s": 0.5}).start()
    sessions = sessions_on_s2(cluster, 20)
    for c in sessions:
        c.base = cluster.proxy_url

    cluster.kill("s2", signal.SIGSTOP)
    try:
        threads, results = one_request_each(sessions)
        for t in threads:
            t.join(timeout=20)
        # the proxy moved them after its io timeout: applied once, at the secondary
        assert all(status == 200 and body["counter"] == 2 and body["server"] != "s2"
                   for status, body in results.values()), results
        wait_failed(cluster, "s2", ("s1", "s3"))
        for c in sessions:  # the clients go on: the held request is no longer the last
            status, body = c.get()
            assert status == 200 and body["counter"] == 3, body
    finally:
        cluster.kill("s2", signal.SIGCONT)
    cluster.wait_formed(["s1", "s2", "s3"])
    time.sleep(0.5)  # s2 has read the requests it held
    for c in sessions:
        status, body = c.get()
        assert status == 200 and body["counter"] == 4, body
