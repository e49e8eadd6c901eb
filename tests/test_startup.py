"""Start-up and stop of real `tandem` processes: taken ports, apps that do not load or do
not start, the restart bound of `tandem up`, its quiet Ctrl-C, the demo-secret warning."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.config import load
from tests.cluster import ROOT, Cluster, free_ports

APP = "tests.apps:asgi_counter"
IN_USE = "address already in use"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
    for name in ("TANDEM_LOG_LEVEL", "TANDEM_SECRETS"):
        if name not in extra:
            env.pop(name, None)
    return env


def tandem(*args: str, cwd: Path = ROOT, timeout: float = 30.0,
           **env: str) -> tuple[int, list[str], float]:
    """Run `tandem ARGS` to its end: exit status, the lines it printed, seconds it took."""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "proxy.cli", *args], cwd=cwd, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    return done.returncode, lines, time.monotonic() - started


@contextlib.contextmanager
def held(port: int) -> Iterator[socket.socket]:
    """Another program's listener on 127.0.0.1:`port`."""
    with socket.socket() as sock:
        # (as servers do: a connection of the port's last owner in TIME_WAIT is no conflict;
        # a listener is, with or without it)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield sock


def _processes_of(config: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", "--", f"--config {config}"], capture_output=True,
                         text=True)
    return [int(p) for p in out.stdout.split()]


def _none_left(config: Path, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while _processes_of(config):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class Up:
    """A `tandem up` running in the background, in a process group of its own (as a
    terminal's foreground job: its Ctrl-C goes to every process of the group)."""

    def __init__(self, tmp: Path, config: Path, *args: str, cwd: Path = ROOT) -> None:
        self.config = config
        self.out_path = tmp / "up.log"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "up", "--config", str(config), *args],
            cwd=cwd, env=_env(), stdout=self._out, stderr=subprocess.STDOUT,
            start_new_session=True)

    @property
    def text(self) -> str:
        return self.out_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while self.text.count(text) < count:
            assert self.proc.poll() is None, self.text
            assert time.monotonic() < deadline, self.text
            time.sleep(0.05)

    def pids(self, server: str) -> list[int]:
        out = subprocess.run(["pgrep", "-f", "--", f"--config {self.config} --server {server} "],
                             capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._out.close()


@pytest.fixture
def up_runs() -> Iterator[list[Up]]:
    runs: list[Up] = []
    yield runs
    for run in runs:
        run.close()
        _none_left(run.config)


# --- taken addresses ----------------------------------------------------------------------


def test_up_with_the_proxy_port_taken_says_so_in_one_line_and_never_prints_its_url(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, n=2)
    port = cluster.proxy_port
    with held(port):
        code, lines, seconds = tandem("up", "--config", str(cluster.config_path),
                                      "--app", APP)
    assert code == 1 and seconds < 10, lines
    assert lines == [f"tandem: cannot listen on 127.0.0.1:{port}: {IN_USE}"]
    assert _none_left(cluster.config_path)


@pytest.mark.parametrize("what", ["http", "replication"])
@pytest.mark.parametrize("peer", [False, True], ids=["alone", "peer running"])
def test_a_backend_whose_port_is_taken_exits_at_once_in_one_line(
        tmp_path: Path, what: str, peer: bool) -> None:
    cluster = Cluster(tmp_path, n=2)
    try:
        if peer:
            cluster.start_server("s2")
        port = getattr(load(cluster.config_path).server("s1"), what).port
        with held(port):
            code, lines, seconds = tandem("backend", "--config", str(cluster.config_path),
                                          "--server", "s1", "--app", APP)
        assert code == 1 and seconds < 10, lines
        assert lines == [f"tandem: cannot listen on 127.0.0.1:{port} (s1's {what} address): "
                         f"{IN_USE}"]
    finally:
        cluster.close()


def test_up_with_a_backend_port_taken_names_it_and_stops_everything(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path, n=2)
    port = load(cluster.config_path).server("s2").replication.port
    with held(port):
        code, lines, seconds = tandem("up", "--config", str(cluster.config_path), "--app", APP)
    assert code == 1 and seconds < 10, lines
    assert lines == [f"tandem: cannot listen on 127.0.0.1:{port} (s2's replication address): "
                     f"{IN_USE}"]
    assert _none_left(cluster.config_path)


def test_a_backend_stops_on_sigterm_while_its_app_is_still_starting(tmp_path: Path) -> None:
    """Signals are heard from the first moment: what was started is torn down."""
    (tmp_path / "slow_start.py").write_text(
        "import asyncio\n"
        "async def app(scope, receive, send):\n"
        "    await receive()\n"
        "    await asyncio.sleep(3600)  # the lifespan start-up never completes\n")
    cluster = Cluster(tmp_path, n=2)
    try:
        cluster.start_server("s2")
        http = load(cluster.config_path).server("s1").http
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy.cli", "backend", "--config", str(cluster.config_path),
             "--server", "s1", "--app", "slow_start:app"], cwd=tmp_path, env=_env(),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:  # its listener is bound before the app starts: connections wait
            with contextlib.suppress(OSError), socket.create_connection(
                    (http.host, http.port), timeout=0.5):
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        cluster.close()


# --- apps that do not load or do not start --------------------------------------------------


@pytest.mark.parametrize("command", ["up", "backend"])
def test_an_app_that_does_not_import_is_one_line_and_exit_status_2(
        tmp_path: Path, command: str) -> None:
    cluster = Cluster(tmp_path, n=2)
    args = [command, "--config", str(cluster.config_path), "--app", "no_such_module_x:app"]
    if command == "backend":
        args += ["--server", "s1"]
    code, lines, seconds = tandem(*args)
    assert code == 2 and seconds < 10, lines
    assert lines == ["tandem: cannot load app 'no_such_module_x:app': ModuleNotFoundError: "
                     "No module named 'no_such_module_x'"]
    # with --debug, the traceback too (before the line)
    code, lines, _ = tandem(*args, "--debug")
    assert code == 2 and lines[0].startswith("Traceback") and lines[-1].startswith(
        "tandem: cannot load app 'no_such_module_x:app'"), lines
    assert _none_left(cluster.config_path)


def test_an_app_that_raises_at_import_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_app.py").write_text("raise RuntimeError('no DATABASE_URL set')\n")
    cluster = Cluster(tmp_path, n=2)
    code, lines, _ = tandem("up", "--config", str(cluster.config_path), "--app",
                            "broken_app:app", cwd=tmp_path)
    assert code == 2
    assert lines == ["tandem: cannot load app 'broken_app:app': RuntimeError: no DATABASE_URL set"]


def test_an_app_whose_startup_fails_stops_up_with_the_reason(tmp_path: Path) -> None:
    (tmp_path / "failing_start.py").write_text(
        "async def app(scope, receive, send):\n"
        "    await receive()\n"
        "    await send({'type': 'lifespan.startup.failed', 'message': 'database unreachable'})\n")
    cluster = Cluster(tmp_path, n=2)
    code, lines, seconds = tandem("up", "--config", str(cluster.config_path), "--app",
                                  "failing_start:app", cwd=tmp_path)
    assert code == 1 and seconds < 10, lines
    assert len(lines) == 1 and lines[0].startswith("tandem: s") and lines[0].endswith(
        "cannot start: application start-up failed: database unreachable"), lines
    assert _none_left(cluster.config_path)


# --- the restart bound ----------------------------------------------------------------------


def test_up_stops_when_a_server_keeps_dying(tmp_path: Path, up_runs: list[Up]) -> None:
    cluster = Cluster(tmp_path, n=2)
    up = Up(tmp_path, cluster.config_path, "--app", APP)
    up_runs.append(up)
    up.wait_for("tandem is up")
    killed: set[int] = set()
    for i in range(5):
        if i:
            up.wait_for("tandem: s1 is up again", count=i)
        (pid,) = [p for p in up.pids("s1") if p not in killed]
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
    assert up.proc.wait(timeout=10) == 1, up.text
    lines = up.text.splitlines()
    assert lines.count("tandem: s1 exited (killed by SIGKILL); restarting it") == 4
    assert lines[-1] == ("tandem: s1 exited 5 times within 60 s (last: killed by SIGKILL); "
                         "stopping the cluster")
    assert _none_left(cluster.config_path)


def test_up_stops_when_a_restarted_server_cannot_start(tmp_path: Path,
                                                       up_runs: list[Up]) -> None:
    cluster = Cluster(tmp_path, n=2)
    up = Up(tmp_path, cluster.config_path, "--app", APP)
    up_runs.append(up)
    up.wait_for("tandem is up")
    port = load(cluster.config_path).server("s1").http.port
    (pid,) = up.pids("s1")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while True:  # take its port the moment it is free (the restart takes longer to bind)
        try:
            holder = held(port)
            holder.__enter__()
            break
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.005)
    try:
        assert up.proc.wait(timeout=10) == 1, up.text
    finally:
        holder.__exit__(None, None, None)
    assert up.text.splitlines()[-2:] == [
        f"tandem: cannot listen on 127.0.0.1:{port} (s1's http address): {IN_USE}",
        "tandem: s1 could not restart; stopping the cluster"]


# --- stopping -------------------------------------------------------------------------------


def test_ctrl_c_of_up_is_one_line_per_process(tmp_path: Path, up_runs: list[Up]) -> None:
    cluster = Cluster(tmp_path, n=3)
    up = Up(tmp_path, cluster.config_path, "--app", APP)
    up_runs.append(up)
    up.wait_for("tandem is up")
    cluster.wait_formed()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    for _ in range(60):  # sessions on every server, each with a replica on another
        opener.open(f"http://127.0.0.1:{cluster.proxy_port}/count", timeout=5).read()
    os.killpg(up.proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole group
    assert up.proc.wait(timeout=30) == 0, up.text
    said = up.text.split("Ctrl-C stops all of it\n", 1)[1].strip().splitlines()
    assert said[0] == "tandem: proxy stopped", up.text
    assert [line.split(" (")[0] for line in said[1:]] == [
        "tandem: s1 stopped", "tandem: s2 stopped", "tandem: s3 stopped"], up.text
    ended = sum(int(line.split("(")[1].split()[0]) for line in said[1:])
    assert ended == 60, up.text  # no hand-over between servers that all stop
    assert _none_left(cluster.config_path)


def test_the_processes_of_up_stop_when_it_is_killed(tmp_path: Path, up_runs: list[Up]) -> None:
    cluster = Cluster(tmp_path, n=2)
    up = Up(tmp_path, cluster.config_path, "--app", APP)
    up_runs.append(up)
    up.wait_for("tandem is up")
    up.proc.send_signal(signal.SIGKILL)  # only the supervisor
    up.proc.wait(timeout=5)
    assert _none_left(cluster.config_path), "orphans of a killed tandem up"


# --- the demo secret ------------------------------------------------------------------------


def _demo_config(tmp: Path, *, proxy_host: str, server_host: str) -> tuple[Path, int, int]:
    proxy, http, repl = free_ports(3)
    path = tmp / "demo.toml"
    path.write_text("\n".join([
        "[cluster]", 'secrets = ["change-me"]', "",
        "[proxy]", f'listen = "{proxy_host}:{proxy}"', 'admin = "off"', "",
        "[[servers]]", 'id = "s1"',
        # a server binding 0.0.0.0 advertises an address a peer can dial
        *([f'http = "127.0.0.1:{http}"', f'http_bind = "{server_host}:{http}"']
          if server_host == "0.0.0.0" else [f'http = "{server_host}:{http}"']),
        f'replication = "127.0.0.1:{repl}"', ""]))
    return path, proxy, http


@pytest.mark.parametrize("command", ["proxy", "backend"])
def test_the_demo_secret_on_a_reachable_address_is_a_warning(tmp_path: Path,
                                                              command: str) -> None:
    path, proxy, http = _demo_config(tmp_path, proxy_host="0.0.0.0", server_host="0.0.0.0")
    args = ["--server", "s1", "--app", APP] if command == "backend" else []
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", command, "--config", str(path),
                             *args], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = proxy if command == "proxy" else http
        deadline = time.monotonic() + 10
        while True:  # up: it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port),
                                                                        timeout=0.5):
                break
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    plain = [line for line in err.splitlines() if line.startswith("tandem:")]
    assert len(plain) == 1 and "'change-me'" in plain[0] and f"0.0.0.0:{port}" in plain[0] \
        and "TANDEM_SECRETS" in plain[0], err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    warned = [e for e in events if e["event"] == "demo_secret_exposed"]
    assert len(warned) == 1 and warned[0]["level"] == "warning", err
    assert f"0.0.0.0:{port}" in warned[0]["addresses"]


def test_the_demo_secret_on_loopback_and_a_real_secret_anywhere_are_quiet(
        tmp_path: Path) -> None:
    path, proxy, _ = _demo_config(tmp_path, proxy_host="127.0.0.1", server_host="127.0.0.1")
    quiet = load(path, environ={})
    from tandem.startup import demo_secret_exposed
    assert demo_secret_exposed(quiet, [quiet.proxy.listen, quiet.servers[0].http]) == []
    exposed, _, _ = _demo_config(tmp_path, proxy_host="0.0.0.0", server_host="0.0.0.0")
    real = load(exposed, environ={"TANDEM_SECRETS": "a-real-secret"})
    assert demo_secret_exposed(real, [real.proxy.listen, real.servers[0].http]) == []
    demo = load(exposed, environ={})
    assert demo_secret_exposed(demo, [demo.proxy.listen]) == [str(demo.proxy.listen)]


def test_up_warns_once_for_the_demo_secret(tmp_path: Path) -> None:
    path, proxy, http = _demo_config(tmp_path, proxy_host="0.0.0.0", server_host="127.0.0.1")
    up = subprocess.Popen([sys.executable, "-m", "proxy.cli", "up", "--config", str(path),
                           "--app", APP], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert up.stdout is not None
        lines = []
        for line in up.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("tandem is up"):
                break
    finally:
        os.killpg(up.pid, signal.SIGINT)
        rest, _ = up.communicate(timeout=30)
    plain = [line for line in lines if line.startswith("tandem: warning:")]
    assert plain == [f"tandem: warning: the cluster secret is the demo's 'change-me' and "
                     f"0.0.0.0:{proxy} is not loopback: anyone who reaches it can forge "
                     "session tokens; set TANDEM_SECRETS"], lines
    # and one structured warning, from the supervisor (not one more per process)
    events = [json.loads(line) for line in lines if line.startswith("{")]
    assert [e["event"] for e in events if e["level"] == "warning"] == ["demo_secret_exposed"]
    assert up.returncode == 0, rest
