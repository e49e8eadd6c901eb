"""How long promoting a million replicas holds the event loop, in one process.

The promotion of an ended primary's replicas (backends/sessions/promotion.py, its slices)
run alone: a `LocalStore` filled with N replicas of a server `s1`, the view that ends it
marked, then `Promotion._promote` driven on a loop beside a task that measures every gap
between its turns. No sockets, no re-protection, no other work: the slices' own cost and
what they allocate (the store's dicts growing, what is kept of the taken-over sessions).
`bench/memory.py` measures the same on real servers with a kill -9.

    python bench/promotion_holds.py --sessions 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.sessions import promotion as promotion_mod  # noqa: E402
from backends.sessions.store import LocalStore, Replica  # noqa: E402
from backends.sessions.taken_over import TakenOver  # noqa: E402
from tandem.token import new_sid  # noqa: E402


async def _measure(n: int) -> dict[str, object]:
    store = LocalStore(max_inactive_s=1800.0)
    now = time.time()
    value = '"' + "x" * 198 + '"'
    for _ in range(n):
        sid = new_sid()
        store.replicas[sid] = Replica(sid, data={"k": value}, version=1, epoch=0,
                                      max_inactive_s=1800.0, created=now, last_access=now,
                                      primary="s1")
    superseded: dict[str, TakenOver] = {}
    ctx = types.SimpleNamespace(
        store=store, superseded=superseded, stats=collections.Counter(),
        next_epoch=lambda epoch, view: (view + 1) * 1024 + 1,
        taken_over=lambda peer: superseded.setdefault(peer, TakenOver()))
    promotion = promotion_mod.Promotion(ctx, committer=None)  # type: ignore[arg-type]
    gc.collect()
    gaps: list[float] = []
    done = False

    async def watch() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            t = time.perf_counter()
            gaps.append(t - last)
            last = t

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0)
    started = time.perf_counter()
    mark = promotion_mod._Ended(view=3, at=time.monotonic() + 1)
    promotion._ended["s1"] = mark
    await promotion._promote({"s1": mark})
    seconds = time.perf_counter() - started
    done = True
    await watcher
    gaps.sort()
    return {"sessions": n, "promoted": len(store.primaries), "seconds": round(seconds, 2),
            "per_s": round(n / seconds), "longest_hold_ms": round(gaps[-1] * 1000, 1),
            "holds_over_50ms": sum(g > 0.05 for g in gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=1_000_000)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(_measure(args.sessions))))


if __name__ == "__main__":
    main()
