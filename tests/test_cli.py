"""The `tandem` command explains itself: its version, help for every option, the default
cluster and the signals of `tandem up`; a bad cluster file is one line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from proxy.cli import _parser
from proxy.up import RESTART_LIMIT, RESTART_WINDOW_S
from tandem.config import default_config_path, load
from tests.cluster import ROOT, Cluster


def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TANDEM_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)


def test_version_is_the_installed_package_version() -> None:
    done = tandem("--version")
    assert done.returncode == 0
    assert done.stdout == f"tandem {metadata.version('tandem-proxy')}\n"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_option_of_every_subcommand_has_help() -> None:
    commands = _subcommands()
    assert set(commands) == {"up", "backend", "witness", "proxy", "status", "certs",
                             "site-down", "export", "sync"}
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
        assert parser.description, name
    for name in ("up", "backend", "witness", "proxy"):
        assert "--debug" in commands[name]._option_string_actions, name


def test_up_help_says_what_the_default_cluster_is_and_what_the_signals_do() -> None:
    done = tandem("up", "--help")
    assert done.returncode == 0
    text = done.stdout
    cfg = load(default_config_path())
    assert cfg.proxy.admin is not None
    for address in (cfg.proxy.listen, cfg.proxy.admin,
                    *(a for s in cfg.servers for a in (s.http, s.replication))):
        assert str(address) in text, address
    assert str(cfg.proxy.listen) == "127.0.0.1:8080" and str(cfg.proxy.admin) == "127.0.0.1:8081"
    assert f"{len(cfg.servers)} servers on 2 \"machines\"" in text
    assert "backends.demo:app" in text
    assert "SIGHUP" in text and "rolling restart" in text
    assert "Ctrl-C" in text
    assert f"{RESTART_LIMIT} exits of one process within {RESTART_WINDOW_S:g} s" in text


@pytest.mark.parametrize("command", ["up", "backend", "proxy"])
def test_a_bad_key_in_the_cluster_file_is_one_line(tmp_path: Path, command: str) -> None:
    cluster = Cluster(tmp_path, n=2)
    path = cluster.config_path
    path.write_text(path.read_text().replace("[session]", "[session]\ncookie_nmae = \"x\""))
    args = [command, "--config", str(path)]
    if command == "backend":
        args += ["--server", "s1", "--app", "tests.apps:asgi_counter"]
    done = tandem(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"tandem: configuration error: session.cookie_nmae: unknown key (got 'x') in {path}"]


def test_an_unknown_server_id_is_one_line(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, n=2)
    done = tandem("backend", "--config", str(cluster.config_path), "--server", "s9",
                  "--app", "tests.apps:asgi_counter")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "tandem: configuration error: servers.id: no such server (known: s1, s2) (got 's9') "
        f"in {cluster.config_path}"]
