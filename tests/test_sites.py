"""Two sites (docs/sites.md), end to end: two clusters of 3 real servers each with their
proxies. Sessions are made at site A; the tests kill all of A (kill -9), cut A off, or end
sessions, and look at what site B does with them."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.token import Route, TokenCodec
from tests.cluster import Client
from tests.sites import SECRETS, TwoSites

WRITES = 5  # acknowledged writes per session before the kill


@pytest.fixture
def two_sites(tmp_path: Path) -> Iterator[type[TwoSites]]:
    made: list[TwoSites] = []

    def factory(**kwargs: object) -> TwoSites:
        where = tmp_path / f"s{len(made)}"
        where.mkdir()
        sites = TwoSites(where, **kwargs)  # type: ignore[arg-type]
        made.append(sites)
        return sites

    yield factory  # type: ignore[misc]
    for sites in made:
        sites.close()


def sessions_at_a(sites: TwoSites, count: int, writes: int) -> list[Client]:
    clients = []
    for _ in range(count):
        c = Client(sites.a.proxy_url)
        for n in range(1, writes + 1):
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == n, body
            assert body["server"].startswith("a")
        clients.append(c)
    return clients


def continue_at_b(sites: TwoSites, clients: list[Client]) -> list[int]:
    """One more write per session through B's proxy; the counter each one found."""
    found = []
    for c in clients:
        status, body = c.get("/count", base=sites.b.proxy_url)
        assert status == 200, body
        assert body["server"].startswith("b"), body
        assert c.route[1].startswith("b")  # the token now names B's servers
        found.append(body["counter"] - 1)
    return found


def test_man_kill_site_a_every_session_continues_at_b(two_sites):
    sites = two_sites(mode="man").start()
    clients = sessions_at_a(sites, 20, WRITES)
    # cluster affinity: B's proxy sends a site-A session to site A while A is up
    status, body = clients[0].get("/peek", base=sites.b.proxy_url)
    assert status == 200 and body["server"].startswith("a") and body["counter"] == WRITES

    sites.kill_site("a")

    found = continue_at_b(sites, clients)
    lost = sum(WRITES - f for f in found)
    assert lost == 0, found
    taken = sum(sites.b.health(s)["stats"]["site_taken_over"] for s in sites.b.servers)
    assert taken == len(clients)
    # and they live on at B: plain affinity, the next write where the token says
    for c in clients:
        status, body = c.get("/count", base=sites.b.proxy_url)
        assert status == 200 and body["counter"] == WRITES + 2
        assert body["server"] == c.route[1]
