"""session.replication = "async": acknowledged before the replica has it, flushed in batches
(threshold or interval). Its loss window is the writes of the last unflushed batch."""

from __future__ import annotations

import time

from tests.cluster import Client


def test_async_batches_reach_the_replica_after_the_interval(make_cluster):
    cluster = make_cluster(session={"replication": "async",
                                    "async_flush_interval_s": 0.1}).start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(10)]
    for c in clients:
        for _ in range(5):
            assert c.get("/count")[0] == 200
    time.sleep(0.5)
    cluster.kill("s1")
    for c in clients:
        status, body = c.get("/count", base=cluster.url(c.route[2]))
        assert status == 200 and body["counter"] == 6


def test_async_threshold_flushes_without_waiting_for_the_interval(make_cluster):
    cluster = make_cluster(session={"replication": "async", "async_flush_threshold": 1,
                                    "async_flush_interval_s": 30.0}).start(proxy=False)
    c = Client(cluster.url("s1"))
    for _ in range(3):
        c.get("/count")
    time.sleep(0.3)  # far less than the interval: only the threshold can have flushed
    cluster.kill("s1")
    assert c.get("/peek", base=cluster.url(c.route[2]))[1]["counter"] == 3


def test_async_loss_window_is_real_and_bounded_by_the_last_batch(make_cluster):
    cluster = make_cluster(session={"replication": "async", "async_flush_threshold": 1000,
                                    "async_flush_interval_s": 1.0}).start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    time.sleep(1.5)  # flushed: the replica has counter 1
    for _ in range(4):
        c.get("/count")  # acknowledged, still queued
    cluster.kill("s1")
    status, body = c.get("/peek", base=cluster.url(c.route[2]))
    assert status == 200 and body["counter"] == 1  # the last unflushed batch is lost
