"""The backend table: states, bad marks, candidate order, round-robin and the dynamic view.

Candidate order for a request (WebLogic plug-in rules, docs/architecture.md):
1. the session's primary, then its secondary, when usable (not down, not marked bad,
   in the cluster's view; draining still counts for a session that lives there);
2. the other backends that take new sessions (up), round-robin;
3. backends the cluster no longer lists in its view (last resort, not bad);
4. the eligible backends marked bad, in the same order: tried last, before giving up
   ("if all are bad, all are tried again" — for session requests too).

A bad mark is cleared when its backend is seen alive again: listed in a new cluster view,
passing an active health probe (not one that says it is draining), or answering a request
(tried last) with anything but 503. A backend out of the view comes back with the next
view that lists it, or when the active probes find the cluster settled on a view with it.

Every change to a backend's admin state, health, view membership or bad mark is shown to
`Router.observer` (the status page's clock) before and after it is made.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from tandem.config import Address, ServerConfig
from tandem.token import Route

from .errors import BadStateTransition, UnknownBackend

__all__ = ["BackendState", "Backend", "Router", "LATENCY_BOUNDS_S"]

# Upper bounds (seconds) of the per-backend latency histogram; the last bucket is +Inf.
LATENCY_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)


class BackendState(enum.Enum):
    UP = "up"  # takes new sessions and the requests of its existing sessions
    DRAINING = "draining"  # no new sessions; requests of its existing sessions still routed
    DOWN = "down"  # takes nothing: sessions fail over to their secondary

    @classmethod
    def parse(cls, text: str) -> BackendState:
        try:
            return cls(text.strip().lower())
        except ValueError:
            raise BadStateTransition(text) from None


# Module constants: attribute access on an Enum class is slow (a descriptor) in 3.11.
_UP = BackendState.UP
_DRAINING = BackendState.DRAINING
_DOWN = BackendState.DOWN


class Backend:
    """One backend server: where it is, what state it is in, what it has done."""

    __slots__ = (
        # identity
        "id", "address", "learned", "remote",
        # state
        "state", "admin_state", "healthy", "bad_until", "in_view", "pool",
        "probe_successes", "probe_failures", "says_draining",
        # counters (rendered at scrape time)
        "routed", "failovers", "connect_errors", "io_errors", "latency_counts",
        "latency_sum_s",
    )

    def __init__(self, backend_id: str, address: Address, *, learned: bool = False) -> None:
        self.id = backend_id
        self.address = address
        self.learned = learned  # added by a cluster view, not in the cluster file
        self.remote = False  # a server of a remote site ([[sites]]): see Router.add_remote

        self.state = BackendState.UP  # effective: admin_state, lowered to DOWN when unhealthy
        self.admin_state = BackendState.UP
        self.healthy = True
        self.bad_until = 0.0  # time.monotonic() before which the backend is skipped
        self.in_view = True  # listed as live by the cluster's last view (or probes, above)
        self.pool: Any = None
        self.probe_successes = 0
        self.probe_failures = 0
        self.says_draining = False  # its last health answer said "draining" (shown only)

        self.routed = 0
        self.failovers = 0
        self.connect_errors = 0
        self.io_errors = 0
        self.latency_counts = [0] * (len(LATENCY_BOUNDS_S) + 1)
        self.latency_sum_s = 0.0

    def __repr__(self) -> str:
        return f"Backend({self.id}, {self.address}, {self.state.value})"

    def refresh_state(self) -> None:
        if self.admin_state is _DOWN or not self.healthy:
            self.state = _DOWN
        else:
            self.state = self.admin_state


class Router:
    """Chooses backends for requests and keeps the table current."""

    def __init__(self, servers: Iterable[ServerConfig], *, max_skip_s: float,
                 pool_factory: Callable[[Backend], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        # configuration
        self._max_skip_s = max_skip_s
        self._pool_factory = pool_factory
        self._clock = clock
        # table
        self._by_id: dict[str, Backend] = {}
        self._order: list[Backend] = []
        for srv in servers:
            self._add(srv.id, srv.http, learned=False)
        self._rr = random.randrange(len(self._order)) if self._order else 0
        # dynamic view: the hash the proxy announces in X-Tandem-View
        self.view_hash = "-"
        self.view_number = -1  # views are adopted in the order of their numbers
        self.view_tail = b"X-Tandem-View: -\r\n\r\n"
        self.views_applied = 0
        # Told of a backend before and after each change of its state (see the docstring
        # above); "before" lets it date a bad mark that ran out on its own meanwhile.
        self.observer: Callable[[Backend], None] | None = None

    # --- lookups ------------------------------------------------------------------------------

    @property
    def backends(self) -> list[Backend]:
        return list(self._order)

    def get(self, backend_id: str) -> Backend:
        b = self._by_id.get(backend_id)
        if b is None:
            raise UnknownBackend(backend_id, list(self._by_id))
        return b

    def is_bad(self, backend: Backend) -> bool:
        return backend.bad_until > self._clock()

    # --- candidate order ----------------------------------------------------------------------

    def first(self, route: Route | None) -> Backend | None:
        """The first candidate when it is the obvious one (usable primary, or the next
        usable backend round-robin); None: ask `candidates()` for the full order."""
        # (the clock is read only for a backend that carries a bad mark)
        if route is not None:
            b = self._by_id.get(route.primary)
            if (b is not None and b.state is not _DOWN and b.in_view
                    and (not b.bad_until or b.bad_until <= self._clock())):
                return b
            return None
        order = self._order
        n = len(order)
        for _ in range(n):
            b = order[self._rr % n]
            self._rr += 1
            if (b.state is _UP and b.in_view
                    and (not b.bad_until or b.bad_until <= self._clock())):
                return b
        return None

    def candidates(self, route: Route | None) -> list[Backend]:
        """Backends to try for a request, in order (may be empty)."""
        now = self._clock()
        order = self._order
        start = self._rr % len(order) if order else 0
        self._rr += 1
        rotated = order[start:] + order[:start]
        up = _UP
        own: list[Backend] = []
        if route is not None:
            for backend_id in (route.primary, route.secondary):
                b = self._by_id.get(backend_id) if backend_id else None
                if b is not None and b.state is not _DOWN and b not in own:
                    own.append(b)
        # Eligible: the session's own backends unless down, the others when up.
        eligible = own + [b for b in rotated if b.state is up and b not in own]
        out = [b for b in eligible if b.in_view and b.bad_until <= now]
        # Out of the cluster's view: still tried when everything else failed.
        out += [b for b in eligible if not b.in_view and b.bad_until <= now]
        # Marked bad: tried last, before giving up.
        out += [b for b in eligible if b.bad_until > now]
        return out

    # --- marks and states ---------------------------------------------------------------------

    def mark_bad(self, backend: Backend) -> None:
        """Skip this backend for max_skip_s (after a connect failure, io timeout or 503)."""
        if self._max_skip_s > 0:
            self._observe(backend)
            backend.bad_until = self._clock() + self._max_skip_s
            self._observe(backend)

    def seen_alive(self, backend: Backend) -> None:
        """The backend was seen serving again (a new cluster view lists it, an active probe
        passed, or it answered): clear its passive bad mark."""
        self._observe(backend)
        backend.bad_until = 0.0
        self._observe(backend)

    def rejoined(self, backend: Backend) -> None:
        """The active probes found the cluster settled on a view that lists this backend:
        in the view again (until the next view the proxy adopts says otherwise)."""
        self._observe(backend)
        backend.in_view = True
        self._observe(backend)

    def set_says_draining(self, backend: Backend, draining: bool) -> None:
        """Record whether the backend's own health answer says it is draining."""
        if backend.says_draining is not draining:
            self._observe(backend)
            backend.says_draining = draining
            self._observe(backend)

    def set_admin_state(self, backend_id: str, state: BackendState | str) -> Backend:
        b = self.get(backend_id)
        self._observe(b)
        b.admin_state = state if isinstance(state, BackendState) else BackendState.parse(state)
        b.refresh_state()
        if b.admin_state is BackendState.UP:
            b.bad_until = 0.0  # an operator's "up" clears a passive mark
        self._observe(b)
        return b

    def set_healthy(self, backend: Backend, healthy: bool) -> bool:
        """Record an active-probe verdict; True when it changed the backend's state."""
        self._observe(backend)
        before = backend.state
        backend.healthy = healthy
        backend.refresh_state()
        if healthy and before is BackendState.DOWN:
            backend.bad_until = 0.0
        self._observe(backend)
        return backend.state is not before

    def _observe(self, backend: Backend) -> None:
        if self.observer is not None:
            self.observer(backend)

    # --- dynamic server list ------------------------------------------------------------------

    def is_newer(self, view: str) -> bool:
        """Is `view` (a cluster view's number) newer than the one adopted? A view agreed by
        a majority has a higher number than every view before it; a server cut off from
        the majority knows only older ones, so the last view to arrive is not trusted."""
        try:
            return int(view) > self.view_number
        except ValueError:  # not a number: a server of an older release (its hash)
            return view != self.view_hash

    def apply_view(self, view_hash: str, members: Mapping[str, Address], *,
                   declined: Backend | None = None) -> list[str]:
        """Adopt a cluster view; returns the ids of backends added to the table.

        The view lists the members the cluster sees alive now: their bad marks are cleared,
        except `declined`'s (the backend whose 503 carried the view)."""
        added = []
        for known in self._order:
            self._observe(known)
        for backend_id, address in members.items():
            b = self._by_id.get(backend_id)
            if b is None:
                self._add(backend_id, address, learned=True)
                added.append(backend_id)
                continue
            if b.address != address:
                old_pool = b.pool
                b.address = address
                b.pool = self._pool_factory(b)
                if old_pool is not None:
                    old_pool.close()
            if b is not declined:
                self.seen_alive(b)
        for b in self._order:
            b.in_view = b.id in members or b.remote  # (no view of ours lists a remote one)
            self._observe(b)
        self.view_hash = view_hash
        if view_hash.isdigit():
            self.view_number = int(view_hash)
        self.view_tail = b"X-Tandem-View: " + view_hash.encode("ascii") + b"\r\n\r\n"
        self.views_applied += 1
        return added

    def add_remote(self, backend_id: str, address: Address) -> Backend:
        """A server of a remote site (docs/sites.md): the requests of its sessions go to it
        first while it answers (cluster affinity), then to ours, which take the session
        over once its site is proven down. It takes no new session here (draining)."""
        b = self._add(backend_id, address, learned=False)
        b.remote = True
        b.admin_state = _DRAINING
        b.refresh_state()
        return b

    def _add(self, backend_id: str, address: Address, *, learned: bool) -> Backend:
        b = Backend(backend_id, address, learned=learned)
        b.pool = self._pool_factory(b)
        self._by_id[backend_id] = b
        self._order.append(b)
        return b

    def close(self) -> None:
        for b in self._order:
            if b.pool is not None:
                b.pool.close()
