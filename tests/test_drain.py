"""SIGTERM drains a server: its sessions are handed over, nothing is lost; it rejoins."""

from __future__ import annotations

import signal
import time

from tests.cluster import Client


def test_sigterm_hands_every_primary_to_its_secondary(make_cluster):
    cluster = make_cluster().start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(30)]
    for c in clients:
        c.get("/count")
        c.get("/count")
    # s1 is also secondary for sessions of s2 and s3
    others = [Client(cluster.url(s)) for s in ("s2", "s3") for _ in range(10)]
    for c in others:
        c.get("/count")
    held = cluster.health("s1")["replicas"]
    assert held > 0
    before = {id(c): c.route for c in clients + others}

    cluster.kill("s1", signal.SIGTERM)
    assert cluster.servers["s1"]["proc"].returncode == 0
    drained = [e for e in cluster.events("s1") if e["event"] == "drained"]
    assert drained and drained[0]["handed_over"] == 30 and drained[0]["replicas_left"] == 0

    for c in clients:
        _, _, secondary = before[id(c)]
        status, body = c.get("/count", base=cluster.url(secondary))
        assert status == 200 and body["counter"] == 3
        assert c.route[1] == secondary and c.route[2] not in ("s1", "NONE")
    assert sum(cluster.health(s)["stats"]["promoted"] for s in ("s2", "s3")) == 0
    assert sum(cluster.health(s)["stats"]["taken_over"] for s in ("s2", "s3")) == 30
    # sessions s1 was secondary for were re-protected elsewhere before it left
    for c in others:
        _, primary, _ = before[id(c)]
        status, body = c.get("/count", base=cluster.url(primary))
        assert status == 200 and body["counter"] == 2 and c.route[2] not in ("s1", "NONE")
    assert sum(cluster.health(s)["replicas"] for s in ("s2", "s3")) == 50


def test_a_restarted_server_rejoins_takes_replicas_and_serves(make_cluster):
    cluster = make_cluster(cluster={"drain_timeout_s": 5.0}).start(proxy=False)
    cluster.kill("s2", signal.SIGTERM)
    cluster.wait_formed(["s1", "s3"])
    cluster.start_server("s2")
    cluster.wait_formed(["s1", "s2", "s3"])
    # it takes replicas again and serves new sessions
    made = [Client(cluster.url("s2")) for _ in range(4)]
    for c in made:
        status, body = c.get("/count")
        assert status == 200 and body["server"] == "s2" and c.route[2] in ("s1", "s3")
    # and it is chosen as a secondary again (s1 holds no replicas anywhere: ties go by id)
    c = Client(cluster.url("s1"))
    c.get("/count")
    assert c.route[1:] == ("s1", "s2")
    assert cluster.health("s2")["replicas"] >= 1


def test_a_request_reaching_a_draining_server_gets_503(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s2"))
    c.get("/count")
    # the peers are frozen, so s2's hand-over stalls and it stays draining for a while
    for sid in ("s1", "s3"):
        cluster.kill(sid, signal.SIGSTOP)
    try:
        cluster.servers["s2"]["proc"].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, body = c.get("/count")
        assert status == 503 and "draining" in body
        assert cluster.health("s2")["state"] == "draining"
    finally:
        for sid in ("s1", "s3"):
            cluster.kill(sid, signal.SIGCONT)
    assert cluster.servers["s2"]["proc"].wait(timeout=40) == 0


def test_rolling_restart_of_every_server_loses_nothing(make_cluster):
    cluster = make_cluster().start(proxy=False)
    clients = [Client(cluster.url(s)) for s in ("s1", "s2", "s3") for _ in range(8)]
    expected = {}
    for c in clients:
        c.get("/count")
        expected[id(c)] = 1
    for sid in ("s1", "s2", "s3"):
        cluster.kill(sid, signal.SIGTERM)
        alive = [s for s in ("s1", "s2", "s3") if s != sid]
        cluster.wait_formed(alive)
        for c in clients:  # the sessions keep working while a server is away
            primary = c.route[1]
            base = cluster.url(primary if primary != sid else c.route[2])
            status, body = c.get("/count", base=base)
            expected[id(c)] += 1
            assert status == 200 and body["counter"] == expected[id(c)], (sid, c.route)
        cluster.start_server(sid)
        cluster.wait_formed(["s1", "s2", "s3"])
    for c in clients:
        status, body = c.get("/peek", base=cluster.url(c.route[1]))
        assert body["counter"] == expected[id(c)] == 4
