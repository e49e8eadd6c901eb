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
from pathlib import Path

import pytest

from backends.cluster.ranking import choose_secondary
from tandem.config import loads
from tandem.errors import ConfigError
from tests.cluster import ROOT, Client, Cluster, get_json

SERVERS = [{"id": "s1"}, {"id": "s2"}, {"id": "w", "witness": True}]


def _config(*servers: str) -> str:
    return "\n".join(["[cluster]", 'secrets = ["x"]', *servers])


def _server(sid: str, n: int, *extra: str) -> str:
    return "\n".join(["[[servers]]", f'id = "{sid}"', f'http = "127.0.0.1:{9000 + n}"',
                      f'replication = "127.0.0.1:{9100 + n}"', *extra, ""])


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
