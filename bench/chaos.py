"""Failover under fire: N sessions doing read-modify-write through the proxy while backends
are killed, hung and restarted, or cut from each other; every acknowledged value is checked.

    python bench/chaos.py --sessions 200 --duration 60 --scenario all --out bench/out/chaos
    python bench/chaos.py --scenario partitions --out bench/out/partitions   # root, nft

Starts a real cluster (3 backends + the proxy, `tests/cluster.py`), runs the clients
(`bench/chaos_load.py`), runs the fault schedule below in a thread, then judges the
histories (`bench/chaos_check.py`), writes `summary.json`, `timeline.png`, `attempts.csv.gz`
and keeps the processes' JSON logs in `<out>/cluster/`. Partition scenarios
(`bench/chaos_partitions.py`) run every process under a uid of its own and cut links with
nftables (`tests/netfault.py`). See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos_check import (  # noqa: E402
    Cut,
    Execution,
    Fault,
    check_session,
    failures_by_cause,
    percentiles,
    recovery,
    reprotection,
    server_executions,
    timeline,
)
from bench.chaos_load import SessionClient, run_clients  # noqa: E402
from bench.chaos_partitions import (  # noqa: E402
    PARTITION_SCENARIOS,
    PROXY,
    partition_report,
    print_partitions,
)
from bench.chaos_plot import draw_timeline  # noqa: E402
from tests.cluster import Cluster  # noqa: E402
from tests.netfault import (  # noqa: E402
    Partition,
    cluster_endpoints,
    reserve_uids,
    unavailable_reason,
)

SERVERS = ("s1", "s2", "s3")
# --machines (the partition scenarios): the layout of the partition issue — a secondary is
# chosen on another machine first, so s1's and s2's sessions are replicated to s3
MACHINES = {"s1": "m1", "s2": "m1", "s3": "m2"}
# --hosts: each server on a loopback address of its own, as on hosts of their own (the
# address is also its machine); with --machines, s1 and s2 share one, as in MACHINES
HOSTS = {"s1": "127.0.0.1", "s2": "127.0.0.2", "s3": "127.0.0.3"}
HOSTS_MACHINES = {"s1": "127.0.0.1", "s2": "127.0.0.1", "s3": "127.0.0.2"}

# The fault schedule: steps run one after the other while the clients run.
#   ("sigkill"|"sigstop"|"sigcont"|"sigterm", server)  send the signal (sigkill/sigterm:
#                                                        and wait until the process exited)
#   ("restart", server)   start the process again, wait until it serves and the cluster
#                         has re-formed (every server sees every other one alive)
#   ("sleep", seconds)
#   ("phase", name)       a scenario starts (partition scenarios report per phase)
#   ("cut"|"heal", ((a, b), ...))   cut or heal network links between processes (servers,
#                         "proxy") in one step
#   ("formed", None)      wait until the cluster has re-formed (noted if it does not)
SCENARIOS: dict[str, list[tuple[str, Any]]] = {
    "kill": [("sigkill", "s1"), ("sleep", 5.0), ("restart", "s1"), ("sleep", 5.0)],
    "hang": [("sigstop", "s2"), ("sleep", 5.0), ("sigcont", "s2"), ("sleep", 5.0)],
    "rolling": [step for sid in SERVERS
                for step in (("sigterm", sid), ("restart", sid), ("sleep", 2.0))]
               + [("sleep", 3.0)],
}
# every server killed once (more samples of the SIGKILL path, e.g. for the async loss window)
SCENARIOS["kills"] = [step for sid in SERVERS
                      for step in (("sigkill", sid), ("sleep", 3.0), ("restart", sid),
                                   ("sleep", 5.0))]
SCENARIOS["all"] = SCENARIOS["kill"] + SCENARIOS["hang"] + SCENARIOS["rolling"]
SCENARIOS["none"] = []  # the load alone: a baseline
SCENARIOS.update(PARTITION_SCENARIOS)
FAULT_KINDS = ("sigkill", "sigstop", "sigterm")


class FaultRunner:
    """Runs a schedule against the cluster (blocking calls: run it in a thread)."""

    def __init__(self, cluster: Cluster, steps: list[tuple[str, Any]], t0: float, *,
                 net: Partition | None = None) -> None:
        self.cluster = cluster
        self.steps = steps
        self.t0 = t0
        self.net = net
        self.events: list[tuple[float, str, str]] = []   # (t, kind, label)
        self.faults: list[Fault] = []
        self.cuts: list[Cut] = []
        self.phases: list[tuple[float, str]] = []  # (start, scenario name)
        self.notes: list[str] = []
        self.error: BaseException | None = None
        self.expected_down: set[str] = set()   # killed or drained by the schedule
        self.unexpected_exits: list[dict[str, Any]] = []
        self.cancel = threading.Event()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _open(self, target: str) -> Fault | None:
        return next((f for f in reversed(self.faults)
                     if f.target == target and f.t_back is None), None)

    def run(self) -> None:
        try:
            for op, arg in self.steps:
                if self.cancel.is_set():
                    return
                self._step(op, arg)
        except BaseException as exc:  # reported in the summary; the load still stops cleanly
            self.error = exc
            self.notes.append(f"schedule failed at {self.now():.2f}s: {exc!r}")

    def check_processes(self) -> None:
        """Note a server process that died without the schedule killing it."""
        for sid, spec in self.cluster.servers.items():
            proc = spec["proc"]
            if (proc is None or sid in self.expected_down or proc.poll() is None
                    or any(e["pid"] == proc.pid for e in self.unexpected_exits)):
                continue
            exit_ = {"server": sid, "pid": proc.pid, "returncode": proc.returncode,
                     "noticed_at_s": round(self.now(), 2)}
            self.unexpected_exits.append(exit_)
            self.events.append((self.now(), "exited", f"{sid} died ({proc.returncode})"))
            self.notes.append(f"{sid} (pid {proc.pid}) exited unexpectedly with "
                              f"{proc.returncode}, noticed at {self.now():.2f}s")

    def _step(self, op: str, arg: Any) -> None:
        c = self.cluster
        if op == "sleep":
            self.cancel.wait(float(arg))
            return
        if op in FAULT_KINDS:
            sig = {"sigkill": signal.SIGKILL, "sigstop": signal.SIGSTOP,
                   "sigterm": signal.SIGTERM}[op]
            t = self.now()
            self.faults.append(Fault(op, arg, t))
            self.events.append((t, op, f"{op.upper()} {arg}"))
            if op != "sigstop":
                self.expected_down.add(arg)
            c.kill(arg, sig)
            if op == "sigterm":
                code = c.servers[arg]["proc"].returncode
                self.events.append((self.now(), "exited", f"{arg} exited ({code})"))
                self.notes.append(f"{arg} drained and exited with {code} after "
                                  f"{self.now() - t:.2f}s")
            return
        if op == "sigcont":
            c.kill(arg, signal.SIGCONT)
            t = self.now()
            self.events.append((t, "sigcont", f"SIGCONT {arg}"))
            fault = self._open(arg)
            if fault is not None:
                fault.t_back = t
            return
        if op == "restart":
            t = self.now()
            self.events.append((t, "restart", f"restart {arg}"))
            c.start_server(arg)
            self.expected_down.discard(arg)
            fault = self._open(arg)
            if fault is not None:
                fault.t_back = self.now()
            c.wait_formed()
            self.events.append((self.now(), "rejoined", f"{arg} rejoined"))
            self.notes.append(f"{arg} restarted: serving after {self.now() - t:.2f}s")
            return
        if op in ("phase", "cut", "heal", "formed"):
            self._net_step(op, arg)
            return
        raise ValueError(f"unknown schedule step {op!r}")


    def _net_step(self, op: str, arg: Any) -> None:
        t = self.now()
        if op == "phase":
            self.phases.append((t, arg))
            self.events.append((t, "phase", f"{arg}"))
            return
        if op == "formed":
            try:
                self.cluster.wait_formed(timeout=30.0)
                self.events.append((self.now(), "rejoined", "re-formed"))
                self.notes.append(f"cluster re-formed {self.now() - t:.2f}s after {t:.2f}s")
            except TimeoutError:
                self.notes.append(f"cluster not re-formed 30 s after {t:.2f}s")
            return
        if self.net is None:
            raise RuntimeError(f"{op} needs a partition (the processes under their own uids)")
        links = tuple((a, b) for a, b in arg)
        label = Cut(links, t).label
        if op == "cut":
            self.net.cut(*links)
            phase = self.phases[-1][1] if self.phases else None
            self.cuts.append(Cut(links, t, phase=phase))
            self.events.append((t, "cut", label))
        else:
            self.net.heal(*links)
            cut = next((c for c in reversed(self.cuts)
                        if c.links == links and c.t_heal is None), None)
            if cut is not None:
                cut.t_heal = t
            self.events.append((t, "heal", "heal" + label.removeprefix("cut")))


# --- logs -------------------------------------------------------------------------------

def _log_events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    try:
        return cluster.events(name)
    except FileNotFoundError:
        return []


def _rel(event: dict[str, Any], t0_wall: float) -> float | None:
    ts = event.get("timestamp")
    if not ts:
        return None
    return datetime.fromisoformat(ts).timestamp() - t0_wall


def analyse_logs(cluster: Cluster, faults: list[Fault], t0_wall: float) -> dict[str, Any]:
    """Detection times (into `faults`) and counts of the events that matter, per process."""
    counts: dict[str, dict[str, int]] = {}
    detections: dict[str, list[tuple[float, str, str]]] = {}
    reprotected: list[dict[str, Any]] = []
    failovers: dict[tuple[float, str, str, str], int] = {}
    interesting = {"peer_failed", "peer_draining", "peer_left", "promoted", "fetched",
                   "session_lost", "session_unprotected", "session_moved",
                   "replication_rejected", "session_not_handed_over", "taken_over",
                   "reprotected", "failover", "upstream_failed", "no_backend",
                   "upstream_timeout", "upstream_truncated", "internal_error", "app_error",
                   "replication_handler_error", "drained"}
    for name in (*cluster.servers, "proxy"):
        per: dict[str, int] = {}
        for e in _log_events(cluster, name):
            ev = e.get("event", "")
            if ev in interesting or e.get("level") in ("error", "critical"):
                key = ev if ev != "failover" else f"failover:{e.get('cause')}"
                per[key] = per.get(key, 0) + 1
            t = _rel(e, t0_wall)
            if t is None:
                continue
            if ev in ("peer_failed", "peer_draining", "peer_left"):
                detections.setdefault(e["peer"], []).append((t, name, ev))
            elif ev == "failover" and name == "proxy":
                key = (round(t, 1), e.get("from_"), e.get("to"), e.get("cause"))
                failovers[key] = failovers.get(key, 0) + 1
            elif ev == "reprotected":
                reprotected.append({"t": round(t, 3), "server": name, "cause": e.get("cause"),
                                    "sessions": e.get("sessions"), "seconds": e.get("seconds")})
        counts[name] = dict(sorted(per.items()))
    for f in faults:
        seen = sorted(d for d in detections.get(f.target, []) if d[0] >= f.t - 0.05)
        if seen:
            f.t_detected = seen[0][0]
    return {"event_counts": counts, "reprotected": sorted(reprotected, key=lambda r: r["t"]),
            # the proxy's failovers per 100 ms: (t, from, to, cause, count)
            "proxy_failovers": [[*k, n] for k, n in sorted(failovers.items())][:300]}


def write_executions(cluster: Cluster, t0: float) -> list[Execution]:
    """Every write the servers' app ran (`chaos_write`, POST load on bench/chaos_app.py)."""
    out = []
    for sid in cluster.servers:
        for e in _log_events(cluster, sid):
            if e.get("event") == "chaos_write":
                out.append(Execution(sid, int(e["client"]), int(e["write"]),
                                     round(float(e["at"]) - t0, 4), int(e["counter"]),
                                     str(e.get("sid"))))
    return out


def scrape_metrics(cluster: Cluster) -> dict[str, float]:
    url = f"http://127.0.0.1:{cluster.admin_port}/__tandem/metrics"
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if "latency" in name or "backend_state" in name:
            continue
        out[name] = float(value)
    return out


# --- CPU --------------------------------------------------------------------------------

def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _pid_cpu_ticks(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])


async def cpu_sampler(stop: asyncio.Event, cluster: Cluster, samples: list[dict[str, float]],
                      t0: float, runner: FaultRunner) -> None:
    """Every second: how busy the machine was, and how much of it was this run's processes
    (the cluster and the load generator) — the rest is someone else's load on the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    ncpu = os.cpu_count() or 1

    def pids() -> list[int]:
        procs = [v["proc"] for v in cluster.servers.values()] + [cluster.proxy_proc]
        return [os.getpid(), *(p.pid for p in procs if p is not None)]

    last_ticks = {pid: _pid_cpu_ticks(pid) or 0 for pid in pids()}
    busy0, total0 = _cpu_times()
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        runner.check_processes()
        busy, total = _cpu_times()
        own = 0
        for pid in pids():
            now = _pid_cpu_ticks(pid)
            if now is not None:
                own += now - last_ticks.get(pid, 0)
                last_ticks[pid] = now
        if total > total0:
            machine = (busy - busy0) / (total - total0) * ncpu
            own_cores = own / tick / ((total - total0) / tick / ncpu)
            samples.append({"t": round(time.monotonic() - t0, 2), "machine": round(machine, 3),
                            "own": round(own_cores, 3)})
        busy0, total0 = busy, total


def process_cpu(cluster: Cluster) -> dict[str, float]:
    """CPU seconds (user + system) of each cluster process still running (since its start)."""
    procs = {sid: v["proc"] for sid, v in cluster.servers.items()}
    procs["proxy"] = cluster.proxy_proc
    out = {}
    for name, proc in procs.items():
        ticks = None if proc is None else _pid_cpu_ticks(proc.pid)
        if ticks is not None:
            out[name] = round(ticks / os.sysconf("SC_CLK_TCK"), 2)
    return out


# --- the run ----------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "cluster").mkdir(parents=True)
    session: dict[str, Any] = {"replication": args.replication}
    proxy = {"io_timeout_s": args.io_timeout, "max_skip_s": args.max_skip}
    with contextlib.ExitStack() as stack:
        # every process under a uid of its own, so that links between them can be cut
        uids = stack.enter_context(reserve_uids([*SERVERS, PROXY])).uids if args.uids else {}
        hosts = (HOSTS_MACHINES if args.machines else HOSTS) if args.hosts else {}
        servers = [{"id": sid, **({"host": hosts[sid]} if hosts else {}),
                    **({"machine": MACHINES[sid]} if args.machines and not hosts else {})}
                   for sid in SERVERS]
        cluster = Cluster(out / "cluster", servers=servers, app=args.app, session=session,
                          proxy=proxy,
                          cluster={"drain_timeout_s": 15.0, "rebalance": args.rebalance},
                          log_level=args.log_level, uids=uids)
        net = None
        if uids:
            net = stack.enter_context(Partition(cluster_endpoints(cluster.config_path, uids)))
        return await _run(args, out, cluster, net)


async def _run(args: argparse.Namespace, out: Path, cluster: Cluster,
               net: Partition | None) -> dict[str, Any]:
    steps = [("sleep", args.warmup), *SCENARIOS[args.scenario]]
    dropped: dict[str, int] = {}
    try:
        await asyncio.to_thread(cluster.start)
        clients = [SessionClient(i, "127.0.0.1", cluster.proxy_port, timeout_s=args.timeout,
                                 method=args.method)
                   for i in range(args.sessions)]
        stop = asyncio.Event()
        cpu: list[dict[str, float]] = []
        t0 = time.monotonic()
        t0_wall = time.time()
        cpu0 = time.process_time()
        runner = FaultRunner(cluster, steps, t0, net=net)
        load = asyncio.create_task(run_clients(clients, t0=t0, rate=args.rate, stop=stop))
        sampler = asyncio.create_task(cpu_sampler(stop, cluster, cpu, t0, runner))
        schedule = asyncio.create_task(asyncio.to_thread(runner.run))
        try:
            await asyncio.sleep(args.duration)
            await schedule  # the schedule may outlast --duration: the load goes on with it
        finally:
            runner.cancel.set()
            with contextlib.suppress(BaseException):
                await schedule
            stop.set()
            await load
            await sampler
            if net is not None:
                net.heal_all()
                dropped = net.dropped()
        elapsed = time.monotonic() - t0
        load_cpu = time.process_time() - cpu0
        metrics = scrape_metrics(cluster)
        proc_cpu = process_cpu(cluster)
        health = {}
        for sid in SERVERS:
            try:
                h = cluster.health(sid)
                health[sid] = {k: h[k] for k in ("state", "primaries", "replicas", "stats")}
            except OSError as exc:
                health[sid] = {"error": str(exc)}
    finally:
        await asyncio.to_thread(cluster.close)
    logs = analyse_logs(cluster, runner.faults, t0_wall)
    histories = [c.history for c in clients]
    executed = server_executions(histories, write_executions(cluster, t0))
    summary = judge(args, histories, runner, logs, metrics, health, t0_wall, elapsed, load_cpu,
                    cpu, executed)
    summary["cpu"]["process_cpu_s"] = proc_cpu
    if net is not None:
        summary["partition"] = {"uids": {n: e.uid for n, e in net.members.items()},
                                "ports": {n: e.ports for n, e in net.members.items()},
                                "packets_dropped": dropped}
    _write_attempts(out / "attempts.csv.gz", histories)
    ts, ok, bad, p99 = timeline(histories)
    title = (f"tandem chaos: {args.sessions} sessions x {args.rate:g} req/s, scenario "
             f"{args.scenario}, replication {args.replication} — lost "
             f"{summary['writes']['lost']}, duplicated {summary['writes']['duplicated']}, "
             f"failed {summary['requests']['failed']}"
             + (f", late applies {summary['writes']['late_applies']}"
                if args.method == "POST" else ""))
    draw_timeline(out / "timeline.png", ts=ts, ok=ok, bad=bad, p99_ms=p99,
                  events=runner.events, title=title, cpu=summary["cpu"].get("per_second", []))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def judge(args: argparse.Namespace, histories: list[list[Any]], runner: FaultRunner,
          logs: dict[str, Any], metrics: dict[str, float], health: dict[str, Any],
          t0_wall: float, elapsed: float, load_cpu: float, cpu: list[dict[str, float]],
          executed: dict[str, Any]) -> dict[str, Any]:
    verdicts = [check_session(i, h) for i, h in enumerate(histories)]
    attempts = [a for h in histories for a in h]
    failed = [a for a in attempts if not a.ok]
    idempotent = args.method == "GET"
    faults = runner.faults
    per_fault = []
    for f in faults:
        entry = {"fault": f.label, "t_s": round(f.t, 3),
                 "t_back_s": None if f.t_back is None else round(f.t_back, 3),
                 "recovery": recovery(histories, f),
                 "reprotection": reprotection(histories, f, faults),
                 "failed_requests_until_back": sum(
                     1 for a in failed if f.t <= a.end <= (f.t_back or elapsed)),
                 # the servers' own view: `reprotected` log events caused by this fault
                 # (secondaries replaced, full state sent, ack received), with their duration
                 "server_reprotected": [
                     r for r in logs["reprotected"]
                     if str(r.get("cause", "")).startswith(f.target + " ")
                     and f.t - 0.05 <= r["t"] <= (f.t_back or elapsed)]}
        per_fault.append(entry)
    lost_events = [(e, v.session) for v in verdicts for e in v.lost_events]
    loss_detail = []
    # signals and network cuts, in time order: a loss is put down to the last one before it
    injected: list[Fault | Cut] = sorted([*faults, *runner.cuts], key=lambda f: f.t)
    for (t_seen, n, acked), sess in sorted(lost_events)[:200]:
        before = [f for f in injected if f.t <= t_seen]
        f = before[-1] if before else None
        loss_detail.append({
            "session": sess, "t_seen_s": round(t_seen, 3), "lost": n,
            "fault": f.label if f else None,
            # how long before the fault each lost write had been acknowledged (ms; negative:
            # acknowledged after it — during a cut, by a server on the wrong side of it)
            "acked_before_fault_ms": [round((f.t - t) * 1000, 1) for t in acked] if f else [],
        })
    ages = [a for d in loss_detail for a in d["acked_before_fault_ms"]]
    latencies = [a.end - a.start for a in attempts if a.ok]
    summary: dict[str, Any] = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]]),
        "config": {"sessions": args.sessions, "rate_per_session": args.rate,
                   "scenario": args.scenario, "replication": args.replication,
                   "proxy_io_timeout_s": args.io_timeout, "proxy_max_skip_s": args.max_skip,
                   "client_timeout_s": args.timeout, "warmup_s": args.warmup,
                   "method": args.method, "app": args.app,
                   "processes_under_own_uids": args.uids,
                   "machines": MACHINES if args.machines else None,
                   "hosts": ((HOSTS_MACHINES if args.machines else HOSTS) if args.hosts
                             else None),
                   "heartbeat": "0.5 s x 3 (tests/cluster.py)", "cpus": os.cpu_count(),
                   "log_level": args.log_level},
        "code": code_version(),
        "t0_unix": t0_wall,
        "elapsed_s": round(elapsed, 2),
        "requests": {"total": len(attempts), "ok": len(attempts) - len(failed),
                     "failed": len(failed),
                   "failed_idempotent": len(failed) if idempotent else 0,
                     "by_cause": failures_by_cause(histories),
                     "rate_per_s": round(len(attempts) / elapsed, 1),
                     "latency_ok": percentiles(latencies, (50, 99, 99.9))},
        "writes": {"acked": sum(v.acked for v in verdicts),
                   "lost": sum(v.lost for v in verdicts),
                   "duplicated": sum(v.duplicated for v in verdicts),
                   "ambiguous_applied_failed": sum(v.ambiguous for v in verdicts),
                   "sessions_with_loss": sum(1 for v in verdicts if v.lost),
                   "sessions_with_duplicate": sum(1 for v in verdicts if v.duplicated),
                   # write log (POST): failed writes applied after the failure was answered,
                   # or before it (the answer lost); write numbers applied more than once
                   "late_applies": sum(v.late_applies for v in verdicts),
                   "applied_failed": sum(v.applied_failed for v in verdicts),
                   "duplicated_by_write_id": sum(v.duplicated_by_id for v in verdicts),
                   "late_events": [{"session": s, "failed_at_s": round(tf, 3),
                                    "applied_at_s": round(ta, 3), "write": w, "cause": c}
                                   for tf, s, ta, w, c in sorted(
                                       (tf, v.session, ta, w, c) for v in verdicts
                                       for tf, ta, w, c in v.late_events)][:200],
                   # the servers' logs: every write their app ran, committed or not, on
                   # whichever copy of the session
                   "server_side": {**executed, "late_events": executed["late_events"][:200]},
                   "session_id_changes": sum(v.sid_changes for v in verdicts),
                   "loss_events": loss_detail,
                   "lost_acked_before_fault": percentiles([a / 1000 for a in ages]),
                   "dup_events": sorted(({"session": v.session, "t_s": round(t, 3), "dup": d,
                                          "failed_since_ack": fs, "after": _last_fault(injected, t)}
                                         for v in verdicts for (t, d, fs) in v.dup_events),
                                        key=lambda d: d["t_s"])[:200]},
        "faults": per_fault,
        # partition scenarios, per phase: cuts, unavailability, writes lost/duplicated/late
        "partitions": partition_report(histories, verdicts, runner.cuts, runner.phases,
                                       executed["late_events"]),
        "events": [{"t_s": round(t, 3), "event": label} for t, _, label in runner.events],
        "schedule_notes": runner.notes,
        "unexpected_exits": runner.unexpected_exits,
        "first_failures": [{"t_s": round(a.start, 3), "end_s": round(a.end, 3),
                            "session": a.session, "cause": a.cause}
                           for a in sorted(failed, key=lambda a: a.start)[:100]],
        "cpu": _cpu_summary(cpu, load_cpu / elapsed),
        "proxy_metrics": metrics,
        "backend_health_at_end": health,
        "logs": logs,
    }
    summary["targets"] = targets(summary)
    return summary


def _last_fault(faults: list[Fault | Cut], t: float) -> str | None:
    before = [f for f in faults if f.t <= t]
    return f"{before[-1].label} @{before[-1].t:.2f}s" if before else None


def _cpu_summary(cpu: list[dict[str, float]], load_cores: float) -> dict[str, Any]:
    """Cores in use (of os.cpu_count()): the machine, this run's processes, everything else."""
    if not cpu:
        return {}
    n = len(cpu)
    machine = sum(c["machine"] for c in cpu) / n
    own = sum(c["own"] for c in cpu) / n
    return {"cores": os.cpu_count(), "machine_busy_cores_mean": round(machine, 2),
            "machine_busy_cores_max_1s": round(max(c["machine"] for c in cpu), 2),
            "run_cores_mean": round(own, 2), "other_load_cores_mean": round(machine - own, 2),
            "load_generator_cores": round(load_cores, 2),
            "seconds_machine_saturated": sum(1 for c in cpu if c["machine"] > 0.95 * (
                os.cpu_count() or 1)),
            "per_second": [[c["t"], c["machine"], c["own"]] for c in cpu]}


def targets(s: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets, met or not (only for the faults this run injected)."""
    out: dict[str, Any] = {
        "zero_lost_writes": s["writes"]["lost"] == 0,
        "zero_duplicated_writes": s["writes"]["duplicated"] == 0,
        "zero_failed_idempotent_requests": s["requests"]["failed_idempotent"] == 0,
    }
    if s["config"]["method"] == "POST":
        out["zero_late_applies"] = s["writes"]["late_applies"] == 0
        out["zero_late_executions_on_servers"] = s["writes"]["server_side"]["late"] == 0
    kills = [f for f in s["faults"] if f["fault"].startswith("sigkill")]
    if kills:
        worst = max(f["recovery"]["request_to_ok"].get("p99_ms", float("inf")) for f in kills)
        out["first_good_after_sigkill_p99_le_50ms"] = {"met": worst <= 50, "p99_ms": worst}
    worst_rp = None
    for f in s["faults"]:
        rp = f["reprotection"]
        m = rp.get("since_detection", rp["since_fault"]).get("max_ms")
        if rp["never_reprotected"]:
            m = float("inf")
        if m is not None:
            worst_rp = m if worst_rp is None else max(worst_rp, m)
    if worst_rp is not None:
        out["every_session_reprotected_within_2s_of_detection"] = {
            "met": worst_rp <= 2000, "worst_ms": worst_rp}
    return out


def code_version() -> dict[str, Any]:
    """The commit measured, and whether the runtime's files differ from it."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except OSError:
            return ""
    dirty = git("status", "--porcelain", "--", "backends", "proxy").splitlines()
    return {"commit": git("rev-parse", "HEAD"), "runtime_changes_uncommitted": dirty}


def _write_attempts(path: Path, histories: list[list[Any]]) -> None:
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["session", "start_s", "end_s", "cause", "status", "counter", "server",
                    "primary", "secondary", "sid8"])
        for h in histories:
            for a in h:
                w.writerow([a.session, f"{a.start:.4f}", f"{a.end:.4f}", a.cause, a.status,
                            a.counter, a.server, a.primary, a.secondary,
                            (a.sid or "")[:8]])


def print_summary(s: dict[str, Any]) -> None:
    r, w = s["requests"], s["writes"]
    print(f"requests {r['total']} ({r['rate_per_s']}/s), ok {r['ok']}, failed {r['failed']} "
          f"{r['by_cause']}; latency {r['latency_ok']}")
    print(f"writes acked {w['acked']}, lost {w['lost']} (in {w['sessions_with_loss']} "
          f"sessions), duplicated {w['duplicated']}, ambiguous {w['ambiguous_applied_failed']},"
          f" session id changes {w['session_id_changes']}")
    if s["config"]["method"] == "POST":
        print(f"write log: late applies {w['late_applies']}, failed writes applied before "
              f"their failure was answered {w['applied_failed']}, write numbers applied "
              f"twice {w['duplicated_by_write_id']}")
        ss = w["server_side"]
        print(f"servers ran {ss['executions']} writes: failed ones run after their failure "
              f"was answered {ss['late']} (never seen by the client "
              f"{ss['late_not_seen_by_client']}), before it {ss['failed_run_before_answer']}"
              f"; writes run more than once {ss['run_more_than_once']}")
    print_partitions(s["partitions"])
    for f in s["faults"]:
        rc, rp = f["recovery"], f["reprotection"]
        print(f"  {f['fault']:>14} @{f['t_s']:7.2f}s  hit {rc['sessions']:3d} sessions, "
              f"failed {f['failed_requests_until_back']:4d}; first good: request "
              f"{rc['request_to_ok']}, fault {rc['fault_to_ok']}; all requests in the 5 s "
              f"before {rc['latency_5s_before_fault']}")
        server = [(r["server"], r["sessions"], r["seconds"]) for r in f["server_reprotected"]]
        print(f"  {'':>14}  server-side reprotected (server, sessions, s): {server}")
        print(f"  {'':>14}  re-protected {rp['sessions']} sessions: detected after "
              f"{rp.get('detected_after_ms')} ms; since detection {rp.get('since_detection')};"
              f" never {rp['never_reprotected']}")
    for note in s["schedule_notes"]:
        print(f"  note: {note}")
    print(f"cpu: { {k: v for k, v in s['cpu'].items() if k != 'per_second'} }")
    print(f"targets: {json.dumps(s['targets'])}")


def replot(out: Path) -> None:
    """Draw `timeline.png` again from a run's `attempts.csv.gz` and `summary.json`."""
    from bench.chaos_load import Attempt

    summary = json.loads((out / "summary.json").read_text())
    histories: dict[int, list[Attempt]] = {}
    with gzip.open(out / "attempts.csv.gz", "rt", newline="") as f:
        for row in csv.DictReader(f):
            a = Attempt(int(row["session"]), float(row["start_s"]), float(row["end_s"]),
                        row["cause"])
            histories.setdefault(a.session, []).append(a)
    ts, ok, bad, p99 = timeline(list(histories.values()))
    kinds = {"SIGKILL": "sigkill", "SIGSTOP": "sigstop", "SIGCONT": "sigcont",
             "SIGTERM": "sigterm", "restart": "restart", "cut": "cut", "heal": "heal",
             "re-formed": "rejoined"}
    events = []
    for e in summary["events"]:
        word = e["event"].split()[0]
        kind = kinds.get(word) or ("rejoined" if "rejoined" in e["event"] else
                                   "phase" if word.startswith("partition") else "exited")
        events.append((e["t_s"], kind, e["event"]))
    c, w, r = summary["config"], summary["writes"], summary["requests"]
    title = (f"tandem chaos: {c['sessions']} sessions x {c['rate_per_session']:g} req/s, "
             f"scenario {c['scenario']}, replication {c['replication']} — lost {w['lost']}, "
             f"duplicated {w['duplicated']}, failed {r['failed']}")
    draw_timeline(out / "timeline.png", ts=ts, ok=ok, bad=bad, p99_ms=p99, events=events,
                  title=title, cpu=summary["cpu"].get("per_second", []))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int,
                   help="concurrent clients (default 200; 60 for the partition scenarios)")
    p.add_argument("--rate", type=float, default=2.0,
                   help="requests/s of each client (default 2: 400 req/s in all)")
    p.add_argument("--duration", type=float, default=60.0,
                   help="seconds of load at least; it goes on until the schedule ends")
    p.add_argument("--scenario", choices=sorted(SCENARIOS), default="all")
    p.add_argument("--replication", choices=("sync", "async"), default="sync",
                   help="session.replication of the cluster")
    p.add_argument("--warmup", type=float, default=5.0,
                   help="seconds of load before the first fault")
    p.add_argument("--io-timeout", type=float, default=5.0,
                   help="proxy.io_timeout_s (default 5, as tests/cluster.py): a hung backend "
                   "is failed over after this")
    p.add_argument("--max-skip", type=float, default=10.0, help="proxy.max_skip_s")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request")
    p.add_argument("--rebalance", action=argparse.BooleanOptionalAction, default=True,
                   help="cluster.rebalance (default on, as in a cluster file)")
    p.add_argument("--method", choices=("GET", "POST"),
                   help="GET /count (default), or POST /count with a write number, whose "
                   "late applies are checked (default for the partition scenarios)")
    p.add_argument("--uids", action=argparse.BooleanOptionalAction,
                   help="run every backend and the proxy under a uid of its own (default: "
                   "only for the partition scenarios, which need it; root)")
    p.add_argument("--machines", action=argparse.BooleanOptionalAction,
                   help="place s1 and s2 on machine m1, s3 on m2 (default: only for the "
                   "partition scenarios)")
    p.add_argument("--hosts", action="store_true",
                   help="each server on a loopback address of its own (127.0.0.1-3), which "
                   "is also its machine; with --machines s1 and s2 share 127.0.0.1")
    p.add_argument("--app", help="default tests.apps:asgi_counter for GET, "
                   "bench.chaos_app:app for POST")
    p.add_argument("--log-level", default="INFO", help="TANDEM_LOG_LEVEL of the processes")
    p.add_argument("--out", default="bench/out/chaos", help="output directory (replaced)")
    p.add_argument("--replot", metavar="DIR",
                   help="only draw DIR/timeline.png again from a finished run's files")
    args = p.parse_args(argv)
    if args.replot:
        replot(Path(args.replot))
        return 0
    partitions = any(op == "cut" for op, _ in SCENARIOS[args.scenario])
    args.sessions = args.sessions or (60 if partitions else 200)
    args.method = args.method or ("POST" if partitions else "GET")
    args.uids = partitions if args.uids is None else args.uids
    args.machines = partitions if args.machines is None else args.machines
    args.app = args.app or ("bench.chaos_app:app" if args.method == "POST"
                            else "tests.apps:asgi_counter")
    if args.uids and (reason := unavailable_reason()) is not None:
        p.error(f"--scenario {args.scenario} cuts network links: {reason}")
    # a killed run still deletes its nftables rules and its processes (the `with` blocks
    # unwind on SystemExit; tests/netfault.py's atexit is the last resort)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    summary = asyncio.run(run(args))
    print_summary(summary)
    print(f"wrote {args.out}/summary.json, timeline.png, attempts.csv.gz, cluster/*.log")
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
