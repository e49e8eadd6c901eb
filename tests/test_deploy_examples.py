"""The example cluster files and the deployment recipes (deploy/): every file loads, and the
container image, the compose file and the systemd unit say what tandem understands."""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest

from proxy.cli import _parser
from tandem.config import default_config_path, load
from tandem.placement import proxy_hosts, select
from tests.cluster import ROOT

yaml = pytest.importorskip("yaml")

DEPLOY = ROOT / "deploy"
EXAMPLES = sorted((ROOT / "config").glob("*.toml"))


@pytest.mark.parametrize("path", [*EXAMPLES, default_config_path()], ids=lambda p: p.name)
def test_every_example_cluster_file_loads(path: Path) -> None:
    cfg = load(path, environ={})
    assert cfg.servers


def test_the_three_host_example_has_one_server_per_host_and_the_proxy_on_the_first() -> None:
    cfg = load(ROOT / "config" / "hosts-3.toml", environ={})
    hosts = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    for host, sid in zip(hosts, ("s1", "s2", "s3"), strict=True):
        here = select(cfg, host=host)
        assert [s.id for s in here.servers] == [sid] and not here.whole
        assert here.proxy == (host == "10.0.0.1")
        (s,) = here.servers
        assert s.http.host == host and s.http_bind is not None and s.http_bind.wildcard
    assert len({s.machine for s in cfg.servers}) == 3  # a secondary always on another host


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return data


def test_the_compose_file_runs_each_host_of_its_cluster_file() -> None:
    compose = _compose()
    (subnet,) = (ipaddress.ip_network(c["subnet"])
                 for c in compose["networks"]["cluster"]["ipam"]["config"])
    started: list[str] = []
    proxies = 0
    for name, svc in compose["services"].items():
        (mount,) = svc["volumes"]
        source, target, _ = mount.split(":")
        assert target == "/etc/tandem/cluster.toml"
        cfg = load((DEPLOY / source).resolve(), environ={})
        host = svc["environment"]["TANDEM_HOST"]
        assert svc["networks"]["cluster"]["ipv4_address"] == host, name
        assert ipaddress.ip_address(host) in subnet
        here = select(cfg, host=host)
        started += [s.id for s in here.servers]
        (server,) = here.servers
        assert f"http://{server.http}/__tandem/health" in " ".join(svc["healthcheck"]["test"])
        assert "TANDEM_SECRETS" in svc["environment"]  # (from the caller's environment)
        grace = float(svc["stop_grace_period"].rstrip("s"))
        assert grace >= cfg.cluster.drain_timeout_s + 10  # the drain of a stop fits in it
        assert svc["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / svc["build"]["context"]).resolve() == ROOT
        if here.proxy:
            proxies += 1
            assert any(p.endswith(f":{cfg.proxy.listen.port}") for p in svc["ports"])
    assert sorted(started) == sorted(cfg.server_ids)  # every server, once
    assert proxies == len(proxy_hosts(cfg)) == 1


def test_the_dockerfile_installs_the_packages_and_runs_up_as_a_user() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[1-9]-slim$", text, re.M)
    copied = {src for line in re.findall(r"^COPY (.+) \S+$", text, re.M)
              for src in line.split()}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    assert {p.split(".")[0] for p in packages} <= copied
    assert all((ROOT / src).exists() for src in copied), copied
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    assert user not in ("root", "0")
    # the entry point as the shell runs it, with this container's host
    (entry,) = re.findall(r"^ENTRYPOINT (.+)$", text, re.M)
    (cmd,) = re.findall(r"^CMD (.+)$", text, re.M)
    script = json.loads(entry)[2]
    words = shlex.split(re.sub(r"\$\{TANDEM_HOST:\?[^}]*\}", "10.0.0.1",
                               script.replace("$TANDEM_CONFIG", "/etc/tandem/cluster.toml")
                               .replace('"$@"', "")))
    assert words[:2] == ["exec", "tandem"]
    args = _parser().parse_args([*words[2:], *json.loads(cmd)])
    assert (args.command, args.host, args.app) == ("up", "10.0.0.1", "backends.demo:app")


def _unit() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (DEPLOY / "systemd" / "tandem@.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_the_systemd_unit_runs_one_host_and_lets_tandem_drain_it() -> None:
    unit = _unit()
    argv = shlex.split(unit["ExecStart"].replace("%i", "10.0.0.2"))
    assert argv[0].endswith("/tandem")
    args = _parser().parse_args(argv[1:])
    assert (args.command, args.host) == ("up", "10.0.0.2")
    # SIGTERM to `tandem up` alone (it drains the servers), within the stop timeout
    assert unit["KillMode"] == "mixed" and unit["KillSignal"] == "SIGTERM"
    cfg = load(ROOT / "config" / "hosts-3.toml", environ={})
    assert float(unit["TimeoutStopSec"]) >= cfg.cluster.drain_timeout_s + 10
    assert unit["Restart"] == "on-failure" and unit["RestartPreventExitStatus"] == "2"
    assert int(unit["LimitNOFILE"]) >= 65536 and unit["User"] != "root"
    env = (DEPLOY / "systemd" / "tandem.env.example").read_text()
    assert unit["EnvironmentFile"].endswith("tandem.env")
    assert re.search(r"^TANDEM_SECRETS=\S+", env, re.M)
