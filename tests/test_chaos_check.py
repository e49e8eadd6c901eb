"""The chaos harness's write check on synthetic histories (no cluster)."""

from __future__ import annotations

from bench.chaos_check import (
    Fault,
    check_session,
    failures_by_cause,
    percentiles,
    recovery,
    reprotection,
)
from bench.chaos_load import Attempt


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
