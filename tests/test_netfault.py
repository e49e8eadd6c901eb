"""tests/netfault.py on real processes: two (three) tiny TCP agents, each under a uid of its
own, each listening on a port and dialling the others; a cut must stop new and established
connections in both directions, leave everyone else alone, and heal."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import free_ports
from tests.netfault import (
    TABLE_PREFIX,
    Endpoint,
    NetfaultError,
    Partition,
    _nft,
    cluster_endpoints,
    reserve_uids,
    run_as,
    unavailable_reason,
)

# The agent: listens on argv[1] (echoes every line, counts them), and obeys one command per
# stdin line, answering one JSON line:
#   dial PORT      open a connection (1 s timeout) -> {"ok", "conn"}
#   send CONN      send "ping" on an outbound connection, wait 1 s for the echo -> {"ok"}
#   push           send "push" on every connection others dialled to us -> {"ok", "n"}
#   counts         lines received: on our inbound connections, and per outbound connection
AGENT = r"""
import json, socket, sys, threading, time
lock = threading.Lock()
inbound, inbound_lines, outbound, echoes, pushes = [], [0], [], [], []

def serve_conn(conn):
    f = conn.makefile("rb")
    for line in f:
        with lock:
            inbound_lines[0] += 1
        try:
            conn.sendall(line)
        except OSError:
            return

def accept(srv):
    while True:
        conn, _ = srv.accept()
        with lock:
            inbound.append(conn)
        threading.Thread(target=serve_conn, args=(conn,), daemon=True).start()

def read_out(i, conn):
    for line in conn.makefile("rb"):
        with lock:
            (pushes if line == b"push\n" else echoes)[i] += 1

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", int(sys.argv[1])))
srv.listen(16)
threading.Thread(target=accept, args=(srv,), daemon=True).start()
print(json.dumps({"ok": True}), flush=True)
for cmd in sys.stdin:
    op, *args = cmd.split()
    out = {"ok": True}
    if op == "dial":
        try:
            c = socket.create_connection(("127.0.0.1", int(args[0])), timeout=1.0)
            c.settimeout(None)
            with lock:
                outbound.append(c); echoes.append(0); pushes.append(0)
                out["conn"] = len(outbound) - 1
            threading.Thread(target=read_out, args=(out["conn"], c), daemon=True).start()
        except OSError as exc:
            out = {"ok": False, "error": type(exc).__name__}
    elif op == "send":
        i = int(args[0])
        before = echoes[i]
        outbound[i].sendall(b"ping\n")
        deadline = time.monotonic() + 1.0
        while echoes[i] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        out["ok"] = echoes[i] > before
    elif op == "push":
        with lock:
            for c in inbound:
                c.sendall(b"push\n")
            out["n"] = len(inbound)
    elif op == "counts":
        with lock:
            out.update(inbound=inbound_lines[0], echoes=list(echoes), pushes=list(pushes))
    print(json.dumps(out), flush=True)
"""


class Agent:
    def __init__(self, uid: int, port: int) -> None:
        self.uid, self.port = uid, port
        self.proc = subprocess.Popen([*run_as(uid), sys.executable, "-c", AGENT, str(port)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._read()["ok"], "agent did not start"

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"agent exited with {self.proc.poll()}"
        return json.loads(line)

    def ask(self, cmd: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def dial(self, other: Agent) -> int | None:
        answer = self.ask(f"dial {other.port}")
        return answer["conn"] if answer["ok"] else None

    def counts(self) -> Any:
        return self.ask("counts")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return bool(check())


@pytest.fixture
def net() -> Iterator[tuple[Partition, dict[str, Agent]]]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with reserve_uids(["a", "b", "c"]) as lease:
        ports = dict(zip("abc", free_ports(3), strict=True))
        agents: dict[str, Agent] = {}
        try:
            for name in "abc":
                agents[name] = Agent(lease.uids[name], ports[name])
            members = {n: Endpoint(a.uid, (a.port,)) for n, a in agents.items()}
            with Partition(members) as partition:
                yield partition, agents
        finally:
            for agent in agents.values():
                agent.close()


def _root_connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False


def test_a_cut_stops_new_connections_both_ways_and_a_heal_restores_them(net):
    partition, ag = net
    a, b, c = ag["a"], ag["b"], ag["c"]
    assert a.dial(b) is not None and b.dial(a) is not None
    partition.cut("a", "b")
    assert partition.cuts == {frozenset(("a", "b"))}
    assert a.dial(b) is None and b.dial(a) is None  # the SYNs vanish: connect times out
    # everyone else still reaches both: the third process, and root (the test itself)
    for x, y in ((c, a), (c, b), (a, c), (b, c)):
        conn = x.dial(y)
        assert conn is not None and x.ask(f"send {conn}")["ok"]
    assert _root_connects(a.port) and _root_connects(b.port)
    assert partition.dropped()["conn_original"] > 0
    partition.heal("a", "b")
    assert partition.cuts == set()
    for x, y in ((a, b), (b, a)):
        conn = x.dial(y)
        assert conn is not None and x.ask(f"send {conn}")["ok"]


@pytest.mark.parametrize("dialler", ["a", "b"])
def test_a_cut_stops_an_established_connection_both_ways(net, dialler):
    partition, ag = net
    x, y = ag[dialler], ag["b" if dialler == "a" else "a"]
    conn = x.dial(y)
    assert conn is not None and x.ask(f"send {conn}")["ok"]
    assert y.ask("push")["n"] == 1
    assert _until(lambda: x.counts()["pushes"][conn] == 1, 2.0)
    inbound_before = y.counts()["inbound"]

    partition.cut("a", "b")
    # dialler -> acceptor: the ping never arrives; acceptor -> dialler: the push neither
    assert not x.ask(f"send {conn}")["ok"]
    y.ask("push")
    time.sleep(1.0)
    assert y.counts()["inbound"] == inbound_before
    assert x.counts()["pushes"][conn] == 1
    dropped = partition.dropped()
    assert dropped["conn_original"] > 0 and dropped["conn_reply"] > 0

    partition.heal("a", "b")
    # TCP retransmits what was dropped: the same connection carries both again
    assert _until(lambda: y.counts()["inbound"] > inbound_before, 15.0)
    assert _until(lambda: x.counts()["pushes"][conn] == 2, 15.0)
    assert _until(lambda: x.ask(f"send {conn}")["ok"], 5.0)


def test_isolate_cuts_one_process_from_several_and_rejoin_heals(net):
    partition, ag = net
    a, b, c = ag["a"], ag["b"], ag["c"]
    partition.isolate("a", from_=["b", "c"])
    assert partition.cuts == {frozenset(("a", "b")), frozenset(("a", "c"))}
    assert a.dial(b) is None and c.dial(a) is None
    assert b.dial(c) is not None  # the others still talk
    partition.rejoin("a", from_=["b", "c"])
    assert a.dial(b) is not None and c.dial(a) is not None
    partition.cut("a", "c")
    partition.heal_all()
    assert partition.cuts == set() and a.dial(c) is not None
    with pytest.raises(NetfaultError, match="unknown process"):
        partition.cut("a", "nobody")


def _tables() -> list[str]:
    return [line.split()[-1] for line in _nft(None, "list", "tables").splitlines()]


def test_the_table_is_deleted_on_exit_and_a_dead_runs_table_at_start():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{TABLE_PREFIX}{dead.pid}"
    _nft(f"table inet {stale} {{ }}\n")
    assert stale in _tables()
    members = {"a": Endpoint(UID_A, (1,)), "b": Endpoint(UID_A + 1, (2,))}
    with pytest.raises(RuntimeError, match="boom"), Partition(members) as partition:
        assert stale not in _tables()
        assert partition.table in _tables()
        partition.cut("a", "b")
        raise RuntimeError("boom")
    assert partition.table not in _tables()
    partition.close()  # twice is fine


def test_two_partitions_open_at_once_keep_their_own_tables():
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    members = {"a": Endpoint(UID_A, (1,)), "b": Endpoint(UID_A + 1, (2,))}
    with Partition(members) as first:
        with Partition(members) as second:
            assert first.table != second.table
            assert {first.table, second.table} <= set(_tables())
            second.cut("a", "b")
        assert first.table in _tables() and second.table not in _tables()
        first.cut("a", "b")  # its rules are still there to change
    assert first.table not in _tables()


UID_A = 64190  # not started as processes here: the rules only name them


def test_a_cluster_under_uids_is_partitioned_and_heals(make_cluster):
    """tests/cluster.py's `uids=`: the backends run under their uids, and cutting s1 from
    its peers makes each side see the other failed, while the test (root) still reaches
    all; healed, the cluster forms again."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with reserve_uids(["s1", "s2", "s3"]) as lease:
        cluster = make_cluster(uids=lease.uids, log_level="INFO")
        with Partition(cluster_endpoints(cluster.config_path, lease.uids)) as partition:
            cluster.start(proxy=False)
            for sid, spec in cluster.servers.items():
                status = Path(f"/proc/{spec['proc'].pid}/status").read_text()
                assert f"Uid:\t{lease.uids[sid]}\t" in status
            partition.isolate("s1", from_=["s2", "s3"])
            assert _until(lambda: cluster.health("s1")["peers"] == {
                "s2": "failed", "s3": "failed"}, 10.0)
            assert _until(lambda: cluster.health("s2")["peers"]["s1"] == "failed", 10.0)
            assert cluster.health("s2")["peers"]["s3"] == "alive"
            partition.rejoin("s1", from_=["s2", "s3"])
            cluster.wait_formed(timeout=20.0)
