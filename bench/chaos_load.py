"""The chaos harness's load generator: N browser-like clients, one session each.

Each client holds one keep-alive connection to the proxy (raw asyncio streams, no client
library on the hot path) and one route token, and sends `GET /count` at a fixed rate with
jitter — or `POST /count?c=INDEX&w=N` with a write number of its own (`method="POST"`, for
`bench/chaos_app.py`, whose answers list the writes applied and when). Every attempt is
recorded with its timing, its outcome and the token it left the client with;
`bench/chaos_check.py` judges the histories.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

__all__ = ["Attempt", "SessionClient", "run_clients"]

# Outcome causes (`Attempt.cause`): "ok", "http_<status>", "connect" (refused/failed before
# the request left), "reset" (connection closed before a full response), "timeout"
# (no full response within the client's timeout), "bad_body" (200 without a counter).
OK = "ok"


@dataclass(slots=True)
class Attempt:
    """One request of one session, as the client saw it (times in s since the load started)."""

    session: int
    start: float
    end: float
    cause: str
    status: int | None = None
    counter: int | None = None
    server: str | None = None
    # the route token the client holds after this attempt (Set-Cookie applied)
    sid: str | None = None
    primary: str | None = None
    secondary: str | None = None
    # POST only: this request's write number, and the writes this answer showed for the
    # first time: (write number, when it was applied, s since the load started)
    write: int | None = None
    applied: list[tuple[int, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.cause == OK


class ResponseError(Exception):
    """The response could not be read to its end."""


@dataclass
class SessionClient:
    """One user: one session token, one connection, one request at a time."""

    index: int
    host: str
    port: int
    cookie_name: str = "JSESSIONID"
    timeout_s: float = 10.0
    method: str = "GET"
    token: str | None = None
    history: list[Attempt] = field(default_factory=list)
    writes: int = 0  # POST: the last write number sent
    # POST: every (write, applied at) seen in an answer; a write seen with two times was
    # applied twice
    seen: set[tuple[int, float]] = field(default_factory=set)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None

    def route(self) -> tuple[str | None, str | None, str | None]:
        if not self.token:
            return None, None, None
        sid, _, rest = self.token.partition("!")
        primary, _, rest = rest.partition("!")
        return sid, primary, rest.split(".", 1)[0]

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def once(self, t0: float) -> Attempt:
        start = time.monotonic() - t0
        if self.method == "POST":
            self.writes += 1  # numbered before the connect: a refused write has its number
        cause, status, body, headers = OK, None, b"", _Headers()
        stage = "connect"
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._writer is None:
                    self._reader, self._writer = await asyncio.open_connection(
                        self.host, self.port)
                stage = "send"
                cookie = f"Cookie: {self.cookie_name}={self.token}\r\n" if self.token else ""
                self._writer.write(self._request(cookie))
                assert self._reader is not None
                status, headers, body = await _read_response(self._reader)
                if headers.get("connection", "").lower() == "close":
                    self.close()
        except TimeoutError:
            cause = "timeout"
            self.close()
        except (OSError, asyncio.IncompleteReadError, ResponseError) as exc:
            cause = "connect" if stage == "connect" else "reset"
            if isinstance(exc, ResponseError):
                cause = "bad_response"
            self.close()
        end = time.monotonic() - t0
        attempt = Attempt(self.index, start, end, cause, status)
        if self.method == "POST":
            attempt.write = self.writes
        if status is not None:
            for value in headers.get_all("set-cookie"):
                name, _, rest = value.partition("=")
                if name.strip() == self.cookie_name:
                    self.token = rest.split(";", 1)[0] or None
            if status != 200:
                attempt.cause = f"http_{status}"
            else:
                try:
                    data = json.loads(body)
                    attempt.counter = int(data["counter"])
                    attempt.server = data.get("server")
                    attempt.applied = self._new_writes(data.get("log") or [], t0)
                except (ValueError, KeyError, TypeError):
                    attempt.cause = "bad_body"
        attempt.sid, attempt.primary, attempt.secondary = self.route()
        self.history.append(attempt)
        return attempt

    def _request(self, cookie: str) -> bytes:
        if self.method != "POST":
            return f"GET /count HTTP/1.1\r\nHost: chaos\r\n{cookie}\r\n".encode("latin-1")
        body = json.dumps({"w": self.writes})
        return (f"POST /count?c={self.index}&w={self.writes} HTTP/1.1\r\nHost: chaos\r\n{cookie}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                f"{body}").encode("latin-1")

    def _new_writes(self, log: list[list[float]], t0: float) -> list[tuple[int, float]]:
        """The log entries not seen in an earlier answer, in the order they were applied."""
        new = []
        for w, at in log:
            key = (int(w), float(at))
            if key not in self.seen:
                self.seen.add(key)
                new.append((key[0], round(key[1] - t0, 4)))
        return new


class _Headers(dict[str, str]):
    """Lower-cased response headers; repeated ones (Set-Cookie) kept in order."""

    def __init__(self) -> None:
        super().__init__()
        self.multi: dict[str, list[str]] = {}

    def get_all(self, name: str) -> list[str]:
        return self.multi.get(name, [])


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, _Headers, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ResponseError(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = _Headers()
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = value
        headers.multi.setdefault(name, []).append(value)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await _skip_trailers(reader)
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif status in (204, 304) or 100 <= status < 200:
        body = b""
    else:
        body = await reader.read()
        headers["connection"] = "close"
    return status, headers, body


async def _skip_trailers(reader: asyncio.StreamReader) -> None:
    while (await reader.readuntil(b"\r\n")) != b"\r\n":
        pass


async def _client_loop(client: SessionClient, *, t0: float, rate: float, stop: asyncio.Event,
                       rng: random.Random) -> None:
    interval = 1.0 / rate
    # spread the clients' first requests over one interval so they do not beat in step
    next_at = time.monotonic() + rng.uniform(0, interval)
    while not stop.is_set():
        delay = next_at - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        await client.once(t0)
        # fixed mean rate with +-20 % jitter; a slow request delays only its own client
        next_at = max(next_at + interval * rng.uniform(0.8, 1.2), time.monotonic())
    client.close()


async def run_clients(clients: list[SessionClient], *, t0: float, rate: float,
                      stop: asyncio.Event, seed: int = 1) -> None:
    """Run every client until `stop` is set."""
    rng = random.Random(seed)
    await asyncio.gather(*(
        _client_loop(c, t0=t0, rate=rate, stop=stop, rng=random.Random(rng.random()))
        for c in clients))
