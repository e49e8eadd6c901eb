"""The four SessionStore implementations and the Persister, in-process, on real servers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from backends.persistence import SessionStore, StoredSession, StoreUnavailable, mask, open_store
from backends.persistence.persister import Persister
from backends.sessions.store import Primary
from tandem.config import loads
from tandem.token import new_sid
from tests.stores import (  # noqa: F401 - fixtures
    Postgres,
    RedisClusterServers,
    RedisServer,
    make_redis,
    postgres,
    redis_cluster,
    redis_server,
)

KINDS = ["file", "sqlite", "postgresql", "redis", "redis-cluster"]


def config_for(kind: str, tmp: Path, request: pytest.FixtureRequest, **extra: Any) -> Any:
    """A cluster config whose persistence is `kind`, on the shared test servers."""
    keys: dict[str, Any] = {"path": str(tmp / "store"), **extra}
    persistence = kind
    if kind == "sqlite":
        keys["path"] = str(tmp / "sessions.db")
    elif kind == "postgresql":
        pg: Postgres = request.getfixturevalue("postgres")
        keys["dsns"] = [pg.dsn()]
    elif kind == "redis":
        keys["url"] = request.getfixturevalue("redis_server").url
    elif kind == "redis-cluster":
        rc: RedisClusterServers = request.getfixturevalue("redis_cluster")
        keys["urls"] = rc.urls
        persistence = "redis"
    text = "\n".join([
        "[session]", f'persistence = "{persistence}"', "max_inactive_s = 60",
        "[persistence]", *(f"{k} = {json.dumps(v)}" for k, v in keys.items()),
        "[[servers]]", 'id = "s1"', 'http = "127.0.0.1:1"', 'replication = "127.0.0.1:2"'])
    return loads(text)


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    s = open_store(config_for(request.param, tmp_path, request))
    assert s is not None
    await s.open()
    yield s
    await s.close()


def row(sid: str, version: int = 1, *, counter: int = 1, last_access: float | None = None,
        max_inactive_s: float = 60.0, epoch: int = 0) -> StoredSession:
    state = {"sid": sid, "v": version, "e": epoch, "data": {"counter": json.dumps(counter)},
             "max_inactive_s": max_inactive_s, "created": 1000.0,
             "last_access": time.time() if last_access is None else last_access}
    return StoredSession.of(state)


# --- the SessionStore contract ----------------------------------------------------------------


async def test_save_then_load_gives_the_state_back(store: SessionStore) -> None:
    sid = new_sid()
    r = row(sid, 3, counter=7)
    await store.save([r])
    got = await store.load(sid, now=time.time())
    assert got is not None
    state = got.state(store=store.kind, where=store.where)
    assert state["sid"] == sid and state["v"] == 3
    assert state["data"] == {"counter": "7"} and state["created"] == 1000.0
    assert abs(state["last_access"] - r.last_access) < 1e-3
    assert await store.load(new_sid(), now=time.time()) is None


async def test_an_older_version_never_replaces_a_newer_one(store: SessionStore) -> None:
    sid = new_sid()
    await store.save([row(sid, 5, counter=5)])
    await store.save([row(sid, 4, counter=4)])  # a late write from a former primary
    got = await store.load(sid, now=time.time())
    assert got is not None and got.version == 5
    await store.save([row(sid, 6, counter=6)])
    got = await store.load(sid, now=time.time())
    assert got is not None and got.version == 6 and json.loads(got.body)["data"]["counter"] == "6"
    # a new primary (next epoch) wins over a higher version of the old one
    await store.save([row(sid, 6, counter=60, epoch=1)])
    await store.save([row(sid, 9, counter=9, epoch=0)])
    got = await store.load(sid, now=time.time())
    assert got is not None and got.age == (1, 6)
    assert got.state(store=store.kind, where=store.where)["e"] == 1


async def test_touch_moves_last_access_only_and_never_creates(store: SessionStore) -> None:
    sid, ghost = new_sid(), new_sid()
    now = time.time()
    await store.save([row(sid, 2, last_access=now - 30, max_inactive_s=40)])
    await store.touch({sid: (now, 40.0), ghost: (now, 40.0)})
    got = await store.load(sid, now=now + 20)  # expired at now+10 without the touch
    assert got is not None and got.version == 2 and abs(got.last_access - now) < 1e-3
    await store.touch({sid: (now - 20, 40.0)})  # never backwards
    got = await store.load(sid, now=now + 20)
    assert got is not None
    assert await store.load(ghost, now=now) is None


async def test_expired_sessions_are_not_loaded_and_are_swept(store: SessionStore) -> None:
    now = time.time()
    old, fresh = new_sid(), new_sid()
    await store.save([row(old, last_access=now - 10, max_inactive_s=0.5 + 10),
                      row(fresh, last_access=now, max_inactive_s=60)])
    assert await store.load(old, now=now) is not None
    await asyncio.sleep(0.7)
    assert await store.load(old, now=time.time()) is None
    await store.sweep(now=time.time())
    assert await store.load(old, now=now) is None  # gone, not only hidden
    assert await store.load(fresh, now=time.time()) is not None


async def test_delete_removes(store: SessionStore) -> None:
    a, b = new_sid(), new_sid()
    await store.save([row(a), row(b)])
    await store.delete([a, new_sid()])
    assert await store.load(a, now=time.time()) is None
    assert await store.load(b, now=time.time()) is not None


async def test_file_store_names_and_atomic_writes(tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    s = open_store(config_for("file", tmp_path, request))
    assert s is not None
    await s.open()
    sid = "../../etc/passwd"  # never trusted as a file name
    await s.save([row(sid)])
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].parent.parent == tmp_path / "store"
    assert files[0].name.endswith(".json") and "passwd" not in files[0].name
    assert not list((tmp_path / "store").rglob("*.tmp"))  # no temp file left behind
    assert (await s.load(sid, now=time.time())) is not None


# --- errors -----------------------------------------------------------------------------------


def test_mask_hides_passwords() -> None:
    assert mask("postgresql://app:s3cr%21t@db1:5432/x") == "postgresql://app:***@db1:5432/x"
    assert mask("redis://:hunter2@r:6379/0") == "redis://:***@r:6379/0"
    assert "pw" not in mask("postgresql://db/x?sslmode=require&password=pw")
    assert mask("host=db password='a b' user=u") == "host=db password=*** user=u"
    assert mask("postgresql://app@db/x") == "postgresql://app@db/x"


@pytest.mark.parametrize("kind", ["postgresql", "redis"])
async def test_unreachable_store_at_open_names_the_masked_dsn(kind: str) -> None:
    from tests.cluster import free_ports

    port = free_ports(1)[0]
    secret = "hunter2"
    keys = (f'dsns = ["postgresql://tandem:{secret}@127.0.0.1:{port}/tandem"]'
            if kind == "postgresql" else f'url = "redis://:{secret}@127.0.0.1:{port}/0"')
    cfg = loads(f'[session]\npersistence = "{kind}"\n[persistence]\n{keys}\ntimeout_s = 1.0\n'
                '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:1"\nreplication = "127.0.0.1:2"\n')
    store = open_store(cfg)
    assert store is not None
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    text = str(info.value)
    assert secret not in text and "***" in text and f"127.0.0.1:{port}" in text
    assert "refused" in text.lower() or "connect" in text.lower()


# --- the Persister: modes, touches, failures --------------------------------------------------


def persister(store: SessionStore, **kw: Any) -> Persister:
    opts: dict[str, Any] = {"mode": "sync", "flush_interval_s": 0.1, "flush_threshold": 100,
                            "timeout_s": 1.0, "sweep_interval_s": 30.0, "stats": {}}
    opts.update(kw)
    return Persister(store=store, **opts)


def record(counter: int = 1) -> Primary:
    r = Primary(new_sid(), max_inactive_s=60.0)
    r.apply({"counter": json.dumps(counter)}, set())
    return r


@pytest.mark.parametrize("kind", ["sqlite"])
async def test_sync_write_is_in_the_store_when_commit_returns(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    s = open_store(config_for(kind, tmp_path, request))
    assert s is not None
    p = persister(s)
    await p.open()
    p.start()
    try:
        records = [record(i) for i in range(20)]
        await asyncio.gather(*(p.committed(r, changed=True) for r in records))
        for r in records:  # no flush has run: every write was awaited (group commit)
            got = await s.load(r.sid, now=time.time())
            assert got is not None and got.version == 1
        assert p.stats["store_saved"] == 20
    finally:
        await p.close()


async def test_batched_writes_wait_for_the_flush_and_reads_only_touch(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    s = open_store(config_for("sqlite", tmp_path, request))
    assert s is not None
    p = persister(s, mode="batched", flush_interval_s=0.3)
    await p.open()
    p.start()
    try:
        r = record()
        await p.committed(r, changed=True)
        assert await s.load(r.sid, now=time.time()) is None  # queued, not written yet
        await asyncio.sleep(0.5)
        got = await s.load(r.sid, now=time.time())
        assert got is not None and got.version == 1
        saved = p.stats["store_saved"]
        # a read-only request: last access moves, nothing else is written
        r.last_access = time.time() + 5
        await p.committed(r, changed=False)
        await asyncio.sleep(0.5)
        got = await s.load(r.sid, now=time.time())
        assert got is not None and got.version == 1 and abs(got.last_access - r.last_access) < 1e-3
        assert p.stats["store_saved"] == saved and p.stats["store_touched"] == 1
        # flush threshold: a full queue is written at once
        p._threshold = 3
        rs = [record() for _ in range(3)]
        for x in rs:
            await p.committed(x, changed=True)
        await asyncio.sleep(0.05)
        assert all([await s.load(x.sid, now=time.time()) for x in rs])
        # invalidation removes it
        await p.invalidated(r.sid)
        await asyncio.sleep(0.5)
        assert await s.load(r.sid, now=time.time()) is None
    finally:
        await p.close()


async def test_store_dying_is_counted_and_retried(request: pytest.FixtureRequest) -> None:
    server: RedisServer = request.getfixturevalue("make_redis")()
    cfg = loads(f'[session]\npersistence = "redis"\n[persistence]\nurl = "{server.url}"\n'
                '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:1"\nreplication = "127.0.0.1:2"\n')
    s = open_store(cfg)
    assert s is not None
    p = persister(s, flush_interval_s=0.2, timeout_s=0.5)
    await p.open()
    p.start()
    try:
        server.kill()
        r = record(3)
        started = time.monotonic()
        with capture_logs() as logs:
            await p.committed(r, changed=True)  # does not raise
            await p.committed(r, changed=True)  # store known down: queued, no wait
        assert time.monotonic() - started < 1.5
        assert p.stats["store_errors"] >= 1
        errors = [e for e in logs if e["event"] == "store_error"]
        assert errors and errors[0]["store"] == "redis" and errors[0]["op"] == "save"
        server.start()  # back on the same port: the queued write lands on a later flush
        deadline = time.monotonic() + 5
        while await _load_quietly(s, r.sid) is None:
            assert time.monotonic() < deadline, "queued write never retried"
            await asyncio.sleep(0.1)
    finally:
        await p.close()


async def _load_quietly(s: SessionStore, sid: str) -> StoredSession | None:
    try:
        return await s.load(sid, now=time.time())
    except Exception:
        return None
