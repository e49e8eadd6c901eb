"""Starts a tandem cluster of real processes on loopback for end-to-end tests.

`Cluster` writes a cluster file with free ports, starts one `tandem backend` process per
server (`tandem witness` for a `"witness": True` entry) and (optionally) one `tandem proxy`,
waits until every server sees every peer, and kills whatever is left when closed. Each
process logs to a file the tests can read.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tests.netfault import run_as

ROOT = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def hostport(host: str, port: int) -> str:
    """`host:port`, `[v6]:port` for an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


class Cluster:
    """N backend processes (+ a proxy) described by one generated cluster file."""

    def __init__(self, tmp: Path, *, servers: list[dict[str, Any]] | None = None, n: int = 3,
                 app: str = "tests.apps:asgi_counter", interface: str = "auto",
                 secrets: list[str] | None = None, session: dict[str, Any] | None = None,
                 proxy: dict[str, Any] | None = None, cluster: dict[str, Any] | None = None,
                 log_level: str = "DEBUG", uids: Mapping[str, int] | None = None,
                 host: str = "127.0.0.1", bind_host: str | None = None) -> None:
        self.tmp = tmp
        # the servers' (advertised) host, "::1" for IPv6; `bind_host`: what they bind
        # instead (http_bind / replication_bind), "0.0.0.0" say
        self.host = host
        # processes named here (server ids, "proxy") run under that uid, so that
        # tests/netfault.py can cut links between them; the others run as we do
        self.uids = dict(uids or {})
        self.log_level = log_level
        self.app = app
        self.interface = interface
        servers = servers or [{"id": f"s{i + 1}"} for i in range(n)]
        cluster = dict(cluster or {})
        ports = free_ports(2 * len(servers) + 2)
        self.proxy_port, self.admin_port = ports[-2], ports[-1]
        self.servers: dict[str, dict[str, Any]] = {}
        lines = ["[cluster]", 'name = "test"',
                 f"secrets = {json.dumps(secrets or ['test-secret'])}",
                 # (`cluster` may override the heartbeat settings: partition tests run short)
                 f"heartbeat_interval_s = {json.dumps(cluster.pop('heartbeat_interval_s', 0.5))}",
                 f"missed_heartbeats = {json.dumps(cluster.pop('missed_heartbeats', 3))}",
                 # tests place sessions on chosen servers; tests/test_rebalance.py turns it on
                 f"rebalance = {json.dumps(cluster.pop('rebalance', False))}"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in cluster.items()]
        lines += ["", "[session]", *(f"{k} = {json.dumps(v)}" for k, v in
                                     (session or {}).items())]
        # `proxy` may override these defaults
        proxy = {"connect_timeout_s": 1.0, "io_timeout_s": 5.0, "max_skip_s": 10.0,
                 **(proxy or {})}
        lines += ["", "[proxy]", f'listen = "127.0.0.1:{self.proxy_port}"',
                  f'admin = "127.0.0.1:{self.admin_port}"',
                  *(f"{k} = {json.dumps(v)}" for k, v in proxy.items())]
        for i, spec in enumerate(servers):
            http, repl = ports[2 * i], ports[2 * i + 1]
            # a spec's "host": that server's own (127.0.0.2 standing for another host)
            shost = spec.get("host", host)
            self.servers[spec["id"]] = {"http": http, "proc": None, "host": shost, **spec}
            lines += ["", "[[servers]]", *(f"{k} = {json.dumps(v)}" for k, v in spec.items()
                                           if k != "host"),
                      f'http = "{hostport(shost, http)}"',
                      f'replication = "{hostport(shost, repl)}"']
            if bind_host is not None:
                lines += [f'http_bind = "{hostport(bind_host, http)}"',
                          f'replication_bind = "{hostport(bind_host, repl)}"']
        self.config_path = tmp / "cluster.toml"
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proxy_proc: subprocess.Popen[bytes] | None = None
        self._logs: list[Any] = []

    # --- processes ----------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
        self._logs.append(log)
        env = dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_LOG_LEVEL=self.log_level)
        env.pop("TANDEM_SECRETS", None)
        prefix = run_as(self.uids[name]) if name in self.uids else []
        return subprocess.Popen([*prefix, sys.executable, "-m", "proxy.cli", *args], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_server(self, sid: str, *, wait: bool = True) -> None:
        """Start a server's process: `tandem backend`, or `tandem witness` for a server
        whose spec says `"witness": True`."""
        if self.servers[sid].get("witness"):
            args = ["witness", "--config", str(self.config_path), "--server", sid]
        else:
            args = ["backend", "--config", str(self.config_path), "--server", sid,
                    "--app", self.app, "--interface", self.interface]
        self.servers[sid]["proc"] = self._spawn(sid, args)
        if wait:
            self.wait_health(sid)

    def start(self, *, proxy: bool = True) -> Cluster:
        for sid in self.servers:
            self.start_server(sid, wait=False)
        for sid in self.servers:
            self.wait_health(sid)
        self.wait_formed()
        if proxy:
            self.start_proxy()
        return self

    def start_proxy(self) -> None:
        self.proxy_proc = self._spawn("proxy", ["proxy", "--config", str(self.config_path)])
        self._wait(lambda: self._up(f"http://127.0.0.1:{self.admin_port}/__tandem/metrics",
                                    raw=True), "proxy", self.proxy_proc)

    def kill(self, sid: str, sig: int = signal.SIGKILL) -> None:
        proc = self.servers[sid]["proc"]
        proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM):
            proc.wait(timeout=20)

    def close(self) -> None:
        procs = [s["proc"] for s in self.servers.values()] + [self.proxy_proc]
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
        for p in procs:
            if p is not None:
                p.wait(timeout=10)
        for log in self._logs:
            log.close()

    # --- waiting ------------------------------------------------------------------------

    def health(self, sid: str) -> Any:
        return get_json(f"{self.url(sid)}/__tandem/health")

    def _up(self, url: str, raw: bool = False) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                resp.read()
            return True
        except (OSError, urllib.error.URLError):
            return False

    def _wait(self, ok: Any, what: str, proc: Any = None, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{self.log(what)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} not ready after {timeout}s:\n{self.log(what)}")
            time.sleep(0.05)

    def wait_health(self, sid: str) -> None:
        self._wait(lambda: self._up(
            f"{self.url(sid)}/__tandem/health"), sid,
            self.servers[sid]["proc"])

    def wait_formed(self, alive: list[str] | None = None, timeout: float = 30.0) -> None:
        """Wait until every server in `alive` sees exactly the others of `alive` alive, and
        they agree on a view of exactly `alive` in which each holds its lease."""
        members = alive or [s for s, v in self.servers.items()
                            if v["proc"] is not None and v["proc"].poll() is None]

        def formed() -> bool:
            views = set()
            for sid in members:
                try:
                    health = self.health(sid)
                except (OSError, urllib.error.URLError):
                    return False
                peers = health["peers"]
                if any((peers[p] == "alive") != (p in members) for p in peers):
                    return False
                if not health["lease"] or sorted(health["members"]) != sorted(members):
                    return False
                views.add(health["view"])
            return len(views) <= 1

        self._wait(formed, "cluster membership", timeout=timeout)

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def events(self, name: str) -> list[dict[str, Any]]:
        """The structured log events a process wrote."""
        out = []
        path = self.tmp / f"{name}.log"
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def wait_event(self, name: str, event: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The process's `event` log entries, once there is at least one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events(name) if e.get("event") == event]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    # --- addresses ----------------------------------------------------------------------

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def url(self, sid: str) -> str:
        s = self.servers[sid]
        return f"http://{hostport(s['host'], s['http'])}"


class Client:
    """One browser-like client holding one session token (cookie, or URL when cookies=False)."""

    def __init__(self, base: str, *, cookies: bool = True, cookie_name: str = "JSESSIONID",
                 context: ssl.SSLContext | None = None):
        self.base = base
        self.context = context  # for an https:// base: the TLS client settings
        self.cookies = cookies
        self.cookie_name = cookie_name
        self.token: str | None = None
        self.next_path = "/count"
        self.set_cookie_seen: list[str] = []

    def get(self, path: str | None = None, *, base: str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        return self._send(path or self.next_path, None, base=base, headers=headers)

    def post(self, path: str, data: Any, *, base: str | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """POST `data` as JSON (with the session's cookie, keeping the token it sets)."""
        return self._send(path, json.dumps(data).encode(), base=base,
                          headers={"Content-Type": "application/json", **(headers or {})})

    def _send(self, path: str, body: bytes | None, *, base: str | None,
              headers: dict[str, str] | None) -> tuple[int, Any]:
        req = urllib.request.Request((base or self.base) + path, data=body,
                                     headers=dict(headers or {}))
        if self.cookies and self.token:
            req.add_header("Cookie", f"{self.cookie_name}={self.token}")
        try:
            with urllib.request.urlopen(req, timeout=10, context=self.context) as resp:
                status, answer, hdrs = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, answer, hdrs = exc.code, exc.read(), exc.headers
        for value in hdrs.get_all("Set-Cookie") or []:
            self.set_cookie_seen.append(value)
            name, _, rest = value.partition("=")
            if name == self.cookie_name and self.cookies:
                self.token = rest.split(";", 1)[0] or None
        try:
            data = json.loads(answer)
        except ValueError:
            data = answer.decode(errors="replace")
        if isinstance(data, dict) and data.get("next") and not self.cookies:
            self.next_path = data["next"]
            self.token = data["next"].split("=", 1)[1]
        return status, data

    @property
    def route(self) -> tuple[str, str, str]:
        assert self.token is not None
        sid, primary, rest = self.token.split("!")
        return sid, primary, rest.split(".", 1)[0]
