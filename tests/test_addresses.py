"""Addresses as operators deploy them: a bound address apart from the advertised one, the
machine taken from the advertised host, IPv6 (`[::1]:9001`) — in the cluster file, and on
real clusters through the proxy."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from backends.errors import ConfigError
from proxy.headers import parse_cluster_header
from tandem.config import Address, Config, loads
from tandem.config import load as load_file
from tests.cluster import ROOT, Client, free_ports, get_json, hostport

SOURCE = "addresses.toml"


def load(*servers: dict[str, Any]) -> Config:
    text = "".join("[[servers]]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in s.items())
                   for s in servers)
    return loads(text, source=SOURCE, environ={})


def error(*servers: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(*servers)
    assert info.value.file == SOURCE
    return info.value


S1 = {"id": "s1", "http": "10.0.0.5:9001", "replication": "10.0.0.5:9101"}


# --- the cluster file --------------------------------------------------------------------


def test_http_alone_is_both_what_is_bound_and_what_is_advertised() -> None:
    (s1,) = load(S1).servers
    assert s1.http == Address("10.0.0.5", 9001)
    assert (s1.http_bind, s1.replication_bind) == (None, None)  # bind http itself


def test_bind_keys_are_what_the_listeners_bind() -> None:
    (s1,) = load({**S1, "http_bind": "0.0.0.0:9001", "replication_bind": "[::]:9101"}).servers
    assert s1.http == Address("10.0.0.5", 9001)  # dialled by the proxy and the peers
    assert s1.http_bind == Address("0.0.0.0", 9001)
    assert s1.replication_bind == Address("::", 9101)
    assert str(s1.replication_bind) == "[::]:9101"


@pytest.mark.parametrize("key", ["http", "replication"])
@pytest.mark.parametrize("wildcard", ["0.0.0.0", "[::]", "[0:0:0:0:0:0:0:0]"])
def test_a_wildcard_that_peers_would_dial_is_an_error_naming_the_key(key: str,
                                                                     wildcard: str) -> None:
    port = 9001 if key == "http" else 9101
    err = error({**S1, key: f"{wildcard}:{port}"})
    assert err.key == f"servers[0].{key}"
    assert f'{key}_bind = "{wildcard}:{port}"' in str(err)  # says what to write instead


@pytest.mark.parametrize("key", ["http_bind", "replication_bind"])
@pytest.mark.parametrize("value", ["off", "", "9001", 9001])
def test_a_bind_key_must_be_an_address(key: str, value: Any) -> None:
    err = error({**S1, key: value})
    assert err.key == f"servers[0].{key}"
    assert "host:port" in str(err)  # ("off" does not mean "the same as http")


def test_replication_bound_on_the_http_listeners_address_is_an_error() -> None:
    err = error({**S1, "http_bind": "0.0.0.0:9001", "replication_bind": "0.0.0.0:9001"})
    assert err.key == "servers[0].replication_bind"


def test_servers_on_several_hosts_may_bind_the_same_wildcard_address() -> None:
    binds = {"http_bind": "0.0.0.0:9001", "replication_bind": "0.0.0.0:9101"}
    cfg = load({**S1, **binds}, {"id": "s2", "http": "10.0.0.6:9001",
                                 "replication": "10.0.0.6:9101", **binds})
    assert [s.machine for s in cfg.servers] == ["10.0.0.5", "10.0.0.6"]


def test_machine_comes_from_the_advertised_host_not_the_bound_one() -> None:
    cfg = load({**S1, "http_bind": "0.0.0.0:9001"},
               {"id": "s2", "http": "10.0.0.5:9002", "replication": "10.0.0.5:9102"},
               {"id": "s3", "http": "[fd00::7]:9003", "replication": "[fd00::7]:9103",
                "machine": "rack-3"})
    assert [s.machine for s in cfg.servers] == ["10.0.0.5", "10.0.0.5", "rack-3"]


@pytest.mark.parametrize(("text", "host", "port"), [
    ("[::1]:9001", "::1", 9001),
    ("[fe80::1:2]:1", "fe80::1:2", 1),
    ("[::ffff:127.0.0.1]:80", "::ffff:127.0.0.1", 80),
    ("127.0.0.1:9001", "127.0.0.1", 9001),
    ("node-1.example:9001", "node-1.example", 9001),
])
def test_ipv6_addresses_are_parsed_and_written_back_in_brackets(text: str, host: str,
                                                                port: int) -> None:
    addr = Address.parse(text)
    assert (addr.host, addr.port) == (host, port)
    assert str(addr) == text


def test_an_ipv6_address_without_brackets_says_so() -> None:
    err = error({**S1, "http": "::1:9001"})
    assert err.key == "servers[0].http"
    assert "[::1]:9001" in str(err)


def test_the_cluster_header_carries_ipv6_members() -> None:
    view, members = parse_cluster_header("7; s1=[::1]:9001, s2=127.0.0.1:9002")
    assert view == "7"
    assert members == {"s1": Address("::1", 9001), "s2": Address("127.0.0.1", 9002)}


# --- real clusters -----------------------------------------------------------------------


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _view_header(url: str) -> str:
    """The X-Tandem-Cluster header a server sends a proxy that knows no view yet."""
    req = urllib.request.Request(url + "/count", headers={"X-Tandem-View": "0"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        value = resp.headers["X-Tandem-Cluster"]
    assert value, "the server sent no view"
    return str(value)


def _proxy_backends(cluster: Any) -> dict[str, dict[str, Any]]:
    status = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")
    return {b["id"]: b for b in status["backends"]}


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_ipv6_cluster_through_the_proxy_survives_kill_9(make_cluster) -> None:
    # the proxy's active probes on too: they dial the [::1] addresses as well
    cluster = make_cluster(host="::1", proxy={"health_interval_s": 0.1}).start()
    ports = {sid: s["http"] for sid, s in cluster.servers.items()}
    # the servers advertise [::1]:port, and the proxy parses it
    _, members = parse_cluster_header(_view_header(cluster.url("s2")))
    assert members == {sid: Address("::1", p) for sid, p in ports.items()}

    clients = []
    while sum(c.route[1] == "s1" for c in clients) < 5:
        c = Client(cluster.proxy_url)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1
        clients.append(c)
        assert len(clients) < 60
    for c in clients:
        assert c.get()[1]["counter"] == 2
    backends = _proxy_backends(cluster)
    assert {b: backends[b]["address"] for b in backends} == {
        sid: f"[::1]:{p}" for sid, p in ports.items()}
    deadline = time.monotonic() + 10
    while not all(b["probe_successes"] > 0 for b in _proxy_backends(cluster).values()):
        assert time.monotonic() < deadline, _proxy_backends(cluster)
        time.sleep(0.05)

    cluster.kill("s1")  # SIGKILL
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 3, body
        assert body["server"] != "s1"

    # `tandem status` reaches every server at its [::1] address
    out = subprocess.run([sys.executable, "-m", "proxy.cli", "status", "--config",
                          str(cluster.config_path), "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    report = json.loads(out.stdout)
    assert report["servers"]["s1"]["state"] == "down"
    assert {s for s in ("s2", "s3") if "peers" in report["servers"][s]} == {"s2", "s3"}


def test_servers_bound_to_0_0_0_0_advertise_their_own_address(make_cluster) -> None:
    cluster = make_cluster(bind_host="0.0.0.0").start()
    ports = {sid: s["http"] for sid, s in cluster.servers.items()}
    # bound on every interface: it answers on 127.0.0.2 too, which it does not advertise
    assert get_json(f"http://127.0.0.2:{ports['s1']}/__tandem/health")["peers"]
    for s in load_file(cluster.config_path).servers:
        socket.create_connection(("127.0.0.2", s.replication.port), timeout=2).close()
    # what the peers are told and what the proxy learns: the advertised addresses
    header = _view_header(cluster.url("s1"))
    assert "0.0.0.0" not in header
    _, members = parse_cluster_header(header)
    assert members == {sid: Address("127.0.0.1", p) for sid, p in ports.items()}

    c = Client(cluster.proxy_url)
    for n in (1, 2):
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == n
    status = get_json(f"http://127.0.0.1:{cluster.admin_port}/__tandem/status?format=json")
    assert status["view"] not in (None, "", "-")  # the proxy adopted a view from a server
    assert {b["id"]: b["address"] for b in status["backends"]} == {
        sid: hostport("127.0.0.1", p) for sid, p in ports.items()}
    # the servers placed secondaries: all on one machine (127.0.0.1), none refused
    assert c.route[2] not in ("NONE", c.route[1])


def test_tandem_up_warns_for_the_demo_secret_on_a_wildcard_bind(tmp_path: Path) -> None:
    proxy, admin, http, repl = free_ports(4)
    path = tmp_path / "bind.toml"
    path.write_text("\n".join([
        "[cluster]", 'secrets = ["change-me"]', "",
        "[proxy]", f'listen = "127.0.0.1:{proxy}"', f'admin = "127.0.0.1:{admin}"', "",
        "[[servers]]", 'id = "s1"', f'http = "127.0.0.1:{http}"',
        f'http_bind = "0.0.0.0:{http}"', f'replication = "127.0.0.1:{repl}"', ""]))
    env = {k: v for k, v in os.environ.items() if k not in ("TANDEM_SECRETS", "TANDEM_LOG_LEVEL")}
    up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "up", "--config", str(path),
                           "--app", "tests.apps:asgi_counter"], cwd=ROOT,
                          env={**env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("tandem is up"):
                break
    finally:
        os.killpg(up.pid, signal.SIGINT)
        up.communicate(timeout=30)
    warned = [line for line in lines if line.startswith("tandem: warning:")]
    assert len(warned) == 1 and f"0.0.0.0:{http} is not loopback" in warned[0], lines


def test_a_secondary_lands_on_another_host_when_one_is_free(make_cluster) -> None:
    # s1 and s2 share a host, s3 is alone on 127.0.0.2; no `machine` anywhere
    cluster = make_cluster(servers=[{"id": "s1"}, {"id": "s2"},
                                    {"id": "s3", "host": "127.0.0.2"}]).start()
    routes = []
    while sum(r[1] == "s1" for r in routes) < 6:
        c = Client(cluster.proxy_url)
        assert c.get("/count")[0] == 200
        routes.append(c.route)
        assert len(routes) < 60
    # s1's and s2's secondaries on s3 (the other machine); s3's on either of the first host
    assert {r[2] for r in routes if r[1] in ("s1", "s2")} == {"s3"}, routes
    assert {r[2] for r in routes if r[1] == "s3"} <= {"s1", "s2"}, routes
