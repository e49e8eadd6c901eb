"""Behind a plain load balancer: real HAProxy, `balance roundrobin`, no cookie, no stick
table, in front of a real 3-server cluster. 50 sessions each send concurrent
read-modify-write requests (one key per lane of requests, so that no two requests in
flight write the same key: docs/replication.md); every acknowledged increment must be in
the final session, with no error, and with none lost when a server is killed (kill -9).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster import free_ports

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy"
                                      if Path("/usr/sbin/haproxy").exists() else None)
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")

SESSIONS = 50
LANES = 3  # requests of one session in flight at once


def haproxy_config(path: Path, port: int, servers: dict[str, str]) -> Path:
    """Round robin, no affinity of any kind; health checks and connect retries as any
    operator would set them."""
    lines = "\n".join(f"    server {sid} {addr} check inter 300ms fall 2 rise 2"
                      for sid, addr in servers.items())
    path.write_text(f"""global
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    option redispatch
    retries 3
    timeout connect 1s
    timeout client 30s
    timeout server 30s

frontend lb
    bind 127.0.0.1:{port}
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /__tandem/health
    http-check expect string '"state": "up"'
{lines}
""")
    return path


@pytest.fixture
def balancer(tmp_path):
    """Starts HAProxy in front of a cluster's servers: `balancer(cluster)` → its URL."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(cluster) -> str:
        port = free_ports(1)[0]
        servers = {sid: f"127.0.0.1:{s['http']}" for sid, s in cluster.servers.items()}
        cfg = haproxy_config(tmp_path / "haproxy.cfg", port, servers)
        log = open(tmp_path / "haproxy.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log,
                                stderr=subprocess.STDOUT)
        log.close()
        procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp_path / "haproxy.log").read_text()) from None
                time.sleep(0.05)
        time.sleep(1.0)  # its first health checks pass (rise 2 × 300 ms)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Session:
    token: str | None = None
    acked: dict[str, list[int]] = field(default_factory=dict)  # key -> values acknowledged
    attempts: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def request(http: aiohttp.ClientSession, url: str, s: Session,
                  method: str = "GET") -> tuple[int, Any]:
    headers = {"Cookie": f"JSESSIONID={s.token}"} if s.token else {}
    async with http.request(method, url, headers=headers) as resp:
        body = await resp.read()
        for value in resp.headers.getall("Set-Cookie", []):
            name, _, rest = value.partition("=")
            if name == "JSESSIONID" and rest.split(";", 1)[0]:
                s.token = rest.split(";", 1)[0]
        try:
            return resp.status, json.loads(body)
        except ValueError:
            return resp.status, body.decode(errors="replace")


async def lane(http: aiohttp.ClientSession, lb: str, s: Session, key: str, n: int) -> None:
    """`n` increments of `key`, one after another; what each acknowledged is recorded."""
    s.acked[key], s.attempts[key] = [], 0
    for _ in range(n):
        s.attempts[key] += 1
        try:
            # (a write is a POST: aiohttp resends a GET whose kept-alive connection closed
            # without an answer — the balancer's, when the server behind it was killed)
            status, body = await request(http, f"{lb}/incr/{key}", s, "POST")
        except (TimeoutError, aiohttp.ClientError) as exc:
            s.errors.append(f"{key}: {type(exc).__name__}")
            continue
        if status == 200:
            s.acked[key].append(body[key])
        else:
            s.errors.append(f"{key}: {status} {str(body)[:60]}")


async def peek(http: aiohttp.ClientSession, lb: str, s: Session) -> dict[str, Any]:
    for _ in range(50):
        status, body = await request(http, f"{lb}/peek", s)
        if status == 200:
            return body["values"]  # type: ignore[no-any-return]
        await asyncio.sleep(0.2)
    raise AssertionError(f"the session cannot be read: {status} {body}")


async def run_load(lb: str, sessions: list[Session], keys: list[str], n: int,
                   during: Any = None) -> None:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(), timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=200)) as http:
        if any(s.token is None for s in sessions):
            for s in sessions:  # (one at a time: a request without a token starts one)
                status, body = await request(http, f"{lb}/count", s)
                assert status == 200 and s.token, body
        load = asyncio.gather(*(lane(http, lb, s, k, n) for s in sessions for k in keys))
        if during is not None:
            await asyncio.gather(load, during())
        else:
            await load


async def finals(lb: str, sessions: list[Session]) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        return [await peek(http, lb, s) for s in sessions]


async def test_round_robin_50_sessions_concurrent_requests_then_kill_9(make_cluster, balancer):
    cluster = make_cluster().start(proxy=False)
    lb = balancer(cluster)
    sessions = [Session() for _ in range(SESSIONS)]

    # 1. Every server takes every session's requests: not one error, not one write lost.
    n = 8
    await run_load(lb, sessions, [f"a{i}" for i in range(LANES)], n)
    errors = [e for s in sessions for e in s.errors]
    assert errors == [], f"{len(errors)} errors, e.g. {errors[:5]}"
    for s, values in zip(sessions, await finals(lb, sessions), strict=True):
        for key, acked in s.acked.items():
            assert acked == list(range(1, n + 1)), (key, acked)
            assert values[key] == n
    served = {sid: cluster.health(sid)["stats"] for sid in cluster.servers}
    assert all(st["forwarded"] > 0 for st in served.values()), served

    # 2. kill -9 of a server mid-load: no acknowledged write is lost, none applied twice.
    for s in sessions:
        s.errors.clear()
    victim = "s2"

    n = 15
    keys = [f"b{i}" for i in range(LANES)]

    async def kill_soon() -> None:  # once a third of the load is acknowledged
        while sum(len(s.acked.get(k, ())) for s in sessions for k in keys) < (
                SESSIONS * LANES * n // 3):
            await asyncio.sleep(0.01)
        cluster.kill(victim)

    await run_load(lb, sessions, keys, n, during=kill_soon)
    lost, doubled = [], []
    for s, values in zip(sessions, await finals(lb, sessions), strict=True):
        for key in keys:
            acked = s.acked[key]
            # each acknowledged value is above the one before: none was rolled back
            assert acked == sorted(set(acked)), (key, acked)
            final = values.get(key, 0)
            if acked and final < acked[-1]:
                lost.append((key, acked[-1], final))
            if final > s.attempts[key]:
                doubled.append((key, s.attempts[key], final, acked))
    errors = [e for s in sessions for e in s.errors]
    print(f"after kill -9 of {victim}: {sum(len(s.acked[k]) for s in sessions for k in keys)}"
          f" acknowledged, {len(errors)} errors: {Counter(e.split(': ', 1)[1] for e in errors)}")
    assert lost == [], f"acknowledged writes lost (key, last acked, final): {lost[:5]}"
    assert doubled == [], f"applied more often than sent (key, sent, final): {doubled[:5]}"
