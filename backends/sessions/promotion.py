"""Promoting an ended primary's replicas, and re-protecting them, in slices.

When a view ends a server, every replica it was primary for is promoted here and sent to a
new secondary. A server holding a million of them cannot do that in one go: the event loop
would answer nothing for seconds. So the work runs in slices of the loop (slices.py), and
what a request or a peer's message touches before its slice comes is promoted on the spot
(`claim`) — the same promotion, with the same epoch (from the number of the view that ended
its primary), so nothing can tell the order apart.

Which replicas the view ended: those naming an ended process as primary that were last
heard of before the view was adopted. A replica changed since (by a message of a peer: a
newer process of that server, say) was not one of them, exactly as when all were promoted
at once.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from .committing import Committer
from .context import Context
from .slices import chunks
from .store import Primary

__all__ = ["Promotion"]

log = structlog.get_logger("tandem.sessions")


@dataclass(frozen=True, slots=True)
class _Ended:
    view: int      # the view that ended the process: its number makes the epochs
    at: float      # time.monotonic() when that view was adopted


class Promotion:
    """The promotions and re-protections still to do after views ended primaries."""

    def __init__(self, ctx: Context, committer: Committer) -> None:
        self.ctx = ctx
        self.committer = committer
        # ended servers whose replicas may not all be promoted yet
        self._ended: dict[str, _Ended] = {}
        self._scan: dict[str, _Ended] = {}    # ended servers not yet scanned for
        self._orphans: list[Primary] = []      # sessions to give a new secondary (one list)
        self._causes: list[str] = []
        self._epochs: dict[tuple[int, int], int] = {}  # one int object per epoch made
        self._task: asyncio.Task[None] | None = None
        self._promoted = 0                     # by this round (log)
        self._claimed = 0                      # on demand, during this round's scan
        # for tests and the bench: sessions promoted on demand, and the last round's figures
        self.claimed = 0
        self.last_round: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        """Are replicas of an ended primary perhaps not promoted yet?"""
        return bool(self._ended)

    # --- starting a round ---------------------------------------------------------------

    def ended(self, peers: Iterable[str], *, view: int, cause: str) -> None:
        """A view ended these servers: promote their replicas and re-home the sessions whose
        secondary they were (in slices, from the next iteration of the loop)."""
        mark = _Ended(view=view, at=time.monotonic())
        for peer in peers:
            self._ended[peer] = mark
            self._scan[peer] = mark
        self._causes.append(cause)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="session-promotion")

    def clear(self) -> None:
        """We were fenced: every session held here was dropped, nothing is left to do."""
        self._ended.clear()
        self._scan.clear()
        self._orphans.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # --- on demand ----------------------------------------------------------------------

    def claim(self, sid: str) -> Primary | None:
        """The session's primary record if it is (or is now made) primary here: a replica of
        an ended primary that its slice has not reached yet is promoted at once."""
        store = self.ctx.store
        record = store.primaries.get(sid)
        if record is not None or not self._ended:
            return record
        replica = store.replicas.get(sid)
        if replica is None:
            return None
        mark = self._ended.get(replica.primary)
        if mark is None or replica.last_heard > mark.at:
            return None
        record = self._promote_one(replica.sid, replica.primary, mark)
        if record is not None:
            self.claimed += 1
            self._claimed += 1
            self.ctx.stats["promoted"] += 1
            self._orphans.append(record)
        return record

    def claim_message(self, msg: dict[str, Any]) -> None:
        """Promote the not-yet-promoted replicas a peer's message names, before it is
        handled (as if every replica had been promoted when the view was adopted)."""
        sid = msg.get("sid")
        if isinstance(sid, str):
            self.claim(sid)
        for key in ("sids", "items"):
            named = msg.get(key)
            if isinstance(named, dict | list):
                for item in named:
                    if isinstance(item, str):
                        self.claim(item)
                    elif isinstance(item, dict) and isinstance(item.get("sid"), str):
                        self.claim(item["sid"])

    async def claim_all(self) -> None:
        """Promote every replica of an ended primary now (before a drain hands them on), in
        slices."""
        if not self._ended:
            return
        async for replicas in chunks(self.ctx.store.replicas.walk_values()):
            for replica in replicas:
                self.claim(replica.sid)

    # --- the slices ---------------------------------------------------------------------

    def _promote_one(self, sid: str, peer: str, mark: _Ended,
                     now: float | None = None) -> Primary | None:
        ctx = self.ctx
        store = ctx.store
        replica = store.replicas[sid]
        if (time.time() if now is None else now) - replica.last_access > replica.max_inactive_s:
            del store.replicas[sid]
            return None
        key = (replica.epoch, mark.view)
        epoch = self._epochs.get(key)
        if epoch is None:
            epoch = self._epochs[key] = ctx.next_epoch(replica.epoch, view=mark.view)
        record = store.promote(replica, epoch=epoch)
        ctx.taken_over(peer).add(sid, epoch)
        return record

    async def _run(self) -> None:
        try:
            await self._rounds()
        except Exception:  # a bug: said once, loudly; a later view change starts anew
            log.exception("promotion_failed")
            self._ended.clear()
            self._scan.clear()
            self._orphans.clear()

    async def _rounds(self) -> None:
        started = time.monotonic()
        while self._scan or self._orphans:
            if self._scan:
                scan, self._scan = self._scan, {}
                await self._promote(scan)
                await self._unassign(scan)
                for peer, mark in scan.items():
                    if self._ended.get(peer) is mark:
                        del self._ended[peer]  # every one of its replicas is promoted now
                self._epochs.clear()
            if self._orphans:
                # The first n, in place: this list is made once, at start-up, so the cycle
                # collector's young runs never walk its million items (one such walk: ~0.1
                # s); what is claimed meanwhile is appended after them, for the next turn.
                n = len(self._orphans)
                causes, self._causes = self._causes, []
                await self.committer.replicate_batches(itertools.islice(self._orphans, n))
                del self._orphans[:n]
                seconds = time.monotonic() - started
                self.last_round = {"sessions": n, "promoted": self._promoted,
                                   "seconds": round(seconds, 3)}
                log.info("reprotected", sessions=n, cause="; ".join(causes),
                         seconds=round(seconds, 3),
                         per_s=round(n / seconds) if seconds > 0 else None)
                self._promoted = 0

    async def _promote(self, scan: dict[str, _Ended]) -> None:
        """Promote, slice by slice, the replicas whose primary `scan` ended."""
        store = self.ctx.store
        promoted = 0
        async for sids in chunks(store.replicas.walk()):
            now = time.time()  # (once a chunk: a few ms at most)
            for sid in sids:
                replica = store.replicas.get(sid)
                if replica is None:
                    continue
                mark = scan.get(replica.primary)
                if mark is None or replica.last_heard > mark.at:
                    continue
                record = self._promote_one(sid, replica.primary, mark, now)
                if record is not None:
                    promoted += 1
                    self._orphans.append(record)
        self.ctx.stats["promoted"] += promoted
        promoted, self._claimed = promoted + self._claimed, 0
        if promoted:
            self._promoted += promoted
            log.info("promoted", sessions=promoted, old_primary=", ".join(sorted(scan)),
                     cause=f"view {max(m.view for m in scan.values())} ended it")

    async def _unassign(self, scan: dict[str, _Ended]) -> None:
        """The sessions whose secondary `scan` ended get a new one."""
        store = self.ctx.store
        async for records in chunks(store.primaries.walk_values()):
            for record in records:
                if record.secondary in scan and store.primaries.get(record.sid) is record:
                    store.assign_secondary(record, None)
                    self._orphans.append(record)
