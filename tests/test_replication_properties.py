"""Property-based, stateful tests of the store and replication.

Three real session managers replicate to each other over loopback sockets, in one event
loop. Hypothesis drives random sequences of writes, crashes (sockets closed abruptly, memory
lost), restarts, reads at third servers (fetches), hand-overs (drains) and invalidations,
and checks after each step that every acknowledged write is still there. One server is down
at a time, and a crash waits for re-protection before the next step, as the cluster promises
to survive one failure at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backends.cluster.listener import ReplicationListener
from backends.cluster.membership import Membership
from backends.sessions.manager import SessionManager, SessionMoved
from backends.sessions.session import Session
from tandem import config as cluster_config
from tandem.token import Route
from tests.cluster import free_ports

IDS = ("s1", "s2", "s3")


def make_config(ports: list[int], replication: str = "sync") -> cluster_config.Config:
    lines = ['[cluster]', 'secrets = ["prop"]', "heartbeat_interval_s = 0.2",
             "replication_timeout_s = 1.0", "peer_connect_timeout_s = 0.5",
             "drain_timeout_s = 3.0", "[session]", f'replication = "{replication}"']
    for i, sid in enumerate(IDS):
        lines += ["[[servers]]", f'id = "{sid}"', f'http = "127.0.0.1:{ports[2 * i]}"',
                  f'replication = "127.0.0.1:{ports[2 * i + 1]}"']
    return cluster_config.loads("\n".join(lines))


class Node:
    """One server without its HTTP front: membership, listener, manager."""

    def __init__(self, cfg: cluster_config.Config, sid: str) -> None:
        self.sid = sid
        self.membership = Membership(config=cfg, me=sid)
        self.manager = SessionManager(config=cfg, me=sid, membership=self.membership)
        self.listener = ReplicationListener(membership=self.membership,
                                            handler=self.manager.handle)

    async def start(self) -> None:
        await self.listener.start()
        self.membership.start()
        self.manager.start()

    async def crash(self) -> None:
        """Die without a word: sockets closed, tasks gone, memory lost."""
        self.listener._closing = True
        if self.listener._server is not None:
            self.listener._server.close()
        for writer in list(self.listener._conns):
            writer.transport.abort()
        for link in self.membership.links.values():
            link._closing = True
            if link._writer is not None:
                link._writer.transport.abort()
            if link._task is not None:
                link._task.cancel()
        for task in self.manager._tasks:
            task.cancel()
        self.manager.ctx.promotion.clear()
        for task in (self.membership._quorum_task, self.membership._stall_task):
            if task is not None:
                task.cancel()
        await asyncio.sleep(0)

    async def stop(self) -> None:
        await self.manager.drain(timeout=3.0)
        await self.manager.close()
        await self.membership.close()
        await self.listener.close()


class ReplicationMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.cfg = make_config(free_ports(6))
        self.nodes: dict[str, Node] = {}
        self.down: str | None = None
        self.acked: dict[int, int] = {}          # client -> last acknowledged counter
        self.routes: dict[int, Route | None] = {}
        self.run(self._start_all())

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, 30))

    async def _start_all(self) -> None:
        for sid in IDS:
            self.nodes[sid] = Node(self.cfg, sid)
            await self.nodes[sid].start()
        await self._formed()

    async def _formed(self) -> None:
        """The live servers reach each other, agree on a view of exactly them, and each
        holds its lease (a crashed or drained server was removed, a restarted one joined)."""
        alive = [s for s in IDS if s != self.down]

        def formed() -> bool:
            ms = [self.nodes[s].membership for s in alive]
            return (all(m.is_alive(p) for m, s in zip(ms, alive, strict=True) for p in alive
                        if p != s)
                    and all(m.quorum.view.members == tuple(alive) for m in ms)
                    and all(m.serving_state() is None for m in ms))

        deadline = asyncio.get_running_loop().time() + 20
        while not formed():
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError("not formed: " + "; ".join(
                    f"{s}: view {m.quorum.view.number} {m.quorum.view.members} "
                    f"{m.quorum.standing.value} {m.serving_state()} links {m.states()} "
                    f"accepted {m.quorum.accepted}"
                    for s in alive for m in [self.nodes[s].membership]))
            await asyncio.sleep(0.02)

    async def _protected(self) -> None:
        """Every primary has a live, up-to-date secondary (re-protection is done)."""
        alive = [s for s in IDS if s != self.down]
        while True:
            ok = all(r.secondary in alive and r.acked_version == r.version
                     for s in alive for r in self.nodes[s].manager.store.primaries.values())
            if ok:
                return
            await asyncio.sleep(0.02)

    # --- one request, routed like the proxy does -------------------------------------

    async def _request(self, client: int, *, write: bool, at: str | None = None,
                       invalidate: bool = False) -> int | None:
        route = self.routes.get(client)
        alive = [s for s in IDS if s != self.down]
        if at is None:
            at = next((s for s in (route.primary, route.secondary) if s in alive), alive[0]) \
                if route else alive[client % len(alive)]
        manager = self.nodes[at].manager
        for _ in range(3):
            record = await manager.open(route)
            session = Session(record, create=manager.new_session)
            if invalidate:
                session.invalidate()
            elif write:
                session["n"] = session.get("n", 0) + 1
            value = None if invalidate else session.get("n", 0)
            try:
                result = await manager.commit(session)
            except SessionMoved:
                continue  # the proxy would fail this over: retry
            self.routes[client] = result.route
            return value
        raise AssertionError("request kept failing over")

    # --- rules -----------------------------------------------------------------------

    @rule(client=st.integers(0, 5))
    def write(self, client: int) -> None:
        value = self.run(self._request(client, write=True))
        assert value == self.acked.get(client, 0) + 1, (client, value, self.acked)
        self.acked[client] = value

    @rule(client=st.integers(0, 5), server=st.sampled_from(IDS))
    def read_anywhere(self, client: int, server: str) -> None:
        if server == self.down or client not in self.acked:
            return
        value = self.run(self._request(client, write=False, at=server))
        assert value == self.acked[client], (client, server, value, self.acked)

    @rule(client=st.integers(0, 5))
    def invalidate(self, client: int) -> None:
        if client in self.acked:
            self.run(self._request(client, write=False, invalidate=True))
            del self.acked[client]
            self.routes[client] = None

    @precondition(lambda self: self.down is None)
    @rule(server=st.sampled_from(IDS))
    def crash(self, server: str) -> None:
        self.run(self.nodes[server].crash())
        self.down = server
        self.run(self._formed())
        self.run(self._protected())

    @precondition(lambda self: self.down is None)
    @rule(server=st.sampled_from(IDS))
    def drain_and_restart(self, server: str) -> None:
        self.run(self.nodes[server].stop())
        self.down = server
        self.run(self._formed())
        self.run(self._protected())
        self.restart()

    @precondition(lambda self: self.down is not None)
    @rule()
    def restart(self) -> None:
        assert self.down is not None
        node = Node(self.cfg, self.down)
        self.nodes[self.down] = node
        self.run(node.start())
        self.down = None
        self.run(self._formed())
        self.run(self._protected())

    @invariant()
    def every_acknowledged_write_is_held(self) -> None:
        """The acknowledged value survives on a live server, and no live copy is ahead.

        After a primary crashes its sessions live on as replicas until their next request
        promotes them (as in WebLogic): one copy is enough then; otherwise there are two.
        """
        alive = [s for s in IDS if s != self.down]
        for client, value in self.acked.items():
            route = self.routes[client]
            assert route is not None
            copies, primaries = [], 0
            for s in alive:
                store = self.nodes[s].manager.store
                rec = store.primaries.get(route.sid)
                primaries += rec is not None
                rec = rec or store.replicas.get(route.sid)
                if rec is not None:
                    copies.append(int(rec.data.get("n", "0")))
            assert value in copies, (client, value, copies)
            assert max(copies) == value, (client, value, copies)
            if primaries:
                assert primaries == 1 and len(copies) >= 2, (client, value, copies)

    def teardown(self) -> None:
        async def close() -> None:
            for sid, node in self.nodes.items():
                if sid == self.down:
                    continue
                with contextlib.suppress(Exception):
                    await node.crash()
            # Twice: connections a peer re-dialled at the last moment are accepted (and
            # their tasks made) after the first sweep.
            for _ in range(2):
                await asyncio.sleep(0.05)
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            for node in self.nodes.values():
                if node.listener._server is not None:
                    await node.listener._server.wait_closed()

        self.loop.run_until_complete(close())
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


# TANDEM_PROPERTY_EXAMPLES=500 for a deeper search than the default run's.
ReplicationMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("TANDEM_PROPERTY_EXAMPLES", "20")),
    stateful_step_count=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestReplication = ReplicationMachine.TestCase
