"""Store-backed membership (`cluster.membership = "redis"`): the view and the leases in a
real Redis, real backend processes, a real proxy (docs/consistency.md, "Views")."""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

from backends.errors import ConfigError
from tandem.config import loads
from tests.cluster import Client
from tests.stores import RedisServer, make_redis  # noqa: F401 - a fixture

VIEW_KEY = "tandem:{test}:view"


def redis_cluster(make_cluster: Any, redis: Any, n: int = 3) -> Any:
    return make_cluster(n=n, cluster={"membership": "redis",
                                      "membership_url": redis.url}).start()


def store_view(redis: Any) -> dict[str, Any]:
    """The view as the store holds it (one inline GET; the reply is a bulk string)."""
    import socket
    with socket.create_connection(("127.0.0.1", redis.port), timeout=2) as s:
        s.sendall(f"GET {VIEW_KEY}\r\n".encode())
        data = b""
        while not data.endswith(b"}\r\n"):
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
    return json.loads(data.split(b"\r\n", 1)[1])


def sessions_on(cluster: Any, primary: str, count: int) -> list[Client]:
    clients: list[Client] = []
    while sum(c.route[1] == primary for c in clients) < count:
        c = Client(cluster.proxy_url)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1, body
        clients.append(c)
        assert len(clients) < 10 * count
    return clients


def direct(cluster: Any, sid: str, client: Client) -> tuple[int, str | None]:
    """The session's request sent to server `sid` itself: (status, X-Tandem-State)."""
    req = urllib.request.Request(cluster.url(sid) + "/count",
                                 headers={"Cookie": f"JSESSIONID={client.token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("X-Tandem-State")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Tandem-State")


def wait_until(ok: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def log_events(cluster: Any, sid: str) -> list[dict[str, Any]]:
    out = []
    for line in (cluster.tmp / f"{sid}.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# --- configuration ---------------------------------------------------------------------------

SERVER = '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:9001"\nreplication = "127.0.0.1:9101"\n'


def test_membership_defaults_to_embedded_and_checks_its_keys() -> None:
    config = loads(SERVER, source="t.toml", environ={})
    assert config.cluster.membership == "embedded"
    ok = loads('[cluster]\nmembership = "redis"\nmembership_url = "redis://127.0.0.1:1/0"\n'
               + SERVER, source="t.toml", environ={})
    assert ok.cluster.membership == "redis"
    with pytest.raises(ConfigError) as bad:
        loads('[cluster]\nmembership = "zookeeper"\n' + SERVER, source="t.toml", environ={})
    assert bad.value.key == "cluster.membership"
    with pytest.raises(ConfigError) as missing:
        loads('[cluster]\nmembership = "redis"\n' + SERVER, source="t.toml", environ={})
    assert missing.value.key == "cluster.membership_url"
    with pytest.raises(ConfigError) as scheme:
        loads('[cluster]\nmembership = "redis"\nmembership_url = "http://x:hunter2@h/"\n'
              + SERVER, source="t.toml", environ={})
    assert scheme.value.key == "cluster.membership_url"
    assert "hunter2" not in str(scheme.value)


# --- failures ----------------------------------------------------------------------------------


def test_kill_primary_sessions_continue_after_the_store_removed_it(make_cluster, request):
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = redis_cluster(make_cluster, redis)
    before_view = store_view(redis)
    assert sorted(before_view["m"]) == ["s1", "s2", "s3"] and all(before_view["i"])
    clients = sessions_on(cluster, "s1", 10)
    for c in clients:
        assert c.get()[1]["counter"] == 2
    before = {id(c): c.route for c in clients}

    cluster.kill("s1")

    for c in clients:
        sid, primary, secondary = before[id(c)]
        status, body = c.get()
        assert status == 200 and body["counter"] == 3, (before[id(c)], body)
        if primary == "s1":
            assert body["server"] == secondary and c.route[1] == secondary
    after = store_view(redis)
    assert sorted(after["m"]) == ["s2", "s3"] and after["n"] > before_view["n"]
    promoted = sum(cluster.health(s)["stats"]["promoted"] for s in ("s2", "s3"))
    assert promoted == sum(r[1] == "s1" for r in before.values())
    # promotion followed the store's view without s1, never the link's failure alone
    promotions = 0
    for sid in ("s2", "s3"):
        removed_at = None
        for i, e in enumerate(log_events(cluster, sid)):
            if e.get("event") == "view_adopted" and "s1" not in e["members"]:
                removed_at = i if removed_at is None else removed_at
            if e.get("event") == "promoted":
                assert removed_at is not None and removed_at < i, sid
                promotions += e["sessions"]
    assert promotions == promoted


def test_two_servers_survive_the_kill_of_one_without_a_witness(make_cluster, request):
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = redis_cluster(make_cluster, redis, n=2)
    clients = sessions_on(cluster, "s2", 5)
    assert all(c.route[2] == "s1" for c in clients if c.route[1] == "s2")

    cluster.kill("s2", signal.SIGKILL)

    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 2 and body["server"] == "s1", body
    health = cluster.health("s1")
    assert health["members"] == ["s1"] and health["lease"] is True
    # the restarted s2 binds its new process by itself and is a member again
    cluster.start_server("s2")
    cluster.wait_formed(["s1", "s2"])
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 3, body


def test_store_unreachable_is_503_minority_and_serving_resumes(make_cluster, request):
    redis: RedisServer = request.getfixturevalue("make_redis")()
    cluster = redis_cluster(make_cluster, redis)
    clients = sessions_on(cluster, "s1", 3)
    c = next(c for c in clients if c.route[1] == "s1")
    number = store_view(redis)["n"]

    redis.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
    try:
        wait_until(lambda: not any(cluster.health(s)["lease"] for s in ("s1", "s2", "s3")),
                   "a server kept its lease without the store")
        assert direct(cluster, "s1", c) == (503, "minority")
        status, _ = c.get()
        assert status in (502, 503)
    finally:
        redis.proc.send_signal(signal.SIGCONT)

    cluster.wait_formed(["s1", "s2", "s3"])
    # no server was removed while nobody could renew: same view, same sessions
    assert store_view(redis)["n"] == number
    status, body = c.get()
    assert status == 200 and body["counter"] == 2 and body["server"] == "s1", body


def test_after_an_outage_no_server_is_removed_before_it_had_a_grant_to_renew(
        make_cluster: Any, request: pytest.FixtureRequest) -> None:
    """A member removes others only once its own renewals have run without a gap for a
    whole grant: s3, stopped through Redis's outage and resumed a while after it (more than
    a heartbeat, less than a grant), is still a member."""
    redis: RedisServer = request.getfixturevalue("make_redis")()
    # heartbeat 2 s: the grant is 4.08 s; s3 is back 3 s after Redis
    cluster = make_cluster(n=3, cluster={"membership": "redis", "membership_url": redis.url,
                                         "heartbeat_interval_s": 2.0}).start(proxy=False)
    number = store_view(redis)["n"]
    assert redis.proc is not None
    s3 = cluster.servers["s3"]["proc"]

    redis.proc.send_signal(signal.SIGSTOP)
    s3.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: not any(cluster.health(s)["lease"] for s in ("s1", "s2")),
                   "a server kept its lease without the store", timeout=20)
        time.sleep(4.5)  # s3's lease key has expired too, by Redis's clock
    finally:
        redis.proc.send_signal(signal.SIGCONT)
        try:
            time.sleep(3.0)
        finally:
            s3.send_signal(signal.SIGCONT)

    cluster.wait_formed(["s1", "s2", "s3"])
    assert store_view(redis)["n"] == number
