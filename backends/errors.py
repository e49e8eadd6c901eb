"""Errors of the backend runtime and of the contract modules (config, route token)."""

from __future__ import annotations

__all__ = [
    "ClusterError",
    "ConfigError",
    "TokenError",
    "BadSignature",
    "MalformedToken",
    "SessionError",
    "SessionInvalidated",
    "ReplicationError",
    "PeerUnavailable",
    "PeerTimeout",
    "HandshakeFailed",
    "ProtocolViolation",
    "SessionMoved",
]


class ClusterError(Exception):
    """Root of every error raised by `backends`."""


# --- configuration --------------------------------------------------------------------------


class ConfigError(ClusterError, ValueError):
    """A cluster file key is unknown, missing or holds a bad value."""

    def __init__(self, message: str, *, key: str, value: object = None, file: str = "") -> None:
        where = f" in {file}" if file else ""
        super().__init__(f"{key}: {message} (got {value!r}){where}")
        self.key = key
        self.value = value
        self.file = file


# --- route token ----------------------------------------------------------------------------


class TokenError(ClusterError):
    """A route token could not be used; the request is treated as carrying no session."""


class BadSignature(TokenError):
    """The token's signature does not verify with any configured secret."""


class MalformedToken(TokenError):
    """The token verified but its payload is not `SID!PRIMARY!SECONDARY`."""


# --- sessions -------------------------------------------------------------------------------


class SessionError(ClusterError):
    """Misuse of a session object by application code."""


class SessionInvalidated(SessionError, RuntimeError):
    """The session was invalidated earlier in this request and can no longer be used."""


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


class ProtocolViolation(ReplicationError):
    """The peer sent a frame that is not valid replication protocol."""


class SessionMoved(ReplicationError):
    """Another server took this session over while this request ran; it was not committed."""
