"""The proxy's part of the cluster file: its listeners may ask for port 0."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from backends.errors import ConfigError
from tandem.config import Address, loads
from tests.proxy_support import SECRET, AppBackend, RawClient

ROOT = Path(__file__).resolve().parent.parent


def _file(listen: str, admin: str, http: str = "127.0.0.1:9001") -> str:
    return (f'[cluster]\nsecrets = ["{SECRET}"]\n\n[proxy]\nlisten = "{listen}"\n'
            f'admin = "{admin}"\n\n[[servers]]\nid = "s1"\nhttp = "{http}"\n'
            'replication = "127.0.0.1:9101"\n')


def test_proxy_listen_and_admin_may_use_port_0():
    cfg = loads(_file("127.0.0.1:0", "[::1]:0"))
    assert cfg.proxy.listen == Address("127.0.0.1", 0)
    assert cfg.proxy.admin == Address("::1", 0)


def test_port_0_is_still_refused_for_a_server_address():
    with pytest.raises(ConfigError, match=r"servers\[0\]\.http"):
        loads(_file("127.0.0.1:0", "127.0.0.1:0", http="127.0.0.1:0"))
    with pytest.raises(ValueError):
        Address.parse("127.0.0.1:0")
    assert Address.parse("127.0.0.1:0", allow_port_0=True).port == 0


async def test_a_proxy_started_from_a_file_with_port_0_logs_its_ports(tmp_path):
    backend = await AppBackend("s1").start()
    cfg = tmp_path / "cluster.toml"
    cfg.write_text(_file("127.0.0.1:0", "127.0.0.1:0", http=f"127.0.0.1:{backend.port}"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.cli", "proxy", "--config", str(cfg), env=env,
        cwd=str(ROOT), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = await proc.stderr.readline()
                assert line, "the proxy exited"
                if line.startswith(b"{") and json.loads(line)["event"] == "proxy_started":
                    started = json.loads(line)
                    break
        host, port = started["listen"].rsplit(":", 1)
        admin_port = int(started["admin"].rsplit(":", 1)[1])
        assert host == "127.0.0.1" and int(port) > 0 and admin_port > 0
        client = await RawClient.open(int(port))
        await client.send(b"GET /id HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response()
        assert (resp.status, resp.body) == (200, b"s1")
        await client.close()
        metrics = await RawClient.open(admin_port)
        await metrics.send(b"GET /__tandem/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await metrics.response()).status == 200
        await metrics.close()
    finally:
        proc.terminate()
        await proc.wait()
        await backend.stop()
