"""The chaos harness's judge: per-session write checks, recovery and re-protection times.

Pure functions over the attempts `bench/chaos_load.py` recorded (no cluster, no I/O), so
`tests/test_chaos_check.py` can feed them synthetic histories.

Write check, per session, over its acknowledged counter values in order (GET /count adds
one and answers the new value; a client sends one request at a time):
- next value == last + 1: fine.
- next value <= last: the server-side state went back to `next - 1`, so the writes that
  had been acknowledged with values `next .. last` are lost (`last - next + 1` of them).
- next value == last + 1 + k (k > 0): k increments were applied that the client never saw
  acknowledged. Each request that failed since the last acknowledged value may or may not
  have been applied, but at most once; so up to `failed` of the k are legitimate
  (ambiguous writes) and the remaining `k - failed` are duplicated writes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Fault",
    "SessionVerdict",
    "check_session",
    "percentiles",
    "recovery",
    "reprotection",
    "failures_by_cause",
    "timeline",
]


@dataclass(slots=True)
class Fault:
    """One injected failure (times in s since the load started)."""

    kind: str            # "sigkill", "sigstop" or "sigterm"
    target: str          # server id
    t: float             # when the signal was sent
    t_back: float | None = None      # when the server was serving again (restart/SIGCONT)
    t_detected: float | None = None  # first peer_failed/peer_draining about it in the logs

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}"


@dataclass(slots=True)
class SessionVerdict:
    """What the write check found in one session's history."""

    session: int
    acked: int = 0
    failed: int = 0
    lost: int = 0          # acknowledged writes that disappeared
    duplicated: int = 0    # increments applied more often than requests could explain
    ambiguous: int = 0     # increments applied for failed requests (allowed)
    sid_changes: int = 0   # the session id changed: the session was lost and recreated
    # (t seen, number lost, ack times of the lost values) for every loss
    lost_events: list[tuple[float, int, list[float]]] = field(default_factory=list)
    # (t seen, number duplicated, failed requests since the last ack)
    dup_events: list[tuple[float, int, int]] = field(default_factory=list)


def check_session(session: int, attempts: Sequence[Any]) -> SessionVerdict:
    """Judge one session's attempts (in the order they were sent)."""
    v = SessionVerdict(session)
    last = 0            # a session starts at 0; its first acknowledged value must be 1
    failed_since = 0
    acked_at: dict[int, float] = {}  # counter value -> when it was acknowledged
    sid: str | None = None
    for a in attempts:
        if not a.ok:
            v.failed += 1
            failed_since += 1
            continue
        v.acked += 1
        if a.sid is not None:
            if sid is not None and a.sid != sid:
                v.sid_changes += 1
            sid = a.sid
        value = a.counter
        if value <= last:
            n = last - value + 1
            v.lost += n
            v.lost_events.append((a.end, n, [acked_at[x] for x in range(value, last + 1)
                                             if x in acked_at]))
        elif value > last + 1:
            skipped = value - last - 1
            dup = max(0, skipped - failed_since)
            v.ambiguous += skipped - dup
            if dup:
                v.duplicated += dup
                v.dup_events.append((a.end, dup, failed_since))
        acked_at[value] = a.end
        last = value
        failed_since = 0
    return v


def percentiles(values: Iterable[float], ps: Sequence[float] = (50, 99)) -> dict[str, Any]:
    """Nearest-rank percentiles, the maximum and the count; values in seconds -> ms."""
    xs = sorted(values)
    out: dict[str, Any] = {"n": len(xs)}
    if not xs:
        return out
    for p in ps:
        k = max(0, min(len(xs) - 1, int(-(-p * len(xs) // 100)) - 1))
        out[f"p{p:g}_ms"] = round(xs[k] * 1000, 1)
    out["max_ms"] = round(xs[-1] * 1000, 1)
    return out


def _route_at(attempts: Sequence[Any], t: float) -> Any | None:
    """The last attempt that completed at or before `t` with a token (the route held then)."""
    route = None
    for a in attempts:
        if a.end > t:
            break
        if a.primary is not None:
            route = a
    return route


def recovery(histories: Sequence[Sequence[Any]], fault: Fault) -> dict[str, Any]:
    """Time from a fault to the first good response of the sessions whose primary it hit.

    `fault_to_ok`: from the signal to the end of the first good response (includes the
    client's think time before its next request). `request_to_ok`: from the first request
    that was in flight at the fault or sent after it to that good response — what a user
    waits for.
    """
    to_ok, waited, failed, never = [], [], 0, 0
    for attempts in histories:
        held = _route_at(attempts, fault.t)
        if held is None or held.primary != fault.target:
            continue
        first = next((a for a in attempts if a.end > fault.t), None)
        good = next((a for a in attempts if a.end > fault.t and a.ok), None)
        if first is None or good is None:
            never += 1
            continue
        failed += sum(1 for a in attempts if fault.t < a.end <= good.end and not a.ok)
        to_ok.append(good.end - fault.t)
        waited.append(good.end - max(fault.t, first.start))
    # for comparison: every request that completed in the 5 s before the fault
    before = [a.end - a.start for attempts in histories for a in attempts
              if fault.t - 5.0 <= a.end < fault.t and a.ok]
    return {"sessions": len(to_ok) + never, "never_recovered": never,
            "failed_requests": failed, "fault_to_ok": percentiles(to_ok),
            "request_to_ok": percentiles(waited),
            "latency_5s_before_fault": percentiles(before)}


def _down(faults: Sequence[Fault], server: str | None, t: float) -> bool:
    return any(f.target == server and f.t <= t and (f.t_back is None or t < f.t_back)
               for f in faults)


def protected(a: Any, faults: Sequence[Fault]) -> bool:
    """The token held after attempt `a` names a live primary and a live, distinct secondary."""
    return (a.secondary not in (None, "NONE", a.primary)
            and not _down(faults, a.primary, a.end) and not _down(faults, a.secondary, a.end))


def reprotection(histories: Sequence[Sequence[Any]], fault: Fault,
                 faults: Sequence[Fault]) -> dict[str, Any]:
    """When each session whose primary or secondary the fault hit held a protected token again.

    Seen from the client: a token changes only with a response, so this includes the
    client's think time (one request interval at most, for a session that was protected
    in the background).
    """
    since_fault, since_detect, never = [], [], 0
    for attempts in histories:
        held = _route_at(attempts, fault.t)
        if held is None or fault.target not in (held.primary, held.secondary):
            continue
        good = next((a for a in attempts if a.end > fault.t and a.ok and protected(a, faults)),
                    None)
        if good is None:
            never += 1
            continue
        since_fault.append(good.end - fault.t)
        if fault.t_detected is not None:
            since_detect.append(max(0.0, good.end - fault.t_detected))
    out = {"sessions": len(since_fault) + never, "never_reprotected": never,
           "since_fault": percentiles(since_fault)}
    if fault.t_detected is not None:
        out["detected_after_ms"] = round((fault.t_detected - fault.t) * 1000, 1)
        out["since_detection"] = percentiles(since_detect)
    return out


def failures_by_cause(histories: Iterable[Iterable[Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for attempts in histories:
        for a in attempts:
            if not a.ok:
                out[a.cause] = out.get(a.cause, 0) + 1
    return dict(sorted(out.items()))


def timeline(histories: Iterable[Iterable[Any]], *, bin_s: float = 0.1
             ) -> tuple[list[float], list[int], list[int], list[float]]:
    """Per bin of completion time: good responses, failed requests, p99 latency (ms)."""
    ok: dict[int, int] = {}
    bad: dict[int, int] = {}
    lat: dict[int, list[float]] = {}
    for attempts in histories:
        for a in attempts:
            b = int(a.end / bin_s)
            if a.ok:
                ok[b] = ok.get(b, 0) + 1
            else:
                bad[b] = bad.get(b, 0) + 1
            lat.setdefault(b, []).append(a.end - a.start)
    last = max([*ok, *bad, 0])
    ts = [i * bin_s for i in range(last + 1)]
    p99 = []
    for i in range(last + 1):
        xs = sorted(lat.get(i, []))
        p99.append(xs[max(0, int(len(xs) * 0.99) - 1)] * 1000 if xs else 0.0)
    return ts, [ok.get(i, 0) for i in range(last + 1)], [bad.get(i, 0) for i in
                                                          range(last + 1)], p99
