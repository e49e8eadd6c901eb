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

Write log (POST load on `bench/chaos_app.py`): every answer lists the writes applied, by the
client's write number, with the moment each was applied. A write the client was told had
failed (an error status, a reset, its own timeout) and that was applied *after* that answer
is a *late apply* — it arrived late, for instance by TCP retransmission after a partition
healed; the client may already have retried it or moved on. A write number applied twice
is a duplicated write by id. Late applies of failures older than the last acknowledged
value also explain increments in the counter check (they are not counted as duplicated).
The servers log every write their app ran (`Execution`); `server_executions` finds the
failed writes run after the failure was answered anywhere — also on a copy of the session
the client never read again — and writes run more than once.

Unavailability under a network cut (`Cut`, `unavailability`): per session, from the cut to
its first good response, from its first request after the cut to that response, and the
longest a request waited for a good answer (retries after failures included) from the cut
until a while after the heal; with the failed requests during the cut and after the heal.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Cut",
    "Execution",
    "Fault",
    "SessionVerdict",
    "check_session",
    "percentiles",
    "recovery",
    "reprotection",
    "server_executions",
    "failures_by_cause",
    "phase_at",
    "timeline",
    "unavailability",
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
class Cut:
    """One network cut: links between processes cut at `t`, healed at `t_heal` (s since
    the load started); `phase` is the scenario it belongs to."""

    links: tuple[tuple[str, str], ...]
    t: float
    t_heal: float | None = None
    phase: str | None = None

    @property
    def label(self) -> str:
        return "cut " + ", ".join(f"{a}|{b}" for a, b in self.links)


@dataclass(frozen=True, slots=True)
class Execution:
    """A write the app ran on a server (its `chaos_write` log event): not necessarily
    committed, nor on the copy of the session the client goes on with."""

    server: str
    client: int
    write: int
    t: float       # s since the load started
    counter: int   # the counter value it produced on that copy
    sid: str       # the session id's prefix


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
    # write log (POST load only)
    late_applies: int = 0      # failed writes applied after the client was told so
    applied_failed: int = 0    # failed writes applied before that answer (its reply lost)
    duplicated_by_id: int = 0  # extra applications of one write number
    # (t the failure was answered, t applied, write number, cause of the failure)
    late_events: list[tuple[float, float, int, str]] = field(default_factory=list)


def check_session(session: int, attempts: Sequence[Any]) -> SessionVerdict:
    """Judge one session's attempts (in the order they were sent)."""
    v = SessionVerdict(session)
    failed_writes = _check_write_log(v, attempts)
    last = 0            # a session starts at 0; its first acknowledged value must be 1
    last_ack_end = float("-inf")
    failed_since = 0
    acked_at: dict[int, float] = {}  # counter value -> when it was acknowledged
    sid: str | None = None
    for a in attempts:
        if not a.ok:
            v.failed += 1
            failed_since += 1
            continue
        # writes that failed before the last acknowledged value and show up only now
        late_earlier = sum(1 for w, _ in getattr(a, "applied", ())
                           if w in failed_writes and failed_writes[w].end <= last_ack_end)
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
            # late applies are counted by the write log; the rest is the counter's judgment
            skipped = value - last - 1 - min(value - last - 1, late_earlier)
            dup = max(0, skipped - failed_since)
            v.ambiguous += skipped - dup
            if dup:
                v.duplicated += dup
                v.dup_events.append((a.end, dup, failed_since))
        acked_at[value] = a.end
        last = value
        last_ack_end = a.end
        failed_since = 0
    return v


def _check_write_log(v: SessionVerdict, attempts: Sequence[Any]) -> dict[int, Any]:
    """Late applies and writes applied twice, from the write log; the failed writes by
    number."""
    failed = {a.write: a for a in attempts
              if not a.ok and getattr(a, "write", None) is not None}
    applied: dict[int, list[float]] = {}
    for a in attempts:
        for w, at in getattr(a, "applied", ()):
            applied.setdefault(w, []).append(at)
    for w, times in applied.items():
        v.duplicated_by_id += len(times) - 1
        f = failed.get(w)
        if f is None:
            continue
        first = min(times)
        if first > f.end:
            v.late_applies += 1
            v.late_events.append((f.end, first, w, f.cause))
        else:
            v.applied_failed += 1
    return failed


def server_executions(histories: Sequence[Sequence[Any]],
                      executions: Sequence[Execution]) -> dict[str, Any]:
    """The servers' side of the write log: failed writes run after the client was told they
    failed (`late`, with where and whether the client ever saw them applied), failed writes
    run before that answer, and writes run more than once."""
    failed = {(a.session, a.write): a for h in histories for a in h
              if not a.ok and getattr(a, "write", None) is not None}
    seen = {(a.session, w) for h in histories for a in h for w, _ in getattr(a, "applied", ())}
    runs: dict[tuple[int, int], list[Execution]] = {}
    for e in executions:
        runs.setdefault((e.client, e.write), []).append(e)
    late, before, twice, repeated = [], 0, 0, []
    for key, es in runs.items():
        twice += len(es) - 1
        if len(es) > 1:  # e.g. run, not committed (503), and resent by the proxy
            repeated.append({"session": key[0], "write": key[1],
                             "runs": [[e.server, round(e.t, 3), e.counter] for e in es]})
        f = failed.get(key)
        if f is None:
            continue
        after = sorted((e for e in es if e.t > f.end), key=lambda e: e.t)
        if not after:
            before += 1
            continue
        e = after[0]
        late.append({"session": key[0], "write": key[1], "cause": f.cause,
                     "failed_at_s": round(f.end, 3), "run_at_s": round(e.t, 3),
                     "server": e.server, "counter": e.counter, "sid": e.sid,
                     "seen_by_client": key in seen})
    late.sort(key=lambda d: d["failed_at_s"])
    return {"executions": len(executions), "late": len(late),
            "late_not_seen_by_client": sum(1 for d in late if not d["seen_by_client"]),
            "failed_run_before_answer": before, "run_more_than_once": twice,
            # (server, t, counter it produced) of each run
            "run_more_than_once_events": repeated[:50],
            "late_events": late}


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


def unavailability(histories: Sequence[Sequence[Any]], cuts: Sequence[Cut], *,
                   after_heal_s: float = 10.0) -> dict[str, Any]:
    """How one or more cuts (in time order, e.g. a flapping link) were felt by the clients.

    Per session and cut, for every session that sent a request after the cut: `cut_to_ok`,
    from the cut to the session's first good response (includes its think time);
    `request_to_ok`, from its first request after the cut to that response. Per session:
    `longest_wait`, the longest a request waited for a good answer — counted from the first
    request after the previous good answer, so failures and retries in between count —
    from the first cut until `after_heal_s` after the last heal. Failed requests: those
    that ended during a cut, and in the `after_heal_s` after each heal (until the next cut).
    """
    if not cuts:
        return {}
    inf = float("inf")
    windows = []  # (cut, heal, end of its after-heal window)
    for i, cut in enumerate(cuts):
        heal = cut.t_heal if cut.t_heal is not None else inf
        nxt = cuts[i + 1].t if i + 1 < len(cuts) else inf
        windows.append((cut, heal, min(heal + after_heal_s, nxt)))
    t_first, settle = cuts[0].t, windows[-1][2]
    to_ok, waited, longest = [], [], []
    failed_during = failed_after = hit = never = 0
    for attempts in histories:
        after = [a for a in attempts if a.end > t_first]
        if not after:
            continue
        for cut, heal, end in windows:
            for a in after:
                if not a.ok and cut.t < a.end <= end:
                    if a.end <= heal:
                        failed_during += 1
                    else:
                        failed_after += 1
            mine = [a for a in after if a.end > cut.t]
            good = next((a for a in mine if a.ok), None)
            if good is not None:
                to_ok.append(good.end - cut.t)
                waited.append(good.end - max(cut.t, mine[0].start))
        hit += any(not a.ok and a.end <= settle for a in after)
        if not any(a.ok for a in after):
            never += 1
            continue
        worst, asked, last_end = 0.0, None, t_first
        for a in after:
            if a.start > settle:
                break
            asked = a.start if asked is None else asked
            last_end = a.end
            if a.ok:
                worst = max(worst, a.end - max(t_first, asked))
                asked = None
        if asked is not None:  # still waiting when the window closed
            worst = max(worst, last_end - max(t_first, asked))
        longest.append(worst)
    return {"cuts": len(cuts), "sessions": len(longest) + never,
            "sessions_with_failures": hit, "never_ok": never,
            "failed_during_cut": failed_during,
            f"failed_{after_heal_s:g}s_after_heal": failed_after,
            "cut_to_ok": percentiles(to_ok), "request_to_ok": percentiles(waited),
            "longest_wait": percentiles(longest)}


def phase_at(phases: Sequence[tuple[float, str]], t: float) -> str | None:
    """The phase (scenario) running at `t`, from (start time, name) in order."""
    current = None
    for start, name in phases:
        if start > t:
            break
        current = name
    return current


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
