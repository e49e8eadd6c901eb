"""Per-host operation: `tandem up --host H` / `--servers` start part of the cluster file, the
other hosts the rest (127.0.0.1, .2 and .3 act as three hosts); which processes a selection
names (tandem.placement); `[proxy] hosts`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tandem.config import Config, loads
from tandem.errors import ConfigError, PlacementError
from tandem.placement import select
from tests.cluster import ROOT, Client, Cluster

APP = "tests.apps:asgi_counter"


def cfg(servers: list[dict[str, Any]], proxy: dict[str, Any] | None = None) -> Config:
    text = "[proxy]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in (proxy or {}).items())
    text += "".join("[[servers]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.items())
                    for s in servers)
    return loads(text, source="hosts.toml", environ={})


def server(sid: str, host: str, port: int = 9001, **extra: Any) -> dict[str, Any]:
    h = f"[{host}]" if ":" in host else host
    return {"id": sid, "http": f"{h}:{port}", "replication": f"{h}:{port + 100}", **extra}


THREE = [server("s1", "10.0.0.1"), server("s2", "10.0.0.2"), server("s3", "10.0.0.3")]


def ids(placement: Any) -> list[str]:
    return [s.id for s in placement.servers]


# --- what a selection runs -----------------------------------------------------------------


def test_no_selection_runs_everything_as_before() -> None:
    here = select(cfg(THREE))
    assert ids(here) == ["s1", "s2", "s3"] and here.proxy and here.whole


def test_host_selects_the_servers_advertised_there_and_the_proxy_placed_there() -> None:
    c = cfg(THREE, {"hosts": ["10.0.0.1"], "listen": "0.0.0.0:8080"})
    one, two = select(c, host="10.0.0.1"), select(c, host="10.0.0.2")
    assert (ids(one), one.proxy, one.whole) == (["s1"], True, False)
    assert (ids(two), two.proxy, two.whole) == (["s2"], False, False)


def test_without_proxy_hosts_the_proxy_is_on_the_host_of_listen() -> None:
    assert select(cfg(THREE, {"listen": "10.0.0.2:8080"}), host="10.0.0.2").proxy
    assert not select(cfg(THREE, {"listen": "10.0.0.2:8080"}), host="10.0.0.1").proxy
    # a wildcard listen address is on no host in particular
    for h in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        assert not select(cfg(THREE, {"listen": "0.0.0.0:8080"}), host=h).proxy


def test_a_host_matches_the_machine_and_the_replication_host_too() -> None:
    c = cfg([server("s1", "10.0.0.1", machine="node-a"),
             {"id": "s2", "http": "10.0.0.2:9001", "replication": "192.168.7.2:9101"},
             server("s3", "10.0.0.3")])
    assert ids(select(c, host="NODE-A")) == ["s1"]  # names without case
    assert ids(select(c, host="192.168.7.2")) == ["s2"]


def test_ipv6_hosts_compare_as_addresses() -> None:
    c = cfg([server("s1", "2001:db8::5"), server("s2", "2001:db8::6")],
            {"hosts": ["[2001:db8::5]"]})
    for spelling in ("2001:DB8:0::5", "[2001:db8::5]"):
        here = select(c, host=spelling)
        assert ids(here) == ["s1"] and here.proxy


def test_a_host_with_every_server_is_the_whole_cluster() -> None:
    c = cfg([server("s1", "127.0.0.1"), server("s2", "127.0.0.1", 9002)],
            {"listen": "127.0.0.1:8080"})
    here = select(c, host="127.0.0.1")
    assert ids(here) == ["s1", "s2"] and here.proxy and here.whole


def test_servers_runs_exactly_those_and_no_proxy() -> None:
    here = select(cfg(THREE), servers=["s3", "s1"])
    assert ids(here) == ["s1", "s3"] and not here.proxy and not here.whole


def test_proxy_only_and_no_proxy() -> None:
    c = cfg(THREE, {"hosts": ["10.0.0.1"]})
    only = select(c, host="10.0.0.1", proxy="only")
    assert ids(only) == [] and only.proxy and not only.whole
    assert not select(c, host="10.0.0.1", proxy="no").proxy
    assert ids(select(c, proxy="only")) == [] and select(c, proxy="only").proxy
    with pytest.raises(PlacementError, match="puts the proxy on 10.0.0.1"):
        select(c, host="10.0.0.2", proxy="only")


def test_an_unknown_host_lists_the_hosts_of_the_file() -> None:
    with pytest.raises(PlacementError) as info:
        select(cfg(THREE, {"hosts": ["10.0.0.1"]}), host="10.0.0.9")
    assert str(info.value) == (
        "--host 10.0.0.9: no server or proxy of the cluster file is on this host; its hosts: "
        "10.0.0.1 (s1, proxy), 10.0.0.2 (s2), 10.0.0.3 (s3) (hosts.toml)")


def test_an_unknown_server_lists_the_servers_of_the_file() -> None:
    with pytest.raises(PlacementError) as info:
        select(cfg(THREE), servers=["s1", "s9"])
    assert str(info.value) == ("--servers s1,s9: no server s9 in the cluster file; its "
                               "servers: s1, s2, s3 (hosts.toml)")


@pytest.mark.parametrize("value", ["10.0.0.1:8080", "0.0.0.0", "[::]", "", "a host"])
def test_proxy_hosts_must_be_hosts(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        cfg(THREE, {"hosts": [value]})
    assert info.value.key == "proxy.hosts" and info.value.file == "hosts.toml"


# --- three hosts, three `tandem up` --------------------------------------------------------


class Up:
    """One host's `tandem up`, in a process group of its own."""

    def __init__(self, tmp: Path, name: str, config: Path, *args: str) -> None:
        self.log_path = tmp / f"up-{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        env = {k: v for k, v in os.environ.items()
               if k not in ("TANDEM_SECRETS", "TANDEM_LOG_LEVEL")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "up", "--config", str(config), "--app", APP,
             *args], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text:
            assert self.proc.poll() is None, self.text
            assert time.monotonic() < deadline, self.text
            time.sleep(0.05)

    def children(self) -> list[str]:
        """The command lines of the processes it started."""
        out = subprocess.run(["pgrep", "-a", "-P", str(self.proc.pid)], capture_output=True,
                             text=True)
        return [line.split(" ", 1)[1] for line in out.stdout.splitlines()]

    def pid_of(self, sid: str) -> int:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid), "-f", "--",
                              f"--server {sid} "], capture_output=True, text=True)
        (pid,) = out.stdout.split()
        return int(pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        else:  # its children, should it have left any
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()


@pytest.fixture
def ups() -> Any:
    made: list[Up] = []
    yield made
    for up in made:
        up.close()


def _served_by(clients: list[Client]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in clients:
        out[c.route[1]] = out.get(c.route[1], 0) + 1
    return out


def _leases(cluster: Cluster, sid: str) -> bool:
    try:
        return bool(cluster.health(sid)["lease"])
    except OSError:
        return False


@pytest.mark.timeout(240)
def test_three_hosts_each_start_their_part_and_form_one_cluster(tmp_path: Path, ups: list[Up],
                                                                make_cluster: Any) -> None:
    cluster = make_cluster(servers=[{"id": "s1"}, {"id": "s2", "host": "127.0.0.2"},
                                    {"id": "s3", "host": "127.0.0.3"}])
    path = cluster.config_path
    host1 = Up(tmp_path, "1", path, "--host", "127.0.0.1")  # s1 and the proxy (listen's host)
    host2 = Up(tmp_path, "2", path, "--servers", "s2")
    ups += [host1, host2]
    host1.wait_for("tandem is up")
    host2.wait_for("tandem is up")
    # each started its own part only
    assert sorted(" proxy " in c or "--server s1 " in c for c in host1.children()) == [
        True, True], host1.children()
    assert [c.split("--server ")[1].split()[0] for c in host2.children()] == ["s2"]
    assert "servers: s2=127.0.0.2:" in host2.text and "(no proxy here)" in host2.text
    # s3's host is not up yet: the cluster does not serve (every server of the file must
    # have been up together once), and neither host's servers are stopped meanwhile
    time.sleep(3.0)
    assert not _leases(cluster, "s1") and not _leases(cluster, "s2")
    assert host1.proc.poll() is None and host2.proc.poll() is None
    host3 = Up(tmp_path, "3", path, "--host", "127.0.0.3")
    ups.append(host3)
    host3.wait_for("tandem is up")
    cluster.wait_formed(alive=["s1", "s2", "s3"])

    # sessions through the proxy of host 1, on every server, each with a secondary elsewhere
    clients: list[Client] = []
    while min(_served_by(clients).get(s, 0) for s in ("s1", "s2", "s3")) < 3:
        c = Client(cluster.proxy_url)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1, body
        assert c.route[2] not in ("NONE", c.route[1])
        clients.append(c)
        assert len(clients) < 80
    counts = {id(c): 1 for c in clients}

    def every_session_continues() -> None:
        for c in clients:
            status, body = c.get()
            counts[id(c)] += 1
            assert status == 200 and body["counter"] == counts[id(c)], (status, body)

    # kill -9 of a primary's process (s2, on host 2): its sessions go on on their
    # secondaries; host 2's `tandem up` restarts s2, which rejoins
    os.kill(host2.pid_of("s2"), signal.SIGKILL)
    every_session_continues()
    host2.wait_for("tandem: s2 is up again")
    cluster.wait_formed(alive=["s1", "s2", "s3"])
    every_session_continues()

    # SIGHUP of host 1's `tandem up`: a rolling restart of its own servers only (s1), each
    # back in the view before the next
    host1.proc.send_signal(signal.SIGHUP)
    host1.wait_for("tandem: rolling restart done", timeout=60)
    every_session_continues()

    # host 3 stops (SIGTERM, as systemd or `docker stop` would): s3 drains to the others,
    # which carry on; nothing of host 1 or 2 stops
    on_s3 = [c for c in clients if c.route[1] == "s3"]
    assert on_s3
    host3.proc.send_signal(signal.SIGTERM)
    assert host3.proc.wait(timeout=60) == 0, host3.text
    said = [line for line in host3.text.split("then stops\n", 1)[1].splitlines()
            if line.startswith("tandem:")]
    assert len(said) == 1 and said[0].startswith("tandem: s3 drained ("), host3.text
    assert int(said[0].split("(")[1].split()[0]) >= len(on_s3), host3.text  # handed over
    assert host1.proc.poll() is None and host2.proc.poll() is None
    said = [line.split(" (")[0] for line in (host1.text + host2.text).splitlines()
            if line.startswith("tandem:")]
    assert said == ["tandem: rolling restart: s1 draining", "tandem: s1 drained",
                    "tandem: rolling restart done", "tandem: s2 exited",
                    "tandem: s2 is up again"], said
    every_session_continues()
    assert not {c.route[1] for c in clients} & {"s3"}
    cluster.wait_formed(alive=["s1", "s2"])  # (s3 removed from the view on its goodbye)

    # host 3 comes back and rejoins; then its `tandem up` is killed (-9): its server, without
    # a supervisor, drains to the others (hand-overs, not promotions of replicas)
    host3 = Up(tmp_path, "3b", path, "--host", "127.0.0.3")
    ups.append(host3)
    host3.wait_for("tandem is up")
    cluster.wait_formed(alive=["s1", "s2", "s3"])
    s3_pid = host3.pid_of("s3")
    while _served_by(clients).get("s3", 0) < 3:
        c = Client(cluster.proxy_url)
        assert c.get("/count")[0] == 200
        counts[id(c)] = 1
        clients.append(c)
        assert len(clients) < 160

    def stats(key: str) -> int:
        return sum(cluster.health(s)["stats"].get(key, 0) for s in ("s1", "s2"))

    taken, promoted = stats("taken_over"), stats("promoted")
    host3.proc.send_signal(signal.SIGKILL)
    host3.proc.wait(timeout=10)
    deadline = time.monotonic() + 40
    while os.path.exists(f"/proc/{s3_pid}") and "zombie" not in _state(s3_pid):
        assert time.monotonic() < deadline, "s3 did not stop without its supervisor"
        time.sleep(0.1)
    assert stats("taken_over") - taken >= 3 and stats("promoted") == promoted
    every_session_continues()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/status") as f:
            return f.read()
    except OSError:
        return "zombie"


def test_an_unknown_host_or_server_is_one_line(tmp_path: Path, make_cluster: Any) -> None:
    cluster = make_cluster(servers=[{"id": "s1"}, {"id": "s2", "host": "127.0.0.2"}])
    for args, start in ((["--host", "127.0.0.9"], "tandem: --host 127.0.0.9: no server or "
                         "proxy of the cluster file is on this host; its hosts: 127.0.0.1 "
                         "(s1, proxy), 127.0.0.2 (s2)"),
                        (["--servers", "s1,s7"], "tandem: --servers s1,s7: no server s7 in "
                         "the cluster file; its servers: s1, s2")):
        done = subprocess.run([sys.executable, "-m", "proxy.cli", "up", "--config",
                               str(cluster.config_path), "--app", APP, *args], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=30)
        lines = (done.stdout + done.stderr).splitlines()
        assert done.returncode == 2 and len(lines) == 1, lines
        assert lines[0].startswith(start), lines


def test_a_host_of_a_witness_alone_needs_no_app(tmp_path: Path, ups: list[Up],
                                                make_cluster: Any) -> None:
    cluster = make_cluster(servers=[{"id": "s1"}, {"id": "s2"},
                                    {"id": "w1", "host": "127.0.0.2", "witness": True}])
    up = Up(tmp_path, "w", cluster.config_path, "--host", "127.0.0.2", "--app",
            "no_such_module_x:app")  # (the app is not imported where only a witness runs)
    ups.append(up)
    up.wait_for("tandem is up")
    assert "servers: w1=127.0.0.2:" in up.text and "(witness)" in up.text
    assert cluster.health("w1")["role"] == "witness"
    up.proc.send_signal(signal.SIGTERM)
    assert up.proc.wait(timeout=30) == 0, up.text
    assert [line for line in up.text.splitlines() if line.startswith("tandem:")] == [
        "tandem: w1 drained"], up.text

