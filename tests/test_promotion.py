"""Promotion in slices (backends/sessions/promotion.py), on three real session managers in
one event loop, replicating over loopback sockets: when the view ending a primary is
adopted, its replicas are not all promoted in that callback; what a request or a peer's
message touches is promoted on the spot, with the epoch the view gives; the rest follow in
slices, and all are re-protected on the third server in batches.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from backends.cluster.view import ViewChanged
from backends.sessions.session import Session
from tandem.token import Route
from tests.cluster import free_ports
from tests.test_replication_properties import IDS, Node, make_config

N = 3000


async def _formed(nodes: dict[str, Node], alive: list[str]) -> None:
    deadline = time.monotonic() + 20
    while True:
        ms = [nodes[s].membership for s in alive]
        if (all(m.is_alive(p) for m, s in zip(ms, alive, strict=True) for p in alive if p != s)
                and all(m.quorum.view.members == tuple(alive) for m in ms)
                and all(m.serving_state() is None for m in ms)):
            return
        assert time.monotonic() < deadline, "the cluster did not form"
        await asyncio.sleep(0.02)


async def _new_session(node: Node, i: int) -> Route:
    manager = node.manager
    session = Session(None, create=manager.new_session)
    session["n"] = i
    result = await manager.commit(session)
    assert result.route is not None
    return result.route


async def test_an_ended_primary_s_replicas_are_promoted_in_slices_and_on_demand() -> None:
    cfg = make_config(free_ports(6))
    nodes = {sid: Node(cfg, sid) for sid in IDS}
    try:
        for node in nodes.values():
            await node.start()
        await _formed(nodes, list(IDS))
        routes: list[Route] = []
        for start in range(0, N, 200):
            routes += await asyncio.gather(*(_new_session(nodes["s1"], i)
                                             for i in range(start, min(N, start + 200))))
        s2 = nodes["s2"].manager
        mine = {r.sid: i for i, r in enumerate(routes) if r.secondary == "s2"}
        assert len(mine) > N // 4, "s1's sessions should be spread over s2 and s3"
        epochs = {sid: s2.store.replicas[sid].epoch for sid in mine}
        first, second = list(mine)[:2]
        seen: dict[str, Any] = {}

        def adopted(event: ViewChanged) -> None:
            # (runs right after the session manager's own callback, in the same iteration)
            if "s1" not in event.removed or seen:
                return
            store, promotion = s2.store, s2.ctx.promotion
            seen["waiting"] = sum(sid in store.replicas for sid in mine)
            seen["active"] = promotion.active
            record = promotion.claim(first)  # a request for it, before its slice
            seen["claimed"] = record is not None and record.sid == first
            seen["epoch"] = None if record is None else record.epoch
            seen["want"] = s2.ctx.next_epoch(epochs[first], view=event.new.number)
            s2.handle("s3", {"op": "touch", "items": {second: time.time()}})  # a message
            seen["by_message"] = second in store.primaries
            seen["view"] = event.new.number

        nodes["s2"].membership.on_view_change(adopted)
        await nodes["s1"].crash()
        await _formed(nodes, ["s2", "s3"])
        deadline = time.monotonic() + 20
        while s2.ctx.promotion.active or any(
                r.secondary != "s3" or r.acked_version != r.version
                for r in s2.store.primaries.values()):
            assert time.monotonic() < deadline, "not all promoted and re-protected"
            await asyncio.sleep(0.02)

        # Nothing was promoted in the view's own callback but the two touched sessions.
        assert seen["waiting"] == len(mine) and seen["active"], seen
        assert seen["claimed"] and seen["epoch"] == seen["want"], seen
        assert seen["by_message"], seen
        # Then every one was, with the epoch that view gives, and s3 holds a copy of each.
        s3 = nodes["s3"].manager
        for sid, i in mine.items():
            record = s2.store.primaries[sid]
            assert record.epoch == s2.ctx.next_epoch(epochs[sid], view=seen["view"])
            assert record.data["n"] == str(i)
            replica = s3.store.replicas[sid]
            assert (replica.primary, replica.version, replica.epoch) == (
                "s2", record.version, record.epoch)
        assert s2.stats["promoted"] == len(mine)
        assert s2.ctx.promotion.claimed == 2
        assert s2.ctx.promotion.last_round["sessions"] >= len(mine)
        # A request with the old token is served by the promoted primary.
        route = next(r for r in routes if r.sid == first)
        record = await s2.open(route)
        assert record is not None and record.sid == first and record.data["n"] == str(mine[first])
    finally:
        for sid in ("s2", "s3"):
            await nodes[sid].crash()
        for _ in range(2):  # (as tests/test_replication_properties.py tears down)
            await asyncio.sleep(0.05)
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for node in nodes.values():
            if node.listener._server is not None:
                await node.listener._server.wait_closed()
