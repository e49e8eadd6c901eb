"""A request that reaches a server other than its session's primary (a plain load balancer
in front) is forwarded to the primary and its answer relayed; `session.foreign_requests =
"take_over"` keeps the older behaviour (the session moves to where the request landed).

Real backend processes, requests sent straight to each server (no proxy in front)."""

from __future__ import annotations

import http.client
import os
import time
import urllib.request

import pytest

from backends.serve.hop import HopAuth
from tests.cluster import Client

APPS = ["tests.apps:asgi_counter", "tests.apps:wsgi_counter"]


def raw_get(url: str, token: str | None, headers: dict[str, str] | None = None,
            ) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, body, headers but Date) of one GET, the token sent as the cookie."""
    req = urllib.request.Request(url, headers=dict(headers or {}))
    if token:
        req.add_header("Cookie", f"JSESSIONID={token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, body, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        status, body, hdrs = exc.code, exc.read(), exc.headers
    return status, body, [(k.lower(), v) for k, v in hdrs.items() if k.lower() != "date"]


def session_on(cluster, primary: str) -> Client:
    """A session created on `primary` (a request without a token starts one where it lands)."""
    c = Client(cluster.url(primary))
    status, body = c.get("/count")
    assert status == 200 and body["server"] == primary and c.route[1] == primary
    return c


def third(cluster, client: Client) -> str:
    """The server that holds no copy of the client's session."""
    _, primary, secondary = client.route
    return next(s for s in cluster.servers if s not in (primary, secondary))


@pytest.mark.parametrize("app", APPS, ids=["asgi", "wsgi"])
def test_a_request_at_another_server_is_served_by_the_primary(make_cluster, app):
    cluster = make_cluster(app=app).start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    for n in range(2, 12):  # at the third server and at the secondary alike
        at = other if n % 2 else c.route[2]
        status, body = c.get("/count", base=cluster.url(at))
        assert status == 200, body
        assert body["counter"] == n and body["server"] == "s1" and body["primary"] == "s1"
    assert c.route[1] == "s1"  # the session never moved
    assert cluster.health(other)["stats"]["forwarded"] == 5
    assert cluster.health(c.route[2])["stats"]["forwarded"] == 5
    assert all(cluster.health(s)["stats"]["fetched"] == 0 for s in cluster.servers)


def test_a_client_without_cookies_is_forwarded_by_the_token_in_its_urls(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"), cookies=False)
    status, body = c.get("/count")
    assert status == 200 and ";jsessionid=" in c.next_path and c.route[1] == "s1"
    other = third(cluster, c)
    for n in (2, 3):
        status, body = c.get(base=cluster.url(other))  # the link the page gave it
        assert status == 200 and body["counter"] == n and body["server"] == "s1"
        assert ";jsessionid=" in body["next"] and len(c.set_cookie_seen) == 1  # (the first)


def test_a_forwarded_answer_is_the_direct_one(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    other = cluster.url(third(cluster, c))
    direct = raw_get(cluster.url("s1") + "/peek", c.token)
    forwarded = raw_get(other + "/peek", c.token)
    assert direct[0] == forwarded[0] == 200
    assert forwarded == direct  # status, body, every header (Date aside)
    # a response that sets the cookie: the same cookie, attribute for attribute
    direct = raw_get(cluster.url("s1") + "/regenerate", c.token)
    token = next(v for k, v in direct[2] if k == "set-cookie").split(";")[0].split("=", 1)[1]
    forwarded = raw_get(other + "/regenerate", token)
    assert forwarded[0] == direct[0] == 200

    def cookie_attrs(resp):  # (the new session id is new each time)
        value = next(v for k, v in resp[2] if k == "set-cookie")
        name, _, rest = value.partition("=")
        tok, _, attrs = rest.partition(";")
        return name, tok.split(".")[0].split("!")[1:], attrs

    assert cookie_attrs(forwarded) == cookie_attrs(direct)
    assert [k for k, _ in forwarded[2]] == [k for k, _ in direct[2]]
    # a 404 of the app, and a response to HEAD, relayed as they are
    assert raw_get(other + "/nothing", c.token)[:2] == raw_get(
        cluster.url("s1") + "/nothing", c.token)[:2]
    req = urllib.request.Request(other + "/peek", method="HEAD",
                                 headers={"Cookie": f"JSESSIONID={c.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200 and resp.read() == b""


def test_bodies_stream_through_both_ways(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    other = cluster.servers[third(cluster, c)]
    payload = os.urandom(300_000)  # beyond what is held whole: it streams to the primary
    conn = http.client.HTTPConnection("127.0.0.1", other["http"], timeout=10)
    conn.putrequest("POST", "/echo")
    conn.putheader("Cookie", f"JSESSIONID={c.token}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    for i in range(0, len(payload), 65536):
        part = payload[i:i + 65536]
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("x-served-by") == "s1"
    # the app on the primary sees the client, not the server that forwarded the request
    assert resp.getheader("x-client") == "{}:{}".format(*conn.sock.getsockname())
    assert resp.getheader("transfer-encoding") == "chunked"  # streamed, as the primary's
    assert resp.read() == payload
    # a small body (held whole, with its Content-Length)
    conn.request("POST", "/echo", body=b"x" * 1000, headers={"Cookie": f"JSESSIONID={c.token}"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"x" * 1000
    conn.close()
    status, body = c.get("/peek", base=cluster.url("s1"))
    assert body["values"]["echoed"] == 1000 and c.route[1] == "s1"


def test_a_forwarded_request_whose_client_left_is_not_applied(make_cluster):
    """The client gives up while the primary runs its request: the forwarding server
    resets the hop, and the primary commits nothing of it (I7 over the hop)."""
    cluster = make_cluster(app="tests.apps:wsgi_counter").start(proxy=False)
    c = session_on(cluster, "s1")
    other = cluster.servers[third(cluster, c)]
    conn = http.client.HTTPConnection("127.0.0.1", other["http"], timeout=0.4)
    conn.request("POST", "/set?key=late&value=1&sleep=1.2",
                 headers={"Cookie": f"JSESSIONID={c.token}"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()  # (the client leaves while the app sleeps, before its commit)
    time.sleep(1.5)
    status, body = c.get("/peek", base=cluster.url("s1"))
    assert status == 200 and "late" not in body["values"], body
    refused = cluster.wait_event("s1", "request_refused_late")
    assert refused and refused[0]["reason"] == "connection_closed"
    # the next request of the session is served as usual
    status, body = c.get("/count", base=f"http://127.0.0.1:{other['http']}")
    assert status == 200 and body["counter"] == 2 and body["server"] == "s1"


def test_a_draining_server_forwards_the_requests_of_sessions_that_live_elsewhere(
        make_cluster):
    """SIGTERM: while the server drains, a request of a session whose primary is another
    server is forwarded there (a plain load balancer still sends it some requests);
    anything that would run there gets 503 `draining`."""
    import signal
    import threading

    cluster = make_cluster(app="tests.apps:wsgi_counter").start(proxy=False)
    mine = session_on(cluster, "s3")
    theirs = session_on(cluster, "s1")
    slow = threading.Thread(target=mine.get, args=("/set?key=k&value=v&sleep=2",))
    slow.start()  # in flight at s3: its drain waits for it
    time.sleep(0.3)
    cluster.servers["s3"]["proc"].send_signal(signal.SIGTERM)
    assert cluster.wait_event("s3", "backend_draining")
    status, body = theirs.get("/count", base=cluster.url("s3"))
    assert status == 200 and body["counter"] == 2 and body["server"] == "s1", body
    status, body = Client(cluster.url("s3")).get("/count")  # a new session: not here
    assert status == 503 and "draining" in body
    slow.join()
    assert cluster.servers["s3"]["proc"].wait(timeout=20) == 0


def test_a_hop_mark_from_a_client_is_not_trusted(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    forged = {"X-Tandem-Request-Id": "forged-1",
              "X-Tandem-Hop": f"{int(time.time())};10.9.9.9:1;{'0' * 64}"}
    status, body = c.get("/count", base=cluster.url(other), headers=forged)
    # a trusted mark would have had the session taken over where the request landed
    assert status == 200 and body["server"] == "s1" and c.route[1] == "s1"
    assert cluster.wait_event(other, "forward_hop_refused")
    # the primary trusts no client's mark either (it would give the app that client address)
    forged["X-Tandem-Request-Id"] = "forged-2"  # (the same id would be a retry: undone)
    status, body = c.get("/count", base=cluster.url("s1"), headers=forged)
    assert status == 200 and body["counter"] == 3
    refused = cluster.wait_event("s1", "forward_hop_refused")
    assert refused and refused[0]["client"].startswith("127.0.0.1:")


def test_a_marked_request_is_never_forwarded_again(make_cluster):
    """A request a peer forwarded (a mark made under the cluster secret) is served where
    it arrives, whoever the session's primary is: a request takes at most one hop."""
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    mark = HopAuth(("test-secret",)).sign(rid="hop-1", method="GET", target=b"/count",
                                          client="10.1.2.3:4567")
    status, body = c.get("/count", base=cluster.url(other), headers={
        "X-Tandem-Request-Id": "hop-1", "X-Tandem-Hop": mark.decode()})
    # not sent on to s1: the session is taken over here (take-over rules)
    assert status == 200 and body["counter"] == 2 and body["server"] == other
    assert not cluster.events(other) or not [
        e for e in cluster.events(other) if e.get("event") == "forward_hop_refused"]


def test_a_request_from_tandem_s_proxy_is_not_forwarded(make_cluster):
    """tandem's proxy (its requests carry X-Tandem-Deadline) sends a request elsewhere than
    to the session's primary only when the primary failed it: it is taken over there."""
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    status, body = c.get("/count", base=cluster.url(other), headers={
        "X-Tandem-Deadline": "5000", "X-Tandem-Request-Id": "proxied-1"})
    assert status == 200 and body["counter"] == 2 and body["server"] == other
    assert c.route[1] == other and cluster.health(other)["stats"]["forwarded"] == 0


def test_take_over_mode_moves_the_session_where_the_request_landed(make_cluster):
    cluster = make_cluster(session={"foreign_requests": "take_over"}).start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    status, body = c.get("/count", base=cluster.url(other))
    assert status == 200 and body["counter"] == 2 and body["server"] == other
    assert c.route[1] == other
    assert cluster.health(other)["stats"]["forwarded"] == 0


def test_a_dead_primary_s_request_goes_to_its_promoted_secondary(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = session_on(cluster, "s1")
    c.get("/count")
    secondary = c.route[2]
    other = third(cluster, c)
    cluster.kill("s1")
    # at the server holding no copy: it waits for the view to remove s1 (the secondary
    # promotes its copy as it adopts that view), then forwards the request there
    status, body = c.get("/count", base=cluster.url(other))
    assert status == 200 and body["counter"] == 3, body
    assert body["server"] == secondary and c.route[1] == secondary
    assert cluster.health(other)["stats"]["fetched"] == 0


def test_take_over_mode_takes_a_dead_primary_s_session_where_the_request_landed(make_cluster):
    cluster = make_cluster(session={"foreign_requests": "take_over"}).start(proxy=False)
    c = session_on(cluster, "s1")
    other = third(cluster, c)
    cluster.kill("s1")
    status, body = c.get("/count", base=cluster.url(other))
    assert status == 200 and body["counter"] == 2 and body["server"] == other
