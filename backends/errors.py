"""Errors of the backend runtime: sessions and the replication channel.

The contract's errors (cluster file, route token) are defined in `tandem.errors` and
re-exported here, so `except backends.errors.ConfigError` keeps working.
"""

from __future__ import annotations

from tandem.errors import BadSignature, ClusterError, ConfigError, MalformedToken, TokenError

__all__ = [
    "ClusterError",
    "ConfigError",
    "TokenError",
    "BadSignature",
    "MalformedToken",
    "SessionError",
    "SessionInvalidated",
    "SessionTooLarge",
    "ReplicationError",
    "PeerUnavailable",
    "PeerTimeout",
    "HandshakeFailed",
    "TlsHandshakeFailed",
    "ProtocolViolation",
    "SessionMoved",
    "NotServing",
    "ForwardError",
]


# --- sessions -------------------------------------------------------------------------------


class SessionError(ClusterError):
    """Misuse of a session object by application code."""


class SessionInvalidated(SessionError, RuntimeError):
    """The session was invalidated earlier in this request and can no longer be used."""


class SessionTooLarge(SessionError, ValueError):
    """An assignment would make the session larger than `session.max_session_bytes`;
    nothing of it is kept."""

    def __init__(self, key: str, *, size: int, limit: int) -> None:
        super().__init__(f"session[{key!r}]: the session would hold {size} bytes, over "
                         f"session.max_session_bytes = {limit}; nothing was assigned")
        self.key = key
        self.size = size
        self.limit = limit


# --- replication channel --------------------------------------------------------------------


class ReplicationError(ClusterError):
    """A replication-channel operation with a peer failed."""

    def __init__(self, message: str, *, peer: str) -> None:
        super().__init__(f"{peer}: {message}")
        self.peer = peer


class PeerUnavailable(ReplicationError, ConnectionError):
    """The peer is failed, unreachable, or its connection closed mid-call."""


class PeerTimeout(ReplicationError, TimeoutError):
    """The peer did not answer within the replication timeout."""


class HandshakeFailed(ReplicationError, PermissionError):
    """The peer failed the challenge-response handshake (wrong or no cluster secret)."""


class TlsHandshakeFailed(HandshakeFailed):
    """The TLS handshake with a peer failed, or its certificate names another server
    (logged where it is raised, once per peer and reason in a while)."""

    def __init__(self, message: str, *, peer: str, remote: str) -> None:
        super().__init__(message, peer=peer)
        self.remote = remote


class ProtocolViolation(ReplicationError):
    """The peer sent a frame that is not valid replication protocol."""


class SessionMoved(ReplicationError):
    """Another server took this session over while this request ran; it was not committed."""

    state = "moved"  # X-Tandem-State of the 503 the request gets


class NotServing(SessionMoved):
    """This server may not acknowledge the request's session now; nothing of it is
    acknowledged, and the 503's `X-Tandem-State` says why (docs/consistency.md):
    `minority` (no lease: cut off from the majority), `starting` (not yet admitted to the
    view), `fenced` (removed from the view), `unprotected` (the secondary the view names
    cannot be reached, and the view has not removed it)."""

    def __init__(self, message: str, *, peer: str, state: str) -> None:
        super().__init__(message, peer=peer)
        self.state = state


# --- forwarding to a session's primary (backends/serve/forward.py) --------------------------


class ForwardError(ClusterError):
    """A request forwarded to its session's primary got no whole answer from it.

    `sent`: some of the request was written (the primary may have run it); `answered`: its
    response head arrived (it was relayed, and only its body is short)."""

    def __init__(self, message: str, *, peer: str, sent: bool, answered: bool = False) -> None:
        super().__init__(f"{peer}: {message}")
        self.peer = peer
        self.sent = sent
        self.answered = answered
