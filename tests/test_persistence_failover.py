"""Sessions that outlive both in-memory copies: real backends, real stores, kill -9."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from backends.persistence.sqlite import SqliteStore
from tests.cluster import Client, Cluster, free_ports
from tests.stores import (  # noqa: F401 - fixtures
    Postgres,
    RedisServer,
    make_postgres,
    make_redis,
    postgres,
    redis_server,
    with_persistence,
)

# s1's sessions always get s2 as secondary (its preferred group), so killing s1 and s2
# leaves s3 with no copy in memory: only the store has them. Five servers: the three left
# are a majority, which may remove the two dead ones (docs/consistency.md); of three, the
# one left would rightly refuse to serve (it cannot tell two deaths from its own isolation).
SERVERS = [{"id": "s1", "group": "a", "preferred_secondary_group": "b"},
           {"id": "s2", "group": "b"}, {"id": "s3", "group": "c"}, {"id": "s4", "group": "c"},
           {"id": "s5", "group": "c"}]


def kill_both(cluster: Cluster, primary: str, secondary: str) -> None:
    """kill -9 both copies at once: the secondary is frozen first, so it cannot promote its
    replicas and re-replicate them to the third server when it sees the primary die."""
    cluster.kill(secondary, signal.SIGSTOP)
    cluster.kill(primary)
    cluster.kill(secondary)


def store_keys(kind: str, tmp: Path, request: pytest.FixtureRequest) -> dict[str, Any]:
    if kind == "file":
        return {"path": str(tmp / "sessions")}
    if kind == "sqlite":
        return {"path": str(tmp / "sessions.db")}
    if kind == "postgresql":
        return {"dsns": [request.getfixturevalue("postgres").dsn()]}
    return {"url": request.getfixturevalue("redis_server").url}


def start(make_cluster: Any, kind: str, *, servers: list[dict[str, str]] | None = None,
          **persistence: Any) -> Cluster:
    cluster = make_cluster(servers=servers or SERVERS,
                           session={"persistence": kind, "max_inactive_s": 300})
    with_persistence(cluster, timeout_s=1.0, **persistence)
    return cluster.start(proxy=False)


@pytest.mark.parametrize("kind,mode", [("file", "sync"), ("sqlite", "sync"),
                                       ("postgresql", "sync"), ("redis", "sync"),
                                       ("sqlite", "batched")])
def test_sessions_survive_losing_primary_and_secondary(make_cluster, tmp_path, request,
                                                       kind, mode):
    cluster = start(make_cluster, kind, mode=mode, flush_interval_s=0.2,
                    **store_keys(kind, tmp_path, request))
    clients = [Client(cluster.url("s1")) for _ in range(20)]
    for c in clients:
        for i in (1, 2):
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == i
        assert c.route[1:] == ("s1", "s2")
    # read-only requests too: they touch, they do not write
    for c in clients[:5]:
        assert c.get("/peek")[1]["counter"] == 2
    if mode == "batched":
        time.sleep(0.6)  # the loss window: writes reach the store with the next flush

    kill_both(cluster, "s1", "s2")
    for c in clients:
        status, body = c.get("/count", base=cluster.url("s3"))
        assert status == 200, body
        assert body["counter"] == 3 and body["server"] == "s3"
        assert c.route[1] == "s3"
    stats = cluster.health("s3")["stats"]
    assert stats["store_loaded"] == 20 and stats["lost"] == 0 and stats["store_errors"] == 0
    assert any(e["event"] == "session_loaded" for e in cluster.events("s3"))
    assert cluster.health("s3")["primaries"] == 20

    # the new primary protected the loaded sessions again on the live members at once
    replicas = sum(cluster.health(s)["replicas"] for s in ("s4", "s5"))
    assert replicas == 20, replicas
    status, body = clients[0].get("/count", base=cluster.url("s3"))
    assert body["counter"] == 4 and clients[0].route[1:][0] == "s3"
    assert clients[0].route[2] in ("s4", "s5")


def test_invalidated_session_is_gone_from_the_store(make_cluster, tmp_path, request):
    db = tmp_path / "sessions.db"
    cluster = start(make_cluster, "sqlite", path=str(db))
    c = Client(cluster.url("s1"))
    c.get("/count")
    c.get("/count")
    sid = c.route[0]

    async def stored() -> Any:
        store = SqliteStore(path=str(db))
        await store.open()
        try:
            return await store.load(sid, now=time.time())
        finally:
            await store.close()

    assert asyncio.run(stored()).version == 2
    assert c.get("/invalidate")[0] == 200
    assert asyncio.run(stored()) is None  # sync mode: deleted before the response left
    kill_both(cluster, "s1", "s2")
    status, body = c.get("/count", base=cluster.url("s3"))
    assert body["counter"] == 1  # a new session: the invalidated one stays dead


def test_expired_sessions_leave_the_store(make_cluster, tmp_path):
    db = tmp_path / "sessions.db"
    cluster = make_cluster(servers=SERVERS, session={"persistence": "sqlite",
                                                     "max_inactive_s": 1.5})
    with_persistence(cluster, path=str(db), flush_interval_s=0.2, timeout_s=1.0)
    cluster.start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(5)]
    for c in clients:
        c.get("/count")

    async def rows() -> int:
        store = SqliteStore(path=str(db))
        await store.open()
        try:  # now=0: expired rows count too, only rows physically there
            return sum([await store.load(c.route[0], now=0) is not None for c in clients])
        finally:
            await store.close()

    assert asyncio.run(rows()) == 5
    deadline = time.monotonic() + 10
    while asyncio.run(rows()):
        assert time.monotonic() < deadline, "expired sessions stayed in the store"
        time.sleep(0.3)
    assert cluster.health("s1")["stats"]["expired"] == 5


def test_postgresql_fails_over_to_the_second_dsn(make_cluster, request):
    make = request.getfixturevalue("make_postgres")
    db1, db2 = make(), make()
    cluster = start(make_cluster, "postgresql", dsns=[db1.dsn(), db2.dsn()])
    clients = [Client(cluster.url("s1")) for _ in range(10)]
    for c in clients:
        c.get("/count")
        c.get("/count")
    assert _versions(db1, clients) == [2] * 10

    db1.stop()
    for c in clients:
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 3
    assert _versions(db2, clients) == [3] * 10  # every write went to the second database
    events = [e["event"] for e in cluster.events("s1")]
    assert "store_failover" in events and "store_dsn_failed" in events
    assert cluster.health("s1")["stats"]["store_errors"] == 0  # nothing was lost

    kill_both(cluster, "s1", "s2")
    for c in clients:
        status, body = c.get("/count", base=cluster.url("s3"))
        assert status == 200 and body["counter"] == 4 and body["server"] == "s3"

    # the first database is back: a background probe finds it, writes return to it
    db1.start()
    deadline = time.monotonic() + 15
    while not any(e["event"] == "store_dsn_back" for e in cluster.events("s3")):
        assert time.monotonic() < deadline, "the first DSN was never probed back"
        time.sleep(0.2)
    assert clients[0].get("/count", base=cluster.url("s3"))[1]["counter"] == 5
    assert _versions(db1, clients[:1]) == [5]


def _versions(db: Postgres, clients: list[Client]) -> list[int | None]:
    async def q() -> list[int | None]:
        conn = await asyncpg.connect(db.dsn())
        try:
            rows = {r["sid"]: r["version"] for r in await conn.fetch(
                "SELECT sid, version FROM tandem_sessions")}
        finally:
            await conn.close()
        return [rows.get(c.route[0]) for c in clients]
    return asyncio.run(q())


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
def test_unreachable_store_at_startup_fails_naming_the_masked_dsn(make_cluster, kind):
    port = free_ports(1)[0]
    secret = "hunter2"
    keys = ({"dsns": [f"postgresql://tandem:{secret}@127.0.0.1:{port}/tandem"]}
            if kind == "postgresql" else {"url": f"redis://:{secret}@127.0.0.1:{port}/0"})
    cluster = make_cluster(n=1, session={"persistence": kind})
    with_persistence(cluster, timeout_s=1.0, **keys)
    cluster.start_server("s1", wait=False)
    proc = cluster.servers["s1"]["proc"]
    assert proc.wait(timeout=20) == 1
    text = cluster.log("s1")
    assert secret not in text
    masked = (f"postgresql://tandem:***@127.0.0.1:{port}/tandem" if kind == "postgresql"
              else f"redis://:***@127.0.0.1:{port}/0")
    assert f"cannot open its session store: {kind} store at {masked}" in text
    assert "refused" in text.lower()
    assert any(e["event"] == "store_unavailable" for e in cluster.events("s1"))


def test_store_dying_at_run_time_is_counted_and_requests_still_succeed(make_cluster,
                                                                       request):
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = start(make_cluster, "redis", url=redis.url, flush_interval_s=0.2)
    clients = [Client(cluster.url("s1")) for _ in range(5)]
    for c in clients:
        c.get("/count")
    redis.kill()
    for i in (2, 3):
        for c in clients:
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == i
    stats = cluster.health("s1")["stats"]
    assert stats["store_errors"] >= 1
    errors = [e for e in cluster.events("s1") if e["event"] == "store_error"]
    assert errors and errors[0]["store"] == "redis"
    # replication alone still protects the sessions
    cluster.kill("s1")
    for c in clients:
        status, body = c.get("/count", base=cluster.url("s2"))
        assert status == 200 and body["counter"] == 4
