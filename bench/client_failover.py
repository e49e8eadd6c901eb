"""The replica-aware client's failover: how long after kill -9 of their primary do 20
sessions get their first good answer, with no proxy (docs/client.md).

    python bench/client_failover.py --runs 5 --sessions 20
    python bench/client_failover.py --runs 5 --library requests
    python bench/client_failover.py --runs 5 --one-by-one
    python bench/client_failover.py --runs 5 --via-proxy     # the reference: the proxy

Each run starts 3 real servers on loopback (tests/cluster.py, no proxy), makes `--sessions`
sessions through the client whose primary is s1, writes each 3 times (GET /count of
tests/apps.py), then kills s1 (SIGKILL) and at once sends every session its next write, all
together (asyncio tasks for httpx's async client, threads for httpx's sync client and for
requests) — or, with `--one-by-one`, each session's after the one before it was answered
(callers whose next request comes at different times). Per session it records:

- *request*: from sending that first request after the kill to its good answer (the failed
  attempt at the dead primary and the failover included);
- *since kill*: from the signal to that answer.

and per run, from the survivors' logs, *view*: from the signal to the last survivor adopting
the view without s1 (their promotion of its sessions follows at once) — the cluster's own
part, which no client can shorten.

Every answer must be 200 with the session's counter intact (4); a run that sees anything
else stops the bench with the session's answer. `--via-proxy`: the same with plain httpx
through tandem's proxy (the reference the client is compared with). Prints one JSON line
per run and one with p50 / p99 / max (ms) over every session of every run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tandem.client import (  # noqa: E402
    AsyncTandemTransport,
    Cluster,
    TandemAdapter,
    TandemTransport,
)
from tandem.logs import configure  # noqa: E402
from tests.cluster import Cluster as Servers  # noqa: E402

BASE = "http://orders"


class Session:
    """One caller's session through the client (one cookie jar)."""

    def __init__(self, library: str, cluster: Cluster, proxy_url: str | None = None) -> None:
        self.library = library
        self.sync: httpx.Client | None = None
        self.aio: httpx.AsyncClient | None = None
        self.req: requests.Session | None = None
        if proxy_url is not None:  # the reference: plain httpx through tandem's proxy
            self.aio = httpx.AsyncClient(base_url=proxy_url)
        elif library == "httpx-async":
            self.aio = httpx.AsyncClient(base_url=BASE, transport=AsyncTandemTransport(cluster))
        elif library == "httpx":
            self.sync = httpx.Client(base_url=BASE, transport=TandemTransport(cluster))
        else:
            self.req = requests.Session()
            self.req.mount(BASE + "/", TandemAdapter(cluster))

    def get_sync(self) -> tuple[int, Any]:
        if self.sync is not None:
            r = self.sync.get("/count")
            return r.status_code, r.json()
        assert self.req is not None
        rr = self.req.get(BASE + "/count", timeout=10)
        return rr.status_code, rr.json()

    async def get(self) -> tuple[int, Any]:
        if self.aio is not None:
            r = await self.aio.get("/count")
            return r.status_code, r.json()
        return self.get_sync()

    async def close(self) -> None:
        if self.aio is not None:
            await self.aio.aclose()
        if self.sync is not None:
            self.sync.close()
        if self.req is not None:
            self.req.close()


async def sessions_on(library: str, cluster: Cluster, count: int,
                      proxy_url: str | None) -> list[Session]:
    kept: list[Session] = []
    for _ in range(20 * count):
        s = Session(library, cluster, proxy_url)
        status, body = await s.get()
        if status != 200 or body["counter"] != 1:
            raise SystemExit(f"new session: {status} {body}")
        if body["primary"] == "s1":
            kept.append(s)
            if len(kept) == count:
                return kept
        else:
            await s.close()
    raise SystemExit("new sessions are not spread over the servers")


async def one_run(library: str, n_sessions: int, log_level: str, one_by_one: bool,
                  keep: Path | None, via_proxy: bool) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        if keep is not None:  # the servers' logs stay there
            where = Path(tempfile.mkdtemp(prefix="run-", dir=keep))
        servers = Servers(where, n=3, log_level=log_level).start(proxy=via_proxy)
        try:
            cluster = Cluster.from_file(servers.config_path)
            sessions = await sessions_on(library, cluster, n_sessions,
                                         servers.proxy_url if via_proxy else None)
            for s in sessions:
                for n in (2, 3):
                    status, body = await s.get()
                    if status != 200 or body["counter"] != n:
                        raise SystemExit(f"before the kill: {status} {body}")
            proc = servers.servers["s1"]["proc"]
            results: list[tuple[float, float, int, Any]] = []

            if one_by_one:
                proc.send_signal(signal.SIGKILL)
                t_kill, wall_kill = time.perf_counter(), time.time()
                for s in sessions:
                    t0 = time.perf_counter()
                    status, body = await s.get()
                    results.append((t0, time.perf_counter(), status, body))
            elif library == "httpx-async" or via_proxy:
                async def timed(s: Session) -> tuple[float, float, int, Any]:
                    t0 = time.perf_counter()
                    status, body = await s.get()
                    return t0, time.perf_counter(), status, body

                proc.send_signal(signal.SIGKILL)
                t_kill, wall_kill = time.perf_counter(), time.time()
                results = list(await asyncio.gather(*(timed(s) for s in sessions)))
            else:
                go = threading.Barrier(len(sessions) + 1)
                out: list[tuple[float, float, int, Any] | None] = [None] * len(sessions)

                def worker(i: int, s: Session) -> None:
                    go.wait()
                    t0 = time.perf_counter()
                    status, body = s.get_sync()
                    out[i] = (t0, time.perf_counter(), status, body)

                threads = [threading.Thread(target=worker, args=(i, s))
                           for i, s in enumerate(sessions)]
                for t in threads:
                    t.start()
                proc.send_signal(signal.SIGKILL)
                t_kill, wall_kill = time.perf_counter(), time.time()
                go.wait()
                for t in threads:
                    t.join()
                results = [r for r in out if r is not None]
            proc.wait(timeout=20)
            for _, _, status, body in results:
                if status != 200 or body.get("counter") != 4 or body.get("server") == "s1":
                    raise SystemExit(f"after the kill: {status} {body}")
            for s in sessions:
                await s.close()
            view_ms = _view_ms(servers, wall_kill)
        finally:
            servers.close()
    request_ms = [(done - t0) * 1000 for t0, done, _, _ in results]
    since_ms = [(done - t_kill) * 1000 for _, done, _, _ in results]
    after_view = [t - view_ms for t in since_ms] if view_ms is not None else []
    return {"library": "proxy" if via_proxy else library,
            "mode": "one-by-one" if one_by_one else "together",
            "sessions": len(results), "intact": len(results),
            "request_ms": _summary(request_ms), "since_kill_ms": _summary(since_ms),
            "view_ms": view_ms,
            **({"after_view_ms": _summary(after_view)} if after_view else {}),
            **({"logs": str(where)} if keep is not None else {}),
            "_request": request_ms, "_since": since_ms, "_after_view": after_view}


def _view_ms(servers: Servers, wall_kill: float) -> float | None:
    """From the kill to the last survivor adopting the view without s1 (their logs)."""
    adopted = []
    for sid in ("s2", "s3"):
        for e in servers.events(sid):
            if e.get("event") == "view_adopted" and "s1" not in e.get("members", ["s1"]):
                t = datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()
                if t >= wall_kill - 0.01:
                    adopted.append(t)
                    break
    return round((max(adopted) - wall_kill) * 1000, 1) if len(adopted) == 2 else None


def _pct(values: list[float], p: float) -> float:
    """The p-th percentile, nearest rank (p99 of 100 samples: the 99th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def _summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 2), "p99": round(_pct(values, 99), 2),
            "max": round(max(values), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--library", choices=("httpx-async", "httpx", "requests"),
                    default="httpx-async")
    ap.add_argument("--one-by-one", action="store_true",
                    help="after the kill, each session's request after the one before it")
    ap.add_argument("--via-proxy", action="store_true",
                    help="the reference: plain httpx async through tandem's proxy instead")
    ap.add_argument("--log-level", default="INFO", help="of the server processes")
    ap.add_argument("--keep", type=Path, help="keep each run's server logs under this folder")
    args = ap.parse_args()
    configure(component="bench", level="WARNING")  # (the client's failover lines: quiet)
    every_request: list[float] = []
    every_since: list[float] = []
    every_after: list[float] = []  # since the kill, less the run's view time
    for i in range(args.runs):
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
        run = asyncio.run(one_run(args.library, args.sessions, args.log_level,
                                  args.one_by_one, args.keep, args.via_proxy))
        every_request += run.pop("_request")
        every_since += run.pop("_since")
        every_after += run.pop("_after_view")
        print(json.dumps({"run": i + 1, **run}), flush=True)
    print(json.dumps({"runs": args.runs,
                      "library": "proxy" if args.via_proxy else args.library,
                      "mode": "one-by-one" if args.one_by_one else "together",
                      "sessions": len(every_request),
                      "request_ms": _summary(every_request),
                      "since_kill_ms": _summary(every_since),
                      **({"after_view_ms": _summary(every_after)} if every_after else {})}),
          flush=True)


if __name__ == "__main__":
    main()
