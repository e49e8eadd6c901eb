"""Errors of the proxy tier, one root (`ProxyError`); retry decisions are made by class.

Upstream errors carry three class-level facts the failover policy reads:
`nothing_sent` (the request never left: failing over is always safe), `method_sensitive`
(the request may have been processed: `proxy.retry` decides) and `marks_bad` (the backend
is skipped for `proxy.max_skip_s`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = [
    "ProxyError",
    "ClientError",
    "ClientProtocolError",
    "HeadTooLarge",
    "BodyTooLarge",
    "MethodNotAllowed",
    "ExpectationFailed",
    "UnsupportedTransferCoding",
    "UnsupportedVersion",
    "UpstreamError",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamResetAfterSend",
    "UpstreamUnwritten",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "UpstreamProtocolError",
    "UnknownBackend",
    "BadStateTransition",
    "SyncError",
    "map_connect_errors",
]


class ProxyError(Exception):
    """Root of every error raised by `proxy`."""


# --- what a client sent (answered with `status`, then the connection is closed) -------------


class ClientError(ProxyError):
    """The client sent a request the proxy refuses to forward."""

    status = 400
    reason = b"Bad Request"


class ClientProtocolError(ClientError):
    """Malformed or ambiguous HTTP/1.x (smuggling vectors included): 400."""


class HeadTooLarge(ClientError):
    """Request line and headers exceed `proxy.max_head_bytes`: 431."""

    status = 431
    reason = b"Request Header Fields Too Large"


class BodyTooLarge(ClientError):
    """Request body exceeds `proxy.max_body_bytes`: 413."""

    status = 413
    reason = b"Content Too Large"


class MethodNotAllowed(ClientError):
    """CONNECT: a reverse proxy does not open tunnels to arbitrary hosts: 405."""

    status = 405
    reason = b"Method Not Allowed"


class ExpectationFailed(ClientError):
    """An `Expect` other than 100-continue: 417."""

    status = 417
    reason = b"Expectation Failed"


class UnsupportedTransferCoding(ClientError):
    """A transfer coding other than chunked: 501."""

    status = 501
    reason = b"Not Implemented"


class UnsupportedVersion(ClientError):
    """An HTTP version other than 1.0 and 1.1: 505."""

    status = 505
    reason = b"HTTP Version Not Supported"


# --- what happened with a backend -------------------------------------------------------------


class UpstreamError(ProxyError):
    """A request could not be completed by one backend."""

    cause = "error"  # label in logs and metrics
    nothing_sent = False
    method_sensitive = True
    marks_bad = False

    def __init__(self, message: str, *, backend_id: str, attempt: int = 0) -> None:
        super().__init__(f"{backend_id}: {message}")
        self.backend_id = backend_id
        self.attempt = attempt


class UpstreamConnectError(UpstreamError, ConnectionError):
    """The connection to the backend could not be opened (refused, reset, unreachable)."""

    cause = "connect"
    nothing_sent = True
    method_sensitive = False
    marks_bad = True


class UpstreamConnectTimeout(UpstreamConnectError, TimeoutError):
    """The connection was not established within `proxy.connect_timeout_s`."""

    cause = "connect_timeout"


class UpstreamResetAfterSend(UpstreamError, ConnectionError):
    """The connection closed after the request was sent and before a status line."""

    cause = "reset"


class UpstreamUnwritten(UpstreamError, ConnectionError):
    """A pooled connection refused the request's first write: it was dead already, and no
    byte of the request reached the backend."""

    cause = "unwritten"
    nothing_sent = True
    method_sensitive = False


class UpstreamTimeout(UpstreamError, TimeoutError):
    """The backend was silent for `proxy.io_timeout_s`."""

    cause = "timeout"
    marks_bad = True


class UpstreamUnavailable(UpstreamError):
    """The backend answered 503: server-initiated failover, whatever the method."""

    cause = "503"
    method_sensitive = False
    marks_bad = True


class UpstreamProtocolError(UpstreamError):
    """The backend sent something that is not a valid HTTP/1.1 response."""

    cause = "bad_response"


# --- the backend table ------------------------------------------------------------------------


class UnknownBackend(ProxyError, LookupError):
    """No backend with that id is in the table."""

    def __init__(self, backend_id: str, known: list[str]) -> None:
        super().__init__(f"no backend {backend_id!r}; known: {', '.join(known) or 'none'}")
        self.backend_id = backend_id


class BadStateTransition(ProxyError, ValueError):
    """A requested backend state is not one of up, draining, down."""

    def __init__(self, value: str) -> None:
        super().__init__(f"unknown backend state {value!r}: send one of up, draining, down")
        self.value = value


# --- front ends (`tandem sync`) ---------------------------------------------------------------


class SyncError(ProxyError):
    """HAProxy's Runtime API or nginx's file or reload refused or failed (`where` names it)."""

    def __init__(self, message: str, *, where: str) -> None:
        super().__init__(message)
        self.where = where


@contextmanager
def map_connect_errors(backend_id: str) -> Iterator[None]:
    """Translate OSError and timeouts of a connection attempt to UpstreamConnectError."""
    try:
        yield
    except TimeoutError as exc:
        raise UpstreamConnectTimeout("connect timed out", backend_id=backend_id) from exc
    except OSError as exc:
        text = exc.strerror or type(exc).__name__
        raise UpstreamConnectError(f"connect failed: {text}", backend_id=backend_id) from exc
