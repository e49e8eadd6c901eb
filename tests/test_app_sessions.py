"""Application sessions (rooms) end to end: real backends, members on several servers."""

from __future__ import annotations

import threading
import time

import pytest

from tests.cluster import Client
from tests.stores import postgres, redis_server  # noqa: F401 - fixtures

APPS = ["tests.room_apps:asgi_rooms", "tests.room_apps:wsgi_rooms"]


@pytest.mark.parametrize("app,replication", [(APPS[0], "sync"), (APPS[1], "sync"),
                                             (APPS[0], "async"), (APPS[0], "none")],
                         ids=["asgi", "wsgi", "asgi-async", "asgi-none"])
def test_members_on_three_servers_share_one_room(make_cluster, app, replication):
    cluster = make_cluster(app=app, session={"replication": replication}).start(proxy=False)
    members = [Client(cluster.url(s)) for s in ("s1", "s2", "s3")]
    for i, c in enumerate(members):
        status, body = c.get(f"/post?room=kitchen&msg=m{i}")
        assert status == 200, body
        assert body["n"] == i + 1, body
    status, body = members[0].get("/join?room=kitchen")
    assert body["room"] == {"log": ["m0", "m1", "m2"], "n": 3}
    assert sorted(body["members"]) == sorted(c.get("/join?room=kitchen")[1]["member"]
                                             for c in members)
    primaries = {c.get("/join?room=kitchen")[1]["primary"] for c in members}
    assert len(primaries) == 1  # one primary, wherever the members are


def rooms_of(cluster, n_rooms: int, per_room: int) -> dict[str, list[Client]]:
    """`per_room` member sessions in each of `n_rooms` rooms, through the proxy (which
    spreads new sessions over the servers)."""
    rooms: dict[str, list[Client]] = {}
    for r in range(n_rooms):
        rooms[f"room{r}"] = []
        for _ in range(per_room):
            c = Client(cluster.proxy_url)
            status, body = c.get(f"/join?room=room{r}")
            assert status == 200, body
            rooms[f"room{r}"].append(c)
    return rooms


def post_until(stop: threading.Event, room: str, c: Client, name: str,
               acked: list[str], failed: list[object], after_kill: threading.Event,
               acked_after: list[str]) -> None:
    seq = 0
    while not stop.is_set():
        msg = f"{name}-{seq}"
        seq += 1
        try:
            status, body = c.get(f"/post?room={room}&msg={msg}")
        except OSError as exc:
            failed.append(exc)
            continue
        if status == 200:
            acked.append(msg)
            if after_kill.is_set():
                acked_after.append(msg)
        else:
            failed.append((status, body))


@pytest.mark.parametrize("app", APPS, ids=["asgi", "wsgi"])
def test_kill_a_rooms_primary_mid_load_loses_no_acknowledged_write(make_cluster, app):
    """10 rooms x 3 member sessions spread over the servers, each posting to its room
    without pause; kill -9 of a room's primary in the middle: every acknowledged post is in
    its room once, and each room's counter matches its log."""
    cluster = make_cluster(app=app).start()
    rooms = rooms_of(cluster, 10, 3)
    spread = [len({c.route[1] for c in members}) for members in rooms.values()]
    assert max(spread) >= 2, spread  # members of one room live on several servers
    where = {r: members[0].get(f"/join?room={r}")[1]["primary"] for r, members in rooms.items()}
    victim = where["room0"]
    assert sum(p == victim for p in where.values()) >= 1

    stop, after_kill = threading.Event(), threading.Event()
    acked: dict[str, list[str]] = {r: [] for r in rooms}
    acked_after: list[str] = []
    failed: list[object] = []
    threads = [threading.Thread(target=post_until, args=(
        stop, r, c, f"{r}.{i}", acked[r], failed, after_kill, acked_after))
        for r, members in rooms.items() for i, c in enumerate(members)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    before = sum(map(len, acked.values()))
    cluster.kill(victim)
    after_kill.set()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert before > 30
    assert len(acked_after) > 30, failed[:5]

    for r, members in rooms.items():
        status, body = members[0].get(f"/join?room={r}")
        assert status == 200, body
        log, n = body["room"]["log"], body["room"]["n"]
        missing = set(acked[r]) - set(log)
        assert not missing, (r, sorted(missing)[:10])
        assert len(log) == len(set(log)), (r, [m for m in set(log) if log.count(m) > 1])
        assert n == len(log), (r, n, len(log))
        assert body["primary"] != victim
        # the member sessions failed over too: each counted its own acknowledged posts
        for i, c in enumerate(members):
            mine = [m for m in acked[r] if m.startswith(f"{r}.{i}-")]
            assert c.get(f"/join?room={r}")[1]["posted"] >= len(mine)


# s1's primaries get s2 as secondary (its preferred group): killing both leaves no copy of
# a room living on s1 in memory. Five servers: the three left are a majority.
SERVERS = [{"id": "s1", "group": "a", "preferred_secondary_group": "b"},
           {"id": "s2", "group": "b"}, {"id": "s3", "group": "c"}, {"id": "s4", "group": "c"},
           {"id": "s5", "group": "c"}]


def rooms_living_on(cluster, server: str, count: int, members: list[Client]) -> list[str]:
    """Room keys whose primary is `server` (a room is created at its key's home), each
    joined by every client of `members`."""
    keys: list[str] = []
    n = 0
    while len(keys) < count:
        key = f"cart{n}"
        n += 1
        assert n < 40 * count, "rooms are not spread over the servers"
        status, body = members[0].get(f"/post?room={key}&msg=first")
        assert status == 200, body
        if body["primary"] == server:
            keys.append(key)
    for key in keys:
        for c in members[1:]:
            assert c.get(f"/post?room={key}&msg=more")[0] == 200
    return keys


@pytest.mark.parametrize("kind", ["sqlite", "file", "postgresql", "redis"])
def test_rooms_come_back_with_their_members_after_both_copies_die(make_cluster, tmp_path,
                                                                   request, kind):
    from tests.stores import with_persistence
    from tests.test_persistence_failover import kill_both, store_keys

    cluster = make_cluster(servers=SERVERS, app="tests.room_apps:asgi_rooms",
                           session={"persistence": kind, "max_inactive_s": 300})
    with_persistence(cluster, timeout_s=1.0, **store_keys(kind, tmp_path, request))
    cluster.start(proxy=False)
    # one member's session dies with s1 and s2 too (it comes back from the store as well)
    members = [Client(cluster.url(s)) for s in ("s1", "s3", "s4")]
    keys = rooms_living_on(cluster, "s1", 10, members)
    before = {k: members[1].get(f"/join?room={k}")[1] for k in keys}
    assert all(b["secondary"] == "s2" for b in before.values()), before
    assert members[0].route[1:] == ("s1", "s2")

    kill_both(cluster, "s1", "s2")
    cluster.wait_formed(["s3", "s4", "s5"])
    members[0].base = cluster.url("s5")

    for key in keys:
        for c in members:
            status, body = c.get(f"/join?room={key}")
            assert status == 200, body
            assert body["primary"] in ("s3", "s4", "s5")
            assert body["room"] == before[key]["room"], key
            assert sorted(body["members"]) == sorted(before[key]["members"]), key
            assert body["posted"] >= 10 and body["member"] in body["members"]  # (its session)
    loaded = sum(e.get("event") == "app_session_loaded"
                 for s in ("s3", "s4", "s5") for e in cluster.events(s))
    assert loaded == len(keys)


def test_a_value_that_cannot_be_replicated_raises_at_the_assignment(make_cluster):
    cluster = make_cluster(app="tests.room_apps:wsgi_rooms", n=2).start(proxy=False)
    c = Client(cluster.url("s1"))
    assert c.get("/post?room=r&msg=hello")[0] == 200
    status, body = c.get("/bad?room=r")
    assert status == 200
    assert body["error"].startswith("app_session['bad']: value of type object cannot be "
                                    "replicated"), body
    assert body["room"] == {"log": ["hello"], "n": 1}  # nothing of it was kept


def test_an_async_handler_reading_a_room_it_did_not_await_gets_a_clear_error(make_cluster):
    cluster = make_cluster(app="tests.room_apps:asgi_rooms", n=2).start(proxy=False)
    status, body = Client(cluster.url("s1")).get("/sync?room=r")
    assert status == 200
    assert body["error"] == ("SessionError: application session 'r' is not loaded: in an "
                             "async handler write `room = await session.app_session(key)`")


def test_concurrent_writers_lose_no_increment_or_append_and_last_writer_wins_per_key(
        make_cluster):
    """Two members on two servers write one room at once: every increment and append of
    both lands once; a key both set holds the value of one of them."""
    cluster = make_cluster(app="tests.room_apps:wsgi_rooms").start(proxy=False)
    a, b = Client(cluster.url("s1")), Client(cluster.url("s2"))
    errors: list[object] = []

    def writer(c: Client, name: str) -> None:
        for i in range(40):
            for path in (f"/post?room=duo&msg={name}{i}", f"/set?room=duo&key=last&value={name}"):
                status, body = c.get(path)
                if status != 200:
                    errors.append(body)

    threads = [threading.Thread(target=writer, args=(c, n)) for c, n in ((a, "a"), (b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    room = a.get("/join?room=duo")[1]["room"]
    assert sorted(room["log"]) == sorted([f"a{i}" for i in range(40)] +
                                         [f"b{i}" for i in range(40)])
    assert room["n"] == 80
    assert room["last"] in ("a", "b")
    # each writer's own posts are in the order it made them
    for name in "ab":
        mine = [m for m in room["log"] if m.startswith(name)]
        assert mine == [f"{name}{i}" for i in range(40)]


def test_a_room_expires_when_no_member_refers_to_it_for_max_inactive_s(make_cluster):
    cluster = make_cluster(app="tests.room_apps:asgi_rooms",
                           session={"max_inactive_s": 2.0}).start(proxy=False)
    first, other = Client(cluster.url("s1")), Client(cluster.url("s2"))
    assert first.get("/post?room=r&msg=hello")[0] == 200
    # a member opening it keeps it: it touches it (and members not seen are dropped)
    for _ in range(6):
        status, body = other.get("/join?room=r")
        assert status == 200 and body["room"]["log"] == ["hello"], body
        time.sleep(0.6)
    assert body["members"] == [body["member"]], body
    # then no member refers to it for max_inactive_s: it ends (both copies)
    time.sleep(3.0)
    # (s1 and s2 remember where it was: they hear it is gone, and it starts anew)
    for c in (first, other, Client(cluster.url("s3"))):
        status, body = c.get("/join?room=r")
        assert status == 200 and body["room"] == {}, body
    expired = sum(e.get("event") == "sessions_expired" and e.get("primaries", 0) > 0
                  for s in cluster.servers for e in cluster.events(s))
    assert expired >= 1


@pytest.mark.parametrize("app,path", [
    ("tests.room_framework_apps:flask_rooms", "/post"),
    ("tests.room_framework_apps:starlette_rooms", "/post"),
    ("tests.room_django_app:application", "/post"),
    ("tests.room_django_app:asgi_application", "/post"),
    ("tests.room_django_app:asgi_application", "/apost"),
], ids=["flask", "starlette", "django-wsgi", "django-asgi-sync-view", "django-async-view"])
def test_each_framework_reaches_the_room_its_own_way(make_cluster, app, path):
    cluster = make_cluster(app=app).start(proxy=False)
    members = [Client(cluster.url(s)) for s in ("s1", "s2", "s3")]
    for i, c in enumerate(members):
        status, body = c.get(f"{path}?room=family-cart&msg=item{i}")
        assert status == 200, body
        assert body["room"]["log"] == [f"item{j}" for j in range(i + 1)], body
        assert body["room"]["n"] == i + 1
        assert len(body["members"]) == i + 1
    assert len({c.get(f"{path}?room=family-cart&msg=x")[1]["primary"] for c in members}) == 1


def test_a_draining_server_hands_its_rooms_to_their_secondaries(make_cluster):
    import signal

    cluster = make_cluster(app="tests.room_apps:asgi_rooms").start(proxy=False)
    home = Client(cluster.url("s1")).get("/join?room=r")[1]["primary"]
    others = [s for s in ("s1", "s2", "s3") if s != home]
    members = [Client(cluster.url(s)) for s in others]
    for i, c in enumerate(members):
        assert c.get(f"/post?room=r&msg=before{i}")[0] == 200

    cluster.kill(home, signal.SIGTERM)  # drains: every primary to its secondary, then exits

    for i, c in enumerate(members):
        status, body = c.get(f"/post?room=r&msg=after{i}")
        assert status == 200, body
        assert body["primary"] in others
    log = members[0].get("/join?room=r")[1]["room"]["log"]
    assert log == ["before0", "before1", "after0", "after1"]

    # back in the cluster it holds nothing: the servers that remember the room there ask
    # again, and find it where it went (it is not made anew at its home)
    cluster.start_server(home)
    cluster.wait_formed()
    for i, c in enumerate(members):
        status, body = c.get(f"/post?room=r&msg=again{i}")
        assert status == 200, body
    assert members[1].get("/join?room=r")[1]["room"]["log"] == [
        "before0", "before1", "after0", "after1", "again0", "again1"]


def test_save_commits_before_the_response_and_refresh_reads_the_others_writes(make_cluster):
    cluster = make_cluster(app="tests.room_apps:asgi_rooms", n=2).start(proxy=False)
    a, b = Client(cluster.url("s1")), Client(cluster.url("s2"))
    assert a.get("/post?room=r&msg=a0")[0] == 200
    status, body = b.get("/save?room=r&msg=b0")
    assert status == 200, body
    # saved: at the primary before the response; the write after it is this request's own
    # until the response (refresh keeps it on top of what the primary holds)
    assert body["saved"]["log"] == ["a0", "b0"]
    assert body["refreshed"]["log"] == ["a0", "b0", "b0!"]
    assert a.get("/join?room=r")[1]["room"]["log"] == ["a0", "b0", "b0!"]  # once each


def test_writes_after_the_response_head_are_committed_too(make_cluster):
    """A streaming response (or a websocket) writes after its head: committed when the app
    returns, as a second commit of the request (the proxy's request id names both)."""
    cluster = make_cluster(app="tests.room_apps:asgi_rooms", n=2).start()
    c = Client(cluster.proxy_url)
    for msg in ("x", "y"):
        assert c.get(f"/stream?room=r&msg={msg}")[0] == 200
    deadline = time.monotonic() + 5
    while (log := c.get("/join?room=r")[1]["room"]["log"]) != ["x<", "x>", "y<", "y>"]:
        assert time.monotonic() < deadline, log
        time.sleep(0.05)


def test_append_keeps_the_last_items_it_is_told_to(make_cluster):
    cluster = make_cluster(app="tests.room_apps:wsgi_rooms", n=2).start(proxy=False)
    a, b = Client(cluster.url("s1")), Client(cluster.url("s2"))
    for i in range(5):
        for c, name in ((a, "a"), (b, "b")):
            status, body = c.get(f"/post?room=r&msg={name}{i}&keep=3")
            assert status == 200 and len(body["room"]["log"]) <= 3, body
    assert a.get("/join?room=r")[1]["room"] == {"log": ["b3", "a4", "b4"], "n": 10}


def test_flask_test_client_keeps_rooms_in_its_process():
    """An app's own test suite (Flask's test client, no tandem server): its rooms are shared
    by the clients of the test process, with the same rules."""
    from tests.room_framework_apps import flask_rooms

    a, b = flask_rooms.test_client(), flask_rooms.test_client()
    assert a.get("/post?room=r&msg=a0").json["room"] == {"log": ["a0"], "n": 1}
    body = b.get("/post?room=r&msg=b0").json
    assert body["room"] == {"log": ["a0", "b0"], "n": 2}
    assert len(body["members"]) == 2 and body["primary"] is None
