"""The memory budget (session.max_memory_mb, max_session_bytes) and offload mode: real
backend processes, real Redis, kill -9."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from backends.errors import SessionTooLarge
from backends.sessions.session import Session
from backends.sessions.store import Primary
from tandem.config import SessionSection
from tests.budget_app import digest, value_of
from tests.cluster import Client
from tests.stores import (  # noqa: F401 - fixtures
    RedisClusterServers,
    RedisServer,
    make_redis,
    redis_cluster,
    redis_server,
    with_persistence,
)

APP = "tests.budget_app:app"
KB = 1024


def raw_get(url: str) -> tuple[int, Any, bytes]:
    """Status, headers (case-insensitive) and body."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def fill(client: Client, key: str, n: int, seed: str, base: str | None = None) -> Any:
    return client.get(f"/fill?key={key}&bytes={n}&seed={seed}", base=base)


def evicting_cluster(make_cluster: Any, redis_url: str, **session: Any) -> Any:
    """Three servers of a 1 MB budget each, evicting to Redis (no proxy), started."""
    cluster = make_cluster(n=3, app=APP, session={"max_memory_mb": 1, "persistence": "redis",
                                                  **session})
    with_persistence(cluster, url=redis_url, timeout_s=2.0)
    return cluster.start(proxy=False)


def filled_on_s1(cluster: Any, n: int) -> list[Client]:
    """`n` sessions of 64 KiB made on s1 (past its budget: the oldest are evicted)."""
    clients = []
    for i in range(n):
        c = Client(cluster.url("s1"))
        status, body = fill(c, "v", 64 * KB, str(i))
        assert status == 200 and "error" not in body, body
        clients.append(c)
    return clients


# --- the keys -----------------------------------------------------------------------------


@pytest.mark.parametrize("text,key,value", [
    ("[session]\nmax_memory_mb = -1", "session.max_memory_mb", -1),
    ('[session]\nmax_memory_mb = "lots"', "session.max_memory_mb", "lots"),
    ("[session]\nmax_session_bytes = -5", "session.max_session_bytes", -5),
    ("[session]\nmax_memory_mb = 1\nmax_session_bytes = 2000000",
     "session.max_session_bytes", 2000000),
    ('[session]\npersistence = "sqlite"\n[persistence]\nmode = "offload"',
     "persistence.mode", "offload"),
    ('[persistence]\nmode = "elsewhere"', "persistence.mode", "elsewhere"),
])
def test_bad_memory_keys_name_key_value_and_file(text, key, value):
    from tandem.config import loads
    from tandem.errors import ConfigError

    servers = '\n[[servers]]\nid = "s1"\nhttp = "127.0.0.1:9001"\nreplication = "127.0.0.1:9101"'
    with pytest.raises(ConfigError) as info:
        loads(text + servers, source="cluster.toml")
    err = info.value
    assert (err.key, err.value, err.file) == (key, value, "cluster.toml"), str(err)
    assert str(err).startswith(f"{key}: ") and "cluster.toml" in str(err)


def test_memory_keys_load():
    from tandem.config import loads

    config = loads('[session]\nmax_memory_mb = 256\nmax_session_bytes = 1048576\n'
                   'persistence = "redis"\n[persistence]\nmode = "offload"\n'
                   '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:9001"\n'
                   'replication = "127.0.0.1:9101"')
    assert config.session.max_memory_mb == 256 and config.session.max_session_bytes == 1 << 20
    assert config.persistence.mode == "offload"
    assert loads('[[servers]]\nid = "s1"\nhttp = "127.0.0.1:9001"\n'
                 'replication = "127.0.0.1:9101"').session.max_memory_mb == 0  # unbounded


# --- session.max_session_bytes ------------------------------------------------------------


class _Settings:
    cluster_settings = SessionSection(max_session_bytes=100)

    def route_of(self, record: Primary) -> Any:
        raise NotImplementedError

    def encode_url(self, url: str, route: Any) -> str:
        return url


def test_an_assignment_past_max_session_bytes_raises_naming_key_and_sizes():
    record = Primary("sid", max_inactive_s=60)
    record.data = {"a": '"' + "x" * 40 + '"'}  # 1 + 42 bytes held
    session = Session(record, create=lambda: record, context=_Settings())
    session["b"] = "y" * 40  # 43 + 43 = 86: fits
    with pytest.raises(SessionTooLarge) as info:
        session["c"] = "z" * 20  # + 1 + 22 = 109
    assert info.value.key == "c" and info.value.size == 109 and info.value.limit == 100
    assert "session['c']" in str(info.value) and "max_session_bytes = 100" in str(info.value)
    assert "c" not in session  # nothing of it was kept
    with pytest.raises(SessionTooLarge):
        session.update({"d": 1, "e": "w" * 30})  # all or nothing
    assert "d" not in session
    del session["a"]  # room again
    session["c"] = "z" * 20
    changes = session.collect_changes()
    assert set(changes.set) == {"b", "c"} and changes.deleted == {"a"}
    # a value mutated in place past the bound keeps its last value, with the reason
    session.reset()
    record.apply(changes.set, changes.deleted)
    session["l"] = []
    session["l"].extend(range(40))
    changes = session.collect_changes()
    assert changes.set == {"l": "[]"} and "max_session_bytes" in changes.errors[0]


def test_max_session_bytes_live(make_cluster):
    cluster = make_cluster(n=1, app=APP, session={"max_session_bytes": 10 * KB}).start(
        proxy=False)
    c = Client(cluster.url("s1"))
    status, body = fill(c, "a", 6 * KB, "1")
    assert status == 200 and "error" not in body
    status, body = fill(c, "b", 6 * KB, "2")
    assert status == 200 and body["key"] == "b" and body["limit"] == 10 * KB
    assert body["size"] > 10 * KB and "max_session_bytes" in body["error"]
    status, body = c.get("/read?key=a")
    assert body["len"] == 6 * KB and c.get("/read?key=b")[1]["len"] is None


# --- a budget without a store -------------------------------------------------------------


def test_past_the_budget_without_a_store_new_sessions_get_503(make_cluster):
    cluster = make_cluster(n=1, app=APP, session={"max_memory_mb": 1}).start(proxy=False)
    url = cluster.url("s1")
    clients, refused = [], None
    for i in range(40):  # 40 x 64 KiB: far past 1 MiB
        c = Client(url)
        status, body = fill(c, "v", 64 * KB, str(i))
        if status == 503:
            refused = i
            break
        assert status == 200, body
        clients.append(c)
    assert refused is not None and 12 <= refused <= 17, refused
    status, headers, body = raw_get(f"{url}/fill?key=v&bytes=10&seed=x")
    assert status == 503 and headers["X-Tandem-State"] == "memory-budget"
    assert b"memory budget" in body and headers["Set-Cookie"] is None
    health = cluster.health("s1")
    memory = health["memory"]
    assert memory["used"] <= memory["limit"] + 80 * KB, memory
    assert health["stats"]["refused_memory"] == 2 and health["primaries"] == len(clients)
    # the sessions held are served as before, and the server lives
    for i, c in enumerate(clients):
        status, body = c.get("/read?key=v")
        assert status == 200 and body["sha256"] == digest(value_of(str(i), 64 * KB))
    assert cluster.servers["s1"]["proc"].poll() is None
    events = cluster.events("s1")
    assert any(e["event"] == "session_refused" for e in events)


# --- a budget with Redis: evicted, read back ----------------------------------------------


def test_past_the_budget_sessions_go_to_redis_and_come_back_intact(make_cluster, request):
    redis: RedisServer = request.getfixturevalue("redis_server")
    cluster = evicting_cluster(make_cluster, redis.url)
    url = cluster.url("s1")
    clients = filled_on_s1(cluster, 40)  # 40 x 64 KiB on s1, their replicas on s2 and s3
    time.sleep(0.5)
    for sid in ("s1", "s2", "s3"):
        memory = cluster.health(sid)["memory"]
        assert memory["used"] <= memory["limit"] + 64 * KB, (sid, memory)
    health = cluster.health("s1")
    assert health["stats"]["evicted"] > 0 and health["memory"]["stubs"] > 0
    for i, c in enumerate(clients):  # every one readable, loaded back when evicted
        status, body = c.get("/read?key=v")
        assert status == 200 and body["server"] == "s1", body
        assert body["sha256"] == digest(value_of(str(i), 64 * KB)), i
    health = cluster.health("s1")
    assert health["stats"]["stub_loaded"] > 0 and health["stats"]["lost"] == 0
    status, headers, text = raw_get(f"{url}/__tandem/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    metrics = text.decode()
    assert 'tandem_backend_session_evictions_total{server="s1"}' in metrics
    assert 'tandem_backend_session_loads_total{server="s1"}' in metrics
    assert 'tandem_backend_session_bytes{kind="primary",server="s1"}' in metrics
    assert 'tandem_backend_session_budget_bytes{server="s1"} 1.048576e+06' in metrics
    # an evicted session keeps counting where it left off, and survives its primary's kill
    status, body = clients[0].get("/count")
    assert body["counter"] == 1
    secondary = clients[0].route[2]
    cluster.kill("s1")
    cluster.wait_formed(["s2", "s3"])
    for i, c in enumerate(clients):
        status, body = c.get("/read?key=v", base=cluster.url(c.route[2]))
        assert status == 200 and body["sha256"] == digest(value_of(str(i), 64 * KB)), body
    status, body = clients[0].get("/count", base=cluster.url(secondary))
    assert body["counter"] == 2


# --- offload ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "redis-cluster"])
def test_offload_kill_9_of_the_primary_loses_no_acknowledged_write(make_cluster, request, kind):
    cluster = make_cluster(n=3, app=APP, session={"persistence": "redis"})
    if kind == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        with_persistence(cluster, url=redis.url, mode="offload", timeout_s=2.0)
    else:  # every operation is a one-key script: the same code on a Redis Cluster
        nodes: RedisClusterServers = request.getfixturevalue("redis_cluster")
        with_persistence(cluster, urls=nodes.urls, mode="offload", timeout_s=2.0)
    cluster.start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(20)]
    for i, c in enumerate(clients):
        assert fill(c, "v", 32 * KB, str(i))[0] == 200
        for n in range(1, 4):
            assert c.get("/count")[1]["counter"] == n
    # the secondaries hold stubs only: the state is in Redis
    held = {s: cluster.health(s) for s in ("s2", "s3")}
    assert sum(h["replicas"] for h in held.values()) == 0
    assert sum(h["memory"]["stubs"] for h in held.values()) == 20
    assert all(h["memory"]["used"] <= 20 * 300 for h in held.values()), held
    routes = [c.route for c in clients]
    cluster.kill("s1", signal.SIGKILL)
    cluster.wait_formed(["s2", "s3"])
    for i, (c, route) in enumerate(zip(clients, routes, strict=True)):
        status, body = c.get("/count", base=cluster.url(route[2]))
        assert status == 200 and body["counter"] == 4 and body["server"] == route[2], body
        read = c.get("/read?key=v", base=cluster.url(route[2]))[1]
        assert read["sha256"] == digest(value_of(str(i), 32 * KB))
    stats = {s: cluster.health(s)["stats"] for s in ("s2", "s3")}
    assert sum(s["stub_loaded"] for s in stats.values()) == 20
    assert sum(s["lost"] for s in stats.values()) == 0


def test_djangos_session_dictionary_checks_max_session_bytes_at_assignment():
    pytest.importorskip("django")
    from backends.frameworks.django_values import Values
    from backends.sessions import codec

    values = Values(codec.dumps, {"a": "x" * 40}, limit=100)  # 1 + 42 bytes
    values["b"] = "y" * 40
    with pytest.raises(SessionTooLarge) as info:
        values["c"] = "z" * 20
    assert (info.value.key, info.value.size, info.value.limit) == ("c", 109, 100)
    assert "c" not in values
    del values["a"]
    values["c"] = "z" * 20
    assert set(values) == {"b", "c"}


# --- what a request leaves behind ---------------------------------------------------------


async def test_a_request_leaves_no_session_for_the_collector_to_free():
    """A cookie-less request's session (its values decoded) is freed when the request ends,
    not at the next collection: with large sessions that garbage was the memory past the
    budget (a new session's first request holds its value twice)."""
    import gc

    import aiohttp

    from tests.test_rewrite import local_backend

    async with local_backend(APP) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        gc.collect()
        gc.disable()
        try:
            for path in ("/fill?key=v&bytes=100000&seed=1", "/count"):
                async with http.get(base + path) as resp:
                    assert resp.status == 200
                    await resp.read()
            await asyncio.sleep(0.05)
            assert [o for o in gc.get_objects() if type(o) is Session] == []  # (not a proxy)
        finally:
            gc.enable()


def test_through_the_proxy_full_servers_send_new_sessions_on_and_none_outgrows_its_budget(
        make_cluster):
    """Without a store: a server past its budget takes no new session and no copy of one
    (503 memory-budget: the proxy tries the next server, keeping this one), so the cluster
    fills up and then refuses, and no server grows past its budget."""
    cluster = make_cluster(n=3, app=APP, session={"max_memory_mb": 1}).start()
    made: list[tuple[Client, int]] = []
    statuses = []
    for i in range(60):  # 60 x 64 KiB, each held twice: far past 3 x 1 MiB
        c = Client(cluster.proxy_url)
        status, body = fill(c, "v", 64 * KB, str(i))
        statuses.append(status)
        if status == 200:
            made.append((c, i))
    assert set(statuses) == {200, 503}, statuses
    first_refused = statuses.index(503)
    assert first_refused >= 15, statuses  # the others took what a full one refused
    for sid in cluster.servers:
        health = cluster.health(sid)
        assert cluster.servers[sid]["proc"].poll() is None
        memory = health["memory"]
        assert memory["used"] <= memory["limit"] + 2 * 70 * KB, (sid, memory)
    for c, i in made:  # every session made is served, whole
        status, body = c.get("/read?key=v")
        assert status == 200 and body["sha256"] == digest(value_of(str(i), 64 * KB)), body


def test_without_a_store_a_full_server_takes_no_copy_of_a_new_session(make_cluster):
    cluster = make_cluster(n=3, app=APP, session={"max_memory_mb": 1}).start(proxy=False)
    for i in range(30):  # s2 full of its own sessions (their copies on s1 and s3)
        if fill(Client(cluster.url("s2")), "v", 64 * KB, f"a{i}")[0] == 503:
            break
    else:
        raise AssertionError("s2 never refused a session")
    # new sessions on s1: s2 refuses their copies, s3 takes them while it has room
    statuses, secondaries = [], set()
    for i in range(12):
        c = Client(cluster.url("s1"))
        status, body = fill(c, "v", 64 * KB, f"b{i}")
        statuses.append(status)
        if status == 200:
            secondaries.add(c.route[2])
    assert statuses[:4] == [200] * 4 and secondaries == {"s3"}, (statuses, secondaries)
    for sid in ("s2", "s3"):
        memory = cluster.health(sid)["memory"]
        assert memory["used"] <= memory["limit"] + 70 * KB, (sid, memory)
    if 503 in statuses:  # s3 full too: refused, nothing kept
        status, headers, body = raw_get(f"{cluster.url('s1')}/fill?key=v&bytes=10&seed=c")
        assert status == 503 and headers["X-Tandem-State"] == "memory-budget"
        assert cluster.health("s1")["primaries"] == statuses.count(200)


def test_an_invalidated_session_whose_copy_was_evicted_stays_ended(make_cluster, request):
    """The replica holder wrote its evicted copy to the store; the primary's invalidation
    deletes it there again, so the old token finds nothing, even after the primary dies."""
    redis: RedisServer = request.getfixturevalue("redis_server")
    cluster = evicting_cluster(make_cluster, redis.url)
    clients = filled_on_s1(cluster, 40)
    time.sleep(0.5)
    # the oldest replicas went to the store first, from their holders
    holders = {s: cluster.health(s) for s in ("s2", "s3")}
    assert sum(h["stats"]["evicted"] for h in holders.values()) > 0, holders
    victims = clients[:5]
    for c in victims:
        token = c.token
        assert c.get("/invalidate")[0] == 200
        c.token = token  # the old token, kept (a stolen cookie, say)
        assert redis.command("EXISTS", f"tandem:session:{c.route[0]}") == ":0"
    cluster.kill("s1")
    cluster.wait_formed(["s2", "s3"])
    for c in victims:
        status, body = c.get("/read?key=v", base=cluster.url(c.route[2]))
        assert status == 200 and body["len"] is None, body  # a new, empty session


def test_an_evicted_session_taken_over_by_a_third_server_comes_from_the_store(
        make_cluster, request):
    redis: RedisServer = request.getfixturevalue("redis_server")
    cluster = evicting_cluster(make_cluster, redis.url, foreign_requests="take_over")
    clients = filled_on_s1(cluster, 30)
    # the oldest are stubs on s1 now; each goes to the server that is not its secondary
    moved = list(enumerate(clients[:6]))
    for i, c in moved:
        third = ({"s2", "s3"} - {c.route[2]}).pop()
        status, body = c.get("/read?key=v", base=cluster.url(third))
        assert status == 200 and body["server"] == third, body
        assert body["sha256"] == digest(value_of(str(i), 64 * KB))
        assert c.route[1] == third  # its primary now
    s1 = cluster.health("s1")
    assert s1["stats"]["stub_loaded"] >= len(moved) and s1["stats"]["lost"] == 0
    cluster.kill("s1")
    cluster.wait_formed(["s2", "s3"])
    for _i, c in moved:  # and it stays there, with s1 gone
        status, body = c.get("/count", base=cluster.url(c.route[1]))
        assert status == 200 and body["counter"] == 1 and body["server"] == c.route[1]


def test_with_its_store_down_a_full_server_refuses_new_sessions_and_serves_its_own(
        make_cluster, request):
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = make_cluster(n=3, app=APP, session={"max_memory_mb": 1, "persistence": "redis"},
                           cluster={"replication_timeout_s": 0.5})  # (how long a commit
    with_persistence(cluster, url=redis.url, timeout_s=0.5)         # waits for room)
    cluster.start(proxy=False)
    url = cluster.url("s1")
    held = []
    for i in range(8):  # half the budget, in memory
        c = Client(url)
        assert fill(c, "v", 64 * KB, str(i))[0] == 200
        held.append(c)
    redis.kill()
    statuses = [fill(Client(url), "v", 64 * KB, f"x{i}")[0] for i in range(14)]
    assert statuses[0] == 200 and statuses[-1] == 503, statuses
    status, headers, body = raw_get(f"{url}/fill?key=v&bytes=10&seed=y")
    assert status == 503 and headers["X-Tandem-State"] == "memory-budget"
    memory = cluster.health("s1")["memory"]
    assert memory["used"] <= memory["limit"] + 70 * KB and memory["stubs"] == 0, memory
    for i, c in enumerate(held):  # what it holds it serves, from memory
        status, body = c.get("/read?key=v")
        assert status == 200 and body["sha256"] == digest(value_of(str(i), 64 * KB))
    assert cluster.servers["s1"]["proc"].poll() is None
    assert cluster.health("s1")["stats"]["store_errors"] > 0


def test_offload_through_the_proxy_fails_over_to_the_stub(make_cluster, request):
    redis: RedisServer = request.getfixturevalue("redis_server")
    cluster = make_cluster(n=3, app=APP, session={"persistence": "redis"})
    with_persistence(cluster, url=redis.url, mode="offload", timeout_s=2.0)
    cluster.start()
    clients = [Client(cluster.proxy_url) for _ in range(12)]
    for c in clients:
        for n in range(1, 4):
            assert c.get("/count")[1]["counter"] == n
    victim = clients[0].route[1]
    ours = [c for c in clients if c.route[1] == victim]
    cluster.kill(victim)
    for c in clients:  # the proxy goes to the secondary, which loads the stub's state
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 4, body
    assert all(c.route[1] != victim for c in ours)
    loaded = sum(cluster.health(s)["stats"]["stub_loaded"] for s in cluster.servers
                 if s != victim)
    assert loaded == len(ours)


def test_offload_with_its_store_down_replicates_the_writes_themselves(make_cluster, request):
    """What the store cannot give, the secondary gets: with Redis gone, each write goes to
    the secondary whole, and a kill -9 of the primary still loses none."""
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = make_cluster(n=3, app=APP, session={"persistence": "redis"})
    with_persistence(cluster, url=redis.url, mode="offload", timeout_s=0.5)
    cluster.start(proxy=False)
    clients = [Client(cluster.url("s1")) for _ in range(6)]
    for c in clients:
        assert [c.get("/count")[1]["counter"] for _ in range(2)] == [1, 2]
    assert sum(cluster.health(s)["replicas"] for s in ("s2", "s3")) == 0  # stubs only
    redis.kill()
    for c in clients:
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 3, body
    assert sum(cluster.health(s)["replicas"] for s in ("s2", "s3")) == len(clients)
    routes = [c.route for c in clients]
    cluster.kill("s1")
    cluster.wait_formed(["s2", "s3"])
    for c, route in zip(clients, routes, strict=True):
        status, body = c.get("/count", base=cluster.url(route[2]))
        assert status == 200 and body["counter"] == 4, body
