"""Retried requests apply once: the proxy's request id and the undo of the last commit.

A primary that applied and replicated a write, then died (or lost the connection) before
its response left, must not have that write applied a second time when the proxy sends
the same request again — to the secondary, or to itself on a fresh connection.
"""

from __future__ import annotations

from tests.cluster import Client


def test_a_retry_at_the_secondary_after_the_primary_died_applies_once(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count", headers={"X-Tandem-Request-Id": "r-1"})
    token = c.token
    status, body = c.get("/count", headers={"X-Tandem-Request-Id": "r-2"})
    assert body["counter"] == 2
    # r-2's response "was lost": the primary dies, the proxy retries r-2 at the secondary
    _, primary, secondary = c.route
    cluster.kill(primary)
    c.token = token
    status, body = c.get("/count", base=cluster.url(secondary),
                         headers={"X-Tandem-Request-Id": "r-2"})
    assert status == 200 and body["counter"] == 2  # once, not twice
    assert cluster.health(secondary)["stats"]["retries_rolled_back"] == 1
    status, body = c.get("/count", base=cluster.url(secondary),
                         headers={"X-Tandem-Request-Id": "r-3"})
    assert body["counter"] == 3


def test_a_retry_on_the_same_server_applies_once_and_other_keys_are_kept(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s2"))
    c.get("/incr/a", headers={"X-Tandem-Request-Id": "a-1"})
    c.get("/set?key=b&value=kept", headers={"X-Tandem-Request-Id": "b-1"})
    c.get("/incr/a", headers={"X-Tandem-Request-Id": "a-2"})
    status, body = c.get("/incr/a", headers={"X-Tandem-Request-Id": "a-2"})
    assert body["a"] == 2 and body["values"]["b"] == "kept"
    # without an id (not through the proxy) a repeated request is a new request
    status, body = c.get("/incr/a")
    assert body["a"] == 3
    # and the rolled-back-and-reapplied state reached the secondary too
    _, primary, secondary = c.route
    cluster.kill(primary)
    status, body = c.get("/peek", base=cluster.url(secondary))
    assert body["values"] == {"a": 3, "b": "kept"}


def test_a_retry_of_a_write_that_created_a_key_removes_it_first(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/peek", headers={"X-Tandem-Request-Id": "p-1"})
    c.get("/count", headers={"X-Tandem-Request-Id": "p-1"})  # same id as a read: harmless
    c.get("/set?key=fresh&value=1", headers={"X-Tandem-Request-Id": "n-1"})
    status, body = c.get("/set?key=fresh&value=2", headers={"X-Tandem-Request-Id": "n-1"})
    assert body["values"]["fresh"] == "2" and body["counter"] == 1
