"""The request pipeline (proxy/client.py: repeat, the last head's fields, regex + parse)
against the general path: the same bytes reach the backend either way; what each layer
relies on; and the backend connection a client connection keeps between its requests."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.proxy_support import (
    RawBackend,
    RawClient,
    answering_always,
    metric_value,
    proxy_env,
    read_request,
    token,
)


async def test_a_body_in_the_same_read_as_the_head_and_a_body_that_comes_later():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"hello")
        await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhe")
        await asyncio.sleep(0.05)
        await client.send(b"llo")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"hello")
        await client.close()


async def test_changed_fields_on_a_keep_alive_connection_are_seen():
    async with proxy_env("s1", "s2") as env:
        client = await RawClient.open(env.port)
        seen = []
        for host, primary in (("a.example", "s1"), ("a.example", "s1"), ("b.example", "s2"),
                              ("b.example", None)):
            cookie = f"Cookie: JSESSIONID={token(primary)}\r\n" if primary else ""
            await client.send(f"GET /headers HTTP/1.1\r\nHost: {host}\r\n{cookie}\r\n"
                              .encode())
            resp = await client.response()
            assert resp.status == 200
            pairs = {k.lower(): v for k, v in json.loads(resp.body)}
            seen.append((pairs["x-forwarded-host"], resp.header("x-server")))
        await client.close()
    assert seen[:3] == [("a.example", "s1"), ("a.example", "s1"), ("b.example", "s2")]
    assert seen[3][0] == "b.example"


async def test_a_read_ending_inside_the_next_request_head():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\nGE")
        await asyncio.sleep(0.05)
        await client.send(b"T /status/202 HTTP/1.1\r\nHost: x\r\n\r\n")
        got = [await client.response() for _ in range(2)]
        await client.close()
    assert [(r.status, r.body) for r in got] == [(201, b"s1 201"), (202, b"s1 202")]
    assert env.backends["s1"].hits["/status/202"] == 1


async def test_http10_keep_alive_client_gets_a_whole_response_with_the_connection_field():
    backend = await RawBackend(answering_always(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            resp = await client.response()
            assert (resp.status, resp.body) == (200, b"ok")
            assert resp.header("connection") == "keep-alive"
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            resp = await client.response()
            assert (resp.body, resp.header("connection")) == (b"ok", "close")
            assert await client.closed()
            await client.close()
    finally:
        await backend.stop()


async def test_an_invalid_request_in_the_fast_lane_is_400():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n")
        resp = await client.response()
        assert resp.status == 400 and await client.closed()
        await client.close()
        assert env.backends["s1"].hits["/"] == 0


async def test_a_repeated_request_gets_its_own_request_id_and_one_sent_early_waits_its_turn():
    heads: list[bytes] = []

    async def handler(reader, writer):
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            await asyncio.sleep(0.05)  # long enough for the client's early repeat to arrive
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    backend = await RawBackend(handler).start()
    request = b"GET /same HTTP/1.1\r\nHost: x\r\nCookie: a=b\r\n\r\n"
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(3):  # the same bytes again and again
                await client.send(request)
                resp = await client.response()
                assert (resp.status, resp.body) == (200, b"ok")
            await client.send(request)
            await asyncio.sleep(0.01)
            await client.send(request)  # while the one before is in flight
            got = [await client.response() for _ in range(2)]
            assert [(r.status, r.body) for r in got] == [(200, b"ok")] * 2
            await client.close()
    finally:
        await backend.stop()
    assert len(heads) == 5
    ids = set()
    for head in heads:
        fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:] if line)
        assert fields[b"Host"] == b"x" and fields[b"Cookie"] == b"a=b"
        assert fields[b"X-Forwarded-Host"] == b"x" and b"X-Forwarded-For" in fields
        ids.add(fields[b"X-Tandem-Request-Id"])
    assert len(ids) == 5


async def test_a_request_as_long_as_the_last_one_is_still_validated():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        await client.send(b"GET /a HTTP/1.1\r\nHost\x01x\r\n\r\n")  # same size, invalid
        resp = await client.response()
        assert resp.status == 400 and await client.closed()
        await client.close()
        assert env.backends["s1"].hits["/a"] == 1


def _serving(server_id: bytes):
    """A raw backend handler answering every request of a connection with its id and a
    counter (no two responses alike)."""
    async def handler(reader, writer):
        n = 0
        while True:
            await read_request(reader)
            n += 1
            body = server_id + b" %d" % n
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    return handler


async def test_a_client_connection_keeps_its_backend_connection_across_backends():
    s1 = await RawBackend(_serving(b"s1")).start()
    s2 = await RawBackend(_serving(b"s2")).start()
    try:
        async with proxy_env(extra={"s1": s1.port, "s2": s2.port}) as env:
            client = await RawClient.open(env.port)
            bodies = []
            for primary in ("s1", "s1", "s2", "s1"):
                await client.send(f"GET /?p={primary} HTTP/1.1\r\nHost: x\r\n"
                                  f"Cookie: JSESSIONID={token(primary)}\r\n\r\n".encode())
                bodies.append((await client.response()).body)
            # Another client connection meanwhile needs a backend connection of its own.
            other = await RawClient.open(env.port)
            await other.send(f"GET / HTTP/1.1\r\nHost: x\r\n"
                             f"Cookie: JSESSIONID={token('s1')}\r\n\r\n".encode())
            assert (await other.response()).body == b"s1 1"
            await other.close()
            await client.close()
        # The same backend connection carried every request to a backend, through the
        # pool when the client went elsewhere in between.
        assert bodies == [b"s1 1", b"s1 2", b"s2 1", b"s1 3"]
        assert (s1.connections, s2.connections) == (2, 1)
    finally:
        await s1.stop()
        await s2.stop()


async def test_a_kept_backend_connection_closed_while_idle_is_not_used():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()  # then closed (no Connection: close: the proxy keeps it)

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(3):
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await client.response()).body == b"ok"
                await asyncio.sleep(0.1)  # the backend's close arrives
            await client.close()
            assert backend.connections == 3
            # (never sent on a closed connection: no retry needed)
            assert metric_value(await env.metrics(), "tandem_proxy_stale_retries_total") == 0
    finally:
        await backend.stop()


async def test_an_idle_client_connection_gives_its_backend_connection_back_to_the_pool():
    async with proxy_env("s1", keepalive_s=0.6) as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        pooled = []
        for _ in range(12):  # housekeeping sweeps every 0.3 s here
            pooled.append(env.backend_status(await env.status(), "s1")["idle_connections"])
            await asyncio.sleep(0.1)
        # Kept by the client connection, then in the pool, then closed as expired (and
        # the idle client connection with it, as before).
        assert 1 in pooled
        assert pooled[-1] == 0
        assert await client.closed()
        await client.close()


async def test_an_http10_request_and_a_connect_in_the_fast_lanes_shape_take_the_general_path():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")  # the lane learns the fields
        assert (await client.response()).status == 200
        await client.send(b"GET /b HTTP/1.0\r\nHost: x\r\n\r\n")  # the same fields
        resp = await client.response()
        assert resp.status == 200 and resp.body.startswith(b"s1")
        assert await client.closed()  # HTTP/1.0 without keep-alive: closed after it
        await client.close()
        client = await RawClient.open(env.port)
        await client.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await client.response()).status == 200
        await client.send(b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response()
        assert resp.status == 405 and await client.closed()
        await client.close()
        assert env.backends["s1"].hits["/b"] == 1


async def test_an_http10_request_whose_body_comes_later_is_answered_as_http10():
    # Its head starts the read as the fast lane's would, but the lane cannot take it (the
    # body is not all there): the general path must see HTTP/1.0 all the same, so a body
    # of unknown length is not chunked for it.
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-App: 1\r\n\r\nhello")  # ends with the connection
        await writer.drain()
        writer.close()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            await client.send(b"POST / HTTP/1.0\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
            await asyncio.sleep(0.05)
            await client.send(b"cd")
            data = await asyncio.wait_for(client.reader.read(), 5)
            await client.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
        assert body == b"hello"
    finally:
        await backend.stop()


def test_llhttp_after_a_whole_request_keeps_alive_http11_alone():
    # What layer 3 of the request pipeline (proxy/client.py) rests on: asked after a whole
    # request, should_keep_alive() is true for HTTP/1.1 alone, so it stands for a version
    # check; and llhttp reports CONNECT as an upgrade, so the lane never forwards one.
    from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

    def keeps_alive(head: bytes) -> bool | None:
        parser = HttpRequestParser(object())
        try:
            parser.feed_data(head)
        except HttpParserError:
            return None  # refused: 400 from the lane and from the general path alike
        return parser.should_keep_alive()

    head = b"GET / HTTP/%s\r\nHost: x\r\n%s\r\n"
    assert keeps_alive(head % (b"1.1", b""))
    for version in (b"0.9", b"1.0", b"2.0"):  # accepted by llhttp, not kept alive
        assert keeps_alive(head % (version, b"")) is False
    for version in (b"0.0", b"1.2", b"3.0"):
        assert keeps_alive(head % (version, b"")) is None
    # It tells nothing else by then (llhttp clears what Connection said at the message's
    # end): the regex must keep heads with a Connection field out of the lane.
    assert keeps_alive(head % (b"1.1", b"Connection: close\r\n"))
    assert keeps_alive(head % (b"1.0", b"Connection: keep-alive\r\n")) is False
    with pytest.raises(HttpParserUpgrade):
        HttpRequestParser(object()).feed_data(b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n")


def test_exchange_class_defaults_are_immutable():
    # What the exchange's class-level defaults rest on (proxy/exchange_state.py): every
    # exchange reads the same default objects until it writes its own value, so none of
    # them may be mutable (a list appended to would be every exchange's list).
    import types

    from proxy.exchange import Exchange

    defaults = {name: value for cls in Exchange.__mro__ for name, value in vars(cls).items()
                if cls is not object and not name.startswith("__")
                and not isinstance(value, types.FunctionType | types.MemberDescriptorType)}
    assert {"candidates", "chunked_in", "close_after", "timer_mark"} <= defaults.keys()
    mutable = {name: value for name, value in defaults.items()
               if value is not None and type(value) not in (bool, int, float)}
    assert mutable == {}
