"""Streaming with flow control (bounded memory), and WebSocket tunnelling with affinity."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from tests.proxy_support import RawBackend, RawClient, proxy_env, read_request, token

MB = 1024 * 1024


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@contextlib.asynccontextmanager
async def rss_peak():
    """Samples this process's RSS while the block runs; yields a dict with the growth."""
    result = {"base": vm_rss(), "peak": vm_rss()}

    async def sample():
        while True:
            result["peak"] = max(result["peak"], vm_rss())
            await asyncio.sleep(0.02)

    task = asyncio.get_running_loop().create_task(sample())
    try:
        yield result
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        result["growth"] = result["peak"] - result["base"]


async def test_200_mb_each_way_with_bounded_memory():
    total = 200 * MB
    async with proxy_env("s1") as env:
        block = b"u" * (256 * 1024)

        async def body():
            for _ in range(total // len(block)):
                yield block

        async with rss_peak() as up:
            async with env.http.post(env.url + "/count", data=body()) as resp:
                assert resp.status == 200
                assert int(await resp.text()) == total
        async with rss_peak() as down:
            async with env.http.get(env.url + f"/stream?n={total}&block=262144") as resp:
                assert resp.status == 200
                got = 0
                async for chunk in resp.content.iter_chunked(256 * 1024):
                    got += len(chunk)
            assert got == total
    # Client, proxy and backend all live in this process: none of them may hold the body.
    assert up["growth"] < 40 * MB, up
    assert down["growth"] < 40 * MB, down


async def test_a_client_that_does_not_read_stops_the_backend():
    sent = [0]
    done = asyncio.Event()

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * MB))
        chunk = b"d" * (64 * 1024)
        for _ in range(1024):
            writer.write(chunk)
            await writer.drain()
            sent[0] += len(chunk)
        done.set()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.5)
            stalled_at = sent[0]
            await asyncio.sleep(0.3)
            assert sent[0] == stalled_at < 24 * MB  # socket buffers only, not the proxy
            await client.reader.readuntil(b"\r\n\r\n")
            got = 0
            while got < 64 * MB:
                got += len(await client.reader.read(MB))
            assert got == 64 * MB
            await asyncio.wait_for(done.wait(), 5)
            await client.close()
    finally:
        await backend.stop()


async def test_a_backend_that_does_not_read_stops_the_client():
    release = asyncio.Event()
    received = [0]

    async def handler(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"Content-Length" in head
        await release.wait()
        while received[0] < 64 * MB:
            data = await reader.read(MB)
            if not data:
                break
            received[0] += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    backend = await RawBackend(handler).start()
    try:
        async with proxy_env(extra={"s1": backend.port}) as env:
            client = await RawClient.open(env.port)
            client.writer.write(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                                % (64 * MB))
            written = 0
            chunk = b"p" * (64 * 1024)

            async def upload():
                nonlocal written
                for _ in range(1024):
                    client.writer.write(chunk)
                    await client.writer.drain()
                    written += len(chunk)

            task = asyncio.get_running_loop().create_task(upload())
            await asyncio.sleep(0.5)
            stalled_at = written
            await asyncio.sleep(0.3)
            assert written == stalled_at < 24 * MB
            release.set()
            await asyncio.wait_for(task, 10)
            resp = await client.response()
            assert resp.status == 200 and received[0] == 64 * MB
            await client.close()
    finally:
        await backend.stop()


async def test_websocket_is_tunnelled_to_the_session_primary():
    async with asyncio.timeout(20), proxy_env("s1", "s2", "s3") as env:
        for primary in ("s2", "s3"):
            cookie = {"Cookie": f"JSESSIONID={token(primary, 's1')}"}
            async with env.http.ws_connect(env.url + "/ws", headers=cookie) as ws:
                await ws.send_str("hello")
                assert await ws.receive_str() == f"{primary}:hello"
                big = bytes(range(256)) * 4096  # 1 MB
                await ws.send_bytes(big)
                assert await ws.receive_bytes() == big
                await ws.send_str("again")
                assert await ws.receive_str() == f"{primary}:again"
        async with env.http.ws_connect(env.url + "/ws") as ws:  # new session
            await ws.send_str("x")
            assert (await ws.receive_str()).endswith(":x")
        assert (await env.status())["backends"][1]["routed"] >= 1
        async with env.http.get(env.admin_url + "/__tandem/metrics") as resp:
            assert "tandem_proxy_upgrades_total 3" in await resp.text()


async def test_upgrade_refused_by_the_backend_is_relayed_and_closed():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                          b"Upgrade: h2c\r\n\r\n")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"s1")
        assert await client.closed()
        await client.close()
        try:
            async with env.http.ws_connect(env.url + "/id"):
                raise AssertionError("not a websocket endpoint")
        except aiohttp.WSServerHandshakeError as exc:
            assert exc.status == 200


async def test_client_gone_mid_response_drops_the_upstream_connection():
    async with proxy_env("s1") as env:
        client = await RawClient.open(env.port)
        await client.send(b"GET /stream?n=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await client.reader.readexactly(100000)
        client.writer.transport.abort()
        await asyncio.sleep(0.2)
        snap = await env.status()
        assert env.backend_status(snap, "s1")["idle_connections"] == 0  # not reused
        assert snap["client_connections"] == 0
        status, body, _ = await env.get("/id")
        assert (status, body) == (200, "s1")
