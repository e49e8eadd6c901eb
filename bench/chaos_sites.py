"""The chaos harness across two sites (docs/sites.md): sessions doing read-modify-write while
servers of site A are killed and hung, the link between the sites is cut, and then every
server of site A is killed; every acknowledged value is checked.

    python bench/chaos_sites.py --mode man --sessions 60 --out bench/out/chaos-sites

Two clusters of 3 servers with their proxies (`tests/sites.py`), each server on a loopback
address of its own (site A on 127.0.1.1-3, site B on 127.0.2.1-3), local replication sync.
The clients (`bench/chaos_load.py`, `GET /count`) reach the sites the way a global load
balancer sends them (`bench/chaos_glb.py`); the judge is `bench/chaos_check.py`'s.

The global load balancer (not part of tandem; DNS failover, anycast or a GSLB in a real
deployment) monitors each site: it probes every server's `/__tandem/health` every 0.25 s
(0.5 s timeout), and a site is up while one of its servers answers. A client goes to its
home site while that site is up, and to the other site while it is not (and back when it
is up again). Three groups of clients:

- `a` (half): home site A, through the balancer: A's proxy until A is lost, then B's;
- `b` (a quarter): home site B, through the balancer (B is never lost: B's sessions, whose
  copies site A keeps, go on through the whole run);
- `ab` (a quarter): made at A's proxy, then every request through B's proxy — the proxy
  tier's cluster affinity sends them to site A while A is up (a client that moved).

The schedule: SIGKILL a1 and restart it; SIGSTOP a2 for 4 s; the link between the sites cut
for 5 s (nftables, `tests/netfault.py`: every server and proxy under a uid of its own; every
connection between a process of A and one of B dropped — the balancer and the clients are
outside both sites and reach both), healed, and the wait until both sites have caught up
(`sites.behind` 0 on every server: the loss window of a link failure is closed); then
SIGKILL of every server of A at once, 10 s of load at B; then site A started again, 8 s.
Without nftables (`--link stop`), the link cut is a SIGSTOP of every server of B instead.

Writes `summary.json` (and `timeline.png` with matplotlib) into `--out`, and keeps the
processes' logs in `<out>/sites/`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.chaos_check import (  # noqa: E402
    Fault,
    check_session,
    failures_by_cause,
    percentiles,
    recovery,
    timeline,
)
from bench.chaos_glb import Balancer, SiteClient  # noqa: E402
from bench.chaos_load import run_clients  # noqa: E402
from tests.netfault import (  # noqa: E402
    Partition,
    cluster_endpoints,
    reserve_uids,
    unavailable_reason,
)
from tests.sites import TwoSites  # noqa: E402

HOSTS = {f"{site}{i}": f"127.0.{n}.{i}" for site, n in (("a", 1), ("b", 2)) for i in (1, 2, 3)}
A, B = ("a1", "a2", "a3"), ("b1", "b2", "b3")
GROUPS = ("a", "a", "b", "ab")  # client i is in GROUPS[i % 4]


class Schedule:
    """The fault steps, run in a thread against the two sites."""

    def __init__(self, sites: TwoSites, t0: float, net: Partition | None) -> None:
        self.sites, self.t0, self.net = sites, t0, net
        self.events: list[tuple[float, str, str]] = []
        self.faults: list[Fault] = []
        self.notes: list[str] = []
        self.error: str | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def _event(self, kind: str, label: str) -> float:
        t = self.now()
        self.events.append((t, kind, label))
        return t

    def run(self, warmup_s: float, scenario: str) -> None:
        try:
            time.sleep(warmup_s)
            if scenario == "operator":
                self._operator()
            else:
                self._site_kill()
        except Exception as exc:  # reported in the summary; the load still stops cleanly
            self.error = f"schedule failed at {self.now():.2f}s: {exc!r}"

    def _site_kill(self) -> None:
        a = self.sites.a
        self._kill(["a1"])
        time.sleep(4.0)
        self._restart(["a1"])
        time.sleep(3.0)
        self.faults.append(Fault("sigstop", "a2", self._event("sigstop", "SIGSTOP a2")))
        a.kill("a2", signal.SIGSTOP)
        time.sleep(4.0)
        a.kill("a2", signal.SIGCONT)
        self.faults[-1].t_back = self._event("sigcont", "SIGCONT a2")
        a.wait_formed()
        time.sleep(3.0)
        self._cut_link(5.0)
        self._wait_caught_up()
        time.sleep(2.0)
        self._kill(list(A))  # the whole site, at once
        time.sleep(10.0)
        self._restart(list(A))
        time.sleep(8.0)

    def _operator(self) -> None:
        """Site A hung (every server stopped: silent, not refusing), declared down by an
        operator at B (`tandem site-down`), then resumed: it must not serve the sessions B
        took over."""
        a = self.sites.a
        t = self._event("sigstop", "SIGSTOP a1,a2,a3")
        for sid in A:
            a.kill(sid, signal.SIGSTOP)
            self.faults.append(Fault("sigstop", sid, t))
        time.sleep(3.0)  # B's links to A fail on missed heartbeats (1.5 s)
        deadline = time.monotonic() + 15.0
        while True:
            done = subprocess.run(
                [sys.executable, "-m", "proxy.cli", "site-down", "--config",
                 str(self.sites.b.config_path), "--site", "a"], cwd=ROOT,
                capture_output=True, text=True, timeout=30)
            if done.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self._event("cut", "tandem site-down --site a")
        self.notes.append(f"site-down exited {done.returncode}: {done.stdout.strip()!r}")
        time.sleep(8.0)
        t = self._event("sigcont", "SIGCONT a1,a2,a3")
        for sid in A:
            a.kill(sid, signal.SIGCONT)
        for f in self.faults:
            if f.target in A and f.t_back is None:
                f.t_back = t
        a.wait_formed()
        self._event("rejoined", "site A formed")
        time.sleep(10.0)

    def _kill(self, ids: list[str]) -> None:
        c = self.sites.a
        t = self._event("sigkill", "SIGKILL " + ",".join(ids))
        for sid in ids:
            c.servers[sid]["proc"].send_signal(signal.SIGKILL)
            self.faults.append(Fault("sigkill", sid, t))
        for sid in ids:
            c.servers[sid]["proc"].wait(timeout=20)

    def _restart(self, ids: list[str]) -> None:
        c = self.sites.a
        t = self._event("restart", "restart " + ",".join(ids))
        for sid in ids:
            c.start_server(sid, wait=False)
        for sid in ids:
            c.wait_health(sid)
        c.wait_formed()
        for f in self.faults:
            if f.target in ids and f.t_back is None:
                f.t_back = self.now()
        self._event("rejoined", "site A formed")
        self.notes.append(f"{','.join(ids)} restarted: formed after {self.now() - t:.2f}s")

    def _cut_link(self, seconds: float) -> None:
        if self.net is None:  # (no nftables) site B silent: its processes stopped
            self._event("cut", "SIGSTOP b1,b2,b3 (link)")
            for sid in B:
                self.sites.b.kill(sid, signal.SIGSTOP)
            time.sleep(seconds)
            for sid in B:
                self.sites.b.kill(sid, signal.SIGCONT)
            self._event("heal", "SIGCONT b1,b2,b3")
            return
        links = [(x, y) for x in (*A, "proxy-a") for y in (*B, "proxy-b")
                 if not (x == "proxy-a" and y == "proxy-b")]
        self._event("cut", "cut A|B")
        self.net.cut(*links)
        time.sleep(seconds)
        self.net.heal(*links)
        self._event("heal", "heal A|B")

    def _wait_caught_up(self, timeout_s: float = 60.0) -> None:
        t = self.now()
        deadline = time.monotonic() + timeout_s
        while True:
            behind = {}
            for c in self.sites.clusters.values():
                for sid in c.servers:
                    with contextlib.suppress(OSError):
                        behind[sid] = sum(c.health(sid)["sites"]["behind"].values())
            if len(behind) == 6 and not any(behind.values()):
                break
            if time.monotonic() > deadline:
                self.notes.append(f"not caught up {timeout_s:g}s after the heal: {behind}")
                return
            time.sleep(0.2)
        self._event("rejoined", "caught up")
        self.notes.append(f"both sites caught up {self.now() - t:.2f}s after the heal")


def _health(sites: TwoSites) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in sites.clusters.values():
        for sid in c.servers:
            try:
                h = c.health(sid)
                out[sid] = {"primaries": h["primaries"], "sites": h["sites"],
                            **{k: h["stats"].get(k, 0) for k in (
                                "site_taken_over", "site_sent", "site_failures", "lost",
                                "superseded")}}
            except OSError as exc:
                out[sid] = {"error": str(exc)}
    return out


def judge(clients: list[SiteClient], sched: Schedule, balancer: Balancer, elapsed: float,
          health: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    histories = [c.history for c in clients]
    verdicts = [check_session(i, h) for i, h in enumerate(histories)]
    attempts = [a for h in histories for a in h]
    failed = [a for a in attempts if not a.ok]
    groups: dict[str, dict[str, int]] = {}
    for c, v in zip(clients, verdicts, strict=True):
        g = groups.setdefault(c.group, {"sessions": 0, "acked": 0, "lost": 0,
                                        "duplicated": 0, "ended_at_site_b": 0})
        g["sessions"] += 1
        g["acked"] += v.acked
        g["lost"] += v.lost
        g["duplicated"] += v.duplicated
        g["ended_at_site_b"] += int((c.route()[1] or "").startswith("b"))
    return {
        "command": " ".join(["bench/chaos_sites.py", *sys.argv[1:]]),
        "config": {"scenario": args.scenario, "mode": args.mode, "remote_sync": args.mode == "man",
                   "local_replication": "sync", "sessions": args.sessions,
                   "rate_per_session": args.rate, "link": args.link, "hosts": HOSTS,
                   "groups": {g: GROUPS.count(g) / len(GROUPS) for g in set(GROUPS)}},
        "elapsed_s": round(elapsed, 2),
        "requests": {"total": len(attempts), "ok": len(attempts) - len(failed),
                     "failed": len(failed), "by_cause": failures_by_cause(histories),
                     "latency_ok": percentiles([a.end - a.start for a in attempts if a.ok],
                                               (50, 99, 99.9))},
        "writes": {"acked": sum(v.acked for v in verdicts),
                   "lost": sum(v.lost for v in verdicts),
                   "duplicated": sum(v.duplicated for v in verdicts),
                   "ambiguous_applied_failed": sum(v.ambiguous for v in verdicts),
                   "session_id_changes": sum(v.sid_changes for v in verdicts),
                   "loss_events": [{"session": v.session, "events": [
                       (round(t, 3), n) for t, n, _ in v.lost_events]}
                       for v in verdicts if v.lost][:50],
                   # (t seen, writes duplicated, failed requests since the last ack) and the
                   # session's attempts around it
                   "dup_events": [{"session": v.session, "t_s": round(t, 3), "dup": d,
                                   "failed_since_ack": fs, "attempts": [
                                       (round(a.start, 3), round(a.end, 3), a.cause,
                                        a.counter, a.server, a.primary)
                                       for a in histories[v.session]
                                       if t - 15 <= a.end <= t + 0.01]}
                                  for v in verdicts for t, d, fs in v.dup_events][:20]},
        "groups": groups,
        "faults": [{"fault": f.label, "t_s": round(f.t, 3), "recovery": recovery(histories, f)}
                   for f in sched.faults],
        "balancer_changes": balancer.changes,
        "events": [{"t_s": round(t, 3), "event": label} for t, _, label in sched.events],
        "schedule_notes": sched.notes + ([sched.error] if sched.error else []),
        "health_at_end": health,
        "targets": {"zero_lost_writes": sum(v.lost for v in verdicts) == 0,
                    "zero_duplicated_writes": sum(v.duplicated for v in verdicts) == 0,
                    "zero_session_id_changes": sum(v.sid_changes for v in verdicts) == 0,
                    "schedule_completed": sched.error is None},
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    (out / "sites").mkdir(parents=True)
    names = [*A, *B, "proxy-a", "proxy-b"]
    with contextlib.ExitStack() as stack:
        uids = stack.enter_context(reserve_uids(names)).uids if args.link == "cut" else {}
        sites = TwoSites(out / "sites", mode=args.mode, hosts=HOSTS, uids=uids,
                         session={"replication": "sync"}, log_level=args.log_level,
                         proxy={"io_timeout_s": 5.0, "max_skip_s": 10.0},
                         site={"flush_interval_s": 1.0})
        net = None
        if uids:
            members = {}
            for name, c in sites.clusters.items():
                own = {k: v for k, v in uids.items() if k in c.servers}
                own["proxy"] = uids[f"proxy-{name}"]
                for k, e in cluster_endpoints(c.config_path, own).items():
                    members[f"proxy-{name}" if k == "proxy" else k] = e
            net = stack.enter_context(Partition(members))
        try:
            await asyncio.to_thread(sites.start)
            t0 = time.monotonic()
            balancer = Balancer(sites, t0)
            clients = [SiteClient(i, "127.0.0.1", 0, timeout_s=args.timeout,
                                  group=GROUPS[i % len(GROUPS)], balancer=balancer)
                       for i in range(args.sessions)]
            sched = Schedule(sites, t0, net)
            stop = asyncio.Event()
            monitor = asyncio.create_task(balancer.run(stop))
            load = asyncio.create_task(run_clients(clients, t0=t0, rate=args.rate, stop=stop))
            try:
                await asyncio.to_thread(sched.run, args.warmup, args.scenario)
            finally:
                stop.set()
                await load
                await monitor
            elapsed = time.monotonic() - t0
            health = await asyncio.to_thread(_health, sites)
        finally:
            await asyncio.to_thread(sites.close)
    summary = judge(clients, sched, balancer, elapsed, health, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    with contextlib.suppress(ImportError):
        from bench.chaos_plot import draw_timeline

        ts, ok, bad, p99 = timeline([c.history for c in clients])
        w = summary["writes"]
        draw_timeline(out / "timeline.png", ts=ts, ok=ok, bad=bad, p99_ms=p99,
                      events=sched.events,
                      title=f"tandem chaos across sites ({args.mode}): {args.sessions} "
                      f"sessions — lost {w['lost']}, duplicated {w['duplicated']}, failed "
                      f"{summary['requests']['failed']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("man", "wan"), default="man",
                   help="the sites' mode (man: remote_sync; wan needs a store: not here)")
    p.add_argument("--scenario", choices=("site-kill", "operator"), default="site-kill",
                   help="site-kill: the schedule above; operator: site A hung (SIGSTOP of "
                   "its servers), declared down at B with tandem site-down, resumed")
    p.add_argument("--sessions", type=int, default=60)
    p.add_argument("--rate", type=float, default=2.0, help="requests/s of each client")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the first fault")
    p.add_argument("--timeout", type=float, default=10.0, help="client timeout per request")
    p.add_argument("--link", choices=("cut", "stop"),
                   help="how the link is cut: nftables (default when available, root) or "
                   "SIGSTOP of site B's servers")
    p.add_argument("--log-level", default="INFO", help="TANDEM_LOG_LEVEL of the processes")
    p.add_argument("--out", default="bench/out/chaos-sites", help="output directory (replaced)")
    args = p.parse_args(argv)
    if args.mode == "wan":
        p.error("--mode wan needs a store for the remote copies: use bench/sites_kill.py")
    reason = unavailable_reason()
    args.link = args.link or ("cut" if reason is None else "stop")
    if args.link == "cut" and reason is not None:
        p.error(f"--link cut: {reason}")
    for sig in (signal.SIGTERM, signal.SIGHUP):  # a killed run still cleans up (the `with`)
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    summary = asyncio.run(run(args))
    r, w = summary["requests"], summary["writes"]
    print(f"requests {r['total']}, ok {r['ok']}, failed {r['failed']} {r['by_cause']}")
    print(f"writes acked {w['acked']}, lost {w['lost']}, duplicated {w['duplicated']}, "
          f"ambiguous {w['ambiguous_applied_failed']}, session id changes "
          f"{w['session_id_changes']}")
    print(f"groups {json.dumps(summary['groups'])}")
    for note in summary["schedule_notes"]:
        print(f"  note: {note}")
    print(f"balancer: {summary['balancer_changes']}")
    print(f"targets: {json.dumps(summary['targets'])}")
    print(f"wrote {args.out}/summary.json")
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
