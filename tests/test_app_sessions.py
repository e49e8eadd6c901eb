"""Application sessions (rooms) end to end: real backends, members on several servers."""

from __future__ import annotations

import pytest

from tests.cluster import Client

APPS = ["tests.room_apps:asgi_rooms", "tests.room_apps:wsgi_rooms"]


@pytest.mark.parametrize("app", APPS, ids=["asgi", "wsgi"])
def test_members_on_three_servers_share_one_room(make_cluster, app):
    cluster = make_cluster(app=app).start(proxy=False)
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
