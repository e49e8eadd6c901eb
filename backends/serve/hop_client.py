"""HTTP/1.1 connections from this server to its peers' http listeners, kept alive between
forwarded requests (backends.serve.forward), with responses parsed by httptools.

One `HopPool` per server holds idle connections per peer address. Failures are translated
once, here, into `ForwardError` (whether any of the request was written, whether its
response head arrived). A connection given up on mid-request is *reset*, never closed: a
closed socket's kernel keeps retransmitting unacknowledged bytes and the primary could
read, and apply, a request we no longer wait for (docs/consistency.md, I7).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

from httptools import HttpParserError, HttpResponseParser

from tandem.address import Address

from ..errors import ForwardError

__all__ = ["HopConnection", "HopPool", "HopResponse"]

_READ_BYTES = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST
# An idle connection older than this is not reused (the peer closes its idle connections
# after 75 s; reusing one it is closing would cost a retry).
_IDLE_S = 30.0


class HopResponse:
    """A response being parsed: httptools calls these as bytes are fed."""

    __slots__ = ("status", "headers", "head", "chunks", "complete")

    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = False  # the head is complete
        self.chunks: deque[bytes] = deque()  # body bytes parsed and not yet taken
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.head = True

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


class HopConnection:
    """One connection to a peer, carrying one request at a time."""

    __slots__ = ("peer", "addr", "reader", "writer", "reused", "sent", "idle_since",
                 "response", "parser", "head_only")

    def __init__(self, peer: str, addr: Address, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self.addr = addr
        self.reader = reader
        self.writer = writer
        self.reused = False  # it carried an earlier request
        self.sent = False  # some of the current request was written
        self.idle_since = 0.0
        self.response = HopResponse()
        self.parser = HttpResponseParser(self.response)
        self.head_only = False  # a HEAD request: no body follows the head

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """OSError, timeouts, EOF and parser errors → ForwardError, once."""
        try:
            yield
        except (OSError, TimeoutError, HttpParserError, asyncio.IncompleteReadError) as exc:
            raise ForwardError(f"{doing}: {type(exc).__name__}: {exc}", peer=self.peer,
                               sent=self.sent, answered=self.response.head) from exc

    async def write(self, data: bytes) -> None:
        with self._errors("writing the request"):
            self.sent = True
            self.writer.write(data)
            await self.writer.drain()

    async def write_chunked(self, receive: Any) -> bool:
        """Send the client's body (ASGI `receive`) as it arrives, chunked; False if the
        client left before its end."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            chunk = message.get("body", b"")
            data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunk else b""
            if not message.get("more_body", False):
                await self.write(data + b"0\r\n\r\n")
                return True
            if data:
                await self.write(data)

    async def read_head(self, timeout_s: float) -> HopResponse:
        """Read until the response head is complete (within `timeout_s`)."""
        resp = self.response
        with self._errors("reading the response head"):
            async with asyncio.timeout(timeout_s):
                while not resp.head:
                    await self._feed()
            resp.status = self.parser.get_status_code()
            if self.head_only:
                resp.chunks.clear()
                resp.complete = True
        return resp

    async def read_body(self, timeout_s: float) -> bytes | None:
        """The next bytes of the response body, None once it is complete."""
        resp = self.response
        with self._errors("reading the response body"):
            while not resp.chunks:
                if resp.complete:
                    return None
                async with asyncio.timeout(timeout_s):
                    await self._feed()
        return b"".join(resp.chunks.popleft() for _ in range(len(resp.chunks)))

    async def _feed(self) -> None:
        data = await self.reader.read(_READ_BYTES)
        if not data:
            raise ConnectionResetError("the peer closed the connection")
        self.parser.feed_data(data)

    @property
    def reusable(self) -> bool:
        return (self.response.complete and not self.head_only
                and self.parser.should_keep_alive() and not self.reader.at_eof())

    def reset(self) -> None:
        """Give up on the connection: close it with a reset (module docstring)."""
        transport = self.writer.transport
        sock = None if transport.is_closing() else transport.get_extra_info("socket")
        if sock is not None:
            # (closed meanwhile: nothing left to drop; uvloop says so with ValueError)
            with contextlib.suppress(OSError, ValueError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()


class HopPool:
    """Idle keep-alive connections to the peers, by address."""

    def __init__(self, *, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[Address, list[HopConnection]] = {}

    async def acquire(self, peer: str, addr: Address) -> HopConnection:
        """An idle connection to `addr` (reused), or a new one."""
        idle = self._idle.get(addr)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < _IDLE_S and not conn.reader.at_eof():
                conn.reused = True
                conn.sent = False
                conn.response = HopResponse()
                conn.parser = HttpResponseParser(conn.response)
                conn.head_only = False
                return conn
            conn.writer.transport.abort()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(addr.host, addr.port)
        except (OSError, TimeoutError) as exc:
            raise ForwardError(f"connecting to {addr}: {type(exc).__name__}: {exc}",
                               peer=peer, sent=False) from exc
        sock = writer.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return HopConnection(peer, addr, reader, writer)

    def release(self, conn: HopConnection) -> None:
        """A connection whose exchange is over: kept if it can carry another, else closed."""
        if conn.reusable:
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.addr, []).append(conn)
        else:
            conn.writer.transport.abort()

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.writer.transport.abort()
        self._idle.clear()
