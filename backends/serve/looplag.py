"""How long the event loop was held: a timer that should fire every `INTERVAL_S`, and how
late it fired.

A server answers nothing while one callback holds its loop, so the work that scales with
the number of sessions (promotion, re-protection, expiry) runs in slices. This is what
shows whether the slices are short: `/__tandem/health` reports the longest hold since the
start, one maximum per second for the last minute, and how many holds passed `WARN_MS`
(each logged as `loop_held`) — and, apart, how much CPU the loop's thread spent within one
period: a hold it spent waiting for a CPU (a machine short of them) is not its own work.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import time
from typing import Any

import structlog

__all__ = ["LoopLag"]

log = structlog.get_logger("tandem.server")

INTERVAL_S = 0.01  # the timer's period
WARN_MS = 50.0     # a hold longer than this is logged (the slicing rule: docs/memory.md)
_SECONDS = 60      # per-second maxima kept


class LoopLag:
    """The loop-lag monitor of one server."""

    def __init__(self) -> None:
        self.max_ms = 0.0                          # longest hold since the start
        self.held = 0                              # holds longer than WARN_MS
        # the CPU time the loop's thread spent within one period at most: a hold it spent
        # running (its own work) rather than waiting for a CPU (a machine short of them)
        self.busy_max_ms = 0.0
        self.busy_held = 0                         # periods with more than WARN_MS of it
        # (wall-clock second, longest hold in it, most CPU in one period), oldest first
        self._seconds: collections.deque[tuple[int, float, float]] = collections.deque(
            maxlen=_SECONDS)
        # Python's cycle collector: its full runs scan every tracked object (a million
        # session records: a quarter of a second), with the loop held
        self.gc_full_runs = 0
        self.gc_full_max_ms = 0.0
        self.gc_full_ms = 0.0
        self._gc_started = 0.0

    def health(self) -> dict[str, Any]:
        return {"lag_max_ms": round(self.max_ms, 1), "held_over_ms": WARN_MS,
                "held": self.held, "busy_max_ms": round(self.busy_max_ms, 1),
                "busy_held": self.busy_held,
                "per_second": [[t, round(ms, 1), round(busy, 1)]
                               for t, ms, busy in self._seconds],
                "gc_full_runs": self.gc_full_runs, "gc_full_max_ms": round(self.gc_full_max_ms, 1),
                "gc_full_total_ms": round(self.gc_full_ms, 1)}

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._gc_started) * 1000
        generation = info.get("generation")
        if generation == 2:
            self.gc_full_runs += 1
            self.gc_full_ms += ms
            self.gc_full_max_ms = max(self.gc_full_max_ms, ms)
        if ms > WARN_MS:  # (a young generation's run too: it says what piled up there)
            log.warning("gc_full_run" if generation == 2 else "gc_run", ms=round(ms, 1),
                        generation=generation, collected=info.get("collected"))

    def record(self, lag_ms: float, now: float, busy_ms: float = 0.0) -> None:
        second = int(now)
        if self._seconds and self._seconds[-1][0] == second:
            _, lag, busy = self._seconds[-1]
            self._seconds[-1] = (second, max(lag, lag_ms), max(busy, busy_ms))
        else:
            self._seconds.append((second, lag_ms, busy_ms))
        if lag_ms > self.max_ms:
            self.max_ms = lag_ms
        if busy_ms > self.busy_max_ms:
            self.busy_max_ms = busy_ms
        if busy_ms > WARN_MS:
            self.busy_held += 1
        if lag_ms > WARN_MS:
            self.held += 1
            log.warning("loop_held", ms=round(lag_ms, 1), cpu_ms=round(busy_ms, 1))

    async def run(self) -> None:
        """The timer (a task of the server's for its whole life)."""
        clock, cpu = time.monotonic, time.thread_time
        gc.callbacks.append(self._gc)
        try:
            while True:
                before, cpu_before = clock(), cpu()
                await asyncio.sleep(INTERVAL_S)
                self.record(max(0.0, (clock() - before - INTERVAL_S) * 1000), time.time(),
                            (cpu() - cpu_before) * 1000)
        finally:
            gc.callbacks.remove(self._gc)
