"""The Python side of one proxied request, without sockets: what the proxy's own code costs.

    python bench/proxy_micro.py                 # this checkout
    python bench/proxy_micro.py --tree /tmp/old # another one (`git archive REV | tar -x`)
    python bench/proxy_micro.py --instructions 1000 6000 --kind vary --kind wrk

A real `ClientProtocol` and `UpstreamProtocol` of a real `ProxyContext` are connected to
transports that only collect what is written; each iteration feeds one client request and
one backend response through the same code path as under load. The cases (`--kind`):

- `wrk`, `browser`: wrk's head (as bench/proxy_compare.py sends it) or a browser-like one,
  and a small response, each repeated byte for byte;
- `varying`: wrk's head with a field whose value changes on every request, the response
  repeated; `fresh`: the same, and a response with a field that changes too;
- `vary`: what `proxy_compare.py --vary` sends — another URL each time, and a response
  with a counting field of fixed width;
- `shapeless`: `vary`'s requests, and a counting field whose width changes every time, so
  that no response has the head shape of the one before.

The proxy remembers the last request and response of a connection that took the fast
lanes, so `wrk` and `browser` measure a client and a backend that repeat themselves byte
for byte; the others measure messages seen for the first time. The CPU time of the process
(not wall time) per iteration is reported, best of `--repeat`; syscalls, the event loop and
cache misses under load come on top (bench/proxy_compare.py measures those).
`--instructions` counts instructions instead (bench/README.md: repeatable where CPU time is
not): each case runs under `valgrind --tool=callgrind` at two iteration counts, and the
difference in instructions is divided by the difference in iterations.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SECRET = "bench-proxy-secret"
CLUSTER = f"""[cluster]
secrets = ["{SECRET}"]
[proxy]
listen = "127.0.0.1:19080"
[[servers]]
id = "s1"
http = "127.0.0.1:19001"
replication = "127.0.0.1:19101"
[[servers]]
id = "s2"
http = "127.0.0.1:19002"
replication = "127.0.0.1:19102"
"""
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class _Transport:
    """Collects writes; never pauses, never closes by itself."""

    def __init__(self) -> None:
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, parts: list[bytes]) -> None:
        self.out.append(b"".join(parts))

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 5555) if key == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def request_head(kind: str, token: str) -> bytes:
    if kind == "wrk":
        return (f"GET / HTTP/1.1\r\nHost: 127.0.0.1:19080\r\n"
                f"Cookie: JSESSIONID={token}; SRV=s1\r\n\r\n").encode()
    return (f"GET /app/page?x=1 HTTP/1.1\r\nHost: example.com\r\n"
            "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"
            "\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
            "Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
            f"Cookie: _ga=GA1.2.3; JSESSIONID={token}; theme=dark\r\n"
            "Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
            "Sec-Fetch-Mode: navigate\r\nSec-Fetch-Site: none\r\n\r\n").encode()


def requests(kind: str, token: str) -> list[bytes]:
    """The request heads one iteration cycles through: the same head every time, or
    (`varying`) a field whose value changes on every request, so that no per-connection
    cache of the last head's fields helps."""
    if kind in ("vary", "shapeless"):  # as bench/proxy_compare.py --vary: another URL each time
        head = request_head("wrk", token)
        return [head.replace(b"GET / ", b"GET /?n=%d " % i) for i in range(1000, 2000)]
    if kind not in ("varying", "fresh"):
        return [request_head(kind, token)]
    head = request_head("wrk", token)
    return [head.replace(b"\r\n\r\n", b"\r\nX-Seq: %d\r\n\r\n" % i) for i in range(1000)]


def responses(kind: str) -> list[bytes]:
    """The backend responses one iteration cycles through (`fresh`: a field whose value
    changes on every response, like a Date or a request id)."""
    if kind == "vary":  # as bench/backend_fast.py --vary
        return [RESPONSE.replace(b"\r\nContent-Length", b"\r\nX-Seq: %010d\r\nContent-Length" % i)
                for i in range(999)]
    if kind == "shapeless":  # a counting field whose width changes every time
        return [RESPONSE.replace(b"\r\nContent-Length",
                                 b"\r\nX-Seq: %d%s\r\nContent-Length" % (i, b"0" * (i % 2)))
                for i in range(1000, 1999)]
    if kind not in ("fresh",):
        return [RESPONSE]
    return [RESPONSE.replace(b"\r\n\r\n", b"\r\nX-Seq: %d\r\n\r\n" % i) for i in range(999)]


def measure(kind: str, iterations: int, repeat: int) -> float:
    """Best CPU-µs per request over `repeat` rounds of `iterations`."""
    # (backends.*, not tandem.*: older checkouts, measured with --tree, have no tandem/)
    from proxy.client import ClientProtocol
    from proxy.context import ProxyContext
    from proxy.upstream import UpstreamProtocol
    from tandem.config import loads
    from tandem.token import Route, TokenCodec

    loop = asyncio.new_event_loop()
    try:
        ctx = ProxyContext(loads(CLUSTER), loop=loop)
        token = TokenCodec([SECRET]).encode(Route("B" * 32, "s1", "s2"))
        heads = requests(kind, token)
        n = len(heads)
        answers = responses(kind)
        m = len(answers)
        backend = ctx.router.get("s1")
        up = UpstreamProtocol(backend.pool)
        upstream = _Transport()
        up.connection_made(upstream)  # type: ignore[arg-type]
        backend.pool.put(up)
        client = ClientProtocol(ctx)
        downstream = _Transport()
        client.connection_made(downstream)  # type: ignore[arg-type]

        def one(i: int) -> None:
            client.data_received(heads[i % n])
            up.data_received(answers[i % m])

        for i in range(2000):
            one(i)
        if not downstream.out[-1].endswith(b"ok") or b"200 OK" not in downstream.out[-1]:
            raise RuntimeError(f"unexpected answer: {downstream.out[-1]!r}")
        best = float("inf")
        for _ in range(repeat):
            downstream.out.clear()
            upstream.out.clear()
            t0 = time.process_time()
            for i in range(iterations):
                one(i)
            best = min(best, (time.process_time() - t0) / iterations * 1e6)
        return best
    finally:
        loop.close()


KINDS = ("wrk", "browser", "varying", "fresh", "vary", "shapeless")


def instructions(kind: str, tree: Path, low: int, high: int) -> int:
    """Instructions per request on the Python side: this script under callgrind at `low`
    and `high` iterations (one round each, hash seed fixed), the difference divided by
    the difference in iterations (start-up and warm-up cancel out)."""
    totals = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (low, high):
            out = Path(tmp) / f"callgrind.{n}"
            subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                 sys.executable, __file__, "--tree", str(tree), "--kind", kind,
                 "--iterations", str(n), "--repeat", "1"],
                env={**os.environ, "PYTHONHASHSEED": "0"}, check=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for line in out.read_text().splitlines():
                if line.startswith(("summary:", "totals:")):
                    totals.append(int(line.split()[1]))
                    break
    return round((totals[1] - totals[0]) / (high - low))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="checkout whose proxy/ and backends/ are measured")
    ap.add_argument("--iterations", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--kind", action="append", choices=KINDS,
                    help="case to measure (repeatable; default: all)")
    ap.add_argument("--instructions", nargs=2, type=int, metavar=("LOW", "HIGH"),
                    help="count instructions per request under callgrind, from runs of LOW "
                         "and HIGH iterations (e.g. 1000 6000)")
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    if args.instructions:
        low, high = args.instructions
        for kind in args.kind or KINDS:
            print(f"{kind:9s} {instructions(kind, tree, low, high):7d} instructions per "
                  f"request (Python side, callgrind, {low} and {high} iterations)", flush=True)
        return 0
    sys.path.insert(0, str(tree))
    import proxy
    print(f"proxy from {Path(proxy.__file__).resolve().parent}")
    for kind in args.kind or KINDS:
        us = measure(kind, args.iterations, args.repeat)
        print(f"{kind:9s} head: {us:6.2f} CPU-µs per request (Python side, best of "
              f"{args.repeat} x {args.iterations})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
