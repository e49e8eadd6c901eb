"""What the client knows of the cluster: its servers' http addresses, the view it learned
from them, and which servers to skip for a while. One `Cluster` is shared by every
transport and adapter that calls the same cluster (thread-safe: a lock guards the table).

Candidate order for a request (the proxy's, docs/architecture.md):
1. the session's primary, then its secondary, when known and not marked bad;
2. the other servers of the view, round-robin (one of them fetches the session);
3. servers the view no longer lists (last resort: a seed not heard of since, say);
4. the servers marked bad, in the same order: tried last, before giving up.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from tandem.address import Address
from tandem.token import Route
from tandem.view import is_newer, parse_cluster_header

from .errors import ClusterSpecError
from .policy import RETRY_CHOICES
from .tokens import route_of_request

__all__ = ["Cluster", "Target"]

log = structlog.get_logger("tandem.client")


@dataclass(frozen=True, slots=True)
class Target:
    """One server to send an attempt to: its id (None for a seed not identified yet)."""

    server: str | None
    address: Address

    @property
    def name(self) -> str:
        return self.server or str(self.address)


class _Server:
    __slots__ = ("target", "in_view", "bad_until")

    def __init__(self, target: Target) -> None:
        self.target = target
        self.in_view = True  # listed by the last view learned (all are, before the first)
        self.bad_until = 0.0  # monotonic time before which it is skipped (tried last)


class Cluster:
    """The servers of one tandem cluster as a replica-aware caller sees them.

    `servers`: the seeds, as `{"s1": "10.0.0.1:9001", ...}` (ids known) or as addresses
    alone (`["10.0.0.1:9001", ...]`: their ids come with the first view). The client learns
    the live members from every backend's `X-Tandem-Cluster` answer.
    """

    def __init__(self, servers: Mapping[str, str] | Iterable[str], *,
                 cookie_name: str = "JSESSIONID", url_rewriting: bool = True,
                 retry: str = "idempotent", max_skip_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        # configuration
        if retry not in RETRY_CHOICES:
            raise ClusterSpecError(f"must be one of {', '.join(RETRY_CHOICES)}",
                                   what="retry", value=retry)
        if max_skip_s < 0:
            raise ClusterSpecError("must be 0 or more", what="max_skip_s", value=max_skip_s)
        if not cookie_name or not cookie_name.replace("-", "").replace("_", "").isalnum():
            raise ClusterSpecError("must be letters, digits, '-' or '_'",
                                   what="cookie_name", value=cookie_name)
        self.cookie_name = cookie_name
        self.url_rewriting = url_rewriting
        self.retry = retry
        self.max_skip_s = max_skip_s
        self._clock = clock
        # the table (under the lock)
        self._lock = threading.Lock()
        self._by_id: dict[str, _Server] = {}
        self._order: list[_Server] = []  # round-robin order: seeds first, learned ones after
        if isinstance(servers, str):
            servers = [servers]  # one address (not its characters)
        pairs = (list(servers.items()) if isinstance(servers, Mapping)
                 else [(None, s) for s in servers])
        for server_id, text in pairs:
            if "://" in str(text):
                raise ClusterSpecError("a server is host:port, not a URL (the scheme is the "
                                       "caller's URL's)", what=f"server {server_id or ''}"
                                       .strip(), value=text)
            try:
                address = Address.parse(str(text))
            except ValueError as exc:
                raise ClusterSpecError(str(exc), what=f"server {server_id or ''}".strip(),
                                       value=text) from None
            if address.wildcard:
                raise ClusterSpecError("a wildcard address cannot be dialled",
                                       what=f"server {server_id or ''}".strip(), value=text)
            self._add(Target(server_id, address))
        if not self._order:
            raise ClusterSpecError("names no server", what="servers", value=servers)
        self._rr = int.from_bytes(os.urandom(2), "big")
        # the view (its number; "-": none learned yet)
        self.view = "-"
        self._view_number = -1
        self.views_learned = 0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, retry: str = "idempotent",
                  max_skip_s: float = 10.0) -> Cluster:
        """The app servers of a cluster file (witnesses host no app), with its cookie name
        and URL-rewriting setting. Its secrets are not needed: a client verifies no token.
        Raises `tandem.errors.ConfigError` naming the key, value and file."""
        from tandem.config import load  # (the config module is the heavier import)

        config = load(path, environ={})
        return cls({s.id: str(s.http) for s in config.app_servers},
                   cookie_name=config.session.cookie_name,
                   url_rewriting=config.session.url_rewriting, retry=retry,
                   max_skip_s=max_skip_s)

    def _add(self, target: Target) -> _Server:
        server = _Server(target)
        if target.server is not None:
            self._by_id[target.server] = server
        self._order.append(server)
        return server

    # --- lookups ------------------------------------------------------------------------------

    def servers(self) -> dict[str, str]:
        """The servers known by id and their http addresses (a snapshot)."""
        with self._lock:
            return {i: str(s.target.address) for i, s in self._by_id.items()}

    def in_view(self) -> list[str]:
        """The ids of the servers the last view lists (a snapshot)."""
        with self._lock:
            return [i for i, s in self._by_id.items() if s.in_view]

    def route_of(self, cookie: str | None, target: str) -> Route | None:
        """The route the request's token names (cookie, then URL), or None."""
        return route_of_request(cookie, target, cookie_name=self.cookie_name,
                                url_rewriting=self.url_rewriting)

    def candidates(self, route: Route | None) -> list[Target]:
        """Servers to try for a request, in order (never empty: every server is listed)."""
        with self._lock:
            now = self._clock()
            n = len(self._order)
            start = self._rr % n
            self._rr += 1
            rotated = self._order[start:] + self._order[:start]
            own: list[_Server] = []
            if route is not None:
                for server_id in (route.primary, route.secondary):
                    s = self._by_id.get(server_id) if server_id else None
                    if s is not None and s not in own:
                        own.append(s)
            eligible = own + [s for s in rotated if s not in own]
            out = [s for s in eligible if s.in_view and s.bad_until <= now]
            out += [s for s in eligible if not s.in_view and s.bad_until <= now]
            out += [s for s in eligible if s.bad_until > now]
            return [s.target for s in out]

    # --- marks --------------------------------------------------------------------------------

    def _find(self, target: Target) -> _Server | None:
        if target.server is not None:
            return self._by_id.get(target.server)
        return next((s for s in self._order if s.target == target), None)

    def mark_bad(self, target: Target) -> None:
        """Skip this server for `max_skip_s` (connect failure, timeout, server-wide 503)."""
        if self.max_skip_s <= 0:
            return
        with self._lock:
            s = self._find(target)
            if s is not None:
                s.bad_until = self._clock() + self.max_skip_s

    def seen_alive(self, target: Target) -> None:
        """The server answered (not 503): its bad mark is cleared."""
        with self._lock:
            s = self._find(target)
            if s is not None and s.bad_until:
                s.bad_until = 0.0

    # --- the view -----------------------------------------------------------------------------

    def learn(self, header: str, *, declined: Target | None = None) -> bool:
        """Adopt the view of an `X-Tandem-Cluster` header if it is newer than ours (True
        when adopted). Its members are alive: their bad marks are cleared, except
        `declined`'s (the server whose 503 carried it)."""
        try:
            view, members = parse_cluster_header(header)
        except ValueError as exc:
            log.warning("client_bad_cluster_header", error=str(exc))
            return False
        with self._lock:
            if not is_newer(view, number=self._view_number, known=self.view):
                return False  # the same, or an older one (a server in a minority)
            added = []
            addresses = set(members.values())
            # seeds known only by address are identified now (or stay, out of the view)
            self._order = [s for s in self._order
                           if s.target.server is not None or s.target.address not in addresses]
            for server_id, address in members.items():
                s = self._by_id.get(server_id)
                if s is None or s.target.address != address:
                    if s is not None:
                        self._order.remove(s)
                    s = self._add(Target(server_id, address))
                    added.append(server_id)
                if declined is None or s.target != declined:
                    s.bad_until = 0.0
            for s in self._order:
                s.in_view = s.target.server in members
            self.view = view
            self._view_number = int(view) if view.isdigit() else self._view_number
            self.views_learned += 1
        log.info("client_view_learned", view=view, members=sorted(members), added=added)
        return True
