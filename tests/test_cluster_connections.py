"""A closed replication connection is evidence of a failure only if it is the peer's current
one (docs/consistency.md, I8): a real server's membership and listener on loopback, and a
peer played by this test over the real wire format (it answers pings and dials in)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from backends.cluster import wire
from backends.cluster.link import PeerState
from backends.cluster.listener import ReplicationListener
from backends.cluster.membership import Membership
from tandem import config as cluster_config
from tests.cluster import free_ports

SECRET = "conn-test"


def _config(ports: list[int]) -> cluster_config.Config:
    lines = ["[cluster]", 'name = "conn"', f'secrets = ["{SECRET}"]',
             "heartbeat_interval_s = 5.0", "peer_connect_timeout_s = 1.0", "[session]",
             'replication = "sync"']
    for i, sid in enumerate(("s1", "s2")):
        lines += ["[[servers]]", f'id = "{sid}"', f'http = "127.0.0.1:{ports[2 * i]}"',
                  f'replication = "127.0.0.1:{ports[2 * i + 1]}"']
    return cluster_config.loads("\n".join(lines))


@contextlib.asynccontextmanager
async def _fake_s2(cfg: cluster_config.Config) -> AsyncIterator[None]:
    """s2's listener: authenticates s1's link and answers its pings."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await wire.accept_handshake(reader, writer, me="s2", cluster="conn",
                                        secrets_=[SECRET], known=cfg.server_ids)
            frames = wire.FrameReader(reader, peer="s1")
            while True:
                msg = await frames.read()
                if msg.get("op") == "ping":
                    wire.write_frame(writer, {"op": "pong"})
        writer.close()

    addr = cfg.server("s2").replication
    server = await asyncio.start_server(serve, addr.host, addr.port)
    try:
        yield
    finally:
        server.close()


async def _dial_s1(cfg: cluster_config.Config) -> asyncio.StreamWriter:
    addr = cfg.server("s1").replication
    reader, writer = await asyncio.open_connection(addr.host, addr.port)
    await wire.dial_handshake(reader, writer, me="s2", peer="s1", cluster="conn",
                              secrets_=[SECRET])
    return writer


async def _until(cond: object, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_only_the_loss_of_a_peers_current_connection_fails_it() -> None:
    cfg = _config(free_ports(4))
    membership = Membership(config=cfg, me="s1")
    listener = ReplicationListener(membership=membership, handler=lambda peer, msg: None)
    failures: list[str] = []
    membership.on_change(
        lambda peer, state, cause: failures.append(cause) if state is PeerState.FAILED else None)
    async with _fake_s2(cfg):
        await listener.start()
        membership.start()
        try:
            link = membership.links["s2"]
            await _until(lambda: link.state is PeerState.ALIVE)
            first = await _dial_s1(cfg)   # s2's link to s1, as before a partition
            second = await _dial_s1(cfg)  # s2 dialled again: this one is current now
            await asyncio.sleep(0.2)
            # the leftover connection goes (closed by s1 as superseded, or by s2): no failure
            first.transport.abort()
            await asyncio.sleep(0.3)
            assert failures == [] and link.state is PeerState.ALIVE
            # the current one breaks: that is evidence
            second.transport.abort()
            await _until(lambda: failures == ["replication connection closed"])
        finally:
            await membership.close()
            await listener.close()
