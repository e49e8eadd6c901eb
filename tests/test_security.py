"""Security checks: nothing secret in the logs, unauthenticated peers refused."""

from __future__ import annotations

import asyncio
import re
import struct

from tandem.token import Route, TokenCodec
from tests.cluster import Client

SECRET = "quokka-secret-5521"


def test_logs_hold_no_secret_no_token_no_whole_session_id(make_cluster):
    cluster = make_cluster(secrets=[SECRET, "older-secret-77"]).start()
    clients = [Client(cluster.proxy_url) for _ in range(6)]
    for c in clients:
        c.get("/count")
        c.get("/count")
    tokens = [c.token for c in clients]
    sids = [c.route[0] for c in clients]
    # bad tokens of every kind, failover, invalidation, regeneration: all logged paths
    forged = Client(cluster.proxy_url)
    forged.token = TokenCodec(["nope"]).encode(Route(sids[0], "s1", "s2"))
    forged.get("/count")
    tampered = Client(cluster.proxy_url)
    tampered.token = tokens[1].replace("!s", "!x", 1)
    tampered.get("/count")
    clients[2].get("/regenerate")
    clients[3].get("/invalidate")
    cluster.kill("s1")
    for c in clients[4:]:
        c.get("/count")
    tokens += [c.token for c in clients if c.token]
    sids += [c.route[0] for c in clients if c.token]
    cluster.wait_event("s2", "promoted", timeout=2)
    text = "".join((cluster.tmp / f"{n}.log").read_text() for n in ("s1", "s2", "s3", "proxy"))
    assert "bad_token" in text and ("promoted" in text or "fetched" in text)
    assert SECRET not in text and "older-secret-77" not in text
    for token in tokens:
        assert token not in text
    for sid in sids:
        assert sid not in text  # only 8-character prefixes are logged
    assert re.search(r'"sid": "[A-Za-z0-9_-]{8}"', text)


def test_unauthenticated_replication_clients_are_refused(make_cluster):
    cluster = make_cluster(n=2).start(proxy=False)
    port = int(cluster.config_path.read_text().split('replication = "127.0.0.1:')[1][:5])

    async def probe(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await reader.readexactly(4)  # the challenge frame's length
            writer.write(payload)
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 3)  # until the server closes
        finally:
            writer.close()

    replicate = b'{"op":"replicate","sid":"x","v":9,"data":{}}'
    rest = asyncio.run(probe(struct.pack(">I", len(replicate)) + replicate))
    assert b"welcome" not in rest
    rest = asyncio.run(probe(b"GET / HTTP/1.1\r\n\r\n"))  # not even our framing
    assert b"welcome" not in rest
    assert cluster.health("s1")["replicas"] == 0
    assert len(cluster.wait_event("s1", "peer_refused")) >= 1
    c = Client(cluster.url("s1"))
    assert c.get("/count")[0] == 200  # and it still works
