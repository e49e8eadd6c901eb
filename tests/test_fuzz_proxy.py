"""Fuzzing the proxy's request parser: malformed, oversized and random bytes.

A seeded corpus (deterministic, so a failure reproduces): random bytes, bit flips of valid
requests, hostile header names and values, conflicting framing, absurd sizes. For each the
proxy must answer with a 4xx/5xx that is not 500, or close the connection — promptly, with
no traceback — and keep serving well-formed requests afterwards.
"""

from __future__ import annotations

import asyncio
import random

from tests.proxy_support import proxy_env, token

SEED = 20261122
VALID = (b"GET /id HTTP/1.1\r\nHost: x\r\nCookie: JSESSIONID=%s\r\n"
         b"Content-Length: 5\r\n\r\nhello")


def corpus(rng: random.Random, valid: bytes) -> list[bytes]:
    cases: list[bytes] = []
    for _ in range(60):  # random bytes
        cases.append(rng.randbytes(rng.randint(1, 3000)))
    for _ in range(80):  # bit flips of a valid request
        data = bytearray(valid)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        cases.append(bytes(data))
    nasty = [b"\x00", b"\r", b"\n", b" ", b":", b"\x7f", b"\xff", b"\t", b"\x0b", b"(", b"@"]
    for _ in range(60):  # hostile header names and values
        name = b"X" + b"".join(rng.choice(nasty + [b"a"]) for _ in range(rng.randint(1, 6)))
        value = b"".join(rng.choice(nasty + [b"v"]) for _ in range(rng.randint(0, 12)))
        cases.append(b"GET / HTTP/1.1\r\nHost: x\r\n" + name + b": " + value + b"\r\n\r\n")
    framing = [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked",
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: -1", b"Content-Length: 99999999999999999999999",
        b"Content-Length: 0x10", b"Content-Length: 5 5",
        b"Transfer-Encoding: gzip, chunked, identity", b"Transfer-Encoding: chunked\r\n x",
        b"Transfer-Encoding: \x0bchunked", b"Transfer-Encoding: xchunked",
    ]
    bodies = [b"", b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\n", b"ffffffffffffffffff\r\n",
              b"5;ext=\x00\r\nhello\r\n0\r\n\r\n", b"-5\r\nhello"]
    for f in framing:
        for b in bodies:
            cases.append(b"POST /echo HTTP/1.1\r\nHost: x\r\n" + f + b"\r\n\r\n" + b)
    lines = [b"GET", b"GET /", b"GET / HTTP/9.9", b"GET / HTTP/1.1 extra", b" / HTTP/1.1",
             b"G\x00T / HTTP/1.1", b"GET http://evil.example/ HTTP/1.1", b"CONNECT x:443 HTTP/1.1",
             b"GET /" + b"a" * 100_000 + b" HTTP/1.1", b"PRI * HTTP/2.0\r\n\r\nSM",
             b"GET / HTTP/1.0\r\nX: " + b"y" * 200_000]
    for line in lines:
        cases.append(line + b"\r\nHost: x\r\n\r\n")
    cases.append(b"GET / HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n")
    cases.append(b"GET / HTTP/1.1\r\nHost: x\r\n folded: value\r\n\r\n")
    return cases


async def probe(port: int, data: bytes) -> tuple[int | None, bytes]:
    """Send, half-close, and read what comes back (status or None when closed silently)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        try:
            writer.write(data)
            await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
        async with asyncio.timeout(5):
            try:
                raw = await reader.read(65536)
                rest = raw
                while rest:  # read to EOF so a hanging response is noticed
                    rest = await reader.read(65536)
                    raw += rest
            except ConnectionError:
                raw = b""
    finally:
        writer.close()
    if not raw.startswith(b"HTTP/1."):
        return None, raw
    return int(raw.split(b" ", 2)[1]), raw


async def test_the_proxy_survives_a_fuzzing_corpus():
    rng = random.Random(SEED)
    async with proxy_env("s1", "s2", max_head_bytes=16384, max_body_bytes=1_000_000) as env:
        valid = VALID % token("s1", "s2").encode()
        cases = corpus(rng, valid)
        statuses: dict[int | None, int] = {}
        for i, data in enumerate(cases):
            status, raw = await probe(env.port, data)
            statuses[status] = statuses.get(status, 0) + 1
            assert status != 500, (i, data[:200], raw[:300])
            assert b"Traceback" not in raw, (i, data[:200])
            if status is not None:
                assert status < 600, (i, raw[:200])
        # the corpus really exercised the refusal paths
        assert statuses.get(400, 0) > 50 and 431 in statuses, statuses
        # and the proxy still does its job
        status, body, _ = await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2')}"})
        assert status == 200 and "s2" in body
        metrics = await env.metrics()
        assert "tandem_proxy_requests_total" in metrics
