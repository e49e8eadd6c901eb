"""Replica-aware httpx transports: `TandemTransport` (sync) and `AsyncTandemTransport`.

    cluster = Cluster({"s1": "10.0.0.1:9001", "s2": "10.0.0.2:9001", "s3": "10.0.0.3:9001"})
    client = httpx.Client(base_url="http://orders", transport=TandemTransport(cluster))

The URL's host names the cluster, not a server: each request goes to the server its token
names (the cookie jar of the `httpx.Client` keeps the token, as for any cookie), and fails
over by the rules of `tandem.client.policy`. The scheme is kept (https: TLS to each server,
with the `verify` / `cert` given here, passed to httpx's own transport).
"""

from __future__ import annotations

import ssl
from typing import Any

from .attempts import REQUEST_ID_HEADER, Attempts
from .cluster import Cluster, Target
from .errors import MissingDependency, NoServerAvailable
from .policy import Failure

try:
    import httpx
except ImportError as exc:  # an optional dependency: pip install 'tandem-proxy[client]'
    raise MissingDependency(library="httpx") from exc

__all__ = ["TandemTransport", "AsyncTandemTransport", "HttpxNoServerAvailable"]

_STATE_HEADER = "x-tandem-state"
_CLUSTER_HEADER = "x-tandem-cluster"


class HttpxNoServerAvailable(httpx.ConnectError, NoServerAvailable):
    """No server of the cluster could take the request (an `httpx.ConnectError` too)."""

    def __init__(self, message: str, *, request: httpx.Request, tried: list[str]) -> None:
        httpx.ConnectError.__init__(self, message, request=request)
        self.method = request.method
        self.tried = tuple(tried)


def _failure(exc: httpx.TransportError) -> Failure | None:
    """What an httpx error means for failover; None: not a server's failure (raise it)."""
    if isinstance(exc, httpx.ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, httpx.ConnectError):
        cause: BaseException | None = exc
        while cause is not None:  # a certificate every server would fail the same way
            if isinstance(cause, ssl.SSLCertVerificationError):
                return None
            cause = cause.__cause__ or cause.__context__
        return Failure.CONNECT
    if isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)):
        return Failure.TIMEOUT
    if isinstance(exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)):
        return Failure.RESET
    return None  # pool timeout, a local protocol error, an unsupported scheme...


def _start(cluster: Cluster, request: httpx.Request) -> Attempts:
    cookie = "; ".join(request.headers.get_list("cookie")) or None
    target = request.url.raw_path.decode("ascii")
    return Attempts(cluster, method=request.method,
                    route=cluster.route_of(cookie, target),
                    # bytes can be sent again; a stream may be consumed by then
                    replayable=isinstance(request.stream, httpx.ByteStream),
                    request_id=request.headers.get(REQUEST_ID_HEADER))


def _to(request: httpx.Request, target: Target, attempts: Attempts) -> httpx.Request:
    """The request as sent to `target`: its address in the URL, the caller's Host kept."""
    url = request.url.copy_with(host=target.address.host, port=target.address.port)
    headers = request.headers.copy()
    headers.update(attempts.headers())
    return httpx.Request(request.method, url, headers=headers, stream=request.stream,
                         extensions=request.extensions)


def _give_up(attempts: Attempts, request: httpx.Request) -> Exception:
    if attempts.maybe_applied and isinstance(attempts.last_error, Exception):
        return attempts.last_error  # the last one may have been applied: not "no server"
    error = HttpxNoServerAvailable(attempts.exhausted(), request=request, tried=attempts.tried)
    error.__cause__ = attempts.last_error
    return error


class TandemTransport(httpx.BaseTransport):
    """A sync httpx transport that sends each request to its session's primary and fails
    over to the secondary, then to the other live servers of the cluster."""

    def __init__(self, cluster: Cluster, *, transport: httpx.BaseTransport | None = None,
                 **http_options: Any) -> None:
        """`transport`: the one that talks to each server (default: `httpx.HTTPTransport`
        made with `http_options`: verify, cert, trust_env, limits, http2...)."""
        self.cluster = cluster
        self._inner = transport if transport is not None else httpx.HTTPTransport(
            **http_options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        attempts = _start(self.cluster, request)
        for target in attempts:
            try:
                response = self._inner.handle_request(_to(request, target, attempts))
            except httpx.TransportError as exc:
                failure = _failure(exc)
                if failure is not None and attempts.failed(target, failure, exc):
                    continue
                raise
            if response.status_code == 503 and attempts.declined(
                    target, response.headers.get(_STATE_HEADER)):
                response.read()  # (small) and the connection goes back to the pool
                response.close()
                continue
            attempts.answered(target, status=response.status_code,
                              cluster_header=response.headers.get(_CLUSTER_HEADER))
            return response
        raise _give_up(attempts, request)

    def close(self) -> None:
        self._inner.close()


class AsyncTandemTransport(httpx.AsyncBaseTransport):
    """The async twin of `TandemTransport` (for `httpx.AsyncClient`)."""

    def __init__(self, cluster: Cluster, *,
                 transport: httpx.AsyncBaseTransport | None = None,
                 **http_options: Any) -> None:
        """`transport`: the one that talks to each server (default:
        `httpx.AsyncHTTPTransport` made with `http_options`)."""
        self.cluster = cluster
        self._inner = transport if transport is not None else httpx.AsyncHTTPTransport(
            **http_options)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        attempts = _start(self.cluster, request)
        for target in attempts:
            try:
                response = await self._inner.handle_async_request(
                    _to(request, target, attempts))
            except httpx.TransportError as exc:
                failure = _failure(exc)
                if failure is not None and attempts.failed(target, failure, exc):
                    continue
                raise
            if response.status_code == 503 and attempts.declined(
                    target, response.headers.get(_STATE_HEADER)):
                await response.aread()
                await response.aclose()
                continue
            attempts.answered(target, status=response.status_code,
                              cluster_header=response.headers.get(_CLUSTER_HEADER))
            return response
        raise _give_up(attempts, request)

    async def aclose(self) -> None:
        await self._inner.aclose()
