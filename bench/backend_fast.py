"""A minimal fast HTTP/1.1 backend for the proxy benchmark (bench/proxy_compare.py).

    python bench/backend_fast.py --port 9001 --port 9002 [--burn-us 200] [--vary]

One process, one event loop (uvloop), an asyncio Protocol per connection parsing requests
with httptools; every request is answered with a tiny fixed response (`ok`), keep-alive.
`--burn-us N` spends N microseconds of CPU per request first (a backend that costs more
than the proxy in front of it). `--vary`: every response differs from the one before
(an `X-Seq` field counts), as real responses do. Listens on every `--port` given (one
backend per port for the proxies, same process). `--health`: `GET /__tandem/health` is
answered as a serving tandem server answers it (what the health checks of HAProxy and
nginx configured by `tandem export` expect); off by default, as it costs a callback per
request.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from httptools import HttpParserError, HttpRequestParser

__all__ = ["main"]

_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok")
_VARIED = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Seq: %010d\r\n"
           b"Content-Length: 2\r\n\r\nok")
_HEALTH = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 32\r\n\r\n"
           b'{"state": "up", "lease": true}  ')
_CLOSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
          b"Connection: close\r\n\r\nok")


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time (not wall time: preemption does not count)."""
    clock = time.thread_time
    end = clock() + seconds
    while clock() < end:
        pass


class _Conn(asyncio.Protocol):
    __slots__ = ("transport", "parser", "out", "burn_s", "vary", "health")
    seq = 0  # responses sent (all connections)

    def __init__(self, burn_s: float, vary: bool) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = HttpRequestParser(self)
        self.out: list[bytes] = []
        self.burn_s = burn_s
        self.vary = vary
        self.health = False  # this request is a health check (_HealthConn)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except HttpParserError:
            assert self.transport is not None
            self.transport.close()
            return
        if self.out:
            assert self.transport is not None
            self.transport.write(b"".join(self.out))
            self.out.clear()

    def on_message_complete(self) -> None:
        if self.health:
            self.health = False
            self.out.append(_HEALTH)
            return
        if self.burn_s:
            _burn(self.burn_s)
        if self.parser.should_keep_alive():
            if self.vary:
                _Conn.seq += 1
                self.out.append(_VARIED % _Conn.seq)
            else:
                self.out.append(_RESPONSE)
        else:
            self.out.append(_CLOSE)
            assert self.transport is not None
            self.transport.write(b"".join(self.out))
            self.out.clear()
            self.transport.close()


class _HealthConn(_Conn):
    __slots__ = ()

    def on_url(self, url: bytes) -> None:
        self.health = url.startswith(b"/__tandem/health")


async def _serve(ports: list[int], burn_s: float, vary: bool, health: bool) -> None:
    loop = asyncio.get_running_loop()
    conn = _HealthConn if health else _Conn
    servers = [await loop.create_server(lambda: conn(burn_s, vary), "127.0.0.1", port,
                                        backlog=1024)
               for port in ports]
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, action="append", required=True)
    ap.add_argument("--burn-us", type=float, default=0.0,
                    help="CPU microseconds spent per request before answering")
    ap.add_argument("--vary", action="store_true",
                    help="no two responses alike (an X-Seq field counts them)")
    ap.add_argument("--health", action="store_true",
                    help="answer GET /__tandem/health as a serving tandem server")
    args = ap.parse_args()
    try:
        import uvloop
        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(args.port, args.burn_us / 1e6, args.vary, args.health))


if __name__ == "__main__":
    main()
