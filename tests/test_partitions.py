"""Network partitions between real processes: the cases of the partition tests (issue #12,
docs/consistency.md, "The six failures"), with links cut by nftables (tests/netfault.py)
between three servers and the proxy, each under a uid of its own.

- B, a primary cut off from both peers while the proxy still reaches it (case 1): no
  acknowledged write is lost; the isolated server answers 503 with its state once its lease
  ran out; the majority removes it, it is fenced at the heal and re-admitted.
- Case 2: writes sent to the isolated primary directly are never acknowledged once its lease
  ran out, and never with a token naming no secondary.
- Case 3: the proxy adopts views by their number, never the isolated server's.
- A and D (case 4): the s1<->s2 link cut, or cut and healed every second: no acknowledged
  write lost, none applied twice; a request that cannot be served gets no 200 (503 or 502,
  which acknowledge nothing).
- Case 5 (a request the proxy gave up on, applied after the heal): tests/test_deadlines.py;
  case 6 (a leftover connection closing after the heal): tests/test_cluster_connections.py.

Each client does read-modify-write (`GET /count`) in a loop; a session's history is judged by
the counters it was answered (`problems`): an acknowledged value never goes back (no lost
write), and never jumps by more than the unacknowledged attempts since the last one could
have applied (no write applied twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster, get_json
from tests.netfault import Partition, cluster_endpoints, reserve_uids, unavailable_reason
from tests.proxy_support import proxy_env, token

HEARTBEAT_S = 0.2
MISSED = 3
LEASE_S = HEARTBEAT_S * (MISSED - 1)  # docs/consistency.md, "Leases"
EXPIRED_S = LEASE_S + 0.1  # this long after a cut, the cut-off server's lease has run out
CLUSTER = {"heartbeat_interval_s": HEARTBEAT_S, "missed_heartbeats": MISSED,
           "replication_timeout_s": 0.3}
PROXY = {"io_timeout_s": 3.0, "connect_timeout_s": 0.5}
SESSION = {"replication": "sync"}
PAUSE_S = 0.15  # between two requests of one client
UNACKED = {0, 502, 503}  # 0: no response at all (reset, timeout)
SERVERS = ("s1", "s2", "s3")

pytestmark = pytest.mark.timeout(120)


def _skip_without_netfault() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


# --- clients ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attempt:
    """One request and its answer (times: monotonic)."""

    sent: float
    done: float
    status: int  # 0: no response
    counter: int | None = None
    server: str | None = None
    state: str | None = None  # X-Tandem-State
    token: str | None = None  # set by this response
    secondary: str | None = None  # the app's view of the session's secondary (200 only)


def call(port: int, path: str, token: str | None, timeout: float = 15.0) -> Attempt:
    sent = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Cookie": f"JSESSIONID={token}"} if token else {})
        resp = conn.getresponse()
        body = resp.read()
    except (OSError, http.client.HTTPException):
        return Attempt(sent, time.monotonic(), 0)
    finally:
        conn.close()
    new = None
    for name, value in resp.getheaders():
        if name.lower() == "set-cookie" and value.startswith("JSESSIONID="):
            new = value.split(";", 1)[0].split("=", 1)[1] or None
    data: dict[str, Any] = {}
    if resp.status == 200:
        with contextlib.suppress(ValueError):
            data = json.loads(body)
    secondary = (data["secondary"] or "NONE") if "secondary" in data else None
    return Attempt(sent, time.monotonic(), resp.status, data.get("counter"), data.get("server"),
                   resp.getheader("X-Tandem-State"), new, secondary)


def shown(items: list[Any], most: int = 12) -> str:
    """A failure's evidence, cut short: how many, and the first few."""
    more = f" ... ({len(items)} in all)" if len(items) > most else ""
    return "\n".join(map(str, items[:most])) + more


def secondary_of(token: str) -> str:
    return token.split("!")[2].split(".", 1)[0]


@dataclass(eq=False)
class Session:
    """One client's session: its token, and every write it sent."""

    name: str
    port: int  # where it sends its requests: the proxy, or one server directly
    token: str | None = None
    attempts: list[Attempt] = field(default_factory=list)

    def write(self) -> Attempt:
        a = call(self.port, "/count", self.token)
        if a.token:
            self.token = a.token
        self.attempts.append(a)
        return a

    @property
    def copies(self) -> tuple[str, str]:
        """(primary, secondary) its token names."""
        assert self.token is not None
        _, primary, rest = self.token.split("!")
        return primary, rest.split(".", 1)[0]


def new_sessions(port: int, n: int, prefix: str) -> list[Session]:
    out = []
    for i in range(n):
        s = Session(f"{prefix}{i}", port)
        assert s.write().status == 200 and s.token, s.attempts
        out.append(s)
    return out


class Load:
    """Every session writes in a thread of its own, until `stop()`."""

    def __init__(self, sessions: list[Session]) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(s,), daemon=True)
                         for s in sessions]
        for t in self._threads:
            t.start()

    def _run(self, s: Session) -> None:
        while not self._stop.is_set():
            s.write()
            self._stop.wait(PAUSE_S)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


# --- judging histories ------------------------------------------------------------------

def problems(s: Session, final: Attempt | None, t0: float) -> list[str]:
    """What went wrong in the session's history: writes lost or applied twice, statuses that
    are neither an acknowledgement nor a refusal; `final` is a read after everything."""
    out = []
    last, unacked = 0, 0
    for a in s.attempts:
        at = f"t={a.sent - t0:.2f}s"
        if a.status == 200 and a.counter is not None:
            if a.counter <= last:
                out.append(f"{s.name}: acknowledged {last}, then answered {a.counter} by "
                           f"{a.server} ({at}): a write lost")
            elif a.counter > last + 1 + unacked:
                out.append(f"{s.name}: acknowledged {last}, then {a.counter} by {a.server} "
                           f"({at}) with {unacked} unacknowledged attempts between: a write "
                           f"applied twice")
            last, unacked = a.counter, 0
        elif a.status in UNACKED:
            unacked += 1
        else:
            out.append(f"{s.name}: answered {a.status} ({at})")
    if final is None or final.status != 200 or final.counter is None:
        out.append(f"{s.name}: no answer to the final read: {final}")
    elif final.counter < last:
        out.append(f"{s.name}: acknowledged {last}, the final read shows {final.counter} at "
                   f"{final.server}: a write lost")
    elif final.counter > last + unacked:
        out.append(f"{s.name}: acknowledged {last}, the final read shows {final.counter} "
                   f"with {unacked} unacknowledged attempts after it: a write applied twice")
    return out


def report(label: str, sessions: list[Session], t_cut: float, t_heal: float) -> str:
    """What the clients saw from the cut to the heal (printed: `pytest -s` shows it): the
    statuses, and each session's longest time without an acknowledgement around the cut."""
    statuses = Counter(a.status for s in sessions for a in s.attempts
                       if t_cut <= a.sent < t_heal)
    gaps = []
    for s in sessions:
        acks = [a.done for a in s.attempts if a.status == 200]
        gaps.append(max((b - a for a, b in zip(acks, acks[1:], strict=False)
                         if b >= t_cut and a <= t_heal), default=0.0))
    line = (f"{label}: statuses during the cut {dict(sorted(statuses.items()))}; longest "
            f"without an ack: median {statistics.median(gaps):.2f} s, max {max(gaps):.2f} s")
    print(line)
    return line


def final_read(s: Session, port: int, timeout: float = 10.0) -> Attempt | None:
    """The session's value, read through `port` (retried while it is refused)."""
    deadline = time.monotonic() + timeout
    a = None
    while time.monotonic() < deadline:
        a = call(port, "/peek", s.token)
        if a.status == 200:
            return a
        time.sleep(0.2)
    return a


# --- the cluster ------------------------------------------------------------------------

def view_number(health: dict[str, Any] | None) -> int | None:
    try:
        return int(health["view"]) if health else None
    except (KeyError, TypeError, ValueError):
        return None  # (a server of a release before numbered views says its hash)


def try_health(cluster: Cluster, sid: str) -> dict[str, Any] | None:
    try:
        health: dict[str, Any] = cluster.health(sid)
        return health
    except OSError:
        return None


def proxy_view(cluster: Cluster) -> str | None:
    try:
        snapshot = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status"
                            "?format=json")
        return str(snapshot["view"])
    except (OSError, KeyError, ValueError):
        return None


def wait_formed(cluster: Cluster, timeout: float = 20.0) -> float | None:
    """When the cluster formed again with every server (None: not in `timeout`)."""
    try:
        cluster.wait_formed(timeout=timeout)
    except TimeoutError:
        return None
    return time.monotonic()


@contextlib.contextmanager
def partitioned_cluster(tmp: Path) -> Iterator[tuple[Cluster, Partition]]:
    """Three servers and the proxy, each under its uid, started; links all up."""
    with reserve_uids([*SERVERS, "proxy"]) as lease:
        cluster = Cluster(tmp, uids=lease.uids, cluster=CLUSTER, session=SESSION,
                          proxy=PROXY, log_level="INFO")
        try:
            with Partition(cluster_endpoints(cluster.config_path, lease.uids)) as partition:
                cluster.start()
                yield cluster, partition
        finally:
            cluster.close()


def sessions_until(port: int, enough: Callable[[list[Session]], bool], *, start: int,
                   most: int = 60) -> list[Session]:
    """At least `start` sessions created through `port`, more until `enough` of them."""
    sessions = new_sessions(port, start, "p")
    while not enough(sessions) and len(sessions) < most:
        sessions += new_sessions(port, 1, f"p{len(sessions)}-")
    assert enough(sessions), [s.copies for s in sessions]
    return sessions


# --- B: a primary cut off from both peers, the proxy still reaching it ------------------

B_CUT_S = 4.0


@dataclass
class RunB:
    cluster: Cluster
    t0: float
    t_cut: float
    t_heal: float
    t_formed: float | None
    v0: int | None  # the view before the cut
    through_proxy: list[Session]
    direct: list[Session]  # sessions s1 is primary of, written at s1 directly
    probes: list[Attempt]  # reads at s1 (during the cut) of sessions it is not primary of
    finals: dict[str, Attempt | None]
    samples: list[tuple[float, dict[str, Any]]]  # health of each server, the proxy's view
    after: dict[str, dict[str, Any] | None]  # each server's health once formed again


@pytest.fixture(scope="module")
def run_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunB]:
    """One run of case B, judged by the tests below: 24 sessions write through the proxy and
    6 at s1 directly, while s1 is cut from s2 and s3 for B_CUT_S, then healed."""
    _skip_without_netfault()
    with partitioned_cluster(tmp_path_factory.mktemp("b")) as (cluster, partition):
        t0 = time.monotonic()
        through_proxy = sessions_until(
            cluster.proxy_port, lambda ss: sum(s.copies[0] == "s1" for s in ss) >= 3
            and sum(s.copies[1] == "s1" for s in ss) >= 3, start=24)
        direct = new_sessions(cluster.servers["s1"]["http"], 6, "d")
        assert all(s.copies[0] == "s1" for s in direct)
        others = [s for s in through_proxy if s.copies[0] != "s1"]
        load = Load(through_proxy + direct)
        time.sleep(1.0)

        before = {view_number(try_health(cluster, sid)) for sid in SERVERS}
        v0 = before.pop() if len(before) == 1 else None
        partition.isolate("s1", from_=["s2", "s3"])
        t_cut = time.monotonic()
        samples: list[tuple[float, dict[str, Any]]] = []
        probes: list[Attempt] = []
        while (now := time.monotonic()) < t_cut + B_CUT_S:
            sample: dict[str, Any] = {sid: try_health(cluster, sid) for sid in SERVERS}
            sample["proxy"] = proxy_view(cluster)
            samples.append((now, sample))
            if now >= t_cut + EXPIRED_S:
                s = others[len(probes) % len(others)]
                probes.append(call(cluster.servers["s1"]["http"], "/peek", s.token))
            time.sleep(0.1)
        partition.rejoin("s1", from_=["s2", "s3"])
        t_heal = time.monotonic()
        t_formed = wait_formed(cluster)
        time.sleep(1.0)  # writes go on after the heal: the minority's copies must not win
        load.stop()
        after = {sid: try_health(cluster, sid) for sid in SERVERS}
        finals = {s.name: final_read(s, cluster.proxy_port) for s in through_proxy + direct}
    # (everything stopped and the rules gone before the tests judge: their logs stay)
    yield RunB(cluster, t0, t_cut, t_heal, t_formed, v0, through_proxy, direct, probes,
               finals, samples, after)


def test_b_no_acknowledged_write_is_lost_when_a_primary_is_cut_off(run_b: RunB) -> None:
    r = run_b
    report("B, through the proxy", r.through_proxy, r.t_cut, r.t_heal)
    report("B, at s1 directly", r.direct, r.t_cut, r.t_heal)
    found = [p for s in r.through_proxy + r.direct
             for p in problems(s, r.finals[s.name], r.t0)]
    assert not found, shown(found)
    during = [a for s in r.through_proxy for a in s.attempts if r.t_cut <= a.sent < r.t_heal]
    assert sum(a.status == 200 for a in during) > 0  # the majority served meanwhile


def test_b_the_cut_off_server_answers_503_with_its_state_once_its_lease_ran_out(
        run_b: RunB) -> None:
    r = run_b
    at_s1 = r.probes + [a for s in r.direct for a in s.attempts
                        if r.t_cut + EXPIRED_S <= a.sent and a.done < r.t_heal]
    assert len(at_s1) > 10, "too few requests reached s1 during the cut"
    wrong = [(round(a.sent - r.t_cut, 2), a.status, a.state) for a in at_s1
             if a.status != 503 or a.state not in ("minority", "fenced")]
    assert not wrong, f"(s after the cut, status, X-Tandem-State) at s1:\n{shown(wrong)}"
    late = [s["s1"] for t, s in r.samples if t >= r.t_cut + EXPIRED_S and s["s1"]]
    assert late and not any(h.get("lease", True) for h in late), late[-1:]


def test_b_the_majority_removes_it_fences_it_and_admits_it_again(run_b: RunB) -> None:
    r = run_b
    assert r.v0 is not None, "the servers' health shows no view number, or not one view"
    removed = [view_number(s["s2"]) for t, s in r.samples
               if s["s2"] and sorted(s["s2"].get("members", ())) == ["s2", "s3"]]
    assert removed, "the majority never decided a view without s1 during the cut"
    v1 = removed[0]
    assert v1 is not None and v1 > r.v0
    # the cut-off server decided nothing alone: it kept the view it had
    s1_views = {view_number(s["s1"]) for t, s in r.samples if s["s1"]}
    assert s1_views == {r.v0}, s1_views
    assert r.t_formed is not None, "the cluster did not form again after the heal"
    after = {sid: view_number(h) for sid, h in r.after.items()}
    assert len(set(after.values())) == 1 and after["s1"] is not None and after["s1"] > v1, after
    assert all(h and sorted(h["members"]) == list(SERVERS) for h in r.after.values())
    fenced = [e for e in r.cluster.events("s1") if e.get("event") == "fenced"]
    assert fenced and fenced[0]["sessions_dropped"] > 0, "s1 was not fenced"
    assert int(fenced[0]["view"]) >= v1


def test_2_a_cut_off_primary_acknowledges_no_write_it_could_not_replicate(run_b: RunB) -> None:
    r = run_b
    during = [a for s in r.direct for a in s.attempts if r.t_cut <= a.sent < r.t_heal]
    expired = [a for a in during if a.sent >= r.t_cut + EXPIRED_S]
    assert len(expired) > 10, "too few writes reached s1 during the cut"
    acked = [(round(a.sent - r.t_cut, 2), a.counter, a.secondary) for a in expired
             if a.status == 200]
    assert not acked, ("acknowledged by s1 after its lease ran out (s after the cut, counter, "
                       f"secondary):\n{shown(acked)}")
    unprotected = [(round(a.sent - r.t_cut, 2), a.status) for s in r.direct
                   for a in s.attempts
                   if (a.token and secondary_of(a.token) == "NONE") or a.secondary == "NONE"]
    assert not unprotected, f"tokens naming no secondary:\n{shown(unprotected)}"


def test_3_the_proxy_never_adopts_the_cut_off_servers_view(run_b: RunB) -> None:
    r = run_b
    adopted = [e for e in r.cluster.events("proxy") if e.get("event") == "view_updated"]
    assert adopted, "the proxy adopted no view"
    minority = [e for e in adopted if sorted(e["members"]) == ["s1"]]
    assert not minority, f"adopted the cut-off server's view:\n{shown(minority)}"
    views = [str(e["view"]) for e in adopted]
    assert all(v.isdigit() for v in views), f"views without a number: {views}"
    numbers = [int(v) for v in views]
    assert numbers == sorted(set(numbers)), f"views adopted out of order: {numbers}"
    # as the proxy's status page saw it during the cut: the majority's view, never back
    seen = [int(v) for _, s in r.samples if (v := s["proxy"]) is not None and v.isdigit()]
    assert seen == sorted(seen), seen
    majority = {view_number(s["s2"]) for _, s in r.samples if s["s2"]}
    assert seen and seen[-1] in majority and seen[-1] > (r.v0 or 0), (seen[-1:], majority)


async def test_3_an_older_view_arriving_after_a_newer_one_is_not_adopted_by_the_proxy() -> None:
    """The proxy's own rule, on a real proxy with scripted backends. (Above, tandem's servers
    never send it an older view: a server without the lease answers only 503s, which carry
    no view, and a server sends its view only when the proxy's is older. This is the second
    line.) s1's response, delayed, carries an older view listing only itself (what the
    isolated s1 sent before the fix); meanwhile s2's brought a newer one."""
    async with proxy_env(*SERVERS) as env:
        b = env.backends
        addr = {sid: f"{sid}=127.0.0.1:{x.port}" for sid, x in b.items()}
        b["s1"].view = ("2", f"2; {addr['s1']}")
        b["s2"].view = ("3", f"3; {', '.join(addr.values())}")
        slow = asyncio.create_task(
            env.get("/slow?s=0.5", headers={"Cookie": f"JSESSIONID={token('s1', 's2')}"}))
        await asyncio.sleep(0.2)  # at s1, sent while the proxy knew no view yet
        got = await env.get("/id", headers={"Cookie": f"JSESSIONID={token('s2', 's3')}"})
        assert got[:2] == (200, "s2")
        assert (await env.status())["view"] == "3"
        got = await slow
        assert got[:2] == (200, "s1")
        assert b["s1"].seen_views == ["-"]  # so its answer carried its view (the proxy drops it)
        snap = await env.status()
        assert snap["view"] == "3", "the proxy took the older view that came last"
        assert all(env.backend_status(snap, sid)["in_view"] for sid in SERVERS)


# --- A and D: the s1<->s2 link cut, or cut and healed every second ----------------------

SCENARIOS = {
    "A": [("cut", 3.0), ("heal", 0.0)],
    "D": [("cut", 1.0), ("heal", 1.0)] * 3,
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_4_a_cut_link_between_two_servers_loses_and_duplicates_nothing(
        tmp_path: Path, scenario: str) -> None:
    """A: the link s1<->s2 cut for 3 s; D: cut 1 s and healed 1 s, three times. The proxy
    reaches every server throughout, so every session's requests reach one copy or other."""
    _skip_without_netfault()
    with partitioned_cluster(tmp_path) as (cluster, partition):
        t0 = time.monotonic()
        sessions = sessions_until(
            cluster.proxy_port,
            lambda ss: sum(set(s.copies) == {"s1", "s2"} for s in ss) >= 3, start=24)
        on_pair = [s for s in sessions if set(s.copies) == {"s1", "s2"}]
        load = Load(sessions)
        time.sleep(0.5)
        t_cut = time.monotonic()
        for step, hold in SCENARIOS[scenario]:
            (partition.cut if step == "cut" else partition.heal)("s1", "s2")
            time.sleep(hold)
        t_heal = time.monotonic()
        t_formed = wait_formed(cluster)
        time.sleep(1.0)
        load.stop()
        finals = {s.name: final_read(s, cluster.proxy_port) for s in sessions}

    report(scenario, sessions, t_cut, t_heal)
    report(f"{scenario}, sessions on s1 and s2", on_pair, t_cut, t_heal)
    found = [p for s in sessions for p in problems(s, finals[s.name], t0)]
    assert not found, shown(found)
    pair = [a for s in on_pair for a in s.attempts if t_cut <= a.sent < t_heal]
    assert pair, "no request of a session on s1 and s2 during the cut"
    assert t_formed is not None, "the cluster did not form again after the heal"
