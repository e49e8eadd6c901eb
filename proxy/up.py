"""`tandem up`: every server of the cluster file as a child process, and the proxy — or
part of them (`--host`, `--servers`: tandem.placement), the other hosts running the rest.

A server with `witness = true` runs as `tandem witness` (it votes; it hosts no app).

A small supervisor. Start: the app is imported once, here (one line if it does not load,
exit 2); then every server and the proxy start at once, and each says through its channel
(`tandem.supervision`) that it listens — or, in one line, why it cannot: that line is
printed, everything stops, exit 1. The URL is printed only once the proxy itself said it
listens there (a probe of the port would also be answered by another program holding it).

Running: a process that exits is restarted; RESTART_LIMIT exits of one process within
RESTART_WINDOW_S, or a restarted process that cannot start, stop the cluster (exit 1).
SIGHUP restarts the servers one by one (a rolling restart): each drains — hands its
sessions to their secondaries — exits, starts again and rejoins before the next one goes.
Ctrl-C or SIGTERM stops the whole cluster: the proxy first, then every server at once, in
steps (no hand-over to peers that stop too, no repair after peers that leave), one line
each. When it runs only part of the cluster, the servers of other hosts carry on: Ctrl-C or
SIGTERM drains its servers one at a time (each hands its sessions to peers that stay, as
SIGTERM of one server does), then stops the proxy, which routed to the new primaries
meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from tandem.config import Config, ServerConfig
from tandem.logs import configure
from tandem.placement import Placement, select
from tandem.startup import AppLoadError, fail, warn_demo_secret
from tandem.supervision import PART_ENV

from .children import Child, ChildState, describe_exit

__all__ = ["run_up", "print_status", "child_env", "RESTART_LIMIT", "RESTART_WINDOW_S"]

RESTART_LIMIT = 5  # exits of one process within RESTART_WINDOW_S that stop the cluster
RESTART_WINDOW_S = 60.0
START_TIMEOUT_S = 30.0  # for a process to say it listens (the app's start-up included)
STOP_TIMEOUT_S = 15.0  # for the whole cluster to stop; then SIGKILL
STEP_TIMEOUT_S = 2.0  # for every server to answer a step of the stop (a hung one: not waited)
_TICK_S = 0.1


def child_env() -> dict[str, str]:
    """The environment of child processes: the caller's directory importable (for --app),
    and their logs at WARNING unless TANDEM_LOG_LEVEL says otherwise (`--debug`: DEBUG) —
    the terminal shows what needs attention, not every session created."""
    env = dict(os.environ)
    extra = [os.getcwd()]
    if env.get("PYTHONPATH"):
        extra.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(extra)
    env.setdefault("TANDEM_LOG_LEVEL", "WARNING")
    return env


def _get_json(url: str, timeout: float = 1.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _backend_cmd(path: str, server: str, app: str, interface: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "backend", "--config", path,
            "--server", server, "--app", app, "--interface", interface]


def _server_cmd(path: str, server: ServerConfig, app: str, interface: str) -> list[str]:
    """A server runs the app; a witness (`witness = true`) only votes."""
    if server.witness:
        return [sys.executable, "-m", "proxy.cli", "witness", "--config", path,
                "--server", server.id]
    return _backend_cmd(path, server.id, app, interface)


def _wait_rejoined(cfg: Config, server: str, timeout: float,
                   stopping: Callable[[], bool]) -> bool:
    """Until `server` answers, is a member of the view again and sees every other member
    alive (servers of other hosts that are down are no members: nothing to wait for)."""
    url = f"http://{cfg.server(server).http}/__tandem/health"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        try:
            health = _get_json(url)
            peers, members = health.get("peers", {}), health.get("members", [])
            if server in members and health.get("standing") == "member" and all(
                    peers.get(m) == "alive" for m in members if m != server):
                return True
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.1)
    return False


class _Failed(Exception):
    """The cluster stops because of a process; `lines` say why, one line each."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0])
        self.lines = lines


def run_up(cfg: Config, path: str, *, app: str, interface: str, restart: bool,
           placement: Placement | None = None) -> int:
    """Run the cluster (or `placement`'s part of it) until Ctrl-C/SIGTERM (0) or a process
    fails (1); a bad app: 2."""
    configure(component="up")
    here = placement or select(cfg)
    # (a host of a witness or of the proxy alone need not have the app installed)
    if any(not s.witness for s in here.servers):
        from backends.server import load_app
        try:
            load_app(app, interface)  # once, here: not a traceback per server
        except AppLoadError as exc:
            return fail(f"tandem: {exc}", exc, code=2)
    p = cfg.proxy
    warn_demo_secret(cfg, [*(a for s in here.servers for a in (s.http, s.replication,
                                                          s.http_bind, s.replication_bind)
                             if a is not None),
                           *(a for a in (p.listen, p.admin) if a is not None and here.proxy)],
                     plain=True)
    return _Supervisor(cfg, path, app=app, interface=interface, restart=restart,
                       placement=here).run()


class _Supervisor:
    def __init__(self, cfg: Config, path: str, *, app: str, interface: str,
                 restart: bool, placement: Placement) -> None:
        # configuration
        self.cfg = cfg
        self.restart = restart
        self.placement = placement
        # what a failure stops: all of the cluster, or what runs here
        self.what = "the cluster" if placement.whole else f"this part ({placement.scope})"
        env = child_env()
        self.proxy = Child(name="proxy", cmd=[sys.executable, "-m", "proxy.cli", "proxy",
                                              "--config", path], env=env) \
            if placement.proxy else None
        # part of the cluster: a server that loses this supervisor drains to the others
        server_env = env if placement.whole else {**env, PART_ENV: "1"}
        self.servers = {s.id: Child(name=s.id, cmd=_server_cmd(path, s, app, interface),
                                    env=server_env) for s in placement.servers}
        # what the signals asked for
        self.stopping = False
        self.rolling = False

    @property
    def children(self) -> list[Child]:
        return [*([self.proxy] if self.proxy else []), *self.servers.values()]

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            self.rolling = True
        else:
            self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        announce = False
        try:
            for child in self.children:
                child.spawn()
            self._wait_ready(self.children)
            if self.stopping:
                return 0
            from backends.server import warn_cluster_file
            warn_cluster_file(self.cfg)  # (once for the cluster: not by each server)
            self._announce()
            announce = True
            while not self.stopping:
                time.sleep(_TICK_S)
                if self.rolling:
                    self.rolling = False
                    self._rolling_restart()
                for child in self.children:
                    self._check(child)
            return 0
        except _Failed as exc:
            for line in exc.lines:
                print(line, file=sys.stderr, flush=True)
            announce = False
            return 1
        finally:
            self._stop_all(announce=announce)

    # --- starting -----------------------------------------------------------------------

    def _wait_ready(self, children: Iterable[Child]) -> None:
        """Until each of `children` said it listens; _Failed if one cannot start."""
        waiting = list(children)
        while waiting and not self.stopping:
            for child in waiting:
                self._check_start(child)
            waiting = [c for c in waiting if c.state is ChildState.STARTING]
            if waiting:
                time.sleep(_TICK_S)

    def _check_start(self, child: Child) -> bool:
        """True once it said it listens; _Failed if it cannot start."""
        child.read()
        if child.failure is None and child.state is ChildState.STARTING:
            code = child.exit_code()
            if code is not None:
                child.read()  # the line it wrote just before it exited
                if child.failure is None:
                    raise _Failed(f"tandem: {child.name} exited while starting "
                                  f"({describe_exit(code)})", *self._after_restart(child))
            elif time.monotonic() - child.started_at > START_TIMEOUT_S:
                raise _Failed(f"tandem: {child.name} did not start within "
                              f"{START_TIMEOUT_S:g} s", *self._after_restart(child))
        if child.failure is not None:
            raise _Failed(child.failure, *self._after_restart(child))
        return child.state is ChildState.READY

    def _after_restart(self, child: Child) -> tuple[str, ...]:
        if child.spawns < 2:
            return ()
        return (f"tandem: {child.name} could not restart; stopping {self.what}",)

    def _announce(self) -> None:
        here = self.placement
        if self.proxy is not None:
            listen, *admin = self.proxy.addresses or [str(self.cfg.proxy.listen)]
            status = f", status page http://{admin[0]}/__tandem/status" if admin else ""
            scheme = "https" if self.cfg.proxy.tls_cert else "http"
            first = f"{scheme}://{listen}/{status}"
        else:
            first = "(no proxy here)"
        servers = ", ".join(f"{s.id}={s.http}" + (" (witness)" if s.witness else "")
                            for s in here.servers) or "none here"
        if here.whole:
            print(f"\ntandem is up: {first}\n"
                  f"servers: {servers} — Ctrl-C stops all of it\n", file=sys.stderr,
                  flush=True)
            return
        others = [s.id for s in self.cfg.servers if s.id not in self.servers]
        print(f"\ntandem is up ({here.scope}): {first}\n"
              f"servers: {servers}; on other hosts: {', '.join(others)}\n"
              "(a new cluster first serves once every server of the file has been up together)\n"
              "Ctrl-C drains the servers here to the others, then stops\n", file=sys.stderr,
              flush=True)

    # --- running ------------------------------------------------------------------------

    def _check(self, child: Child) -> None:
        """A restarted process that is starting, or one that exited: restart it, within
        the bound (_Failed past it)."""
        if child.state is ChildState.STARTING:
            if self._check_start(child):
                print(f"tandem: {child.name} is up again", file=sys.stderr, flush=True)
            return
        code = child.exit_code()
        if code is None or child.state is not ChildState.READY:
            return
        child.state = ChildState.EXITED
        why = describe_exit(code)
        if not self.restart:
            raise _Failed(f"tandem: {child.name} exited ({why}); not restarted (--no-restart)")
        n = child.exited_within(RESTART_WINDOW_S)
        if n >= RESTART_LIMIT:
            raise _Failed(f"tandem: {child.name} exited {n} times within "
                          f"{RESTART_WINDOW_S:g} s (last: {why}); stopping {self.what}")
        print(f"tandem: {child.name} exited ({why}); restarting it", file=sys.stderr,
              flush=True)
        child.spawn()

    def _rolling_restart(self) -> None:
        drain_s = self.cfg.cluster.drain_timeout_s + 10.0
        for sid, child in self.servers.items():
            if self.stopping:
                return
            print(f"tandem: rolling restart: {sid} draining", file=sys.stderr, flush=True)
            child.stop(hand_over=True)
            if child.wait(drain_s):
                print(f"tandem: {sid} drained" + (f" ({child.summary})" if child.summary
                                                   else ""), file=sys.stderr, flush=True)
            else:
                child.kill()
                print(f"tandem: {sid} did not drain within {drain_s:g} s: killed",
                      file=sys.stderr, flush=True)
            child.spawn()
            self._wait_ready([child])
            if not _wait_rejoined(self.cfg, sid, 60.0, lambda: self.stopping):
                if not self.stopping:
                    print(f"tandem: rolling restart stopped: {sid} did not rejoin",
                          file=sys.stderr, flush=True)
                return
        print("tandem: rolling restart done", file=sys.stderr, flush=True)

    # --- stopping -----------------------------------------------------------------------

    def _stop_all(self, *, announce: bool) -> None:
        """The whole cluster stops: the proxy first (no new requests), then every server
        at once, each told that its peers stop too; `announce`: a line for each."""
        if not self.placement.whole:
            self._stop_part(announce=announce)
            return
        running = [c for c in self.children if c.exit_code() is None and c.proc is not None]
        deadline = time.monotonic() + STOP_TIMEOUT_S
        killed = set()
        for group in ([self.proxy] if self.proxy else [], list(self.servers.values())):
            self._step(group, "stopping", "stopping")
            self._step(group, "leave", "left")
            for child in group:
                child.stop(hand_over=False)
            for child in group:
                if not child.wait(deadline - time.monotonic()):
                    child.kill()
                    killed.add(child.name)
        for child in self.children:
            child.close()
        if not announce:
            return
        if sys.stderr.isatty():
            print(file=sys.stderr)  # past the terminal's "^C"
        for child in running:
            if child.name in killed:
                line = f"did not stop within {STOP_TIMEOUT_S:g} s: killed"
            else:
                line = "stopped" + (f" ({child.summary})" if child.summary else "")
            print(f"tandem: {child.name} {line}", file=sys.stderr, flush=True)

    def _stop_part(self, *, announce: bool) -> None:
        """Part of the cluster stops, the servers of other hosts carry on: each server here
        drains in turn (SIGTERM: it hands its sessions and re-homes its replicas to peers
        that stay; one at a time, so none hands to a neighbour about to go too), then the
        proxy stops — it kept sending each drained session to its new primary."""
        def say(line: str) -> None:
            if announce:
                print(f"tandem: {line}", file=sys.stderr, flush=True)

        if announce and sys.stderr.isatty():
            print(file=sys.stderr)  # past the terminal's "^C"
        drain_s = self.cfg.cluster.drain_timeout_s + 10.0
        for child in self.servers.values():
            if child.proc is None or child.exit_code() is not None:
                continue
            child.stop(hand_over=True)
            if child.wait(drain_s):
                say(f"{child.name} drained" + (f" ({child.summary})" if child.summary else ""))
            else:
                child.kill()
                say(f"{child.name} did not drain within {drain_s:g} s: killed")
        if self.proxy is not None and self.proxy.proc is not None \
                and self.proxy.exit_code() is None:
            self.proxy.stop(hand_over=False)
            if self.proxy.wait(STOP_TIMEOUT_S):
                say("proxy stopped")
            else:
                self.proxy.kill()
                say(f"proxy did not stop within {STOP_TIMEOUT_S:g} s: killed")
        for child in self.children:
            child.close()

    @staticmethod
    def _step(group: list[Child], word: str, answer: str) -> None:
        """Tell each of `group` a step of the whole cluster's stop, and wait (bounded) for
        every answer before the next step (`tandem.supervision` says why)."""
        told = [c for c in group if c.tell(word)]
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while time.monotonic() < deadline:
            for child in told:
                child.read()
            if all(answer in c.answers or c.exit_code() is not None for c in told):
                return
            time.sleep(0.01)


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
        print(f"{'server':<10}{'state':<10}{'primaries':>10}{'replicas':>10}{'view':>6}  "
              f"{'standing':<10}  peers")
        for sid, h in report["servers"].items():
            peers = ", ".join(f"{k}:{v}" for k, v in h.get("peers", {}).items())
            state = "witness" if h.get("role") == "witness" else h.get("state", "?")
            # standing: "serving" under the lease; else why not (minority, starting, fenced)
            standing = ("-" if "standing" not in h else "serving" if h.get("lease")
                        else "minority" if h["standing"] == "member" else str(h["standing"]))
            print(f"{sid:<10}{state:<10}{h.get('primaries', '-'):>10}"
                  f"{h.get('replicas', '-'):>10}{h.get('view', '-'):>6}  {standing:<10}  {peers}")
        proxy = report["proxy"]
        if proxy is not None:
            print(f"proxy: {'down' if proxy.get('state') == 'down' else 'up'}")
    return 0 if all(h.get("state") != "down" for h in report["servers"].values()) else 1
