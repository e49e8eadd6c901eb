"""Sessions on real backend processes, talked to directly (no proxy in between)."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from backends.cluster import wire
from tandem.token import Route, TokenCodec
from tests.cluster import Client

APPS = ["tests.apps:asgi_counter", "tests.apps:wsgi_counter"]


def third(cluster, *names):
    return next(s for s in cluster.servers if s not in names)


def get_after_kill(c, path, *, base, within=15.0):
    """GET as a client does after its primary died: a 503 (the secondary waits for the view
    to remove the dead primary before it takes over; a loaded machine may outlast that
    wait) is retried, as the proxy or the client would, until `within` seconds passed."""
    deadline = time.monotonic() + within
    while True:
        status, body = c.get(path, base=base)
        if status != 503 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.2)


@pytest.mark.parametrize("app", APPS)
def test_third_server_fetches_the_session_and_becomes_primary(make_cluster, app):
    # (the take-over itself: what a request at a third server did before forwarding)
    cluster = make_cluster(app=app, session={"foreign_requests": "take_over"}).start(proxy=False)
    c = Client(cluster.url("s1"))
    for i in range(3):
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == i + 1
    sid, primary, secondary = c.route
    assert primary == "s1" and secondary in ("s2", "s3")
    other = third(cluster, primary, secondary)

    status, body = c.get("/count", base=cluster.url(other))
    assert status == 200
    assert body["counter"] == 4 and body["server"] == other
    new_sid, new_primary, new_secondary = c.route
    assert (new_sid, new_primary) == (sid, other)
    assert new_secondary not in (other, "NONE")
    stats = cluster.health(other)["stats"]
    assert stats["fetched"] == 1
    # The old primary let go: going back there fetches it again, the count continues.
    status, body = c.get("/count", base=cluster.url("s1"))
    assert body["counter"] == 5 and body["server"] == "s1" and c.route[1] == "s1"


@pytest.mark.parametrize("app", APPS)
def test_non_serializable_value_raises_and_session_stays(make_cluster, app):
    cluster = make_cluster(app=app).start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    c.get("/count")
    status, body = c.get("/bad")
    assert status == 200
    assert "'bad'" in body["error"] and "object" in body["error"]
    assert body["keys"] == ["counter"] and body["counter"] == 2
    # and nothing of it was replicated: the secondary's copy is the same
    _, primary, secondary = c.route
    # (a server killed before the first view bound every server cannot be voted out:
    # that view needs all of them — docs/consistency.md)
    cluster.wait_formed()
    cluster.kill(primary)
    status, body = get_after_kill(c, "/peek", base=cluster.url(secondary))
    assert body["keys"] == ["counter"] and body["counter"] == 2


def test_in_place_mutation_is_replicated(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s2"))
    for _ in range(3):
        c.get("/mutate")
    _, primary, secondary = c.route
    cluster.kill(primary)
    status, body = get_after_kill(c, "/peek", base=cluster.url(secondary))
    assert body["items"] == [0, 1, 2]


@pytest.mark.parametrize("forge", ["tampered", "foreign-key", "garbage", "unsigned"])
def test_bad_token_gets_a_new_session_not_an_error(make_cluster, forge):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    c.get("/count")
    sid, primary, secondary = c.route
    if forge == "tampered":  # point the token at another server, keep the signature
        c.token = c.token.replace(f"!{primary}!", "!s3!", 1)
    elif forge == "foreign-key":
        c.token = TokenCodec(["not-our-secret"]).encode(Route(sid, primary, secondary))
    elif forge == "garbage":
        c.token = "%%%!!!..."
    else:
        c.token = f"{sid}!{primary}!{secondary}"
    status, body = c.get("/count")
    assert status == 200
    assert body["counter"] == 1  # a new session
    assert c.route[0] != sid
    events = cluster.wait_event("s1", "bad_token")
    assert events and all(sid not in str(e) for e in events)


def test_wrong_secret_peer_is_refused(make_cluster):
    cluster = make_cluster(n=2).start(proxy=False)
    port = int(cluster.config_path.read_text().split('replication = "127.0.0.1:')[1][:5])

    async def dial(secret: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await wire.dial_handshake(reader, writer, me="s2", peer="s1", cluster="test",
                                      secrets_=[secret])
            return "accepted"
        except Exception as exc:  # noqa: BLE001 - the outcome is what we test
            return f"{type(exc).__name__}: {exc}"
        finally:
            writer.close()

    assert asyncio.run(dial("test-secret")) == "accepted"
    outcome = asyncio.run(dial("zebra-7731"))
    assert outcome.startswith("HandshakeFailed") and "bad credentials" in outcome
    refused = cluster.wait_event("s1", "peer_refused")
    assert refused and "wrong cluster secret" in refused[-1]["reason"]
    assert not any("zebra-7731" in str(e) for e in cluster.events("s1"))  # the secret is not logged


def test_server_with_wrong_secret_never_joins(make_cluster, tmp_path):
    cluster = make_cluster(n=3).start(proxy=False)
    cluster.kill("s3")
    text = cluster.config_path.read_text().replace('["test-secret"]', '["intruder"]')
    rogue = tmp_path / "rogue.toml"
    rogue.write_text(text)
    cluster.config_path, real = rogue, cluster.config_path
    cluster.start_server("s3")
    cluster.config_path = real
    time.sleep(2.0)
    assert cluster.health("s1")["peers"]["s3"] != "alive"
    assert cluster.health("s3")["peers"] == {"s1": "unknown", "s2": "unknown"}
    c = Client(cluster.url("s1"))
    c.get("/count")
    assert c.route[2] == "s2"  # never the rogue server


def test_invalidation_reaches_the_replica(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    c.get("/count")
    old = c.token
    _, primary, secondary = c.route
    assert cluster.health(secondary)["replicas"] == 1
    status, body = c.get("/invalidate")
    assert body["invalidated"] and any("Max-Age=0" in v for v in c.set_cookie_seen)
    assert cluster.health(secondary)["replicas"] == 0
    cluster.kill(primary)
    c.token = old  # replay the invalidated token at the old secondary
    status, body = c.get("/count", base=cluster.url(secondary))
    assert body["counter"] == 1


def test_expiry_reaches_the_replica(make_cluster):
    cluster = make_cluster(session={"max_inactive_s": 1.0}).start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    _, _, secondary = c.route
    assert cluster.health(secondary)["replicas"] == 1
    time.sleep(1.6)
    assert cluster.health("s1")["primaries"] == 0
    assert cluster.health(secondary)["replicas"] == 0
    status, body = c.get("/count")
    assert body["counter"] == 1


def test_regenerate_id_keeps_data_and_kills_old_id(make_cluster):
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    old_token, (old_sid, _, _) = c.token, c.route
    status, body = c.get("/regenerate")
    assert body["counter"] == 1 and c.route[0] != old_sid
    c.get("/count")
    new_token = c.token
    c.token = old_token
    status, body = c.get("/count")
    assert body["counter"] == 1  # the old id is gone: a fresh session
    c.token = new_token
    assert c.get("/peek")[1]["counter"] == 2


def test_a_link_rendered_after_regenerate_id_names_the_new_id_and_its_secondary(make_cluster):
    # URL rewriting: the response that regenerates the id renders links with the new token
    # (the old one ends with that response), naming the secondary its copy then goes to
    cluster = make_cluster().start(proxy=False)
    c = Client(cluster.url("s1"), cookies=False)
    c.get("/count")
    old_token, old_sid = c.token, c.route[0]
    status, body = c.get(c.next_path.replace("/count", "/regenerate", 1))
    assert status == 200 and body["counter"] == 1
    sid, primary, secondary = c.route  # (the token of the link the response rendered)
    assert sid != old_sid and primary == "s1" and secondary == body["secondary"]
    cluster.kill("s1")
    status, body = get_after_kill(c, c.next_path, base=cluster.url(secondary))
    assert status == 200 and body["counter"] == 2  # the copy is there, under the new id
    c.token, c.next_path = old_token, f"/count;jsessionid={old_token}"
    status, body = c.get(base=cluster.url(secondary))
    assert body["counter"] == 1  # the old id names nothing: a fresh session


def test_hung_secondary_is_replaced(make_cluster):
    cluster = make_cluster(cluster={"replication_timeout_s": 0.5}).start(proxy=False)
    c = Client(cluster.url("s1"))
    c.get("/count")
    _, _, secondary = c.route
    cluster.kill(secondary, signal.SIGSTOP)
    try:
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 2
        assert c.route[2] not in (secondary, "NONE")
    finally:
        cluster.kill(secondary, signal.SIGCONT)
