"""The hop mark of a forwarded request (backends.serve.hop): made under the cluster secret
for one request, and refused for any other, when forged, or when too old."""

from __future__ import annotations

import time

from backends.serve.hop import HOP_WINDOW_S, HopAuth


def mark(auth: HopAuth, rid: str = "r1", method: str = "GET", target: bytes = b"/a?b=1",
         client: str = "10.0.0.9:4711") -> bytes:
    return auth.sign(rid=rid, method=method, target=target, client=client)


def test_a_mark_verifies_for_its_own_request_and_gives_the_client():
    auth = HopAuth(("s3cret",))
    assert auth.verify(mark(auth), rid="r1", method="GET", target=b"/a?b=1") == "10.0.0.9:4711"
    assert auth.verify(mark(auth, client="-"), rid="r1", method="GET",
                       target=b"/a?b=1") == "-"


def test_a_mark_is_refused_for_another_request():
    auth = HopAuth(("s3cret",))
    m = mark(auth)
    assert auth.verify(m, rid="r2", method="GET", target=b"/a?b=1") is None
    assert auth.verify(m, rid="r1", method="POST", target=b"/a?b=1") is None
    assert auth.verify(m, rid="r1", method="GET", target=b"/a?b=2") is None
    assert auth.verify(m, rid=None, method="GET", target=b"/a?b=1") is None


def test_a_forged_or_altered_mark_is_refused():
    auth = HopAuth(("s3cret",))
    other = HopAuth(("another",))
    assert auth.verify(mark(other), rid="r1", method="GET", target=b"/a?b=1") is None
    ts, client, mac = mark(auth).split(b";")
    for forged in (b";".join((ts, b"10.6.6.6:1", mac)),  # another client address
                   b";".join((str(int(ts) + 1).encode(), client, mac)),  # another time
                   b"garbage", b"", b"1;2;3;4"):
        assert auth.verify(forged, rid="r1", method="GET", target=b"/a?b=1") is None


def test_a_mark_older_than_the_window_is_refused():
    import hashlib
    import hmac

    from backends.serve import hop

    auth = HopAuth(("s3cret",))
    key = hmac.new(b"s3cret", b"tandem.forward", hashlib.sha256).digest()
    for age in (HOP_WINDOW_S + 5, -HOP_WINDOW_S - 5):  # made long ago, or far ahead
        ts = str(int(time.time() - age))
        old = f"{ts};-;{hop._mac(key, ts, '-', 'r1', 'GET', b'/a')}".encode()
        assert auth.verify(old, rid="r1", method="GET", target=b"/a") is None
    ts = str(int(time.time() - 5))  # (the same, made 5 s ago: accepted)
    fresh = f"{ts};-;{hop._mac(key, ts, '-', 'r1', 'GET', b'/a')}".encode()
    assert auth.verify(fresh, rid="r1", method="GET", target=b"/a") == "-"


def test_every_secret_verifies_the_first_signs():
    old = HopAuth(("old",))
    rotated = HopAuth(("new", "old"))
    assert rotated.verify(mark(old), rid="r1", method="GET", target=b"/a?b=1") is not None
    assert old.verify(mark(rotated), rid="r1", method="GET", target=b"/a?b=1") is None
