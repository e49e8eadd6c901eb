"""The cluster as this server sees it: a link to every peer, which of them answer, and the
view the majority agreed on (docs/consistency.md).

Two kinds of knowledge, kept apart:
- *reachability* (`PeerLink.state`): what this server's own links say of each peer. It picks
  secondaries among reachable members and re-dials the others; it never promotes anything.
- *the view* (`Quorum`): members and their processes, decided by a majority; the lease that
  lets this server acknowledge writes. Promotions, fencing and re-homing follow view changes
  only (`ViewChanged` events), and the proxy is told the view by its number.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig
from tandem.errors import ConfigError

from ..errors import NotServing
from .link import PeerLink, PeerState
from .quorum import Quorum, Standing
from .roster import Roster, announcement
from .store_view import StoreView, open_store_view
from .tls import Channel
from .view import Out, ViewChanged

__all__ = ["Membership"]

log = structlog.get_logger("tandem.peers")

# How often the view consensus runs its timers (heartbeats, ballots' deadlines, turns).
_QUORUM_TICK_S = 0.05


class Membership:
    """The cluster as this server sees it: which peers are alive, and the view hash."""

    def __init__(self, *, config: Config, me: str) -> None:
        self.config = config
        self.me = config.server(me)
        self.roster = Roster(config)  # where each server is: the file's, and joined ones
        # this process: new at every start (a restarted server forgot everything it promised)
        self.incarnation = secrets.token_hex(8)
        c = config.cluster
        # the view and the leases: our own consensus, or a store's (cluster.membership)
        self.store: StoreView | None = None
        self.quorum: Quorum | StoreView
        if c.membership != "embedded":  # "redis", "postgresql"
            self.quorum = self.store = open_store_view(
                c.membership, me=me, servers=config.server_ids, incarnation=self.incarnation,
                cluster=c.name, url=c.membership_url,
                heartbeat_interval_s=c.heartbeat_interval_s,
                missed_heartbeats=c.missed_heartbeats)
        else:
            self.quorum = Quorum(me=me, servers=config.server_ids,
                                 incarnation=self.incarnation,
                                 heartbeat_interval_s=c.heartbeat_interval_s,
                                 missed_heartbeats=c.missed_heartbeats, now=time.monotonic())
        # how the replication connections are made: plaintext or mutual TLS (a TLS file
        # that cannot be used is a ConfigError here, before anything starts)
        self.channel = Channel(config=config, me=me)
        self.links: dict[str, PeerLink] = {
            s.id: self._link(s) for s in config.servers if s.id != me}
        self._listeners: list[Callable[[str, PeerState, str], Awaitable[None] | None]] = []
        self._view_listeners: list[Callable[[ViewChanged], None]] = []
        self._view: tuple[str, str] | None = None
        self._forgetting: set[asyncio.Future[None]] = set()  # links of departed joiners
        # until when (monotonic) this server may acknowledge writes: the lease, while bound
        self.ack_until = float("-inf")
        self.leaving = False  # said goodbye: acknowledges nothing more
        self.voter = True  # bound in the view we know (view 1 binds any process)
        self._view_changed = asyncio.Event()  # set and replaced at every adopted view
        self._stall_task: asyncio.Task[None] | None = None
        self._quorum_task: asyncio.Task[None] | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._stalled_at = -1e9  # monotonic time our last stall ended
        self._last_tick = float("inf")  # when the stall watch last ran (not yet: inf)

    def _link(self, server: ServerConfig) -> PeerLink:
        return PeerLink(me=self.me.id, peer=server, config=self.config, on_state=self._changed,
                        stalled=self.recently_stalled, incarnation=self.incarnation,
                        on_refused=self.refused, on_heard=self.heard, channel=self.channel)

    def server(self, server_id: str) -> ServerConfig:
        """A server's configuration: from the cluster file, or announced when it joined."""
        found = self.roster.get(server_id)
        return found if found is not None else self.config.server(server_id)

    # --- joins (backends.cluster.roster) -------------------------------------------------

    def admit_dialler(self, peer: str, spec: object) -> None:
        """A server we do not know dialled us with the cluster secrets and announced itself:
        admit it (ConfigError refuses it, said to the dialler)."""
        if self.store is not None:
            raise ConfigError('needs cluster.membership = "embedded" to join a running '
                              "cluster; add the server to every cluster file and restart",
                              key="cluster.membership", value=self.config.cluster.membership,
                              file=self.config.source)
        self._admit(self.roster.parse(spec, peer=peer), by="handshake")
        self._gossip_roster()  # the others learn where it is, dial it, and hear from it

    def _admit(self, server: ServerConfig, *, by: str) -> None:
        if server.id == self.me.id or not self.roster.admit(server):
            return
        link = self.links[server.id] = self._link(server)
        if self._quorum_task is not None:
            link.start()
        assert isinstance(self.quorum, Quorum)
        self.quorum.admit(server.id)
        self._view = None
        log.info("server_admitted", server=server.id, http=str(server.http),
                 replication=str(server.replication), machine=server.machine, by=by)

    def _gossip_roster(self) -> None:
        """Tell every peer where the servers are that joined (not in every cluster file):
        each heartbeat while there are any, so that a peer that missed a join learns it."""
        joined = [announcement(s) for s in self.roster if s.id not in self.roster.from_file]
        if joined:
            self.broadcast({"op": "v_roster", "servers": joined})

    def _on_roster(self, peer: str, msg: dict[str, Any]) -> None:
        servers = msg.get("servers")
        if not isinstance(servers, list):
            log.warning("roster_malformed", peer=peer)
            return
        for spec in servers:
            sid = spec.get("id") if isinstance(spec, dict) else None
            if not isinstance(sid, str) or sid in self.roster or isinstance(
                    self.quorum, StoreView):
                continue
            try:
                self._admit(self.roster.parse(spec, peer=sid), by=peer)
            except ConfigError as exc:
                log.warning("roster_entry_refused", peer=peer, server=sid, reason=str(exc))

    def _forget_departed(self, event: ViewChanged) -> None:
        """A server that joined at run time, left (drained, said goodbye) and is out of the
        view is forgotten: no more dialling it (if it starts again, it joins again)."""
        for m in event.removed:
            link = self.links.get(m)
            if m in self.roster.from_file or link is None or link.state is not PeerState.LEFT:
                continue
            del self.links[m]
            self.roster.forget(m)
            self._forgetting.add(asyncio.ensure_future(link.close(goodbye=False)))
            self._forgetting = {t for t in self._forgetting if not t.done()}
            log.info("server_forgotten", server=m)

    def on_change(self, fn: Callable[[str, PeerState, str], Awaitable[None] | None]) -> None:
        self._listeners.append(fn)

    def on_view_change(self, fn: Callable[[ViewChanged], None]) -> None:
        """`fn` runs for every view this server adopts, before anything else is served."""
        self._view_listeners.append(fn)

    def start(self) -> None:
        self.channel.start()
        for link in self.links.values():
            link.start()
        self._stall_task = asyncio.create_task(self._watch_stalls(), name="stall-watch")
        self._quorum_task = asyncio.create_task(self._tick_quorum(), name="quorum")

    # --- the view consensus and the lease ----------------------------------------------

    async def _tick_quorum(self) -> None:
        heartbeat = self.config.cluster.heartbeat_interval_s
        tick = min(_QUORUM_TICK_S, heartbeat / 5)
        gossip_at = 0.0
        while True:
            now = time.monotonic()
            if self.store is not None:
                await self.store.beat(now)
            elif now >= gossip_at:
                gossip_at = now + heartbeat
                self._gossip_roster()
            self._deliver(self.quorum.tick(time.monotonic()))
            await asyncio.sleep(tick)

    def receive(self, peer: str, msg: dict[str, Any]) -> None:
        """A `v_*`/`l_*` frame from `peer` (authenticated by the listener)."""
        if msg.get("op") == "v_roster":
            self._on_roster(peer, msg)
            return
        if msg.get("op") in ("v_prepare", "v_accept"):
            # A change is proposed: re-dial the peers we lost now, so that a dead one's
            # refusal (the proof we may vote it out on) is here by the proposer's retry.
            for link in self.links.values():
                if not link.alive:
                    link.kick()
        self._deliver(self.quorum.receive(peer, msg, time.monotonic()))

    def heard(self, peer: str, incarnation: str) -> None:
        """Any sign of life of that process of `peer` (a handshake, a ping, a pong)."""
        self.quorum.heard(peer, incarnation, time.monotonic())

    def refused(self, peer: str) -> None:
        """`peer`'s replication port refused a connection: no process of it is running."""
        self._deliver(self.quorum.refused(peer, time.monotonic()))

    def said_goodbye(self, peer: str) -> None:
        """`peer`'s process left (drained, then said goodbye): as good as proven gone."""
        q = self.quorum
        if isinstance(q, StoreView):
            return  # it released its lease key: the store's members remove it at once
        q.sightings.superseded(peer, q.view.incarnation_of(peer) or "")
        self._deliver(q.proposer.propose(time.monotonic(), forced=False))

    def _deliver(self, out: list[Out]) -> None:
        for dest, msg in out:
            link = self.links.get(dest)
            if link is not None:
                link.send(msg)
        events = self.quorum.take_events()
        q = self.quorum
        if isinstance(q, Quorum):
            self._retry_when(q, q.proposer.retry_at)
        self.voter = q.voter
        if self.leaving or not self.voter:
            self.ack_until = float("-inf")
        else:
            self.ack_until = q.lease.lease_until
        for event in events:
            self._view = None
            self._forget_departed(event)
            for fn in self._view_listeners:
                fn(event)  # promotions and fencing happen here, before anything else runs
            self._view_changed.set()
            self._view_changed = asyncio.Event()

    def _retry_when(self, q: Quorum, at: float) -> None:
        """A ballot to retry within the quorum's tick: at its time, not at the next tick
        (a retry after a kill -9 is what the first good answer waits for)."""
        delay = at - time.monotonic()
        if not 0 < delay < _QUORUM_TICK_S or self._retry_timer is not None:
            return

        def retry() -> None:
            self._retry_timer = None
            self._deliver(q.proposer.propose(time.monotonic(), forced=False))

        self._retry_timer = asyncio.get_running_loop().call_later(delay, retry)

    def serving_state(self) -> str | None:
        """None if this server may acknowledge writes now; else the X-Tandem-State why not."""
        if time.monotonic() < self.ack_until:
            return None
        standing = self.quorum.standing
        if self.leaving:
            return "leaving"
        if standing is Standing.MEMBER:
            return "minority"
        return str(standing.value)

    async def ready(self, timeout: float | None = None) -> None:
        """Return once this server may acknowledge writes (the lease held); NotServing
        after `timeout` (default one heartbeat: a lease is renewed every heartbeat)."""
        if time.monotonic() < self.ack_until:
            return
        if timeout is None:
            timeout = self.config.cluster.heartbeat_interval_s
        deadline = time.monotonic() + timeout
        while (state := self.serving_state()) is not None:
            if time.monotonic() >= deadline:
                raise NotServing(f"not serving: {state}", peer=self.me.id, state=state)
            await asyncio.sleep(0.01)

    def in_view(self, peer: str) -> bool:
        """Is `peer` a member of the view (whatever process the view binds)?"""
        return self.quorum.view.incarnation_of(peer) is not None

    async def wait_view(self, still: Callable[[], bool], timeout: float,
                        redial: Iterable[str] = ()) -> bool:
        """Wait until `still()` is false — checked at every adopted view, and every 50 ms
        for what links learn (a peer reachable again); False on timeout.

        `redial`: peers to dial again at once — a dead process refuses the connection, and
        that refusal lets the majority remove it within milliseconds.
        """
        for peer in redial:
            link = self.links.get(peer)
            if link is not None:
                link.kick()
        deadline = time.monotonic() + timeout
        while still():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._view_changed.wait(), min(left, 0.05))
        return True

    def start_leaving(self) -> None:
        """We drained and say goodbye: from now on acknowledge nothing (the majority may
        remove us at once on our goodbye)."""
        self.leaving = True
        self.ack_until = float("-inf")

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
        self.start_leaving()  # before the goodbyes: the peers may remove us on hearing them
        for task in (self._stall_task, self._quorum_task):
            if task is not None:
                task.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
        await asyncio.gather(*(link.close() for link in self.links.values()))
        await self.channel.close()
        if self.store is not None:
            await self.store.close()

    def is_alive(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.alive

    def alive_peers(self) -> list[ServerConfig]:
        """Peers that may take new replicas: alive, not draining, not a witness (it holds
        no sessions), and the very process the view binds (a replica held by any other
        process would outlive its fencing)."""
        view = self.quorum.view
        return [link.peer for link in self.links.values() if link.state is PeerState.ALIVE
                and not link.peer.witness
                and view.incarnation_of(link.peer.id) in ("", link.peer_incarnation)]

    def serving_peer(self, peer: str) -> ServerConfig | None:
        """`peer` if it may be handed a request of its sessions (backends.serve.forward):
        alive, not draining, in the view as the very process our link hears; else None."""
        link = self.links.get(peer)
        if link is None or link.state is not PeerState.ALIVE or link.peer.witness:
            return None
        bound = self.quorum.view.incarnation_of(peer)
        return link.peer if bound in ("", link.peer_incarnation) else None

    def broadcast(self, msg: dict[str, Any]) -> None:
        for link in self.links.values():
            link.send(dict(msg))

    def states(self) -> dict[str, str]:
        return {pid: link.state.value for pid, link in self.links.items()}

    def view(self) -> tuple[str, str]:
        """(number, header value): the view's number and its members' http addresses.

        The proxy adopts a view only if its number is higher than the one it holds: a
        server in a minority, which knows only older views, cannot take it back. Witnesses
        vote in the view but are no backends: the listing leaves them out.
        """
        if self._view is None:
            view = self.quorum.view
            listing = ", ".join(f"{m}={s.http}" for m in view.members
                                if (s := self.roster.get(m)) is not None and not s.witness)
            number = str(view.number)
            self._view = (number, f"{number}; {listing}")
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
