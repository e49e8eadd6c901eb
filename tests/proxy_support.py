"""Helpers for the proxy tests: real aiohttp backends, raw socket backends and clients,
and a real ProxyServer on loopback, all in the test's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.server import ProxyServer
from tandem.config import Config, loads
from tandem.token import Route, TokenCodec

SECRET = "proxy-test-secret"


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_config(servers: dict[str, int], *, session: str = "", **proxy: Any) -> Config:
    """A cluster file for these backends (id -> http port); the proxy listens on port 0."""
    proxy.setdefault("connect_timeout_s", 1.0)
    proxy.setdefault("io_timeout_s", 5.0)
    proxy.setdefault("listen", "127.0.0.1:0")
    proxy.setdefault("admin", "127.0.0.1:0")
    # (no replication here: a short replication timeout lets tests use short io timeouts)
    lines = ["[cluster]", f'secrets = ["{SECRET}"]', "replication_timeout_s = 0.1", "",
             "[session]", session, "", "[proxy]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in proxy.items()]
    for i, (sid, port) in enumerate(servers.items()):
        lines += ["", "[[servers]]", f'id = "{sid}"', f'http = "127.0.0.1:{port}"',
                  f'replication = "127.0.0.1:{60000 + i}"']
    return loads("\n".join(lines) + "\n")


def token(primary: str, secondary: str | None = None, sid: str = "S" * 32) -> str:
    return TokenCodec([SECRET]).encode(Route(sid, primary, secondary))


# --- an aiohttp backend ---------------------------------------------------------------------


class AppBackend:
    """A real aiohttp server that says who it is; counts hits per path."""

    def __init__(self, server_id: str) -> None:
        self.id = server_id
        self.hits: Counter[str] = Counter()
        self.health_status = 200
        self.health_state = "up"  # in the health answer's JSON ("draining" while draining)
        self.unavailable = False  # answer 503 to everything but the health check
        self.request_ids: list[str | None] = []  # X-Tandem-Request-Id of each request
        self.view: tuple[str, str] | None = None  # (hash, X-Tandem-Cluster value)
        self.seen_views: list[str | None] = []  # X-Tandem-View of each request
        self.extra_headers: dict[str, str] = {}
        self.port = 0
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        @web.middleware
        async def maybe_unavailable(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path != "/__tandem/health":
                self.request_ids.append(request.headers.get("X-Tandem-Request-Id"))
            if self.unavailable and request.path != "/__tandem/health":
                self.hits["503"] += 1
                return web.Response(status=503, text=f"{self.id} unavailable")
            self.seen_views.append(request.headers.get("X-Tandem-View"))
            resp: web.StreamResponse = await handler(request)
            if (self.view is not None and not resp.prepared
                    and request.headers.get("X-Tandem-View") != self.view[0]):
                resp.headers["X-Tandem-Cluster"] = self.view[1]
            return resp

        app = web.Application(middlewares=[maybe_unavailable])
        r = app.router
        r.add_route("*", "/id", self._id)
        r.add_get("/headers", self._headers)
        r.add_post("/echo", self._echo)
        r.add_put("/echo", self._echo)
        r.add_post("/count", self._count)
        r.add_get("/stream", self._stream)
        r.add_get("/status/{code}", self._status)
        r.add_route("*", "/slow", self._slow)
        r.add_get("/ws", self._ws)
        r.add_get("/__tandem/health", self._health)
        r.add_route("*", "/{tail:.*}", self._id)
        return app

    async def start(self, port: int = 0) -> AppBackend:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _done(self, request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        self.hits[request.path] += 1
        resp.headers["X-Server"] = self.id
        resp.headers.update(self.extra_headers)
        return resp

    async def _id(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return self._done(request, web.Response(text=self.id))

    async def _headers(self, request: web.Request) -> web.StreamResponse:
        pairs = [[k, v] for k, v in request.headers.items()]
        return self._done(request, web.json_response(pairs))

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        resp = web.Response(body=body)
        resp.headers["X-Body-Length"] = str(len(body))
        return self._done(request, resp)

    async def _count(self, request: web.Request) -> web.StreamResponse:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return self._done(request, web.Response(text=str(n)))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        total = int(request.query.get("n", "1000"))
        block = int(request.query.get("block", "65536"))
        resp = web.StreamResponse()
        if request.query.get("cl"):
            resp.content_length = total
        self._done(request, resp)
        await resp.prepare(request)
        chunk = b"x" * block
        sent = 0
        while sent < total:
            piece = chunk[:min(block, total - sent)]
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return self._done(request, web.Response(status=code))
        return self._done(request, web.Response(status=code, text=f"{self.id} {code}"))

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(request.query.get("s", "1")))
        return self._done(request, web.Response(text=self.id))

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        self._done(request, ws)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"{self.id}:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return self._done(request, web.json_response({"server": self.id,
                                                      "state": self.health_state},
                                                     status=self.health_status))


# --- a raw socket backend -------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """A TCP server whose connections are handled by a test-written coroutine."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []  # raw request heads (+ bodies) received
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> RawBackend:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)  # type: ignore[arg-type]
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                self._tasks.discard(task)  # type: ignore[arg-type]
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request (head, body) from a raw connection; body de-chunked."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
    elif b"content-length:" in lower:
        length = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    return head, body


def answering(responses: list[bytes]) -> Handler:
    """A RawBackend handler that answers each request on its connection with the next of
    `responses`, as is, then waits for the client to close."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for data in responses:
            await read_request(reader)
            writer.write(data)
            await writer.drain()
        await reader.read()

    return handler


def answering_always(response: bytes) -> Handler:
    """A RawBackend handler that answers every request on its connection with `response`."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(response)
            await writer.drain()

    return handler


# --- a raw client ---------------------------------------------------------------------------


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_body: bytes  # as framed on the wire
    trailers: list[tuple[str, str]]
    raw_head: bytes = b""  # status line and fields as received, blank line included

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def has(self, name: str) -> bool:
        return self.header(name) is not None


class RawClient:
    """A client socket that writes bytes as given and parses responses itself."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, *, head: bool = False, timeout: float = 5.0) -> RawResponse:
        async with asyncio.timeout(timeout):
            return await self._response(head)

    async def _response(self, head_request: bool) -> RawResponse:
        r = self.reader
        raw_head = await r.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [(k.strip(), v.strip()) for k, _, v in
                   (line.partition(":") for line in lines[1:] if line)]
        resp = RawResponse(status, headers, b"", b"", [], raw_head)
        te = (resp.header("transfer-encoding") or "").lower()
        if head_request or status in (204, 304) or 100 <= status < 200:
            return resp
        if te == "chunked":
            raw = bytearray()
            body = bytearray()
            while True:
                size_line = await r.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    while True:
                        line = await r.readuntil(b"\r\n")
                        raw += line
                        if line == b"\r\n":
                            break
                        k, _, v = line.decode("latin-1").partition(":")
                        resp.trailers.append((k.strip(), v.strip()))
                    break
                data = await r.readexactly(size + 2)
                raw += data
                body += data[:-2]
            resp.body, resp.raw_body = bytes(body), bytes(raw)
        elif resp.has("content-length"):
            resp.body = resp.raw_body = await r.readexactly(int(resp.header("content-length")
                                                                or 0))
        else:
            resp.body = resp.raw_body = await r.read()
        return resp

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the server closed the connection (EOF) within timeout."""
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read() == b""
        except ConnectionError:
            return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


# --- the whole set-up -----------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """Backends, a running proxy and a client session against it."""

    backends: dict[str, AppBackend]
    proxy: ProxyServer
    http: aiohttp.ClientSession

    @property
    def port(self) -> int:
        assert self.proxy.listen_address is not None
        return self.proxy.listen_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        assert self.proxy.admin_address is not None
        host, port = self.proxy.admin_address
        return f"http://{host}:{port}"

    async def get(self, path: str, **kw: Any) -> tuple[int, str, Any]:
        async with self.http.get(self.url + path, **kw) as resp:
            return resp.status, await resp.text(), resp.headers

    async def status(self) -> dict[str, Any]:
        async with self.http.get(self.admin_url + "/__tandem/status?format=json") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def metrics(self) -> str:
        async with self.http.get(self.admin_url + "/__tandem/metrics") as resp:
            assert resp.status == 200
            return await resp.text()

    def backend_status(self, snapshot: dict[str, Any], backend_id: str) -> dict[str, Any]:
        for b in snapshot["backends"]:
            if b["id"] == backend_id:
                return dict(b)
        raise KeyError(backend_id)


@contextlib.asynccontextmanager
async def proxy_env(*ids: str, extra: dict[str, int] | None = None, session: str = "",
                    drain_timeout_s: float = 2.0, **proxy: Any) -> AsyncIterator[Env]:
    """Start an AppBackend per id, a proxy in front of them (plus `extra` id -> port)."""
    backends = {sid: await AppBackend(sid).start() for sid in ids}
    servers = {sid: b.port for sid, b in backends.items()}
    servers.update(extra or {})
    cfg = make_config(servers, session=session, **proxy)
    try:
        async with ProxyServer(cfg, drain_timeout_s=drain_timeout_s) as srv, \
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            yield Env(backends, srv, http)
    finally:
        for b in backends.values():
            await b.stop()


async def ask(port: int, n: int,
              request: bytes = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n") -> list[RawResponse]:
    """Send `request` n times, each after the last one's response, on one new connection;
    the responses."""
    client = await RawClient.open(port)
    try:
        got = []
        for _ in range(n):
            await client.send(request)
            got.append(await client.response())
        return got
    finally:
        await client.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    key = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0
