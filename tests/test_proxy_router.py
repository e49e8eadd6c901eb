"""Candidate order of the backend table (pure: no sockets)."""

from __future__ import annotations

import pytest

from proxy.errors import BadStateTransition, UnknownBackend
from proxy.router import Backend, BackendState, Router
from tandem.config import Address, ServerConfig
from tandem.token import Route


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_router(n: int = 4, max_skip_s: float = 10.0) -> tuple[Router, Clock]:
    servers = [ServerConfig(f"s{i}", Address("127.0.0.1", 9000 + i),
                            Address("127.0.0.1", 9100 + i)) for i in range(1, n + 1)]
    clock = Clock()
    return Router(servers, max_skip_s=max_skip_s, pool_factory=lambda b: None,
                  clock=clock), clock


def ids(backends: list[Backend]) -> list[str]:
    return [b.id for b in backends]


def test_primary_then_secondary_then_the_others_round_robin():
    router, _ = make_router()
    route = Route("sid", "s3", "s1")
    orders = [ids(router.candidates(route)) for _ in range(4)]
    assert all(o[:2] == ["s3", "s1"] and sorted(o[2:]) == ["s2", "s4"] for o in orders)
    assert {tuple(o[2:]) for o in orders} == {("s2", "s4"), ("s4", "s2")}


def test_new_sessions_rotate_from_a_random_start():
    router, _ = make_router()
    firsts = [router.candidates(None)[0].id for _ in range(8)]
    assert sorted(firsts) == ["s1", "s1", "s2", "s2", "s3", "s3", "s4", "s4"]
    assert firsts[:4] == firsts[4:]


def test_bad_marks_skip_until_max_skip_s_and_bad_ones_are_tried_last():
    router, clock = make_router(3)
    route = Route("sid", "s1", "s2")
    router.mark_bad(router.get("s1"))
    assert router.first(route) is None  # the primary is skipped...
    assert ids(router.candidates(route)) == ["s2", "s3", "s1"]  # ...and tried last
    assert ids(router.candidates(None))[-1] == "s1"
    router.mark_bad(router.get("s2"))
    assert ids(router.candidates(route)) == ["s3", "s1", "s2"]
    for b in router.backends:
        router.mark_bad(b)
    assert ids(router.candidates(route)) == ["s1", "s2", "s3"]  # the WebLogic rule
    assert sorted(ids(router.candidates(None))) == ["s1", "s2", "s3"]
    clock.now += 10.1
    assert ids(router.candidates(route))[0] == "s1"
    assert router.first(route) is router.get("s1")


def test_a_new_view_or_a_passing_probe_clears_bad_marks():
    router, _ = make_router(3)
    s1, s2, s3 = (router.get(i) for i in ("s1", "s2", "s3"))
    for b in (s1, s2, s3):
        router.mark_bad(b)
    view = {b.id: b.address for b in (s1, s2)}
    router.apply_view("v1", view, declined=s2)  # s2's own 503 carried the view
    assert not router.is_bad(s1) and router.is_bad(s2) and router.is_bad(s3)
    assert router.first(Route("sid", "s1", "s2")) is s1
    router.seen_alive(s3)  # what a passing health probe does
    assert not router.is_bad(s3)


def test_draining_keeps_its_sessions_but_takes_no_new_ones():
    router, _ = make_router(3)
    router.set_admin_state("s1", "draining")
    for _ in range(3):
        assert "s1" not in ids(router.candidates(None))
    assert ids(router.candidates(Route("sid", "s1", "s2")))[:2] == ["s1", "s2"]
    assert ids(router.candidates(Route("sid", "s2", "s1")))[:2] == ["s2", "s1"]


def test_down_takes_nothing_even_as_a_last_resort():
    router, _ = make_router(2)
    router.set_admin_state("s1", BackendState.DOWN)
    assert ids(router.candidates(Route("sid", "s1", "s2"))) == ["s2"]
    router.set_admin_state("s2", "down")
    assert router.candidates(Route("sid", "s1", "s2")) == []
    assert router.candidates(None) == []


def test_unhealthy_is_down_whatever_the_admin_state():
    router, _ = make_router(2)
    b = router.get("s1")
    router.set_admin_state("s1", "draining")
    assert router.set_healthy(b, False) and b.state is BackendState.DOWN
    assert router.set_healthy(b, True) and b.state is BackendState.DRAINING


def test_out_of_view_backends_come_last():
    router, _ = make_router(3)
    added = router.apply_view("v1", {"s2": Address("127.0.0.1", 9002),
                                     "s3": Address("127.0.0.1", 9003),
                                     "s7": Address("127.0.0.1", 9007)})
    assert added == ["s7"]
    order = ids(router.candidates(Route("sid", "s1", "s2")))
    assert order[0] == "s2" and order[-1] == "s1" and sorted(order[1:3]) == ["s3", "s7"]
    assert "s1" in ids(router.candidates(None))  # last resort for new sessions too
    assert ids(router.candidates(None))[-1] == "s1"
    assert router.view_tail == b"X-Tandem-View: v1\r\n\r\n"


def test_views_are_adopted_in_the_order_of_their_numbers():
    """A server cut off from the majority knows only older views: the proxy, which has seen
    a newer one, must not take its view (it would send every session there)."""
    router, _ = make_router(3)
    assert router.is_newer("4")
    router.apply_view("4", {"s2": Address("127.0.0.1", 9002),
                            "s3": Address("127.0.0.1", 9003)})
    assert not router.is_newer("4") and not router.is_newer("3")  # the isolated s1's
    assert router.is_newer("5")
    assert router.view_tail == b"X-Tandem-View: 4\r\n\r\n"


def test_unknown_ids_and_bad_states_raise_with_a_sentence():
    router, _ = make_router(2)
    with pytest.raises(UnknownBackend, match="known: s1, s2"):
        router.set_admin_state("s9", "up")
    with pytest.raises(BadStateTransition, match="one of up, draining, down"):
        router.set_admin_state("s1", "sideways")
    assert ids(router.candidates(Route("sid", "s9", None))) != []  # unknown primary: skipped


def test_a_remote_site_gets_its_own_sessions_first_and_no_new_ones():
    """Cluster affinity (docs/sites.md): a remote site's servers are tried first for its
    sessions, never for a new one, and no view of ours takes them out."""
    router, clock = make_router(2)
    for i in (1, 2):
        router.add_remote(f"r{i}", Address("127.0.0.2", 9000 + i))
    route = Route("sid", "r1", "r2")
    assert router.first(route) is router.get("r1")
    assert ids(router.candidates(route))[:2] == ["r1", "r2"]
    assert all(router.candidates(None)[0].id in ("s1", "s2") for _ in range(6))
    assert all(router.first(None).id in ("s1", "s2") for _ in range(6))
    router.apply_view("7", {"s1": Address("127.0.0.1", 9001),
                            "s2": Address("127.0.0.1", 9002)})
    assert ids(router.candidates(route))[:2] == ["r1", "r2"]
    # the remote site refuses: its servers marked bad, ours next (they take it over)
    router.mark_bad(router.get("r1"))
    router.mark_bad(router.get("r2"))
    assert router.first(route) is None
    assert sorted(ids(router.candidates(route))[:2]) == ["s1", "s2"]
