"""The cluster as this server sees it: a link to every peer, which of them are alive, and
the view (live members and their addresses) the proxy is told about."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig

from .link import PeerLink, PeerState

__all__ = ["Membership"]

log = structlog.get_logger("tandem.peers")


class Membership:
    """The cluster as this server sees it: which peers are alive, and the view hash."""

    def __init__(self, *, config: Config, me: str) -> None:
        self.config = config
        self.me = config.server(me)
        # this process: new at every start (a restarted server forgot everything it promised)
        self.incarnation = secrets.token_hex(8)
        self.links: dict[str, PeerLink] = {
            s.id: PeerLink(me=me, peer=s, config=config, on_state=self._changed,
                           stalled=self.recently_stalled, incarnation=self.incarnation)
            for s in config.servers if s.id != me
        }
        self._listeners: list[Callable[[str, PeerState, str], Awaitable[None] | None]] = []
        self._view: tuple[str, str] | None = None
        self._stall_task: asyncio.Task[None] | None = None
        self._stalled_at = -1e9  # monotonic time our last stall ended
        self._last_tick = float("inf")  # when the stall watch last ran (not yet: inf)

    def on_change(self, fn: Callable[[str, PeerState, str], Awaitable[None] | None]) -> None:
        self._listeners.append(fn)

    def start(self) -> None:
        for link in self.links.values():
            link.start()
        self._stall_task = asyncio.create_task(self._watch_stalls(), name="stall-watch")

    def recently_stalled(self, within: float | None = None) -> bool:
        """Were we frozen long enough, recently, for the peers to have declared us failed?

        Then the failures we see now are most likely our own: the peers closed our links.
        `within`: seconds since the stall ended (default: until the peers have surely
        noticed we are back, two rounds of missed heartbeats).
        """
        c = self.config.cluster
        now = time.monotonic()
        if now - self._last_tick > c.heartbeat_interval_s * c.missed_heartbeats / 2:
            return True  # frozen until just now: the watch has not run yet
        if within is None:
            within = 2 * c.heartbeat_interval_s * (c.missed_heartbeats + 1)
        return now - self._stalled_at < within

    async def _watch_stalls(self) -> None:
        c = self.config.cluster
        tick = min(0.1, c.heartbeat_interval_s / 5)
        limit = c.heartbeat_interval_s * c.missed_heartbeats / 2
        self._last_tick = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - self._last_tick > limit:
                self._stalled_at = now
                log.warning("stalled", seconds=round(now - self._last_tick, 3))
            self._last_tick = now

    async def close(self) -> None:
        if self._stall_task is not None:
            self._stall_task.cancel()
        await asyncio.gather(*(link.close() for link in self.links.values()))

    def is_alive(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.alive

    def alive_peers(self) -> list[ServerConfig]:
        """Peers that may take new replicas (alive and not draining)."""
        return [link.peer for link in self.links.values() if link.state is PeerState.ALIVE]

    def broadcast(self, msg: dict[str, Any]) -> None:
        for link in self.links.values():
            link.send(dict(msg))

    def states(self) -> dict[str, str]:
        return {pid: link.state.value for pid, link in self.links.items()}

    def view(self) -> tuple[str, str]:
        """(hash, header value) of the live members and their http addresses."""
        if self._view is None:
            members = [self.me, *self.alive_peers()]
            listing = ", ".join(f"{s.id}={s.http}" for s in sorted(members, key=lambda s: s.id))
            digest = hashlib.sha256(listing.encode()).hexdigest()[:16]
            self._view = (digest, f"{digest}; {listing}")
        return self._view

    def _changed(self, peer: str, state: PeerState, cause: str) -> None:
        self._view = None
        if state is PeerState.ALIVE:
            log.info("peer_alive", peer=peer)
        elif state is PeerState.LEFT:
            log.info("peer_left", peer=peer)
        elif state is PeerState.DRAINING:
            log.info("peer_draining", peer=peer)
        else:
            log.warning("peer_failed", peer=peer, cause=cause)
        for fn in self._listeners:
            result = fn(peer, state, cause)
            if asyncio.iscoroutine(result):
                asyncio.get_running_loop().create_task(result)
