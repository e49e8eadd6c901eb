"""HTTP/1.1 done right at the proxy's edges, driven with raw sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.proxy_support import (
    RawBackend,
    RawClient,
    answering_always,
    ask,
    metric_value,
    proxy_env,
    read_request,
    token,
)


async def _exchange(port: int, data: bytes, *, head: bool = False) -> tuple[RawClient, object]:
    client = await RawClient.open(port)
    await client.send(data)
    return client, await client.response(head=head)


async def test_chunked_request_with_trailers_is_reframed_for_the_backend():
    seen: list[bytes] = []

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        raw = await reader.readuntil(b"0\r\n")
        raw += await reader.readuntil(b"\r\n\r\n")
        seen.append(head + raw)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            await client.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5;ext=1\r\nhello\r\n")
            await asyncio.sleep(0.05)
            await client.send(b"6\r\n world\r\n0\r\nX-Checksum: 42\r\nTE: bogus\r\n\r\n")
            resp = await client.response()
            assert (resp.status, resp.body) == (200, b"ok")
            await client.close()
        head, _, body = seen[0].partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert body == b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: 42\r\n\r\n"
    finally:
        await backend.stop()


async def test_chunked_request_body_reaches_an_aiohttp_backend():
    async with proxy_env("s1") as env:
        client, resp = await _exchange(
            env.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n")
        assert (resp.status, resp.body) == (200, b"abcdefg")
        await client.close()


async def test_chunked_response_with_trailers_reaches_the_client():
    backend = await RawBackend(answering_always(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
        b"Trailer: X-Sum\r\n\r\n"
        b"4\r\nwiki\r\n5\r\npedia\r\n0\r\nX-Sum: 9\r\n\r\n")).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(2):  # the client connection stays usable
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = await client.response()
                assert resp.status == 200 and resp.header("transfer-encoding") == "chunked"
                assert resp.body == b"wikipedia"
                assert resp.trailers == [("X-Sum", "9")]
            await client.close()
            assert backend.connections == 1  # and so does the upstream one
    finally:
        await backend.stop()


async def test_close_delimited_upstream_response_is_chunked_for_http11_clients():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            for _ in range(2):
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                resp = await client.response()
                assert resp.body == b"until the end"
                assert resp.raw_body == b"d\r\nuntil the end\r\n0\r\n\r\n"
            await client.close()
    finally:
        await backend.stop()


async def test_truncated_upstream_response_closes_the_client_connection():
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
        writer.transport.abort()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await client.reader.readuntil(b"\r\n\r\n")
            assert b"Content-Length: 100" in head
            assert await client.reader.read() == b"only part"  # then EOF: truncated
            await client.close()
    finally:
        await backend.stop()


async def test_head_and_no_body_statuses_keep_both_connections_in_sync():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        cases = [
            (b"HEAD /stream?n=5000&cl=1 HTTP/1.1\r\nHost: x\r\n\r\n", True, 200),
            (b"HEAD /stream?n=5000 HTTP/1.1\r\nHost: x\r\n\r\n", True, 200),
            (b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n", False, 204),
            (b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n", False, 304),
        ]
        for request, head, status in cases:
            await client.send(request)
            resp = await client.response(head=head)
            assert resp.status == status and resp.body == b""
            if request.startswith(b"HEAD /stream?n=5000&cl=1"):
                assert resp.header("content-length") == "5000"
            await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await client.response()
            assert (resp.status, resp.body) == (200, b"s1")
        await client.close()
        # one upstream connection carried all of it
        assert env.backend_status(await env.status(), "s1")["idle_connections"] == 1


async def test_expect_100_continue():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                          b"Expect: 100-continue\r\n\r\n")
        interim = await client.response()
        assert interim.status == 100
        await client.send(b"hello")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"hello")
        await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
                          b"Expect: something-else\r\n\r\nx")
        resp = await client.response()
        assert resp.status == 417
        await client.close()


async def test_pipelined_requests_are_answered_in_order():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /status/201 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nthree"
                          b"GET /status/202 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        got = [await client.response() for _ in range(4)]
        assert [(r.status, r.body) for r in got] == [
            (200, b"s1"), (201, b"s1 201"), (200, b"three"), (202, b"s1 202")]
        assert got[3].header("connection") == "close"
        assert await client.closed()
        await client.close()


async def test_connection_close_is_honoured():
    async with proxy_env("s1") as env:
        client, resp = await _exchange(
            env.port, b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert resp.status == 200 and resp.header("connection") == "close"
        assert await client.closed()
        await client.close()


async def test_http10_clients_get_close_delimited_bodies_and_optional_keep_alive():
    async with proxy_env("s1") as env:
        client, resp = await _exchange(env.port, b"GET /stream?n=100000 HTTP/1.0\r\n\r\n")
        assert resp.status == 200 and not resp.has("transfer-encoding")
        assert resp.body == b"x" * 100000  # read to EOF
        await client.close()
        client, resp = await _exchange(
            env.port, b"GET /id HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (resp.status, resp.body) == (200, b"s1")
        assert resp.header("connection") == "keep-alive"
        await client.send(b"GET /id HTTP/1.0\r\n\r\n")
        resp = await client.response()
        assert resp.body == b"s1" and await client.closed()
        await client.close()


async def test_oversized_head_is_431():
    async with proxy_env("s1", max_head_bytes=4096) as env:
        client, resp = await _exchange(
            env.port, b"GET /id HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
        assert resp.status == 431 and await client.closed()
        await client.close()
        # a head that never ends is cut off too
        client = await RawClient.open(env.port)
        await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\nX-Big: ")
        for _ in range(10):
            await client.send(b"a" * 1000)
        resp = await client.response()
        assert resp.status == 431 and await client.closed()
        await client.close()
        assert env.backends["s1"].hits["/id"] == 0


async def test_oversized_body_is_413():
    async with proxy_env("s1", max_body_bytes=1000) as env:
        client, resp = await _exchange(
            env.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
        assert resp.status == 413 and await client.closed()
        await client.close()
        client = await RawClient.open(env.port)
        await client.send(b"POST /count HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):
            await client.send(b"200\r\n" + b"y" * 512 + b"\r\n")
        resp = await client.response()
        assert resp.status == 413 and await client.closed()
        await client.close()
        ok, resp = await _exchange(
            env.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
                      + b"z" * 1000)
        assert resp.status == 200 and len(resp.body) == 1000
        await ok.close()


@pytest.mark.parametrize("request_bytes", [
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n"
    b"\r\n0\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n"
    b"\r\n0\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 6\r\n\r\nhello!",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01b\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\r\nX Bad: a\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\r\nContent-Length : 0\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\nX-Bare-LF: 1\r\n\r\n",
    b"GET /id HTTP/1.1\r\n\r\n",
    b"GET /id HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    b"POST /echo HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
], ids=["cl+te", "te+cl", "two-cl", "cl-list", "bad-chunk-size", "bad-chunk-end", "obs-fold",
        "ctl-in-value", "space-in-name", "space-before-colon", "bare-lf", "no-host",
        "two-hosts", "te-in-http10"])
async def test_ambiguous_or_malformed_requests_are_400_and_closed(request_bytes):
    async with proxy_env("s1") as env:
        client, resp = await _exchange(env.port, request_bytes)
        assert resp.status == 400
        assert resp.header("connection") == "close" and await client.closed()
        await client.close()
        assert sum(env.backends["s1"].hits.values()) == 0
        assert metric_value(await env.metrics(), "tandem_proxy_client_errors_total") == 1


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
     501),
    (b"GET /id HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
])
async def test_unsupported_requests_are_refused(request_bytes, status):
    async with proxy_env("s1") as env:
        client, resp = await _exchange(env.port, request_bytes)
        assert resp.status == status and await client.closed()
        await client.close()


async def test_a_bad_request_behind_a_good_pipelined_one_is_answered_after_it():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /slow?s=0.1 HTTP/1.1\r\nHost: x\r\n\r\n"
                          b"GET /id HTTP/1.1\r\nHost: x\r\nX A: 1\r\n\r\n")
        first = await client.response()
        second = await client.response()
        assert (first.status, first.body) == (200, b"s1")
        assert second.status == 400 and await client.closed()
        await client.close()


async def test_idle_client_connections_are_closed_after_keepalive_s():
    async with proxy_env("s1", keepalive_s=0.3) as env:
        client, resp = await _exchange(env.port, b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.status == 200
        assert await client.closed(timeout=3.0)
        await client.close()
        slow = await RawClient.open(env.port)
        await slow.send(b"GET /id HTTP/1.1\r\n")  # and never the rest
        assert await slow.closed(timeout=3.0)
        await slow.close()


async def test_half_closed_client_still_gets_its_response():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /slow?s=0.1 HTTP/1.1\r\nHost: x\r\n\r\n")
        client.writer.write_eof()
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"s1")
        assert await client.closed()
        await client.close()


async def test_a_stalled_upload_is_408_and_the_backend_is_not_blamed():
    async with proxy_env("s1", io_timeout_s=0.3) as env:
        client = await RawClient.open(env.port)
        await client.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
                          b"only ten b")
        resp = await client.response(timeout=3.0)
        assert resp.status == 408 and await client.closed()
        await client.close()
        snap = await env.status()
        assert not env.backend_status(snap, "s1")["bad"]
        assert (await env.get("/id"))[:2] == (200, "s1")


@pytest.mark.parametrize("piece", [1, 7, 61])
async def test_requests_split_anywhere_are_parsed_the_same(piece):
    cookie = f"JSESSIONID={token('s2', 's1')}".encode()
    stream = (b"GET /id HTTP/1.1\r\nHost: x\r\nCookie: " + cookie + b"\r\n\r\n"
              b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
              b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Tandem-View: spoof\r\n\r\n")
    async with proxy_env("s1", "s2") as env:
        client = await RawClient.open(env.port)
        for i in range(0, len(stream), piece):
            await client.send(stream[i:i + piece])
            if piece == 1 and i % 16 == 0:
                await asyncio.sleep(0)
        got = [await client.response() for _ in range(4)]
        await client.close()
    assert (got[0].status, got[0].body) == (200, b"s2")
    assert [(r.status, r.body) for r in got[1:3]] == [(200, b"hello"), (200, b"abcde")]
    names = {k.lower(): v for k, v in json.loads(got[3].body)}
    assert names["x-tandem-view"] == "-" and names["x-forwarded-for"] == "127.0.0.1"


async def test_responses_dribbled_in_small_pieces_are_relayed_intact():
    responses = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Tandem-Secret: 1\r\n\r\nhello",
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok",
    ]

    async def handler(reader, writer):
        for data in responses:
            await read_request(reader)
            for i in range(0, len(data), 3):
                writer.write(data[i:i + 3])
                await writer.drain()
                await asyncio.sleep(0.001)
        await reader.read()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            got = await ask(env.port, len(responses))
        assert [(r.status, r.body) for r in got] == [(200, b"hello"), (201, b"abc"),
                                                     (202, b"ok")]
        assert not got[0].has("x-tandem-secret")
        assert backend.connections == 1
    finally:
        await backend.stop()
