"""Errors of the contract both tiers share: the cluster file and the route token.

`ClusterError` is the root of every tandem error; the backend runtime's own errors
(sessions, the replication channel) are in `backends.errors`.
"""

from __future__ import annotations

__all__ = ["ClusterError", "ConfigError", "TokenError", "BadSignature", "MalformedToken"]


class ClusterError(Exception):
    """Root of every error raised by tandem (both tiers)."""


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
