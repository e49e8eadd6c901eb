"""The chaos harness's network partitions: the scenarios, and their part of the summary.

A partition scenario cuts links between the cluster's processes with `tests/netfault.py`
(every backend and the proxy under a uid of its own, nftables rules between them on
loopback) while the clients write through the proxy. The four cases of the partition
issue, each a phase of its own:

| name | what is cut |
|---|---|
| `partition-a` | the link s1<->s2 for 15 s (the proxy reaches every server) |
| `partition-b` | s1 from both peers for 15 s (the proxy still reaches s1) |
| `partition-c` | the proxy from s1 for 15 s (s1's peers still reach it) |
| `partition-d` | the link s1<->s2 cut 2 s and healed 2 s, five times (20 s) |

After the heal a phase waits until the cluster has re-formed, then `SETTLE_S` more, so that
data TCP retransmits after a heal (seconds later, with its back-off) lands inside the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.chaos_check import Cut, SessionVerdict, phase_at, unavailability

__all__ = ["PARTITION_SCENARIOS", "PROXY", "partition_report", "print_partitions"]

PROXY = "proxy"      # the proxy's name among the processes a partition knows
CUT_S = 15.0         # how long a cut lasts (cases A, B, C)
FLAP_S = 2.0         # case D: cut this long, then healed this long ...
FLAPS = 5            # ... this many times
SETTLE_S = 20.0      # after the cluster re-formed: late retransmissions land in the run
AFTER_HEAL_S = 10.0  # failures this long after a heal still count to the cut

Step = tuple[str, Any]
Links = tuple[tuple[str, str], ...]


def _phase(name: str, links: Links) -> list[Step]:
    return [("phase", name), ("cut", links), ("sleep", CUT_S), ("heal", links),
            ("formed", None), ("sleep", SETTLE_S)]


_S1_S2: Links = (("s1", "s2"),)
PARTITION_SCENARIOS: dict[str, list[Step]] = {
    "partition-a": _phase("partition-a", _S1_S2),
    "partition-b": _phase("partition-b", (("s1", "s2"), ("s1", "s3"))),
    "partition-c": _phase("partition-c", (("s1", PROXY),)),
    "partition-d": [("phase", "partition-d"),
                    *[step for _ in range(FLAPS)
                      for step in (("cut", _S1_S2), ("sleep", FLAP_S), ("heal", _S1_S2),
                                   ("sleep", FLAP_S))],
                    ("formed", None), ("sleep", SETTLE_S)],
}
PARTITION_SCENARIOS["partitions"] = [step for name in ("a", "b", "c", "d")
                                     for step in PARTITION_SCENARIOS[f"partition-{name}"]]


def partition_report(histories: Sequence[Sequence[Any]], verdicts: Sequence[SessionVerdict],
                     cuts: Sequence[Cut], phases: Sequence[tuple[float, str]],
                     server_late: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """Per phase: its cuts, the clients' unavailability, the writes lost and duplicated
    (by when the client saw it), and the failed writes applied late (by when they failed):
    seen in the session by the client, and run by a server's app (`server_late`, from
    `chaos_check.server_executions`)."""
    out: dict[str, Any] = {}
    for start, name in phases:
        mine = [c for c in cuts if c.phase == name]
        out[name] = {
            "t_s": round(start, 3),
            "cuts": [{"cut": c.label, "t_s": round(c.t, 3),
                      "t_heal_s": None if c.t_heal is None else round(c.t_heal, 3)}
                     for c in mine],
            "unavailability": unavailability(histories, mine, after_heal_s=AFTER_HEAL_S),
            "writes": {"lost": 0, "duplicated": 0, "late_applies": 0, "late_by_cause": {},
                       "lateness": [], "late_run_on_servers": 0,
                       "late_run_on_servers_not_seen_by_client": 0},
        }
    for v in verdicts:
        for t, n, _ in v.lost_events:
            _bump(out, phase_at(phases, t), "lost", n)
        for t, n, _ in v.dup_events:
            _bump(out, phase_at(phases, t), "duplicated", n)
        for t_failed, t_applied, _, cause in v.late_events:
            phase = phase_at(phases, t_failed)
            _bump(out, phase, "late_applies", 1)
            if phase in out:
                w = out[phase]["writes"]
                w["late_by_cause"][cause] = w["late_by_cause"].get(cause, 0) + 1
                w["lateness"].append(t_applied - t_failed)
    for d in server_late:
        phase = phase_at(phases, d["failed_at_s"])
        _bump(out, phase, "late_run_on_servers", 1)
        _bump(out, phase, "late_run_on_servers_not_seen_by_client", not d["seen_by_client"])
    for entry in out.values():
        w = entry["writes"]
        lateness = sorted(w.pop("lateness"))
        w["late_apply_after_failure_s"] = {
            "n": len(lateness),
            **({"median": round(lateness[len(lateness) // 2], 2),
                "max": round(lateness[-1], 2)} if lateness else {})}
    return out


def _bump(out: dict[str, Any], phase: str | None, key: str, n: int) -> None:
    if phase in out:
        out[phase]["writes"][key] += n


def print_partitions(report: dict[str, Any]) -> None:
    for name, p in report.items():
        w, u = p["writes"], p["unavailability"]
        print(f"  {name:>12} @{p['t_s']:7.2f}s  lost {w['lost']}, duplicated "
              f"{w['duplicated']}, late applies {w['late_applies']} {w['late_by_cause']} "
              f"(applied after the failure: {w['late_apply_after_failure_s']}); run late "
              f"on a server {w['late_run_on_servers']} (never seen by the client "
              f"{w['late_run_on_servers_not_seen_by_client']})")
        if not u:
            continue
        after = next(k for k in u if k.endswith("_after_heal"))
        print(f"  {'':>12}  {u['cuts']} cut(s): failed during {u['failed_during_cut']}, "
              f"{after.removeprefix('failed_').replace('_', ' ')} {u[after]}; sessions with "
              f"failures {u['sessions_with_failures']}/{u['sessions']}, never ok "
              f"{u['never_ok']}")
        print(f"  {'':>12}  cut->first ok {_p(u['cut_to_ok'])}; request->ok "
              f"{_p(u['request_to_ok'])}; longest wait per session {_p(u['longest_wait'])}")


def _p(d: dict[str, Any]) -> str:
    if not d.get("n"):
        return "-"
    return f"p50 {d['p50_ms']:.0f} / p99 {d['p99_ms']:.0f} / max {d['max_ms']:.0f} ms"
