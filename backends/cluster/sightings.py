"""What one server knows of the others' processes: when it last heard each, which are dead.

The evidence behind the view consensus' refusal rule (`backends.cluster.quorum`):

- *suspected*: nothing heard from that process for `heartbeat_interval_s × missed_heartbeats`
  of our own clock (counted from our own start if we never heard from it);
- *dead*: proven gone — its server's replication port refused a connection (no process
  listening), or a newer process of the same server told us which process it replaces;
- *reachable*: heard within that same interval, and not dead.

Pure bookkeeping: times are the caller's monotonic clock, in seconds.
"""

from __future__ import annotations

__all__ = ["Sightings"]


class Sightings:
    """Last-heard times and death proofs, per (server id, incarnation)."""

    def __init__(self, *, suspect_after_s: float, now: float) -> None:
        self.suspect_after_s = suspect_after_s
        self.since = now  # our own start: silence before it is not evidence
        self._heard: dict[tuple[str, str], float] = {}
        self._dead: set[tuple[str, str]] = set()
        self._joins: dict[str, tuple[str, float]] = {}  # server -> (new incarnation, asked at)

    def heard(self, peer: str, incarnation: str, now: float) -> None:
        key = (peer, incarnation)
        if now > self._heard.get(key, float("-inf")):
            self._heard[key] = now

    def refused(self, peer: str, bound: str) -> None:
        """The peer's port refused a connection: every process of it heard so far is gone,
        and so is `bound`, the one our view binds ("" if none)."""
        for p, inc in list(self._heard):
            if p == peer:
                self._dead.add((p, inc))
        if bound:
            self._dead.add((peer, bound))

    def superseded(self, peer: str, old: str) -> None:
        """A newer process of `peer` knows a view binding `old`: `old` has ended."""
        if old:
            self._dead.add((peer, old))

    def is_dead(self, peer: str, incarnation: str) -> bool:
        return bool(incarnation) and (peer, incarnation) in self._dead

    def last_heard(self, peer: str, incarnation: str = "") -> float:
        """Latest time heard from that process ("" = from any process of `peer`)."""
        return max((t for (p, inc), t in self._heard.items()
                    if p == peer and incarnation in ("", inc)), default=float("-inf"))

    def suspects(self, peer: str, now: float, incarnation: str = "") -> bool:
        if self.is_dead(peer, incarnation):
            return True
        return now - max(self.last_heard(peer, incarnation), self.since) >= self.suspect_after_s

    def reachable(self, peer: str, incarnation: str, now: float) -> bool:
        if self.is_dead(peer, incarnation):
            return False
        return now - self.last_heard(peer, incarnation) < self.suspect_after_s

    def latest(self, peer: str, now: float) -> str | None:
        """The reachable process of `peer` heard most recently, if any."""
        best: tuple[float, str] | None = None
        for (p, inc), t in self._heard.items():
            if p == peer and self.reachable(p, inc, now) and (best is None or t > best[0]):
                best = (t, inc)
        return best[1] if best else None

    # --- join requests ----------------------------------------------------------------------

    def asked_to_join(self, peer: str, incarnation: str, now: float) -> None:
        self._joins[peer] = (incarnation, now)

    def joiner(self, peer: str, now: float) -> str | None:
        """The process of `peer` that asked to join recently and is reachable."""
        entry = self._joins.get(peer)
        if entry is None or now - entry[1] >= self.suspect_after_s:
            return None
        return entry[0] if self.reachable(peer, entry[0], now) else None
