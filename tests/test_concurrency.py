"""Concurrent requests on one session (the seeds' frames problem).

The rule: a commit applies only the keys its request changed. Concurrent writes to
different keys therefore both survive; for the same key the last commit wins (no merge).
"""

from __future__ import annotations

import threading

import pytest

from tests.cluster import Client

APPS = ["tests.apps:asgi_counter", "tests.apps:wsgi_counter"]


@pytest.mark.parametrize("app", APPS, ids=["asgi", "wsgi"])
def test_concurrent_writes_to_different_keys_both_survive(make_cluster, app):
    cluster = make_cluster(app=app).start(proxy=False)
    first = Client(cluster.url("s1"))
    first.get("/count")
    token = first.token
    n, keys = 25, ["a", "b", "c", "d"]
    errors: list[object] = []

    def writer(key: str) -> None:
        c = Client(cluster.url("s1"))
        c.token = token
        for _ in range(n):
            status, body = c.get(f"/incr/{key}")
            if status != 200:
                errors.append(body)

    threads = [threading.Thread(target=writer, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    status, body = first.get("/peek")
    assert body["values"] == {k: n for k in keys}
    # the secondary holds the same: versions only moved forward there
    _, primary, secondary = first.route
    cluster.kill(primary)
    status, body = first.get("/peek", base=cluster.url(secondary))
    assert body["values"] == {k: n for k in keys} and body["counter"] == 1


def test_same_key_last_commit_wins_on_primary_and_secondary(make_cluster):
    cluster = make_cluster(app="tests.apps:wsgi_counter").start(proxy=False)
    first = Client(cluster.url("s1"))
    first.get("/count")
    token = first.token
    results: dict[str, int] = {}

    def setter(value: str, sleep: float) -> None:
        c = Client(cluster.url("s1"))
        c.token = token
        results[value] = c.get(f"/set?key=x&value={value}&sleep={sleep}")[0]

    slow = threading.Thread(target=setter, args=("slow", 0.5))  # set first, commits last
    slow.start()
    fast = threading.Thread(target=setter, args=("fast", 0.0))
    fast.start()
    slow.join()
    fast.join()
    assert results == {"slow": 200, "fast": 200}
    assert first.get("/peek")[1]["values"]["x"] == "slow"
    _, primary, secondary = first.route
    cluster.kill(primary)
    assert first.get("/peek", base=cluster.url(secondary))[1]["values"]["x"] == "slow"
