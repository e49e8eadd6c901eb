"""Retry decisions by error class, body replayability and `proxy.retry` (pure)."""

from __future__ import annotations

import pytest

from proxy.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamResetAfterSend,
    UpstreamTimeout,
    UpstreamUnavailable,
    UpstreamUnwritten,
)
from proxy.policy import may_retry, may_retry_same

CONNECT = UpstreamConnectError("refused", backend_id="s1")
RESET = UpstreamResetAfterSend("reset", backend_id="s1")
TIMEOUT = UpstreamTimeout("slow", backend_id="s1")
UNAVAILABLE = UpstreamUnavailable("503", backend_id="s1")


@pytest.mark.parametrize("policy", ["idempotent", "all", "none"])
@pytest.mark.parametrize("method", [b"GET", b"POST"])
def test_connect_failures_always_fail_over_before_anything_was_sent(policy, method):
    for exc in (CONNECT, UpstreamConnectTimeout("t", backend_id="s1")):
        assert may_retry(exc, method=method, policy=policy, replayable=False,
                         sent_before=False)


@pytest.mark.parametrize(("policy", "method", "expected"), [
    ("idempotent", b"GET", True), ("idempotent", b"PUT", True),
    ("idempotent", b"DELETE", True), ("idempotent", b"POST", False),
    ("idempotent", b"PATCH", False), ("all", b"POST", True), ("none", b"GET", False),
])
def test_after_send_failures_follow_the_retry_policy(policy, method, expected):
    for exc in (RESET, TIMEOUT, UpstreamProtocolError("junk", backend_id="s1")):
        assert may_retry(exc, method=method, policy=policy, replayable=True,
                         sent_before=True) is expected


def test_nothing_is_retried_once_the_body_is_gone():
    for exc in (RESET, TIMEOUT, UNAVAILABLE):
        assert not may_retry(exc, method=b"GET", policy="all", replayable=False,
                             sent_before=True)
    # a later connect failure needs a replay too
    assert not may_retry(CONNECT, method=b"GET", policy="all", replayable=False,
                         sent_before=True)


def test_503_fails_over_whatever_the_method_when_replayable():
    assert may_retry(UNAVAILABLE, method=b"POST", policy="none", replayable=True,
                     sent_before=True)


def test_error_classes_carry_the_standard_bases_and_context():
    assert isinstance(TIMEOUT, TimeoutError) and isinstance(RESET, ConnectionError)
    assert isinstance(UpstreamConnectTimeout("t", backend_id="s2"), TimeoutError)
    assert CONNECT.backend_id == "s1" and CONNECT.marks_bad and not RESET.marks_bad


def test_same_backend_retry_after_a_dead_connection():
    ok = dict(method=b"GET", policy="idempotent", replayable=True, reused=True, already=False)
    # written on a reused keep-alive connection: after-send, the retry policy decides
    assert may_retry_same(RESET, **ok)
    assert not may_retry_same(RESET, **{**ok, "reused": False})  # a fresh connection failed
    assert not may_retry_same(RESET, **{**ok, "already": True})
    assert not may_retry_same(RESET, **{**ok, "replayable": False})
    assert not may_retry_same(RESET, **{**ok, "method": b"POST"})
    assert may_retry_same(RESET, **{**ok, "method": b"POST", "policy": "all"})
    assert not may_retry_same(RESET, **{**ok, "policy": "none"})
    # the write itself failed: nothing reached the backend, any method goes again
    unwritten = UpstreamUnwritten("dead", backend_id="s1")
    assert unwritten.nothing_sent and not unwritten.marks_bad
    for policy in ("idempotent", "none"):
        assert may_retry_same(unwritten, **{**ok, "method": b"POST", "policy": policy})
    assert not may_retry_same(unwritten, **{**ok, "replayable": False})  # the body moved
    assert not may_retry_same(unwritten, **{**ok, "already": True})
