"""Start and stop: the runbook shutdown, and `run()` as the CLI calls it (a real process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from tests.proxy_support import SECRET, AppBackend, RawClient, proxy_env

ROOT = Path(__file__).resolve().parent.parent


async def test_shutdown_finishes_in_flight_requests_and_closes_idle_connections():
    async with proxy_env("s1") as env:
        idle = await RawClient.open(env.port)
        await idle.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await idle.response()).status == 200
        busy = await RawClient.open(env.port)
        await busy.send(b"GET /slow?s=0.4 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        stopping = asyncio.get_running_loop().create_task(env.proxy.shutdown())
        assert await idle.closed(timeout=1.0)  # idle keep-alive: closed at once
        resp = await busy.response()
        assert (resp.status, resp.body) == (200, b"s1")  # in flight: answered...
        assert resp.header("connection") == "close"  # ...and not kept
        await stopping
        try:
            late = await RawClient.open(env.port)
        except OSError:
            pass  # no longer accepting
        else:
            assert await late.closed(timeout=1.0)
            await late.close()
        await idle.close()
        await busy.close()


async def test_shutdown_bound_aborts_what_does_not_finish():
    async with proxy_env("s1", drain_timeout_s=0.2) as env:
        busy = await RawClient.open(env.port)
        await busy.send(b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await env.proxy.shutdown()
        assert loop.time() - t0 < 0.8
        assert await busy.closed(timeout=1.0)
        await busy.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_serves_until_sigterm_and_exits_0(tmp_path):
    backend = await AppBackend("s1").start()
    port, admin = _free_port(), _free_port()
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(f'[cluster]\nsecrets = ["{SECRET}"]\n\n[proxy]\nlisten = "127.0.0.1:{port}"\n'
                   f'admin = "127.0.0.1:{admin}"\n\n[[servers]]\nid = "s1"\n'
                   f'http = "127.0.0.1:{backend.port}"\nreplication = "127.0.0.1:1"\n')
    code = ("import sys; from tandem.config import load; from proxy.server import run; "
            "sys.exit(run(load(sys.argv[1])))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(cfg), env=env, cwd=str(ROOT),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    client = await RawClient.open(port)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
            resp = await client.response()
            assert (resp.status, resp.body) == (200, b"s1")
            await client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            err = await proc.stderr.read()
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await backend.stop()
    events = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    started = next(e for e in events if e["event"] == "proxy_started")
    assert started["listen"] == f"127.0.0.1:{port}" and started["admin"] == f"127.0.0.1:{admin}"
    assert started["loop"] == "uvloop" and started["component"] == "proxy"
    assert events[-1]["event"] == "proxy_stopped"
