"""A witness (`witness = true`): the third voter that lets two servers fail over.

Two servers alone cannot remove each other (a majority of two is two); with a witness, the
survivor and the witness are a majority of three. The witness votes and grants leases but
hosts nothing: it is never a secondary, never in the view the proxy is told, never a backend.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from backends.cluster.ranking import choose_secondary
from tandem.config import loads
from tandem.errors import ConfigError
from tests.cluster import ROOT, Client, Cluster, get_json
from tests.netfault import Partition, cluster_endpoints, reserve_uids, unavailable_reason

SERVERS = [{"id": "s1"}, {"id": "s2"}, {"id": "w", "witness": True}]


def _config(*servers: str) -> str:
    return "\n".join(["[cluster]", 'secrets = ["x"]', *servers])


def _server(sid: str, n: int, *extra: str) -> str:
    return "\n".join(["[[servers]]", f'id = "{sid}"', f'http = "127.0.0.1:{9000 + n}"',
                      f'replication = "127.0.0.1:{9100 + n}"', *extra, ""])


class Writer:
    """A client doing read-modify-write (`GET /count`) that checks its own history: an
    acknowledged counter never goes back (no lost write), and never jumps by more than the
    unacknowledged attempts since the last one could have applied (none applied twice)."""

    def __init__(self, base: str) -> None:
        self.client = Client(base)
        self.acked = 0
        self.unacked = 0  # attempts since the last acknowledgement (5xx, or no answer)
        self.answers: list[tuple[int, str | None]] = []  # (status, X-Tandem-State or server)

    def step(self) -> int:
        try:
            status, body = self.client.get("/count")
        except (OSError, urllib.error.URLError):
            status, body = 0, None
        if status != 200:
            self.unacked += 1
            self.answers.append((status, None))
            return status
        n = body["counter"]
        assert self.acked < n <= self.acked + 1 + self.unacked, (self.acked, self.unacked, n)
        self.acked, self.unacked = n, 0
        self.answers.append((200, body["server"]))
        return status


def _writers_on_both(cluster: Cluster, each: int) -> list[Writer]:
    writers: list[Writer] = []
    while min(sum(w.client.route[1] == s for w in writers) for s in ("s1", "s2")) < each:
        w = Writer(cluster.proxy_url)
        assert w.step() == 200 and w.step() == 200
        writers.append(w)
        assert len(writers) < 20 * each, "new sessions are not spread over the servers"
    return writers


def _skip_without_netfault() -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def _status(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --- the cluster file ---------------------------------------------------------------------


def test_the_witness_key_and_what_a_witness_may_not_say() -> None:
    cfg = loads(_config(_server("s1", 1), _server("s2", 2), _server("w", 3, "witness = true")))
    assert [s.witness for s in cfg.servers] == [False, False, True]
    assert [s.id for s in cfg.app_servers] == ["s1", "s2"]
    assert cfg.server_ids == ("s1", "s2", "w")  # every one votes
    assert cfg.warnings == ()
    # a key that means nothing for a witness would be silently ignored: an error
    for key in ('group = "a"', 'preferred_secondary_group = "b"', 'machine = "m1"'):
        with pytest.raises(ConfigError) as err:
            loads(_config(_server("s1", 1), _server("w", 3, "witness = true", key)))
        assert err.value.key == f"servers[1].{key.split()[0]}"
    # it needs its replication address (it votes through it) and its http one (health)
    with pytest.raises(ConfigError) as err:
        loads(_config(_server("s1", 1), '[[servers]]\nid = "w"\nhttp = "127.0.0.1:9003"\n'
                      "witness = true\n"))
    assert err.value.key == "servers[1].replication"
    with pytest.raises(ConfigError) as err:
        loads(_config(_server("w", 3, "witness = true")))
    assert err.value.key == "servers"
    with pytest.raises(ConfigError) as err:
        loads(_config(_server("s1", 1, 'witness = "yes"')))
    assert err.value.key == "servers[0].witness"


def test_two_servers_without_a_witness_are_warned_about_and_others_are_not() -> None:
    two = loads(_config(_server("s1", 1), _server("s2", 2)))
    (line,) = two.warnings
    assert "s1 and s2 cannot fail over without a third voter" in line
    assert "witness = true" in line
    assert loads(_config(_server("s1", 1), _server("s2", 2), _server("s3", 3))).warnings == ()
    assert loads(_config(_server("s1", 1))).warnings == ()


def test_a_witness_is_never_chosen_as_a_secondary() -> None:
    cfg = loads(_config(_server("s1", 1), _server("s2", 2), _server("w", 3, "witness = true")))
    s1, s2, w = cfg.servers
    assert choose_secondary(s1, [w], {}) is None  # even when it is the only one alive
    assert choose_secondary(s1, [w, s2], {"s2": 1000}) is s2


# --- the processes --------------------------------------------------------------------------


def test_two_servers_and_a_witness_fail_over_and_readmit_the_restarted_server(make_cluster):
    cluster = make_cluster(servers=SERVERS).start()
    witness = cluster.health("w")
    assert witness["role"] == "witness" and witness["lease"]
    assert sorted(witness["members"]) == ["s1", "s2", "w"]
    # its http address answers its health only
    assert _status(cluster.url("w") + "/")[0] == 404
    assert _status(cluster.url("w") + "/count")[0] == 404

    clients: list[Client] = []
    while sum(c.route[1] == "s1" for c in clients) < 8:
        c = Client(cluster.proxy_url)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1
        clients.append(c)
        assert len(clients) < 80, "new sessions are not spread over the servers"
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 2
        _, primary, secondary = c.route
        assert {primary, secondary} == {"s1", "s2"}, c.route  # never the witness, never NONE
    on_s1 = [c for c in clients if c.route[1] == "s1"]

    # the proxy's table and the view it is told: the servers, not the witness
    proxy = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")
    assert sorted(b["id"] for b in proxy["backends"]) == ["s1", "s2"]
    req = urllib.request.Request(cluster.url("s2") + "/peek", headers={"X-Tandem-View": "0"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        view = resp.headers["X-Tandem-Cluster"]
    assert view is not None and "s1=" in view and "s2=" in view and "w=" not in view, view

    cluster.kill("s1")  # -9

    for c in clients:
        sid, primary, _ = c.route
        status, body = c.get()
        assert status == 200, body
        assert body["counter"] == 3 and body["server"] == "s2", (sid, primary, body)
        assert c.route == (sid, "s2", "NONE")  # one copy left: the token says so
    cluster.wait_formed(["s2", "w"])
    assert cluster.health("s2")["stats"]["promoted"] == len(on_s1)

    cluster.start_server("s1")  # a new process of s1: re-admitted by s2 and the witness
    cluster.wait_formed()
    for c in clients:
        sid = c.route[0]
        status, body = c.get()
        assert status == 200 and body["counter"] == 4 and body["server"] == "s2", body
        assert c.route == (sid, "s2", "s1")  # protected again, on the restarted server

    cluster.kill("w")  # the witness alone: the two servers are a majority of three
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 5, body
    cluster.wait_formed(["s1", "s2"])
    for c in clients:  # and with the witness dead, still two copies of every session
        status, body = c.get()
        assert status == 200 and body["counter"] == 6 and c.route[1:] == ("s2", "s1"), body
    assert "w" not in cluster.health("s1")["members"]


def test_backend_and_witness_refuse_each_others_servers(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, servers=SERVERS)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TANDEM_SECRETS", None)
    for args, said in (
            (["backend", "--server", "w", "--app", "tests.apps:asgi_counter"],
             "servers.id: is a witness: run it with `tandem witness` (got 'w')"),
            (["witness", "--server", "s1"], "servers.id: is not a witness")):
        done = subprocess.run([sys.executable, "-m", "proxy.cli", *args, "--config",
                               str(cluster.config_path)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("tandem: configuration error: ") and said in line, line


def test_a_backend_of_two_servers_without_a_witness_warns_once_started(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, n=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_LOG_LEVEL="ERROR")
    env.pop("TANDEM_SECRETS", None)
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "backend", "--config",
                             str(cluster.config_path), "--server", "s1", "--app",
                             "tests.apps:asgi_counter"], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().rstrip("\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=30)[1]
    assert line == ("tandem: warning: s1 and s2 cannot fail over without a third voter (a "
                    "majority of two is two); add a [[servers]] entry with witness = true "
                    f"({cluster.config_path})"), line + rest
    assert "tandem: warning" not in rest


@pytest.mark.timeout(120)
def test_tandem_up_starts_the_witness(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, servers=SERVERS)  # (only its cluster file: `up` runs it)
    log_path = tmp_path / "up.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for name in ("TANDEM_LOG_LEVEL", "TANDEM_SECRETS"):
        env.pop(name, None)
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "up", "--config",
                               str(cluster.config_path), "--app", "tests.apps:asgi_counter"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while "Ctrl-C stops all of it" not in log_path.read_text():
                assert up.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            cluster.wait_formed(["s1", "s2", "w"])
            assert cluster.health("w")["role"] == "witness"
            c = Client(cluster.proxy_url)
            assert c.get("/count")[0] == 200 and c.get("/count")[1]["counter"] == 2
            assert c.route[1] in ("s1", "s2") and c.route[2] in ("s1", "s2"), c.route
            status = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status"
                              "?format=json")
            assert sorted(b["id"] for b in status["backends"]) == ["s1", "s2"]
            shown = subprocess.run([sys.executable, "-m", "proxy.cli", "status", "--config",
                                    str(cluster.config_path)], cwd=ROOT, env=env,
                                   capture_output=True, text=True, timeout=30)
            assert shown.returncode == 0, shown.stdout + shown.stderr
            (row,) = [line for line in shown.stdout.splitlines() if line.startswith("w ")]
            assert row.split()[:4] == ["w", "witness", "-", "-"], shown.stdout
            (s1,) = [line for line in shown.stdout.splitlines() if line.startswith("s1 ")]
            assert s1.split()[5] == "serving", shown.stdout  # under its lease, in the view
        finally:
            os.killpg(up.pid, signal.SIGINT)
            code = up.wait(timeout=60)
    text = log_path.read_text()
    assert code == 0, text
    assert f"w=127.0.0.1:{cluster.servers['w']['http']} (witness)" in text
    assert "tandem: warning" not in text  # (two servers and a witness: nothing to say)
    said = text.split("Ctrl-C stops all of it\n", 1)[1].strip().splitlines()
    assert [line.split(" (")[0] for line in said] == [
        "tandem: proxy stopped", "tandem: s1 stopped", "tandem: s2 stopped",
        "tandem: w stopped"], text


# --- partitions -----------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_server_cut_off_from_its_peer_and_the_witness_is_replaced(make_cluster):
    """s1 cut from s2 and the witness, the proxy still reaching it: s2 and the witness are
    the majority; s1 stops acknowledging, its sessions go on at s2 with every acknowledged
    write; healed, s1 is fenced (drops its copies) and re-admitted."""
    _skip_without_netfault()
    with reserve_uids(["s1", "s2", "w"]) as lease:
        cluster = make_cluster(servers=SERVERS, uids=lease.uids, log_level="INFO")
        with Partition(cluster_endpoints(cluster.config_path, lease.uids)) as partition:
            cluster.start()
            writers = _writers_on_both(cluster, 4)
            partition.isolate("s1", from_=["s2", "w"])
            deadline = time.monotonic() + 60
            # every session answered by s2 again, twice in a row
            while not all(w.answers[-2:] == [(200, "s2")] * 2 for w in writers):
                assert time.monotonic() < deadline, [w.answers for w in writers]
                for w in writers:
                    w.step()
            assert not cluster.health("s1")["lease"]
            assert sorted(cluster.health("s2")["members"]) == ["s2", "w"]
            partition.rejoin("s1", from_=["s2", "w"])
            cluster.wait_formed(timeout=30)
            assert cluster.wait_event("s1", "fenced")  # it held copies: dropped, not served
            for w in writers:
                assert w.step() == 200, w.answers
                assert w.client.route[1:] == ("s2", "s1")  # protected again, on s1


@pytest.mark.timeout(180)
def test_two_servers_cut_from_each_other_but_not_from_the_witness_lose_nothing(make_cluster):
    """The s1<->s2 link cut, both still reaching the witness: it suspects neither, so no
    view removes either (a removal needs the witness's vote); no acknowledged write is lost
    or applied twice, and the sessions go on when the link heals."""
    _skip_without_netfault()
    with reserve_uids(["s1", "s2", "w"]) as lease:
        cluster = make_cluster(servers=SERVERS, uids=lease.uids, log_level="INFO")
        with Partition(cluster_endpoints(cluster.config_path, lease.uids)) as partition:
            cluster.start()
            writers = _writers_on_both(cluster, 2)
            view = cluster.health("w")["view"]
            partition.cut("s1", "s2")
            until = time.monotonic() + 6  # past suspicion, a lease and rule R's wait
            with ThreadPoolExecutor(len(writers)) as pool:  # (each waits seconds for a 503)
                while time.monotonic() < until:
                    list(pool.map(Writer.step, writers))
            for sid in ("s1", "s2", "w"):
                health = cluster.health(sid)
                assert sorted(health["members"]) == ["s1", "s2", "w"], (sid, health)
            assert cluster.health("w")["view"] == view
            partition.heal("s1", "s2")
            cluster.wait_formed(timeout=30)
            deadline = time.monotonic() + 30
            while not all(w.answers[-1][0] == 200 for w in writers):
                assert time.monotonic() < deadline, [w.answers for w in writers]
                for w in writers:
                    w.step()
