"""Store-backed membership in PostgreSQL (`cluster.membership = "postgresql"`): the view row
and the lease rows in a real PostgreSQL, real backend processes, a real proxy
(docs/consistency.md, "Store-backed views")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from backends.errors import ConfigError
from tandem.config import loads
from tests.stores import Postgres, make_postgres  # noqa: F401 - a fixture
from tests.test_store_membership import SERVER, direct, log_events, sessions_on, wait_until


def pg_cluster(make_cluster: Any, pg: Postgres, n: int = 3) -> Any:
    return make_cluster(n=n, cluster={"membership": "postgresql",
                                      "membership_url": pg.dsn()}).start()


def sql(pg: Postgres, query: str) -> str:
    """One query through psql, its unaligned output."""
    done = subprocess.run([str(pg.bin / "psql"), "-h", "127.0.0.1", "-p", str(pg.port),
                           "-U", "tandem", "-d", "postgres", "-Atc", query],
                          capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def store_view(pg: Postgres) -> dict[str, Any]:
    """The view as the database holds it."""
    raw = sql(pg, "SELECT view FROM tandem_membership WHERE cluster = 'test' AND server = ''")
    view: dict[str, Any] = json.loads(raw)
    return view


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@contextmanager
def stopped(pg: Postgres) -> Iterator[None]:
    """The whole server stopped: the postmaster (no new connection is served) and every
    backend (no query is answered) — connections open and hang, as on a frozen machine."""
    assert pg.proc is not None
    postmaster = pg.proc.pid
    os.kill(postmaster, signal.SIGSTOP)  # first: it forks no new backend meanwhile
    children = _children(postmaster)
    for pid in children:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in children:
            os.kill(pid, signal.SIGCONT)
        os.kill(postmaster, signal.SIGCONT)


# --- configuration ---------------------------------------------------------------------------


def test_postgresql_membership_config() -> None:
    ok = loads('[cluster]\nmembership = "postgresql"\n'
               'membership_url = "postgresql://u:pw@127.0.0.1:5432/db"\n' + SERVER,
               source="t.toml", environ={})
    assert ok.cluster.membership == "postgresql"
    assert "pw" not in repr(ok.cluster)
    assert loads('[cluster]\nmembership = "postgresql"\n'
                 'membership_url = "postgres://127.0.0.1/db"\n' + SERVER,
                 source="t.toml", environ={}).cluster.membership_url.startswith("postgres:")
    with pytest.raises(ConfigError) as missing:
        loads('[cluster]\nmembership = "postgresql"\n' + SERVER, source="t.toml", environ={})
    assert missing.value.key == "cluster.membership_url"
    # a Redis URL for PostgreSQL, a DSN for Redis: refused, the password never shown
    for kind, url in (("postgresql", "redis://:hunter2@127.0.0.1/0"),
                      ("redis", "postgresql://u:hunter2@127.0.0.1/db")):
        with pytest.raises(ConfigError) as wrong:
            loads(f'[cluster]\nmembership = "{kind}"\nmembership_url = "{url}"\n' + SERVER,
                  source="t.toml", environ={})
        assert wrong.value.key == "cluster.membership_url", kind
        assert "hunter2" not in str(wrong.value)
    # a URL that the embedded membership would ignore
    with pytest.raises(ConfigError) as unused:
        loads('[cluster]\nmembership_url = "postgresql://u:hunter2@127.0.0.1/db"\n' + SERVER,
              source="t.toml", environ={})
    assert unused.value.key == "cluster.membership_url"
    assert "hunter2" not in str(unused.value)


# --- failures ----------------------------------------------------------------------------------


def test_kill_primary_sessions_continue_after_the_database_removed_it(
        make_cluster: Any, request: pytest.FixtureRequest) -> None:
    pg: Postgres = request.getfixturevalue("make_postgres")()
    cluster = pg_cluster(make_cluster, pg)
    before_view = store_view(pg)
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
    after = store_view(pg)
    assert sorted(after["m"]) == ["s2", "s3"] and after["n"] > before_view["n"]
    # the number column is the view's own (the compare-and-set reads it)
    assert sql(pg, "SELECT number FROM tandem_membership WHERE server = ''") == str(after["n"])
    promoted = sum(cluster.health(s)["stats"]["promoted"] for s in ("s2", "s3"))
    assert promoted == sum(r[1] == "s1" for r in before.values())
    # promotion followed the database's view without s1, never the link's failure alone
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


def test_two_servers_survive_the_kill_of_one_without_a_witness(
        make_cluster: Any, request: pytest.FixtureRequest) -> None:
    pg: Postgres = request.getfixturevalue("make_postgres")()
    cluster = pg_cluster(make_cluster, pg, n=2)
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
    view = store_view(pg)
    assert view["m"] == ["s1", "s2"]
    rows = sql(pg, "SELECT server || '=' || incarnation FROM tandem_membership "
                   "WHERE server <> '' AND expires_at > clock_timestamp() ORDER BY server")
    assert rows.split("\n") == [f"{m}={i}" for m, i in zip(view["m"], view["i"], strict=True)]
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 3, body


def test_database_stopped_is_503_minority_and_serving_resumes(
        make_cluster: Any, request: pytest.FixtureRequest) -> None:
    pg: Postgres = request.getfixturevalue("make_postgres")()
    cluster = pg_cluster(make_cluster, pg)
    clients = sessions_on(cluster, "s1", 3)
    c = next(c for c in clients if c.route[1] == "s1")
    number = store_view(pg)["n"]

    with stopped(pg):  # connections accepted, nothing answered
        wait_until(lambda: not any(cluster.health(s)["lease"] for s in ("s1", "s2", "s3")),
                   "a server kept its lease without the database")
        assert direct(cluster, "s1", c) == (503, "minority")
        status, _ = c.get()
        assert status in (502, 503)

    cluster.wait_formed(["s1", "s2", "s3"])
    # no server was removed while nobody could renew: same view, same sessions
    assert store_view(pg)["n"] == number
    status, body = c.get()
    assert status == 200 and body["counter"] == 2 and body["server"] == "s1", body
    events = [e.get("event") for e in log_events(cluster, "s1")]
    assert "membership_store_unreachable" in events
    assert "membership_store_reachable" in events


def test_after_an_outage_no_server_is_removed_before_it_had_a_grant_to_renew(
        make_cluster: Any, request: pytest.FixtureRequest) -> None:
    """The rule that lets a member remove others only once its own renewals have run without
    a gap for a whole grant: s3, stopped through the database's outage and resumed a while
    after it (more than a heartbeat, less than a grant), is still a member."""
    pg: Postgres = request.getfixturevalue("make_postgres")()
    # heartbeat 2 s: the grant is 4.08 s; s3 is back 3 s after the database
    cluster = make_cluster(n=3, cluster={"membership": "postgresql", "membership_url": pg.dsn(),
                                         "heartbeat_interval_s": 2.0}).start(proxy=False)
    number = store_view(pg)["n"]
    s3 = cluster.servers["s3"]["proc"]

    with stopped(pg):
        s3.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: not any(cluster.health(s)["lease"] for s in ("s1", "s2")),
                       "a server kept its lease without the database", timeout=20)
            time.sleep(4.5)  # s3's lease row has expired too, by the database's clock
        except BaseException:
            s3.send_signal(signal.SIGCONT)
            raise
    try:
        time.sleep(3.0)
    finally:
        s3.send_signal(signal.SIGCONT)

    cluster.wait_formed(["s1", "s2", "s3"])
    assert store_view(pg)["n"] == number
