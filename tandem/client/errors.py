"""Errors of the replica-aware client, one root (`ClientError`, itself a `ClusterError`).

The httpx transport and the requests adapter raise their library's own exception classes
(so that a caller's `except httpx.ConnectError` keeps working), mixed with these: catch
either. An error after the request was sent that may not be retried is re-raised as the
library raised it, with a note saying why it was not sent elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

from tandem.errors import ClusterError

__all__ = ["ClientError", "ClusterSpecError", "NoServerAvailable", "MissingDependency"]


class ClientError(ClusterError):
    """Root of every error raised by `tandem.client`."""


# --- what the caller gave ---------------------------------------------------------------------


class ClusterSpecError(ClientError, ValueError):
    """The cluster given to the client is unusable: no server, a bad address, a bad option."""

    def __init__(self, message: str, *, what: str, value: object) -> None:
        super().__init__(f"{what}: {message} (got {value!r})")
        self.what = what
        self.value = value


class MissingDependency(ClientError, ImportError):
    """The HTTP library a transport is built on is not installed."""

    def __init__(self, *, library: str) -> None:
        super().__init__(f"tandem.client needs {library!r} for this transport: "
                         f"pip install 'tandem-proxy[client]' (or pip install {library})")
        self.library = library


# --- what happened to a request ---------------------------------------------------------------


class NoServerAvailable(ClientError):
    """Every candidate server failed the request before applying it (refused, unreachable,
    declined with 503): nothing of it was applied."""

    def __init__(self, message: str, *, method: str = "", tried: Sequence[str] = ()) -> None:
        # (defaults: the library-bound subclasses reach here through their library's
        # cooperative __init__, with the message alone, and set the attributes themselves)
        super().__init__(message)
        self.method = method
        self.tried = tuple(tried)
