"""The backend's HTTP/1.1 server (backends/http.py) on real sockets, with raw requests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from backends.serve.http_server import HttpServer

Message = dict[str, Any]


@contextlib.asynccontextmanager
async def serve(app: Any, **kw: Any) -> AsyncIterator[HttpServer]:
    async with HttpServer(app, host="127.0.0.1", port=0, **kw) as srv:
        yield srv


@contextlib.asynccontextmanager
async def connect(srv: HttpServer) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*srv.server_addr)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class Response:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes,
                 chunks: list[bytes] | None = None) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.chunks = chunks  # the body's chunks, when it came chunked

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Response:
    """One response; its body framed by Content-Length, chunks, or the end of the stream."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    resp = Response(status, headers, b"")  # type: ignore[arg-type]
    if head or status in (204, 304) or 100 <= status < 200:
        return resp
    if resp.header("content-length") is not None:
        resp.body = await reader.readexactly(int(resp.header("content-length") or 0))
    elif resp.header("transfer-encoding") == "chunked":
        resp.chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            resp.chunks.append(data[:-2])
        resp.body = b"".join(resp.chunks)
    else:
        resp.body = await asyncio.wait_for(reader.read(), 5)
    return resp


async def at_eof(reader: asyncio.StreamReader) -> bool:
    """Has the server closed the connection (nothing more comes)?"""
    try:
        return await asyncio.wait_for(reader.read(1), 2) == b""
    except ConnectionResetError:
        return True


def text_app(body: bytes = b"hello", *, status: int = 200,
             headers: list[tuple[bytes, bytes]] | None = None, length: bool = True) -> Any:
    async def app(scope: Message, receive: Any, send: Any) -> None:
        hs = [(b"content-type", b"text/plain"), *(headers or [])]
        if length:
            hs.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": hs})
        await send({"type": "http.response.body", "body": body})
    return app


async def echo_app(scope: Message, receive: Any, send: Any) -> None:
    """Answers with the request body and how many messages it came in."""
    parts = []
    while True:
        msg = await receive()
        parts.append(msg.get("body", b""))
        if not msg.get("more_body"):
            break
    body = b"".join(parts)
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-length", b"%d" % len(body)), (b"x-messages", b"%d" % len(parts)),
        (b"x-path", scope["path"].encode()), (b"x-query", scope["query_string"])]})
    await send({"type": "http.response.body", "body": body})


# --- connections ----------------------------------------------------------------------------


async def test_keep_alive_serves_requests_one_after_the_other_on_one_connection():
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await read_response(reader)
            assert (resp.status, resp.body) == (200, b"hello")
            assert resp.header("connection") is None
            assert resp.header("date")
        assert len(srv.connections) == 1


async def test_pipelined_requests_are_answered_in_order():
    async def app(scope: Message, receive: Any, send: Any) -> None:
        delay = float(scope["query_string"].decode().split("=")[1])
        await asyncio.sleep(delay)  # the first is the slowest
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": body})

    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"".join(b"GET /%d?d=%s HTTP/1.1\r\nHost: x\r\n\r\n" % (i, d)
                              for i, d in enumerate([b"0.2", b"0", b"0.05"])))
        assert [(await read_response(reader)).body for _ in range(3)] == [b"/0", b"/1", b"/2"]


async def test_connection_close_is_honoured():
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        resp = await read_response(reader)
        assert resp.body == b"hello" and resp.header("connection") == "close"
        assert await at_eof(reader)


async def test_app_asking_to_close_closes_after_its_response():
    app = text_app(headers=[(b"connection", b"close")])
    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).header("connection") == "close"
        assert await at_eof(reader)


async def test_http_1_0_closes_unless_keep_alive_and_delimits_unsized_bodies_by_closing():
    async with serve(text_app()) as srv:
        async with connect(srv) as (reader, writer):
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            resp = await read_response(reader)
            assert resp.body == b"hello" and resp.header("connection") == "close"
            assert await at_eof(reader)
        async with connect(srv) as (reader, writer):
            for _ in range(2):
                writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                resp = await read_response(reader)
                assert resp.body == b"hello" and resp.header("connection") == "keep-alive"
    async with serve(text_app(length=False)) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await read_response(reader)  # read to the end of the stream
        assert resp.body == b"hello" and resp.header("transfer-encoding") is None


# --- request bodies -------------------------------------------------------------------------


async def test_content_length_body_and_query():
    async with serve(echo_app) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST /a%20b?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde")
        resp = await read_response(reader)
        assert resp.body == b"abcde"
        assert (resp.header("x-path"), resp.header("x-query")) == ("/a b", "x=1")


async def test_chunked_request_body_is_streamed_to_receive():
    async with serve(echo_app) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n")
        await asyncio.sleep(0.1)  # the app has the first chunk and waits for more
        writer.write(b"2\r\nde\r\n0\r\n\r\n")
        resp = await read_response(reader)
        assert resp.body == b"abcde" and int(resp.header("x-messages") or 0) >= 2
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
        assert (await read_response(reader)).status == 200


async def test_large_body_is_flow_controlled_and_arrives_whole():
    received: list[int] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        total = 0
        while True:
            msg = await receive()
            total += len(msg["body"])
            await asyncio.sleep(0.001)  # a slow consumer
            if not msg["more_body"]:
                break
        received.append(total)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body"})

    size = 8 * 1024 * 1024
    async with serve(app, body_buffer_bytes=64 * 1024) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        writer.write(b"x" * size)
        await writer.drain()
        assert (await read_response(reader)).status == 200
    assert received == [size]


async def test_expect_100_continue():
    async with serve(echo_app) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100 ")
        writer.write(b"abc")
        assert (await read_response(reader)).body == b"abc"


async def test_unread_body_is_skipped_and_the_connection_goes_on():
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234")
        assert (await read_response(reader)).body == b"hello"
        writer.write(b"56789GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).body == b"hello"


# --- responses ------------------------------------------------------------------------------


async def test_response_without_length_is_chunked():
    async def app(scope: Message, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one", b"", b"two"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b"three"})

    async with serve(app) as srv, connect(srv) as (reader, writer):
        for _ in range(2):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await read_response(reader)
            assert resp.header("transfer-encoding") == "chunked"
            assert resp.chunks == [b"one", b"two", b"three"]  # an empty message is no chunk


async def test_head_response_has_headers_and_no_body():
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        writer.write(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader, head=True)
        assert resp.header("content-length") == "5"
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # no stray body bytes before it
        assert (await read_response(reader)).body == b"hello"


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_are_not_framed(status):
    async with serve(text_app(b"", status=status, length=False)) as srv, \
            connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == status
        assert resp.header("transfer-encoding") is None and resp.header("content-length") is None
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == status


async def test_app_framing_headers_are_replaced_by_ours():
    app = text_app(headers=[(b"transfer-encoding", b"chunked"), (b"keep-alive", b"x")])
    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
        assert resp.body == b"hello" and resp.header("transfer-encoding") is None


async def test_a_header_with_a_line_break_is_refused_with_500():
    app = text_app(headers=[(b"x-evil", b"a\r\nset-cookie: b=c")])
    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 500 and resp.header("set-cookie") is None


async def test_app_errors():
    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", b"10")]})
            await send({"type": "http.response.body", "body": b"01234", "more_body": True})
        elif scope["path"] == "/none":
            return
        raise ValueError("boom")

    async with serve(app) as srv:
        for path in (b"/early", b"/none"):
            async with connect(srv) as (reader, writer):
                writer.write(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                assert (await read_response(reader)).status == 500
                writer.write(b"GET /early HTTP/1.1\r\nHost: x\r\n\r\n")  # still usable
                assert (await read_response(reader)).status == 500
        async with connect(srv) as (reader, writer):
            writer.write(b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(asyncio.IncompleteReadError):
                await read_response(reader)  # cut off: the client sees it is incomplete


async def test_body_longer_than_its_content_length_is_an_error():
    app = text_app(b"too long", headers=[(b"content-length", b"3")], length=False)
    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        # the head goes out with the first body message: nothing of it was sent
        assert (await read_response(reader)).status == 500


# --- refused requests -----------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"NOT A REQUEST\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
], ids=["two-lengths", "bad-chunk", "garbage", "bad-field"])
async def test_malformed_request_gets_400_and_close(request_):
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        writer.write(request_)
        resp = await read_response(reader)
        assert resp.status == 400 and resp.header("connection") == "close"
        assert await at_eof(reader)


@pytest.mark.parametrize("head", [
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
], ids=["url", "field", "count"])
async def test_oversized_head_gets_431(head):
    async with serve(text_app(), max_head_bytes=16384) as srv, connect(srv) as (reader, writer):
        writer.write(head)
        resp = await read_response(reader)
        assert resp.status == 431 and resp.header("connection") == "close"


async def test_unfinished_oversized_head_gets_431():
    async with serve(text_app(), max_head_bytes=16384) as srv, connect(srv) as (reader, writer):
        for _ in range(10):  # a header that never ends
            writer.write(b"GET / HTTP/1.1\r\nX-Big: " if _ == 0 else b"b" * 4096)
            await writer.drain()
        assert (await read_response(reader)).status == 431


async def test_refusal_after_pipelined_requests_comes_after_their_responses():
    async with serve(text_app()) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n")
        assert (await read_response(reader)).status == 200
        assert (await read_response(reader)).status == 400


# --- disconnects ----------------------------------------------------------------------------


async def test_client_disconnect_reaches_the_app_as_http_disconnect():
    seen: asyncio.Queue[str] = asyncio.Queue()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        first = await receive()
        assert first["type"] == "http.request" and not first["more_body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"tick", "more_body": True})
        await seen.put((await receive())["type"])  # a long poll: wait for the client to go
        await send({"type": "http.response.body", "body": b"ignored", "more_body": False})

    async with serve(app) as srv:
        async with connect(srv) as (reader, writer):
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"tick"), 5)
        assert await asyncio.wait_for(seen.get(), 5) == "http.disconnect"


async def test_receive_after_the_response_returns_http_disconnect():
    got: list[str] = []

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})
        got.append((await asyncio.wait_for(receive(), 2))["type"])

    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader)).status == 204
        await asyncio.sleep(0.05)
    assert got == ["http.disconnect"]


async def test_shutdown_lets_the_request_in_flight_finish_and_closes_idle_connections():
    release = asyncio.Event()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await text_app()(scope, receive, send)

    srv = HttpServer(app, host="127.0.0.1", port=0, shutdown_timeout_s=5)
    await srv.__aenter__()
    async with connect(srv) as (r1, w1), connect(srv) as (r2, w2):
        w2.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await read_response(r2)  # now idle
        w1.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.05)
        closing = asyncio.create_task(srv.close())
        assert await at_eof(r2)
        release.set()
        resp = await read_response(r1)
        assert resp.body == b"hello" and resp.header("connection") == "close"
        await closing


# --- websockets -----------------------------------------------------------------------------


async def ws_app(scope: Message, receive: Any, send: Any) -> None:
    assert (await receive())["type"] == "websocket.connect"
    if scope["path"] == "/reject":
        await send({"type": "websocket.close"})
        return
    if scope["path"] == "/deny":
        await send({"type": "websocket.http.response.start", "status": 401,
                    "headers": [(b"content-length", b"6")]})
        await send({"type": "websocket.http.response.body", "body": b"nope!\n"})
        return
    await send({"type": "websocket.accept", "subprotocol": (scope["subprotocols"] or [None])[0]})
    while True:
        msg = await receive()
        if msg["type"] == "websocket.disconnect":
            return
        if msg.get("text") == "bye":
            await send({"type": "websocket.close", "code": 4000, "reason": "bye"})
            return
        if msg.get("text") is not None:
            await send({"type": "websocket.send", "text": msg["text"].upper()})
        else:
            await send({"type": "websocket.send", "bytes": msg["bytes"][::-1]})


@pytest.mark.parametrize("compress", [0, 15], ids=["plain", "permessage-deflate"])
async def test_websocket_messages_and_close(compress):
    async with serve(ws_app) as srv, aiohttp.ClientSession() as http:
        url = "http://{}:{}/ws".format(*srv.server_addr)
        async with http.ws_connect(url, protocols=["chat"], compress=compress) as ws:
            assert ws.protocol == "chat"
            await ws.send_str("hi" * 50000)  # fragmented on the way in
            assert await ws.receive_str() == "HI" * 50000
            await ws.send_bytes(b"abc")
            assert await ws.receive_bytes() == b"cba"
            await ws.send_str("bye")
            msg = await ws.receive()
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4000


async def test_websocket_refused_and_denied():
    async with serve(ws_app) as srv, aiohttp.ClientSession() as http:
        base = "http://{}:{}".format(*srv.server_addr)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(base + "/reject")
        assert refused.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
            await http.ws_connect(base + "/deny")
        assert denied.value.status == 401


async def test_websocket_client_going_away_is_a_disconnect():
    seen: asyncio.Queue[Message] = asyncio.Queue()

    async def app(scope: Message, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await seen.put(await receive())

    async with serve(app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        writer.close()
        msg = await asyncio.wait_for(seen.get(), 5)
    assert msg == {"type": "websocket.disconnect", "code": 1006}


async def test_websocket_upgrade_with_a_bad_version_gets_426():
    async with serve(ws_app) as srv, connect(srv) as (reader, writer):
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 8\r\n\r\n")
        resp = await read_response(reader)
        assert resp.status == 426 and resp.header("sec-websocket-version") == "13"


async def test_a_whole_request_whose_connection_closes_with_it_is_delivered_whole() -> None:
    """Head, body and FIN in one go (a client that half-closes after sending, a request
    retransmitted late): the app reads the body that arrived, then the disconnect."""
    seen: list[Message] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            msg = await receive()
            seen.append(msg)
            if msg["type"] == "http.disconnect" or not msg.get("more_body"):
                break
        done.set()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = asyncio.Event()

    async def held(scope: Any, receive: Any, send: Any) -> None:
        await gate.wait()  # the whole request and its FIN are read before the app runs
        await app(scope, receive, send)

    async with serve(held) as srv, connect(srv) as (reader, writer):
        writer.write(b"POST /w HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        writer.write_eof()
        await writer.drain()
        await asyncio.sleep(0.2)
        gate.set()
        await asyncio.wait_for(done.wait(), 5)
    assert seen[0] == {"type": "http.request", "body": b"hello", "more_body": False}
