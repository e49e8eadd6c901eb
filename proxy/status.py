"""One state per backend for the operator, and since when it holds.

The router keeps several independent facts about a backend: the operator's admin state,
the active probes' verdict, membership in the cluster's view and a passive bad mark. The
status page shows one `Status` derived from them, in precedence order (the first that
holds wins), and the time it last changed; `StatusBoard` dates the changes as the router
reports them (`Router.observer`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable

from .router import Backend, BackendState, Router

__all__ = ["Status", "LEGEND", "derive", "StatusBoard", "Report"]


class Status(enum.Enum):
    # In precedence order: a backend shows the first one that holds.
    DOWN_ADMIN = "down (admin)"  # an operator set it down: takes nothing
    FAILING = "failing (probe)"  # health_fall probes in a row failed: takes nothing
    DRAINING = "draining"  # no new sessions (an operator, or the server shutting down)
    OUT_OF_VIEW = "not in cluster view"  # its peers do not list it alive: tried last
    SKIPPED = "skipped"  # a request to it failed: tried last until its mark runs out
    SERVING = "serving"  # takes new sessions and the requests of its sessions


# (state, what it means, what to do) — the legend of the status page and docs/operations.md
LEGEND: tuple[tuple[Status, str, str], ...] = (
    (Status.DOWN_ADMIN,
     "An operator set it down: it takes no request; its sessions go to their secondaries.",
     "Bring it back with POST /__tandem/backends/ID/state and the body up."),
    (Status.FAILING,
     "The proxy's active health probes failed health_fall times in a row: it takes no "
     "request; its sessions go to their secondaries.",
     "Check that the server process runs and answers /__tandem/health (its log). It "
     "serves again after health_rise probes pass."),
    (Status.DRAINING,
     "No new sessions; requests of sessions that live there still go to it. Set by an "
     "operator, or said by the server itself while it hands its sessions over and exits "
     "(SIGTERM).",
     "Nothing when you drain it on purpose: POST up ends an operator's drain. A server "
     "that drains by itself leaves and should be restarted."),
    (Status.OUT_OF_VIEW,
     "Its peers do not list it as alive in the cluster's view: it is tried only when "
     "every backend in the view failed.",
     "Normal for a few seconds after a restart, until it rejoins. If it lasts, check that "
     "it runs and reaches its peers' replication ports."),
    (Status.SKIPPED,
     "A request to it failed (no connection, no answer in time, or 503): it is tried only "
     "after the others until the time shown (proxy.max_skip_s).",
     "Nothing: the mark runs out, or clears as soon as it answers a probe or a request. "
     "If it keeps coming back, look at the server."),
    (Status.SERVING,
     "Takes new sessions and the requests of its sessions.",
     "Nothing."),
)


def derive(b: Backend, now: float) -> Status:
    """The backend's one state at monotonic time `now`."""
    if b.admin_state is BackendState.DOWN:
        return Status.DOWN_ADMIN
    if not b.healthy:
        return Status.FAILING
    if b.admin_state is BackendState.DRAINING or b.says_draining:
        return Status.DRAINING
    if not b.in_view:
        return Status.OUT_OF_VIEW
    if b.bad_until > now:
        return Status.SKIPPED
    return Status.SERVING


@dataclasses.dataclass(slots=True)
class _Record:
    status: Status
    since: float  # monotonic time it began
    bad_until: float  # the backend's bad mark when last observed
    errors: tuple[int, int]  # (connect, io) errors counted when it began
    cause: str = ""  # of a skip: what failed


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    """What the status page says of one backend."""

    status: Status
    since: float  # epoch seconds
    age_s: float  # seconds in this state
    detail: str


class StatusBoard:
    """Dates every change of each backend's `Status` (installs itself as the router's
    observer; one per admin listener)."""

    def __init__(self, router: Router, *, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._wall = wall
        self._records: dict[str, _Record] = {}
        router.observer = self.observe
        for b in router.backends:
            self.observe(b)

    def observe(self, b: Backend) -> None:
        """Note the backend's state now (the router calls this around every change)."""
        now = self._clock()
        status = derive(b, now)
        errors = (b.connect_errors, b.io_errors)
        rec = self._records.get(b.id)
        if rec is None:
            self._records[b.id] = _Record(status, now, b.bad_until, errors)
            return
        if status is not rec.status:
            if rec.status is Status.SKIPPED and 0 < rec.bad_until <= now:
                # Nothing else changed since the last observation: its mark ran out then.
                rec.status, rec.since = status, rec.bad_until
            else:
                if status is Status.SKIPPED:
                    rec.cause = _cause(rec.errors, errors)
                rec.status, rec.since, rec.errors = status, now, errors
        rec.bad_until = b.bad_until

    def report(self, b: Backend) -> Report:
        self.observe(b)  # (a bad mark may have run out since the last change)
        rec = self._records[b.id]
        now, wall = self._clock(), self._wall()
        age = max(0.0, now - rec.since)
        return Report(rec.status, wall - age, age, self._detail(b, rec, now, wall))

    def _detail(self, b: Backend, rec: _Record, now: float, wall: float) -> str:
        status = rec.status
        skip = ""
        if b.bad_until > now:
            at = wall + (b.bad_until - now)
            skip = f"retried at {clock_time(at)} (in {b.bad_until - now:.0f} s)"
        if status is Status.DOWN_ADMIN:
            return "set by an operator"
        if status is Status.FAILING:
            if b.probe_successes:
                return (f"recovering: {b.probe_successes} probe(s) passed in a row, "
                        "health_rise needed")
            failed = f"{b.probe_failures} probes failed in a row"
            return failed if b.in_view else failed + "; its peers do not list it as alive"
        if status is Status.DRAINING:
            return ("set by an operator" if b.admin_state is BackendState.DRAINING
                    else "the server says it is draining")
        if status is Status.OUT_OF_VIEW:
            return "; ".join(filter(None, ("its peers do not list it as alive", skip)))
        if status is Status.SKIPPED:
            return f"{rec.cause}: {skip}" if rec.cause else skip
        if b.probe_failures:
            return f"last {b.probe_failures} probe(s) failed"
        return ""


def _cause(before: tuple[int, int], after: tuple[int, int]) -> str:
    """What failed, from the errors counted since the previous state began (a 503 answer
    counts no error)."""
    if after[0] > before[0]:
        return "connect errors"
    if after[1] > before[1]:
        return "no answer in time"
    return "answered 503"


def clock_time(epoch_s: float) -> str:
    """Local wall-clock time of day, to the second."""
    return time.strftime("%H:%M:%S", time.localtime(epoch_s))
