"""A server with a memory budget and Redis offload holding far more sessions than its budget.

Starts Redis and three backends (tests/cluster.py, app tests/budget_app.py) with
`session.max_memory_mb`, `session.persistence = "redis"` and `persistence.mode = "offload"`;
creates SESSIONS sessions of SIZE bytes on s1 (each then counted once: an acknowledged
write), reads every one back from s1 (checking its SHA-256), kills s1 with SIGKILL, and reads
and counts every one at its secondary. The servers' RSS is sampled every 0.1 s throughout.

    python bench/offload.py --sessions 2000 --size 1048576 --budget-mb 256
    python bench/offload.py --measure    # the per-record overheads of sessions/accounting.py

Prints one JSON summary (and writes it to --out/summary.json).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import signal
import sys
import tempfile
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.budget_app import digest, value_of  # noqa: E402
from tests.cluster import Client, Cluster  # noqa: E402
from tests.stores import RedisServer, with_persistence  # noqa: E402


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """The peak RSS of each server, per phase."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for sid, spec in self.cluster.servers.items():
                proc = spec["proc"]
                if proc is None or proc.poll() is not None:
                    continue
                try:
                    kib = rss_kib(proc.pid)
                except OSError:
                    continue
                peak = self.peaks.setdefault(self.phase, {})
                peak[sid] = max(peak.get(sid, 0), kib)
            time.sleep(0.1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tandem-offload-"))
    redis = RedisServer(tmp / "redis").start()
    cluster = Cluster(tmp, n=3, app="tests.budget_app:app", log_level="INFO",
                      session={"persistence": "redis", "max_memory_mb": args.budget_mb,
                               "max_inactive_s": 3600})
    with_persistence(cluster, url=redis.url, mode="offload", timeout_s=10.0)
    sampler = Sampler(cluster)
    out: dict[str, Any] = {"sessions": args.sessions, "size": args.size,
                           "budget_mb": args.budget_mb, "concurrency": args.concurrency}
    try:
        cluster.start(proxy=False)
        time.sleep(1.0)
        out["idle_rss_mib"] = {s: round(rss_kib(v["proc"].pid) / 1024, 1)
                               for s, v in cluster.servers.items()}
        sampler.start()
        clients = [Client(cluster.url("s1")) for _ in range(args.sessions)]
        pool = ThreadPoolExecutor(args.concurrency)

        def create(i: int) -> None:
            c = clients[i]
            status, body = c.get(f"/fill?key=v&bytes={args.size}&seed={i}")
            assert status == 200 and "error" not in body, body
            status, body = c.get("/count")  # an acknowledged write
            assert status == 200 and body["counter"] == 1, body

        sampler.phase = "create"
        started = time.monotonic()
        list(pool.map(create, range(args.sessions)))
        out["create_s"] = round(time.monotonic() - started, 1)
        out["after_create"] = {s: cluster.health(s)["memory"] for s in cluster.servers}

        expected = {i: digest(value_of(str(i), args.size)) for i in range(args.sessions)}

        def read(i: int, base: str | None = None) -> bool:
            status, body = clients[i].get("/read?key=v", base=base)
            return status == 200 and body["sha256"] == expected[i]

        sampler.phase = "read"
        started = time.monotonic()
        ok = sum(pool.map(read, range(args.sessions)))
        out["read_s"] = round(time.monotonic() - started, 1)
        out["read_ok"] = ok
        out["s1_stats"] = {k: v for k, v in cluster.health("s1")["stats"].items()
                           if k in ("created", "evicted", "stub_loaded", "store_saved",
                                    "store_loaded", "refused_memory", "lost")}

        sampler.phase = "kill"
        routes = [c.route for c in clients]
        cluster.kill("s1", signal.SIGKILL)
        killed = time.monotonic()
        cluster.wait_formed(["s2", "s3"], timeout=60)
        out["view_s"] = round(time.monotonic() - killed, 2)

        def after(i: int) -> tuple[bool, bool]:
            base = cluster.url(routes[i][2])
            status, body = clients[i].get("/count", base=base)
            counted = status == 200 and body["counter"] == 2
            return counted, read(i, base=cluster.url(clients[i].route[1]))

        started = time.monotonic()
        results = list(pool.map(after, range(args.sessions)))
        out["after_kill_s"] = round(time.monotonic() - started, 1)
        out["after_kill_counted"] = sum(r[0] for r in results)
        out["after_kill_read_ok"] = sum(r[1] for r in results)
        out["lost_acknowledged_writes"] = args.sessions - out["after_kill_counted"]
        out["survivor_stats"] = {s: {k: v for k, v in cluster.health(s)["stats"].items()
                                     if k in ("promoted", "evicted", "stub_loaded", "lost")}
                                 for s in ("s2", "s3")}
        pool.shutdown()
    finally:
        sampler.stop.set()
        cluster.close()
        redis.stop()
        if args.keep:
            print(f"logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["peak_rss_mib"] = {phase: {s: round(k / 1024, 1) for s, k in peaks.items()}
                           for phase, peaks in sampler.peaks.items()}
    return out


async def measure(n: int = 20000) -> dict[str, Any]:
    """Bytes per record as tracemalloc counts them (a 200-byte value under one key),
    beside what sessions/accounting.py accounts for it."""
    from backends.sessions import codec
    from backends.sessions.accounting import STUB_BYTES, Stub, record_bytes
    from backends.sessions.budget import Budget
    from backends.sessions.store import LocalStore, Replica
    from tandem.token import new_sid

    result: dict[str, Any] = {"python": sys.version.split()[0]}
    for kind in ("primary", "replica", "stub"):
        store = LocalStore(max_inactive_s=1800)
        budget = Budget(limit_bytes=1 << 40, store=store, persister=None, offload=False,
                        stats={}, me="s1")
        sids = [new_sid() for _ in range(n)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for sid in sids:
            value = codec.dumps("key", "x" * 198)  # (a new str: counted, as a request's is)
            if kind == "primary":
                record = store.create(sid)
                record.apply({"key": value}, set())
                store.assign_secondary(record, "s2")
                record.clear_pending()
                record.clear_site_pending()
                budget.committed(record, stored=False)
            elif kind == "replica":
                store.replicas[sid] = Replica(sid, data={"key": value}, version=1, epoch=0,
                                              max_inactive_s=1800.0, created=1.0,
                                              last_access=2.0, primary="s2")
            else:
                budget.stubs[sid] = Stub(sid, version=1, epoch=0, peer="s2", primary=True,
                                         last_access=2.0, max_inactive_s=1800.0,
                                         rid=new_sid(), undo={"key": None})
        gc.collect()
        used = (tracemalloc.get_traced_memory()[0] - before) / n
        tracemalloc.stop()
        accounted: float
        if kind == "primary":
            accounted = record_bytes(next(iter(store.primaries.values())))
        elif kind == "replica":
            accounted = record_bytes(next(iter(store.replicas.values())))
        else:
            accounted = STUB_BYTES
        result[kind] = {"measured_bytes": round(used), "accounted_bytes": accounted}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1 << 20, help="bytes per session")
    parser.add_argument("--budget-mb", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", default="bench/out/offload")
    parser.add_argument("--keep", action="store_true",
                        help="keep the servers' logs and files (else removed at the end)")
    parser.add_argument("--measure", action="store_true",
                        help="only measure the per-record overheads (no cluster)")
    args = parser.parse_args()
    result = asyncio.run(measure()) if args.measure else run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if not args.measure:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
