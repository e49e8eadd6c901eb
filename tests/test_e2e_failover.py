"""The core loop end to end: real backends, a real proxy, kill -9 of a primary."""

from __future__ import annotations

import pytest

from tandem.token import Route, TokenCodec
from tests.cluster import Client

APPS = ["tests.apps:asgi_counter", "tests.apps:wsgi_counter"]


def sessions_on(cluster, primary: str, count: int, *, cookies: bool) -> list[Client]:
    """New sessions through the proxy until `count` of them have `primary` as primary."""
    clients: list[Client] = []
    while sum(c.route[1] == primary for c in clients) < count:
        c = Client(cluster.proxy_url, cookies=cookies)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1
        clients.append(c)
        assert len(clients) < 10 * count, "new sessions are not spread over the servers"
    return clients


@pytest.mark.parametrize("cookies", [True, False], ids=["cookie", "url-rewriting"])
@pytest.mark.parametrize("app", APPS, ids=["asgi", "wsgi"])
def test_kill_primary_every_session_continues_on_its_secondary(make_cluster, app, cookies):
    cluster = make_cluster(app=app).start()
    clients = sessions_on(cluster, "s1", 20, cookies=cookies)
    for c in clients:
        for n in (2, 3):
            status, body = c.get()
            assert status == 200 and body["counter"] == n
    if not cookies:
        assert all(not c.set_cookie_seen or not c.cookies for c in clients)
        assert all(";jsessionid=" in c.next_path for c in clients)
    before = {id(c): c.route for c in clients}
    assert all(r[2] not in ("NONE", r[1]) for r in before.values())

    cluster.kill("s1")

    for c in clients:
        sid, primary, secondary = before[id(c)]
        status, body = c.get()
        assert status == 200, body
        assert body["counter"] == 4, (before[id(c)], body)
        new_sid, new_primary, new_secondary = c.route
        assert new_sid == sid
        if primary == "s1":
            # served by its old secondary, which promoted the replica and picked a live third
            assert body["server"] == secondary
            assert new_primary == secondary
            assert new_secondary not in ("s1", secondary, "NONE")
        else:
            assert body["server"] == primary and new_primary == primary
            assert new_secondary not in ("s1", "NONE")
    stats = {s: cluster.health(s)["stats"] for s in ("s2", "s3")}
    assert sum(st["promoted"] for st in stats.values()) == 20, stats
    # the next round is plain affinity again: no more take-overs
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 5 and body["server"] == c.route[1]
    assert sum(cluster.health(s)["stats"]["promoted"] for s in ("s2", "s3")) == 20


@pytest.mark.parametrize("forge", ["tampered", "foreign-key"])
def test_bad_token_through_the_proxy_is_a_new_session(make_cluster, forge):
    cluster = make_cluster().start()
    c = Client(cluster.proxy_url)
    c.get("/count")
    c.get("/count")
    sid, primary, secondary = c.route
    if forge == "tampered":
        c.token = c.token.replace(f"!{primary}!", f"!{secondary}!", 1)
    else:
        c.token = TokenCodec(["someone-else"]).encode(Route(sid, primary, secondary))
    status, body = c.get("/count")
    assert status == 200 and body["counter"] == 1 and c.route[0] != sid


def test_spoofed_tandem_headers_do_not_reach_the_backend(make_cluster):
    cluster = make_cluster().start()
    c = Client(cluster.proxy_url)
    status, body = c.get("/count", headers={"X-Tandem-View": "spoof"})
    assert status == 200
    # a spoofed view header would make the backend answer with its cluster view; the
    # proxy must drop inbound X-Tandem-* and strip X-Tandem-* from responses
    import urllib.request
    req = urllib.request.Request(cluster.proxy_url + "/peek",
                                 headers={"X-Tandem-View": "spoof"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert not any(k.lower().startswith("x-tandem") for k in resp.headers)
