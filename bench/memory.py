"""Memory per session, and the kill -9 of a primary holding a million sessions.

Three real servers (tests/cluster.py) running tests.apps:asgi_counter, and the proxy. s1's
secondaries are all on s2 (s1 prefers s2's replication group); s3 holds nothing at first.

1. `--probe` sessions are made on s1 by a Python client that keeps their tokens; then
   `--sessions` in all are made on s1 directly by wrk (one request per session, no cookie:
   `GET /set?key=v&value=<198 x>`, a 200-byte JSON value; a Lua script stops each thread
   after its share). Reported: the creation rate, each server's RSS (VmRSS) before and
   after, bytes and sessions per GiB per server.
2. The probe sessions are read through the proxy in a loop (`GET /peek`, `--probe-conns`
   connections) while s1 is killed with SIGKILL. Reported: the time from the kill to the
   view without s1, then to every session promoted on s2 and re-protected on s3 (s3 holds
   a replica of each), sessions per second; the longest event-loop hold on s2 in that
   time (its loop-lag monitor, /__tandem/health "loop"); p50/p99/max and errors of the
   probe requests answered meanwhile; s2's RSS before the kill and after.

    python bench/memory.py --sessions 1000000 --out /tmp/memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cluster import Cluster  # noqa: E402

__all__ = ["create_sessions", "read_sessions", "rss_bytes", "main"]

VALUE = "x" * 198  # 200 bytes as the JSON string the session stores
SERVERS = [{"id": "s1", "group": "a", "preferred_secondary_group": "b"},
           {"id": "s2", "group": "b", "preferred_secondary_group": "c"},
           {"id": "s3", "group": "c", "preferred_secondary_group": "b"}]

_FILL_LUA = """
local done, limit = 0, tonumber(os.getenv("FILL_PER_THREAD"))
function response(status, headers, body)
  done = done + 1
  if done >= limit then wrk.thread:stop() end
end
"""


# --- a small HTTP/1.1 keep-alive client (the tokens it is given, or makes) ----------------

async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
                   token: str | None) -> tuple[int, str | None, bytes]:
    cookie = f"Cookie: JSESSIONID={token}\r\n" if token else ""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n{cookie}\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status, length, new_token = int(lines[0].split()[1]), 0, None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.lower()
        if name == "content-length":
            length = int(value)
        elif name == "set-cookie" and value.strip().startswith("JSESSIONID="):
            new_token = value.strip()[len("JSESSIONID="):].split(";", 1)[0] or None
    return status, new_token, await reader.readexactly(length)


async def create_sessions(host: str, port: int, n: int, *, path: str = "/count",
                          conns: int = 16) -> list[str]:
    """`n` new sessions (one request each, no cookie): their tokens."""
    tokens: list[str] = []
    left = [n]

    async def worker() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while left[0] > 0:
                left[0] -= 1
                status, token, _ = await _request(reader, writer, path, None)
                if status != 200 or token is None:
                    raise RuntimeError(f"a new session got {status}, token {token!r}")
                tokens.append(token)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    return tokens


async def read_sessions(host: str, port: int, tokens: list[str], *, path: str = "/peek",
                        conns: int = 8, stop: asyncio.Event | None = None
                        ) -> list[tuple[float, float, int, dict[str, Any] | None]]:
    """Read each session once (or in a loop until `stop` is set): per request its start
    (time.monotonic()), its latency in seconds, its status and its JSON body (None: the
    connection failed). A new token in an answer is kept for the next request."""
    results: list[tuple[float, float, int, dict[str, Any] | None]] = []
    mine = list(tokens)

    async def worker(k: int) -> None:
        reader = writer = None
        i = k
        while (stop is None and i < len(mine)) or (stop is not None and not stop.is_set()):
            j = i % len(mine)
            i += conns
            started = time.monotonic()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                status, token, body = await _request(reader, writer, path, mine[j])
                if token:
                    mine[j] = token
                results.append((started, time.monotonic() - started, status,
                                json.loads(body) if status == 200 else None))
            except (OSError, asyncio.IncompleteReadError, ValueError):
                results.append((started, time.monotonic() - started, 0, None))
                if writer is not None:
                    writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker(k) for k in range(conns)))
    return results


# --- the servers ------------------------------------------------------------------------

def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _rss(cluster: Cluster) -> dict[str, int]:
    return {sid: rss_bytes(v["proc"].pid) for sid, v in cluster.servers.items()
            if v["proc"] is not None and v["proc"].poll() is None}


def _wrk_fill(cluster: Cluster, n: int, *, threads: int, conns: int) -> None:
    """`n` sessions (a few more: the requests in flight when a thread stops) on s1."""
    if n <= 0:
        return
    if shutil.which("wrk") is None:
        raise SystemExit("bench/memory.py: wrk is needed to fill (apt-get install wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_FILL_LUA)
    try:
        url = f"{cluster.url('s1')}/set?key=v&value={VALUE}"
        env = dict(os.environ, FILL_PER_THREAD=str(-(-n // threads)))
        target = cluster.health("s1")["primaries"] + n
        # (a thread that has sent its share stops; wrk itself runs until interrupted)
        wrk = subprocess.Popen(["wrk", "-t", str(threads), "-c", str(conns), "-d", "3600s",
                                "-s", f.name, url], env=env, stdout=subprocess.DEVNULL)
        try:
            _wait("the sessions made by wrk",
                  lambda: wrk.poll() is not None or cluster.health("s1")["primaries"] >= target,
                  3600, 0.5)
        finally:
            wrk.send_signal(signal.SIGINT)
            wrk.wait(timeout=10)
    finally:
        os.unlink(f.name)


def _wait(what: str, ok: Any, timeout: float, every: float = 0.05) -> float:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(every)
    return time.monotonic()


def _percentile(xs: list[float], p: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cluster = Cluster(tmp, servers=[dict(s) for s in SERVERS], log_level="INFO",
                      session={"max_inactive_s": 3600})
    out: dict[str, Any] = {"sessions": args.sessions, "value_bytes": len(VALUE) + 2,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        cluster.start()
        cluster.wait_formed()
        idle = _rss(cluster)
        # 1. fill
        t0 = time.monotonic()
        s1 = cluster.servers["s1"]
        probes = await create_sessions(s1["host"], s1["http"], args.probe,
                                       path=f"/set?key=v&value={VALUE}")
        _wrk_fill(cluster, args.sessions - args.probe, threads=2, conns=args.fill_conns)
        created = cluster.health("s1")["primaries"]
        fill_s = time.monotonic() - t0
        _wait("replicas on s2", lambda: cluster.health("s2")["replicas"] >= created, 60)
        full = _rss(cluster)
        out["fill"] = {"created": created, "seconds": round(fill_s, 1),
                       "per_s": round(created / fill_s)}
        out["rss_idle"] = idle
        out["rss_full"] = full
        out["bytes_per_session"] = {s: round((full[s] - idle[s]) / created)
                                    for s in ("s1", "s2")}
        out["sessions_per_gib"] = {s: round(created * 2**30 / full[s]) for s in ("s1", "s2")}
        print(json.dumps(out), flush=True)
        # 2. kill -9 of s1, under the probe load
        stop = asyncio.Event()
        load = asyncio.create_task(read_sessions("127.0.0.1", cluster.proxy_port, probes,
                                                 conns=args.probe_conns, stop=stop))
        await asyncio.sleep(2.0)
        before = rss_bytes(cluster.servers["s2"]["proc"].pid)
        loop_before = cluster.health("s2")["loop"]
        killed_wall, killed = time.time(), time.monotonic()
        cluster.servers["s1"]["proc"].send_signal(signal.SIGKILL)

        def done() -> bool:
            h2, h3 = cluster.health("s2"), cluster.health("s3")
            return h2["stats"]["promoted"] >= created and h3["replicas"] >= created

        finished = await asyncio.to_thread(_wait, "promoted and re-protected", done,
                                           args.timeout, 0.1)
        after = rss_bytes(cluster.servers["s2"]["proc"].pid)
        await asyncio.sleep(1.0)
        stop.set()
        results = await load
        h2 = cluster.health("s2")
        events = cluster.events("s2")
        view_at = next((e for e in events if e.get("event") == "view_adopted"
                        and "s1" not in e.get("members", ["s1"])), None)
        reprotected = [e for e in events if e.get("event") == "reprotected"]
        during = [r for r in results if killed <= r[0] <= finished]
        lat = [r[1] * 1000 for r in during if r[2] == 200]
        lost = [r for r in during if r[2] == 200 and (r[3] or {}).get("values", {}).get("v")
                != VALUE]
        window = [ms for t, ms, _ in h2["loop"]["per_second"] if killed_wall - 1 <= t]
        busy = [b for t, _, b in h2["loop"]["per_second"] if killed_wall - 1 <= t]
        out["kill"] = {
            "to_done_s": round(finished - killed, 2),
            "per_s_from_kill": round(created / (finished - killed)),
            "view_adopted": view_at and view_at.get("timestamp"),
            "reprotected_events": reprotected,
            "loop_hold_max_ms_during": max(window, default=None),
            "loop_held_over_50ms": h2["loop"]["held"] - loop_before["held"],
            "loop_busy_max_ms_during": max(busy, default=None),
            "loop_busy_over_50ms": h2["loop"]["busy_held"] - loop_before["busy_held"],
            "s2_gc_full_runs": h2["loop"]["gc_full_runs"] - loop_before["gc_full_runs"],
            "s2_gc_full_ms": round(h2["loop"]["gc_full_total_ms"]
                                   - loop_before["gc_full_total_ms"]),
            "s2_gc_full_max_ms": h2["loop"]["gc_full_max_ms"],
            "probe_requests": len(during), "probe_errors": len(during) - len(lat),
            "probe_wrong_value": len(lost),
            "probe_p50_ms": _percentile(lat, 50), "probe_p99_ms": _percentile(lat, 99),
            "probe_max_ms": max(lat, default=None),
            "s2_rss_before": before, "s2_rss_after": after,
            "s2_rss_after_1s": rss_bytes(cluster.servers["s2"]["proc"].pid),
            "s3_rss_after": rss_bytes(cluster.servers["s3"]["proc"].pid),
        }
        return out
    finally:
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sessions", type=int, default=1_000_000)
    p.add_argument("--probe", type=int, default=2000, help="sessions read during the kill")
    p.add_argument("--probe-conns", type=int, default=8)
    p.add_argument("--fill-conns", type=int, default=64)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the servers' logs (printed)")
    args = p.parse_args(argv)
    if args.keep:
        tmp = tempfile.mkdtemp(prefix="tandem-memory-")
        print(f"logs in {tmp}", flush=True)
        out = asyncio.run(run(args, Path(tmp)))
    else:
        with tempfile.TemporaryDirectory(prefix="tandem-memory-") as tmp:
            out = asyncio.run(run(args, Path(tmp)))
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
