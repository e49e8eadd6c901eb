"""A replica-aware requests adapter: `TandemAdapter`, mounted on a `requests.Session`.

    cluster = Cluster({"s1": "10.0.0.1:9001", "s2": "10.0.0.2:9001", "s3": "10.0.0.3:9001"})
    session = requests.Session()
    session.mount("http://orders/", TandemAdapter(cluster))
    session.get("http://orders/cart")

The mounted prefix's host names the cluster, not a server: each request goes to the server
its token names (the Session's cookie jar keeps the token), and fails over by the rules of
`tandem.client.policy`. The scheme is kept; https uses the Session's `verify` and `cert`.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from .attempts import REQUEST_ID_HEADER, Attempts
from .cluster import Cluster, Target
from .errors import MissingDependency, NoServerAvailable
from .policy import Failure

try:
    import requests
    import urllib3.exceptions
    from requests.adapters import HTTPAdapter
    from requests.cookies import RequestsCookieJar, extract_cookies_to_jar
except ImportError as exc:  # an optional dependency: pip install 'tandem-proxy[client]'
    raise MissingDependency(library="requests") from exc

__all__ = ["TandemAdapter", "RequestsNoServerAvailable"]


class RequestsNoServerAvailable(requests.exceptions.ConnectionError, NoServerAvailable):
    """No server of the cluster could take the request (a `requests.ConnectionError` too)."""

    def __init__(self, message: str, *, request: requests.PreparedRequest,
                 tried: list[str]) -> None:
        requests.exceptions.ConnectionError.__init__(self, message, request=request)
        self.method = request.method or ""
        self.tried = tuple(tried)


def _failure(exc: requests.exceptions.RequestException) -> Failure | None:
    """What a requests error means for failover; None: not a server's failure (raise it)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return None  # a certificate every server would fail the same way
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return Failure.CONNECT_TIMEOUT
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return Failure.TIMEOUT
    if isinstance(exc, requests.exceptions.ConnectionError):
        reason = exc.args[0] if exc.args else None
        if isinstance(reason, urllib3.exceptions.MaxRetryError):
            reason = reason.reason
        if isinstance(reason, urllib3.exceptions.NewConnectionError):
            return Failure.CONNECT  # (before ConnectTimeoutError: it subclasses it)
        if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
            return Failure.CONNECT_TIMEOUT
        return Failure.RESET  # aborted after the request was written (or while)
    return None


class TandemAdapter(HTTPAdapter):
    """Sends each request to its session's primary and fails over to the secondary, then
    to the other live servers of the cluster. urllib3's own retries are off: failing over
    is this adapter's."""

    def __init__(self, cluster: Cluster, *, pool_connections: int = 10,
                 pool_maxsize: int = 10, pool_block: bool = False) -> None:
        self.cluster = cluster
        super().__init__(pool_connections=pool_connections, pool_maxsize=pool_maxsize,
                         max_retries=0, pool_block=pool_block)

    def send(self, request: requests.PreparedRequest, stream: bool = False,
             timeout: None | float | tuple[float, float] | tuple[float, None] = None,
             verify: bool | str = True, cert: None | bytes | str | tuple[bytes | str,
                                                                         bytes | str] = None,
             proxies: Mapping[str, str] | None = None) -> requests.Response:
        url = request.url or ""
        parts = urlsplit(url)
        target_path = parts.path + ("?" + parts.query if parts.query else "")
        cookie = request.headers.get("Cookie")
        attempts = Attempts(self.cluster, method=request.method or "GET",
                            route=self.cluster.route_of(cookie, target_path),
                            replayable=request.body is None
                            or isinstance(request.body, (bytes, str)),
                            request_id=request.headers.get(REQUEST_ID_HEADER))
        for target in attempts:
            try:
                response = super().send(self._to(request, parts.netloc, target, attempts),
                                        stream=stream, timeout=timeout, verify=verify,
                                        cert=cert, proxies=proxies)
            except requests.exceptions.RequestException as exc:
                failure = _failure(exc)
                if failure is not None and attempts.failed(target, failure, exc):
                    continue
                raise
            if response.status_code == 503 and attempts.declined(
                    target, response.headers.get("X-Tandem-State")):
                response.content  # noqa: B018 - read (small), so its connection is reused
                response.close()
                continue
            attempts.answered(target, status=response.status_code,
                              cluster_header=response.headers.get("X-Tandem-Cluster"))
            return self._as_sent(response, request)
        if attempts.maybe_applied and isinstance(attempts.last_error, Exception):
            raise attempts.last_error
        raise RequestsNoServerAvailable(attempts.exhausted(), request=request,
                                        tried=attempts.tried) from attempts.last_error

    @staticmethod
    def _to(request: requests.PreparedRequest, netloc: str, target: Target,
            attempts: Attempts) -> requests.PreparedRequest:
        """The request as sent to `target`: its address in the URL, the caller's Host kept
        (a copy: the Session files cookies under the URL the caller asked for)."""
        sent = request.copy()
        parts = urlsplit(request.url or "")
        sent.url = urlunsplit(parts._replace(netloc=str(target.address)))
        sent.headers.setdefault("Host", netloc)
        sent.headers.update(attempts.headers())
        return sent

    @staticmethod
    def _as_sent(response: requests.Response,
                 request: requests.PreparedRequest) -> requests.Response:
        """The response as the caller's request got it: its URL (redirects resolve against
        it, and stay on this adapter) and its cookies filed under the caller's host."""
        response.request = request
        response.url = request.url or response.url
        jar = RequestsCookieJar()
        extract_cookies_to_jar(jar, request, response.raw)  # type: ignore[no-untyped-call]
        response.cookies = jar
        return response
