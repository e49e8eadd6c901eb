"""`tandem up`: every server of the cluster file as a child process, and the proxy.

A small supervisor: starts the servers, waits until they answer, starts the proxy, prints
the URL, restarts a server process that dies (unless told not to), and on Ctrl-C/SIGTERM
stops everything — servers first get SIGTERM (a clean leave), then SIGKILL after a bound.
SIGHUP restarts the servers one by one (a rolling restart): each drains — hands its
sessions to their secondaries — exits, starts again and rejoins before the next one goes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from backends.config import Config

__all__ = ["run_up", "print_status", "child_env"]

STOP_TIMEOUT_S = 15.0


def child_env() -> dict[str, str]:
    """The environment of child processes: the caller's directory importable (for --app)."""
    env = dict(os.environ)
    extra = [os.getcwd()]
    if env.get("PYTHONPATH"):
        extra.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(extra)
    return env


def _get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _backend_cmd(path: str, server: str, app: str, interface: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "backend", "--config", path,
            "--server", server, "--app", app, "--interface", interface]


def _wait_rejoined(cfg: Config, server: str, timeout: float) -> bool:
    """Until `server` answers and sees every other server alive."""
    url = f"http://{cfg.server(server).http}/__tandem/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            health = _get_json(url)
            if all(v == "alive" for v in health.get("peers", {}).values()):
                return True
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)
    return False


def run_up(cfg: Config, path: str, *, app: str, interface: str, restart: bool) -> int:
    stopping = False
    rolling = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping, rolling
        if signum == signal.SIGHUP:
            rolling = True
        else:
            stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    env = child_env()
    children: dict[str, subprocess.Popen[bytes]] = {}
    cmds: dict[str, list[str]] = {}
    for s in cfg.servers:
        cmds[s.id] = _backend_cmd(path, s.id, app, interface)
    cmds["proxy"] = [sys.executable, "-m", "proxy.cli", "proxy", "--config", path]
    try:
        for s in cfg.servers:
            children[s.id] = subprocess.Popen(cmds[s.id], env=env)
        deadline = time.monotonic() + 30
        for s in cfg.servers:
            while not stopping:
                if children[s.id].poll() is not None:
                    print(f"tandem: server {s.id} exited with {children[s.id].returncode} "
                          "during start-up", file=sys.stderr)
                    return 1
                try:
                    _get_json(f"http://{s.http}/__tandem/health")
                    break
                except (OSError, urllib.error.URLError, ValueError):
                    if time.monotonic() > deadline:
                        print(f"tandem: server {s.id} did not answer on {s.http}",
                              file=sys.stderr)
                        return 1
                    time.sleep(0.1)
        children["proxy"] = subprocess.Popen(cmds["proxy"], env=env)
        if not _wait_listening(cfg, children["proxy"], timeout=30.0):
            print(f"tandem: the proxy did not start listening on {cfg.proxy.listen}",
                  file=sys.stderr)
            return 1
        if not stopping:
            admin = f", status page http://{cfg.proxy.admin}/__tandem/status" if (
                cfg.proxy.admin) else ""
            print(f"\ntandem is up: http://{cfg.proxy.listen}/{admin}\n"
                  f"servers: {', '.join(f'{s.id}={s.http}' for s in cfg.servers)} — "
                  "Ctrl-C stops all of it\n", file=sys.stderr, flush=True)
        while not stopping:
            time.sleep(0.2)
            if rolling:
                rolling = False
                _rolling_restart(cfg, children, cmds, env)
            for name, child in list(children.items()):
                code = child.poll()
                if code is None or stopping:
                    continue
                print(f"tandem: {name} exited with {code}"
                      + ("; restarting it" if restart else ""), file=sys.stderr, flush=True)
                if not restart:
                    return 1
                time.sleep(0.5)
                children[name] = subprocess.Popen(cmds[name], env=env)
        return 0
    finally:
        _stop_all(children)


def _wait_listening(cfg: Config, proxy: subprocess.Popen[bytes], *, timeout: float) -> bool:
    """Until the proxy accepts connections (the URL we print must answer)."""
    addr = cfg.proxy.listen
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proxy.poll() is None:
        try:
            with socket.create_connection((addr.host, addr.port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def _rolling_restart(cfg: Config, children: dict[str, subprocess.Popen[bytes]],
                     cmds: dict[str, list[str]], env: dict[str, str]) -> None:
    drain = cfg.cluster.drain_timeout_s + 10.0
    for s in cfg.servers:
        print(f"tandem: rolling restart: {s.id} draining", file=sys.stderr, flush=True)
        child = children[s.id]
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=drain)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        children[s.id] = subprocess.Popen(cmds[s.id], env=env)
        if not _wait_rejoined(cfg, s.id, timeout=60.0):
            print(f"tandem: rolling restart stopped: {s.id} did not rejoin",
                  file=sys.stderr, flush=True)
            return
    print("tandem: rolling restart done", file=sys.stderr, flush=True)


def _stop_all(children: dict[str, subprocess.Popen[bytes]]) -> None:
    # the proxy first (no new requests), then the servers (each leaves cleanly)
    order = sorted(children, key=lambda n: n != "proxy")
    for name in order:
        if children[name].poll() is None:
            children[name].send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for name in order:
        child = children[name]
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def print_status(cfg: Config, *, as_json: bool) -> int:
    report: dict[str, Any] = {"servers": {}, "proxy": None}
    for s in cfg.servers:
        try:
            report["servers"][s.id] = _get_json(f"http://{s.http}/__tandem/health")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            report["servers"][s.id] = {"state": "down", "error": str(exc)}
    if cfg.proxy.admin is not None:
        try:
            report["proxy"] = _get_json(
                f"http://{cfg.proxy.admin}/__tandem/status?format=json")
        except (OSError, urllib.error.URLError, ValueError) as exc:
            report["proxy"] = {"state": "down", "error": str(exc)}
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{'server':<10}{'state':<10}{'primaries':>10}{'replicas':>10}  peers")
        for sid, h in report["servers"].items():
            peers = ", ".join(f"{k}:{v}" for k, v in h.get("peers", {}).items())
            print(f"{sid:<10}{h.get('state', '?'):<10}{h.get('primaries', '-'):>10}"
                  f"{h.get('replicas', '-'):>10}  {peers}")
        proxy = report["proxy"]
        if proxy is not None:
            print(f"proxy: {'down' if proxy.get('state') == 'down' else 'up'}")
    return 0 if all(h.get("state") != "down" for h in report["servers"].values()) else 1
