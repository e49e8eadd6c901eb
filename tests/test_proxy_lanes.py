"""The fast lanes (a whole request in one read, a whole response in one read) against the
general path: the same bytes reach the other side either way."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.proxy_support import (
    RawBackend,
    RawClient,
    answering,
    answering_always,
    ask,
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


async def test_whole_responses_are_relayed_byte_for_byte_and_others_rewritten():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-App: 1\r\n\r\nhello",  # relayed as read
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nKeep-Alive: timeout=5\r\n\r\nhello",
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n",
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            raw = [r.raw_head + r.raw_body for r in await ask(env.port, len(responses))]
        assert raw[0] == responses[0]
        assert b"keep-alive" not in raw[1].lower() and raw[1].endswith(b"\r\n\r\nhello")
        assert raw[2] == responses[2]
        assert backend.connections == 1
    finally:
        await backend.stop()


async def test_an_invalid_whole_response_is_a_bad_gateway():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nBad Header: x\r\n\r\nok")
        await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            status, body, _ = await env.get("/")
            assert status == 502 and "invalid response" in body
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


async def test_an_unusual_status_class_is_relayed_and_counted():
    backend = await RawBackend(answering_always(
        b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok")).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(2):
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = await client.response()
                assert (resp.status, resp.body) == (600, b"ok")
            await client.close()
            assert (await env.status())["requests"]["total"] == 2
    finally:
        await backend.stop()


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


async def test_a_response_as_long_as_the_last_one_relayed_whole_is_still_looked_at():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",  # the same head again
        b"HTTP/1.1 503 OK\r\nContent-Length: 2\r\n\r\nok",  # same size: fails over
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env("s2", extra={"s1": backend.port}) as env:
            cookie = f"Cookie: JSESSIONID={token('s1', 's2')}\r\n".encode()
            got = await ask(env.port, 3,
                            b"GET /status/201 HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
            assert [(r.status, r.body) for r in got] == [(200, b"ok"), (200, b"ok"),
                                                         (201, b"s2 201")]
    finally:
        await backend.stop()


async def test_an_invalid_response_as_long_as_the_last_one_relayed_whole_is_a_bad_gateway():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: 1\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App\x01 1\r\n\r\nok",
    ]

    backend = await RawBackend(answering(responses)).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            first, resp = await ask(env.port, 2)
            assert first.body == b"ok"
            assert resp.status == 502 and b"invalid response" in resp.body
    finally:
        await backend.stop()


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


async def test_responses_that_cannot_be_relayed_whole_take_the_general_path():
    async def handler(reader, writer):
        await read_request(reader)  # the body in a later read than the head
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"world")
        await writer.drain()
        await read_request(reader)  # whole, with fields to drop
        writer.write(b"HTTP/1.1 200 OK\r\nX-Tandem-Secret: 1\r\nProxy-Thing: 2\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # whole, nothing to drop: as is
        writer.write(b"HTTP/1.1 200 OK\r\nX-App: 3\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = await ask(env.port, 3)
        assert [r.body for r in got] == [b"helloworld", b"ok", b"ok"]
        assert not got[1].has("x-tandem-secret") and not got[1].has("proxy-thing")
        assert got[2].header("x-app") == "3"
        assert backend.connections == 1
    finally:
        await backend.stop()


async def test_responses_shaped_like_the_last_whole_one_are_relayed_as_read_when_they_may_be():
    # Heads that differ from the last one relayed whole only in digits skip the per-field
    # check; what the digits say (status, version, length) is still looked at.
    responses = [
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",  # regex + parse
        b"HTTP/1.1 201 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi",  # its shape: as read
        b"HTTP/1.1 200 OK\r\nX-Seq: 3\r\nContent-Length: 5\r\n\r\nhello",  # another length
        b"HTTP/1.1 200 OK\r\nX-Seq: 4\r\nContent-Length: 9\r\n\r\nhel",  # not whole yet
        b"HTTP/1.1 204 OK\r\nX-Seq: 5\r\nContent-Length: 0\r\n\r\n",  # no body whatever
        b"HTTP/1.0 200 OK\r\nX-Seq: 6\r\nContent-Length: 2\r\n\r\nok",  # HTTP/1.0: rewritten
    ]

    async def handler(reader, writer):
        for data in responses:
            await read_request(reader)
            writer.write(data)
            await writer.drain()
            if data.endswith(b"hel"):
                await asyncio.sleep(0.05)
                writer.write(b"lo you")  # the rest of that body, in a later read
                await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = await ask(env.port, len(responses))
        assert [(r.status, r.body) for r in got] == [
            (200, b"ok"), (201, b"hi"), (200, b"hello"), (200, b"hello you"), (204, b""),
            (200, b"ok")]
        assert [r.header("x-seq") for r in got] == ["1", "2", "3", "4", "5", "6"]
        assert backend.connections == 1
    finally:
        await backend.stop()


@pytest.mark.parametrize(("second", "relayed_as_read"), [
    (b"HTTP/1.1 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi", True),
    (b"HTTP/1.0 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nhi", False),  # rewritten
])
async def test_a_response_shaped_like_the_last_whole_one_is_relayed_as_read_if_http11(
        second, relayed_as_read):
    backend = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok", second])).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = [r.raw_head + r.raw_body for r in await ask(env.port, 2)]
        assert (got[1] == second) == relayed_as_read
        assert got[1].startswith(b"HTTP/1.1 200 ") and got[1].endswith(b"\r\n\r\nhi")
    finally:
        await backend.stop()


async def test_a_same_shaped_response_that_fails_over_or_is_invalid():
    # 503 in the shape of the last whole response: fails over; an HTTP version llhttp
    # refuses, in that shape too: a bad gateway.
    s1 = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 503 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nno",
    ])).start()
    bad = await RawBackend(answering([
        b"HTTP/1.1 200 OK\r\nX-Seq: 1\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.9 200 OK\r\nX-Seq: 2\r\nContent-Length: 2\r\n\r\nok",
    ])).start()
    try:
        async with proxy_env("s2", extra={"s1": s1.port}) as env:
            cookie = f"Cookie: JSESSIONID={token('s1', 's2')}\r\n".encode()
            got = await ask(env.port, 2,
                            b"GET /status/200 HTTP/1.1\r\nHost: x\r\n" + cookie + b"\r\n")
            assert [(r.status, r.body) for r in got] == [(200, b"ok"), (200, b"s2 200")]
        async with proxy_env(extra={"s1": bad.port}) as env:
            got = await ask(env.port, 2)
            assert [(r.status, b"invalid response" in r.body) for r in got] == [
                (200, False), (502, True)]
    finally:
        await s1.stop()
        await bad.stop()


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


def test_llhttp_reads_no_digit_of_a_response_head_but_the_version_and_the_length():
    # What relaying a response in the shape of the last whole one with no parse rests on
    # (proxy/responses.py, layer 2): llhttp accepts any digits in a head it accepted —
    # status code, field names and values, Content-Length's (its value frames the body) —
    # but the version's.
    from httptools import HttpParserError, HttpResponseParser

    class Callbacks:
        def __init__(self) -> None:
            self.complete = 0

        def on_message_complete(self) -> None:
            self.complete += 1

    def parse(data: bytes) -> bool:
        cb = Callbacks()
        try:
            HttpResponseParser(cb).feed_data(data)
        except HttpParserError:
            return False
        return cb.complete == 1

    head = b"HTTP/1.1 %s OK\r\nX-%s: %s\r\nContent-Length: %s\r\n\r\n"
    for status in (b"000", b"099", b"200", b"599", b"600", b"999"):
        for name in (b"0", b"99"):
            for value in (b"0", b"1234567890"):
                for length, body in ((b"2", b"ok"), (b"0002", b"ok"), (b"0", b"")):
                    assert parse(head % (status, name, value, length) + body)
    for version in (b"1.0", b"1.1"):  # (what the version's digits say is checked)
        assert parse(b"HTTP/%s 200 OK\r\nContent-Length: 2\r\n\r\nok" % version)
    assert not parse(b"HTTP/1.9 200 OK\r\nContent-Length: 2\r\n\r\nok")


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
