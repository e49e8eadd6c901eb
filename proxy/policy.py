"""Failover and retry decisions (docs/architecture.md, the life of a request), as pure
functions.

What may be sent again after a failure depends on what the failure was (its class: see
`errors.py`), whether the request body is still held in full, and `proxy.retry`.
"""

from __future__ import annotations

from .errors import UpstreamError

__all__ = ["IDEMPOTENT", "may_retry", "may_retry_same"]

# RFC 9110 idempotent methods: what `proxy.retry = "idempotent"` re-sends after a failure.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})


def may_retry(exc: UpstreamError, *, method: bytes, policy: str, replayable: bool,
              sent_before: bool) -> bool:
    """May the request go to the next candidate after `exc`?

    `replayable`: every body byte received so far is still held; `sent_before`: an
    earlier attempt already wrote the request somewhere (so a new one needs a replay).
    """
    if exc.nothing_sent and not sent_before:
        return True  # connect failure on the first attempt: the body has not moved
    if not replayable:
        return False  # the body streamed through and is gone
    if exc.nothing_sent or not exc.method_sensitive:
        return True  # never reached an application, or the server declined it (503)
    return policy == "all" or (policy == "idempotent" and method in IDEMPOTENT)


def may_retry_same(exc: UpstreamError, *, method: bytes, policy: str, replayable: bool,
                   reused: bool, already: bool) -> bool:
    """After a connection died before any response byte: may the request go once more to
    the same backend, on a fresh connection, before failing over?

    Only when the dead connection was a reused keep-alive one (the backend most likely
    closed it while idle, so it is probably alive) or the request was never written. A
    request that was written may have reached the application: the retry policy decides,
    exactly as for a failover (`exc` is `UpstreamResetAfterSend` then)."""
    if already or not (reused or exc.nothing_sent):
        return False
    return may_retry(exc, method=method, policy=policy, replayable=replayable,
                     sent_before=True)
