"""Losing a whole site: how many acknowledged writes survive at the other one (docs/sites.md).

    python bench/sites_kill.py --mode man --sessions 20 --seconds 3
    python bench/sites_kill.py --mode wan --flush-interval 1.0 --sessions 20 --seconds 3

Two sites of 3 real servers each, with their proxies, on loopback (tests/sites.py). The
sessions are made at site A; GET /count is sent through A's proxy round robin over them for
`--seconds`, each answer an acknowledged write; then every server of A is killed (SIGKILL)
at once, and each session is read back through B's proxy with one more write. Lost: the
acknowledged writes B's counter does not include. WAN runs B's store on a redis-server
started for the run; MAN keeps the copies in memory.

Prints one JSON line: mode, sessions, acknowledged writes, lost writes, the flush interval,
and the age (before the kill) of the oldest lost write.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cluster import Client  # noqa: E402
from tests.sites import TwoSites, write_then_kill  # noqa: E402
from tests.stores import RedisServer  # noqa: E402


def run(mode: str, sessions: int, seconds: float, flush_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        where = Path(tmp)
        redis = RedisServer(where / "redis").start() if mode == "wan" else None
        kwargs: dict[str, object] = {"mode": mode, "site": {"flush_interval_s": flush_s,
                                                            "flush_threshold": 10_000}}
        if redis is not None:
            base = redis.url.rsplit("/", 1)[0]
            kwargs.update(session={"persistence": "redis"},
                          persistence={"a": {"url": f"{base}/1"}, "b": {"url": f"{base}/2"}})
        (where / "sites").mkdir()
        sites = TwoSites(where / "sites", **kwargs)  # type: ignore[arg-type]
        try:
            sites.start()
            clients = []
            for _ in range(sessions):
                c = Client(sites.a.proxy_url)
                status, body = c.get("/count")
                assert status == 200 and body["counter"] == 1, body
                clients.append(c)
            acked, t_kill = write_then_kill(sites, clients, seconds)
            lost: list[float] = []
            for i, c in enumerate(clients):
                status, body = c.get("/count", base=sites.b.proxy_url)
                if status != 200:
                    raise SystemExit(f"session {i} not served at B: {status} {body}")
                have = body["counter"] - 2  # (its first write, and this one)
                lost += acked[i][max(have, 0):]
            return {"mode": mode, "sessions": sessions,
                    "acknowledged": sessions + sum(len(t) for t in acked.values()),
                    "lost": len(lost), "flush_interval_s": flush_s if mode == "wan" else None,
                    "oldest_lost_before_kill_s": round(max((t_kill - t for t in lost),
                                                           default=0.0), 3)}
        finally:
            sites.close()
            if redis is not None:
                redis.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("man", "wan"), default="man")
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--flush-interval", type=float, default=1.0)
    args = ap.parse_args()
    print(json.dumps(run(args.mode, args.sessions, args.seconds, args.flush_interval)))


if __name__ == "__main__":
    main()
