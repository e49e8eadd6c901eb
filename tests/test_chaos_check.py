"""The chaos harness's write check on synthetic histories (no cluster)."""

from __future__ import annotations

from bench.chaos_check import (
    Cut,
    Execution,
    Fault,
    check_session,
    failures_by_cause,
    percentiles,
    phase_at,
    recovery,
    reprotection,
    server_executions,
    unavailability,
)
from bench.chaos_load import Attempt
from bench.chaos_partitions import PARTITION_SCENARIOS, partition_report


def history(*steps: int | str, primary: str = "s1", secondary: str = "s2") -> list[Attempt]:
    """An int is an acknowledged counter value, a str the cause of a failed request."""
    out = []
    for i, step in enumerate(steps):
        t = i * 0.1
        if isinstance(step, int):
            out.append(Attempt(0, t, t + 0.01, "ok", 200, step, primary, "sid", primary,
                               secondary))
        else:
            out.append(Attempt(0, t, t + 0.01, step, None, sid="sid", primary=primary,
                               secondary=secondary))
    return out


def test_a_clean_history_has_no_findings():
    v = check_session(0, history(1, 2, 3, 4))
    assert (v.acked, v.lost, v.duplicated, v.ambiguous, v.failed) == (4, 0, 0, 0, 0)


def test_a_counter_going_back_is_a_lost_write():
    v = check_session(0, history(1, 2, 3, 4, 3))  # 3 and 4 were acknowledged, then gone
    assert v.lost == 2 and v.duplicated == 0
    assert v.lost_events[0][1] == 2 and len(v.lost_events[0][2]) == 2


def test_a_repeated_value_is_a_lost_write():
    v = check_session(0, history(1, 2, 2))
    assert v.lost == 1


def test_a_skip_without_a_failed_request_is_a_duplicated_write():
    v = check_session(0, history(1, 2, 4))
    assert v.duplicated == 1 and v.lost == 0 and v.ambiguous == 0


def test_a_skip_after_a_failed_request_may_be_that_request():
    v = check_session(0, history(1, 2, "reset", 4))
    assert v.duplicated == 0 and v.ambiguous == 1 and v.failed == 1


def test_a_failed_request_explains_at_most_one_increment():
    v = check_session(0, history(1, "timeout", 4))  # 2 and 3 applied for one failure
    assert v.duplicated == 1 and v.ambiguous == 1


def test_a_failed_request_that_was_not_applied_is_fine():
    v = check_session(0, history(1, "http_503", 2, 3))
    assert (v.lost, v.duplicated, v.ambiguous) == (0, 0, 0)


def test_the_first_value_must_be_one():
    assert check_session(0, history(2, 3)).duplicated == 1
    assert check_session(0, history("connect", 2)).duplicated == 0


def test_a_new_session_id_is_counted():
    h = history(1, 2)
    h += [Attempt(0, 1.0, 1.01, "ok", 200, 1, "s2", "other", "s2", "s3")]
    v = check_session(0, h)
    assert v.sid_changes == 1 and v.lost == 2


def test_failures_by_cause_and_percentiles():
    assert failures_by_cause([history(1, "reset", "http_502", "reset", 3)]) == {
        "http_502": 1, "reset": 2}
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert p == {"n": 100, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}


def test_recovery_and_reprotection_after_a_kill():
    fault = Fault("sigkill", "s1", t=0.25, t_back=5.0, t_detected=0.26)
    before = history(1, 2, 3)  # primary s1, ends at 0.21
    after = [Attempt(0, 0.3, 0.32, "reset", None, sid="sid", primary="s1", secondary="s2"),
             Attempt(0, 0.4, 0.45, "ok", 200, 5, "s2", "sid", "s2", "s1"),  # s1 is down
             Attempt(0, 0.5, 0.52, "ok", 200, 6, "s2", "sid", "s2", "s3")]
    other = history(1, 2, 3, primary="s3", secondary="s2")
    r = recovery([before + after, other], fault)
    assert r["sessions"] == 1 and r["failed_requests"] == 1
    assert r["fault_to_ok"]["max_ms"] == 200.0 and r["request_to_ok"]["max_ms"] == 150.0
    rp = reprotection([before + after, other], fault, [fault])
    assert rp["sessions"] == 1 and rp["since_fault"]["max_ms"] == 270.0
    assert rp["since_detection"]["max_ms"] == 260.0
    assert check_session(0, before + after).ambiguous == 1


# --- the write log (POST load), network cuts ------------------------------------------

def post(session: int, start: float, end: float, cause: str, write: int,
         counter: int | None = None, applied: list[tuple[int, float]] | None = None,
         primary: str = "s1") -> Attempt:
    a = Attempt(session, start, end, cause, 200 if cause == "ok" else None, counter, primary,
                "sid", primary, "s2", write=write)
    a.applied = applied or []
    return a


def test_a_failed_write_applied_after_its_failure_is_a_late_apply():
    h = [post(0, 0.0, 0.1, "ok", 1, 1, [(1, 0.05)]),
         post(0, 0.5, 5.5, "http_502", 2),                     # told: failed at 5.5
         post(0, 6.0, 6.1, "ok", 3, 2, [(3, 6.05)]),           # 2 not applied yet
         post(0, 30.0, 30.1, "ok", 4, 4, [(2, 26.0), (4, 30.05)])]  # 2 arrived at 26.0
    v = check_session(0, h)
    assert v.late_applies == 1 and v.late_events == [(5.5, 26.0, 2, "http_502")]
    # the counter's skip at 30.1 is that late write, not a duplicate nor an ambiguous one
    assert (v.duplicated, v.ambiguous, v.lost, v.applied_failed) == (0, 0, 0, 0)


def test_a_late_apply_fails_the_counter_check_without_the_write_log():
    h = [post(0, 0.0, 0.1, "ok", 1, 1), post(0, 0.5, 5.5, "http_502", 2),
         post(0, 6.0, 6.1, "ok", 3, 2), post(0, 30.0, 30.1, "ok", 4, 4)]
    assert check_session(0, h).duplicated == 1  # what the write log tells apart


def test_a_failed_write_applied_before_its_answer_is_not_late():
    h = [post(0, 0.0, 0.1, "ok", 1, 1, [(1, 0.05)]),
         post(0, 0.5, 5.5, "reset", 2),
         post(0, 6.0, 6.1, "ok", 3, 3, [(2, 0.6), (3, 6.05)])]
    v = check_session(0, h)
    assert (v.late_applies, v.applied_failed, v.ambiguous, v.duplicated) == (0, 1, 1, 0)


def test_a_write_number_applied_twice_is_counted():
    h = [post(0, 0.0, 0.1, "ok", 1, 1, [(1, 0.05)]),
         post(0, 0.5, 0.6, "ok", 2, 3, [(2, 0.55), (2, 0.58)])]
    v = check_session(0, h)
    assert v.duplicated_by_id == 1 and v.duplicated == 1


def test_server_executions_find_late_runs_the_client_never_saw():
    h = [post(0, 0.0, 0.1, "ok", 1, 1, [(1, 0.05)]),
         post(0, 0.5, 5.5, "http_502", 2),
         post(0, 6.0, 6.1, "ok", 3, 2, [(3, 6.05)], primary="s2")]
    runs = [Execution("s1", 0, 1, 0.05, 1, "sid"), Execution("s2", 0, 3, 6.05, 2, "sid"),
            Execution("s1", 0, 2, 26.0, 2, "sid")]   # on s1's stale copy, long after
    r = server_executions([h], runs)
    assert r["late"] == 1 and r["late_not_seen_by_client"] == 1
    assert r["late_events"][0]["server"] == "s1" and r["run_more_than_once"] == 0
    r = server_executions([h], [*runs, Execution("s2", 0, 3, 6.06, 3, "sid")])
    assert r["run_more_than_once"] == 1


def steady(session: int, t_end: float, *, gap: tuple[float, float] | None = None,
           period: float = 0.5) -> list[Attempt]:
    """A session asking every `period` s; requests ending inside `gap` fail (reset)."""
    out, t = [], 0.0
    while t < t_end:
        end = t + 0.01
        bad = gap is not None and gap[0] <= end <= gap[1]
        out.append(Attempt(session, t, end, "reset" if bad else "ok", None if bad else 200))
        t += period
    return out


def test_unavailability_of_a_cut():
    cut = Cut((("s1", "s2"),), t=10.0, t_heal=25.0, phase="partition-b")
    hit = steady(0, 60.0, gap=(10.0, 13.0))     # fails from 10.01 to 12.51, ok at 13.01
    calm = steady(1, 60.0)
    u = unavailability([hit, calm], [cut], after_heal_s=10.0)
    assert u["sessions"] == 2 and u["sessions_with_failures"] == 1 and u["never_ok"] == 0
    assert u["failed_during_cut"] == 6 and u["failed_10s_after_heal"] == 0
    assert u["cut_to_ok"]["max_ms"] == 3010.0 and u["cut_to_ok"]["p50_ms"] == 10.0
    assert u["request_to_ok"]["max_ms"] == 3010.0
    assert u["longest_wait"]["max_ms"] == 3010.0 and u["longest_wait"]["p50_ms"] == 10.0


def test_unavailability_of_a_flapping_link_counts_each_window_once():
    cuts = [Cut((("s1", "s2"),), t=10.0 + 4 * i, t_heal=12.0 + 4 * i) for i in range(3)]
    h = steady(0, 60.0, gap=(11.0, 15.2))   # from inside the first cut into the second
    u = unavailability([h], cuts, after_heal_s=10.0)
    assert u["cuts"] == 3 and u["sessions"] == 1
    assert u["failed_during_cut"] + u["failed_10s_after_heal"] == 9   # 11.01 .. 15.01
    assert u["cut_to_ok"]["n"] == 3
    assert u["longest_wait"]["max_ms"] == 4510.0   # asked at 11.0, good answer at 15.51


def test_phase_at_and_the_partition_report():
    phases = [(5.0, "partition-a"), (40.0, "partition-b")]
    assert phase_at(phases, 1.0) is None and phase_at(phases, 39.9) == "partition-a"
    assert phase_at(phases, 40.0) == "partition-b"
    cut = Cut((("s1", "s2"), ("s1", "s3")), t=45.0, t_heal=60.0, phase="partition-b")
    h = history(1, 2, 3)
    h += [Attempt(0, 50.0, 50.01, "ok", 200, 2, "s2", "sid", "s2", "s3")]  # 3 lost at 50
    report = partition_report([h], [check_session(0, h)], [cut], phases)
    assert report["partition-a"]["writes"]["lost"] == 0
    assert report["partition-a"]["unavailability"] == {}
    assert report["partition-b"]["writes"]["lost"] == 2
    assert report["partition-b"]["cuts"][0]["cut"] == "cut s1|s2, s1|s3"


def test_the_partition_scenarios_are_the_issues():
    a, b, c, d = (PARTITION_SCENARIOS[f"partition-{x}"] for x in "abcd")
    assert ("cut", (("s1", "s2"),)) in a and ("sleep", 15.0) in a
    assert ("cut", (("s1", "s2"), ("s1", "s3"))) in b
    assert ("cut", (("s1", "proxy"),)) in c
    assert sum(1 for op, _ in d if op == "cut") == 5 and ("sleep", 2.0) in d
    assert PARTITION_SCENARIOS["partitions"] == a + b + c + d
