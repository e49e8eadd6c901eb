"""Header rewriting both ways, and the dynamic server list (X-Tandem-Cluster)."""

from __future__ import annotations

import json

import pytest

from proxy.headers import parse_cluster_header
from tandem.config import Address
from tests.proxy_support import (
    AppBackend,
    RawBackend,
    RawClient,
    answering_always,
    proxy_env,
    token,
)


async def test_request_headers_hop_by_hop_stripped_forwarding_added_spoofing_dropped():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(
            b"GET /headers HTTP/1.1\r\nHost: shop.example:8080\r\n"
            b"Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
            b"X-Tandem-View: spoofed\r\nX-Tandem-Server: s9\r\n"
            b"x-tandem-cluster: a; s9=1.2.3.4:1\r\n"
            b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: evil.example\r\nForwarded: for=203.0.113.9\r\n"
            b"X-Custom: kept\r\n\r\n")
        resp = await client.response()
        await client.close()
    assert resp.status == 200
    seen: dict[str, list[str]] = {}
    for k, v in json.loads(resp.body):
        seen.setdefault(k.lower(), []).append(v)
    for gone in ("x-hop", "keep-alive", "proxy-authorization", "proxy-connection", "te",
                 "x-tandem-server", "x-tandem-cluster"):
        assert gone not in seen, gone
    assert seen["x-tandem-view"] == ["-"]  # the proxy's own, never the client's
    assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == ["shop.example:8080"]
    assert seen["forwarded"] == ['for=203.0.113.9, for=127.0.0.1;host="shop.example:8080";'
                                 "proto=http"]
    assert seen["host"] == ["shop.example:8080"]
    assert seen["x-custom"] == ["kept"]


async def test_response_hop_by_hop_and_x_tandem_headers_are_removed():
    backend = await RawBackend(answering_always(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: X-Resp\r\n"
        b"X-Resp: 1\r\nKeep-Alive: timeout=1\r\nProxy-Authenticate: Basic\r\n"
        b"X-Tandem-Internal: 1\r\nX-TANDEM-Cluster: nonsense\r\n"
        b"Set-Cookie: a=b\r\nX-App: yes\r\n\r\nok")).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            status, body, headers = await env.get("/")
            assert (status, body) == (200, "ok")
            names = {k.lower() for k in headers}
            assert {"x-resp", "keep-alive", "proxy-authenticate", "x-tandem-internal",
                    "x-tandem-cluster"}.isdisjoint(names)
            assert headers["Set-Cookie"] == "a=b" and headers["X-App"] == "yes"
            assert (await env.status())["view"] == "-"  # a bad cluster header is ignored
    finally:
        await backend.stop()


def test_parse_cluster_header():
    view, members = parse_cluster_header(
        "9f86d081884c7d65; s1=127.0.0.1:9001, s2=127.0.0.1:9002 ,s-3=[::1]:9003")
    assert view == "9f86d081884c7d65"
    assert members == {"s1": Address("127.0.0.1", 9001), "s2": Address("127.0.0.1", 9002),
                       "s-3": Address("::1", 9003)}
    assert parse_cluster_header("h;s1=a.example:1") == ("h", {"s1": Address("a.example", 1)})


@pytest.mark.parametrize("value", [
    "", "nohash", "; s1=127.0.0.1:1", "h;", "h; s1", "h; s1=127.0.0.1", "h; s1=127.0.0.1:0",
    "h; s 1=127.0.0.1:1", "h; NONE=127.0.0.1:1", "h; s1=127.0.0.1:1, s1=127.0.0.1:2",
    "h h; s1=127.0.0.1:1", "-; s1=127.0.0.1:1",
])
def test_parse_cluster_header_rejects_malformed_values(value):
    with pytest.raises(ValueError):
        parse_cluster_header(value)


async def test_cluster_view_update_adds_backends_and_demotes_absent_ones():
    s9 = await AppBackend("s9").start()
    try:
        async with proxy_env("s1", "s2") as env:
            s1 = env.backends["s1"]
            s1.view = ("h1", f"h1; s1=127.0.0.1:{s1.port}, s9=127.0.0.1:{s9.port}")
            s9.view = s1.view
            status, body, headers = await env.get(
                "/id", headers={"Cookie": f"JSESSIONID={token('s1', 's2')}"})
            assert (status, body) == (200, "s1")
            assert "X-Tandem-Cluster" not in headers
            snap = await env.status()
            assert snap["view"] == "h1"
            by_id = {b["id"]: b for b in snap["backends"]}
            assert by_id["s9"]["learned"] and by_id["s9"]["in_view"]
            assert by_id["s9"]["address"] == f"127.0.0.1:{s9.port}"
            assert not by_id["s2"]["in_view"]
            # new sessions: s1 and s9 only; s2 is not live in the cluster's view
            served = {(await env.get("/id"))[1] for _ in range(6)}
            assert served == {"s1", "s9"}
            # the proxy now announces the hash it holds, and s9 sees it
            assert s9.seen_views[-1] == "h1"
            # a session on s2 goes elsewhere first...
            _, body, _ = await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2')}"})
            assert body in ("s1", "s9")
            # ...but s2 is still tried when nothing else is left
            for down in ("s1", "s9"):
                async with env.http.post(f"{env.admin_url}/__tandem/backends/{down}/state",
                                         data="down") as resp:
                    assert resp.status == 200
            _, body, _ = await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2')}"})
            assert body == "s2"
            assert env.backends["s2"].seen_views[-1] == "h1"
    finally:
        await s9.stop()
