"""Errors of the contract both tiers share: the cluster file, the route token, and a
process that cannot start.

`ClusterError` is the root of every tandem error; the backend runtime's own errors
(sessions, the replication channel) are in `backends.errors`.
"""

from __future__ import annotations

__all__ = ["ClusterError", "ConfigError", "TokenError", "BadSignature", "MalformedToken",
           "StartupError", "ListenError", "AppLoadError", "PlacementError"]


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


class PlacementError(ClusterError, ValueError):
    """`tandem up --host` / `--servers` names nothing of the cluster file (the message
    lists what the file has)."""

    def __init__(self, message: str, *, option: str, value: object, file: str = "") -> None:
        where = f" ({file})" if file else ""
        super().__init__(f"{option} {value}: {message}{where}")
        self.option = option
        self.value = value
        self.file = file


# --- route token ----------------------------------------------------------------------------


class TokenError(ClusterError):
    """A route token could not be used; the request is treated as carrying no session."""


class BadSignature(TokenError):
    """The token's signature does not verify with any configured secret."""


class MalformedToken(TokenError):
    """The token verified but its payload is not `SID!PRIMARY!SECONDARY`."""


# --- start-up ---------------------------------------------------------------------------------


class StartupError(ClusterError):
    """A process could not start; the message is the line a person reads."""


class ListenError(StartupError):
    """A listening address could not be bound: taken, not this host's, or not resolvable."""

    def __init__(self, *, address: str, what: str | None, reason: str,
                 errno: int | None = None) -> None:
        role = f" ({what})" if what else ""
        super().__init__(f"cannot listen on {address}{role}: {reason}")
        self.address = address
        self.what = what
        self.reason = reason
        self.errno = errno


class AppLoadError(StartupError):
    """`MODULE:ATTR` of the application does not import or names nothing there."""

    def __init__(self, *, ref: str, cause: BaseException) -> None:
        super().__init__(f"cannot load app {ref!r}: {type(cause).__name__}: {cause}")
        self.ref = ref
        self.cause = cause
