"""Two sites for end-to-end tests: two clusters of real processes (site A: a1..an, site B:
b1..bn), each with its proxy, each file naming the other in `[[sites]]` (docs/sites.md).

Each site has its own secret; each trusts the other's. The inter-site listeners are on
free loopback ports. `hosts` puts servers on loopback addresses of their own (127.0.1.x
standing for site A's hosts, say); `uids` runs named processes (server ids, "proxy-a",
"proxy-b") under uids of their own, so that tests/netfault.py can cut the link between the
sites.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.cluster import Cluster

__all__ = ["TwoSites", "SECRETS", "write_then_kill", "sent_to"]

SECRETS = {"a": "site-a-secret", "b": "site-b-secret"}


class TwoSites:
    """Site A and site B: `a` and `b` are `tests.cluster.Cluster`s."""

    def __init__(self, tmp: Path, *, mode: str = "man", n: int = 3,
                 app: str = "tests.apps:asgi_counter", site: dict[str, Any] | None = None,
                 session: dict[str, Any] | None = None,
                 persistence: dict[str, dict[str, Any]] | None = None,
                 cluster: dict[str, Any] | None = None,
                 proxy: dict[str, Any] | None = None, log_level: str = "DEBUG",
                 hosts: dict[str, str] | None = None,
                 uids: dict[str, int] | None = None) -> None:
        hosts, uids = dict(hosts or {}), dict(uids or {})
        # held open while the clusters pick their own ports, so that none picks one of these
        held = [socket.socket() for _ in range(2 * n)]
        for sock in held:
            sock.bind(("127.0.0.1", 0))
        ports = iter([sock.getsockname()[1] for sock in held])
        self.site_ports: dict[str, int] = {}
        self.clusters: dict[str, Cluster] = {}
        for name in ("a", "b"):
            (tmp / name).mkdir()
            servers = []
            for i in range(n):
                sid = f"{name}{i + 1}"
                self.site_ports[sid] = next(ports)
                host = hosts.get(sid, "127.0.0.1")
                servers.append({"id": sid, **({"host": host} if sid in hosts else {}),
                                "site_replication": f"{host}:{self.site_ports[sid]}"})
            own = {s["id"]: uids[s["id"]] for s in servers if s["id"] in uids}
            if f"proxy-{name}" in uids:
                own["proxy"] = uids[f"proxy-{name}"]
            self.clusters[name] = Cluster(tmp / name, servers=servers, app=app,
                                          secrets=[SECRETS[name]], session=session,
                                          cluster=cluster, proxy=proxy, log_level=log_level,
                                          uids=own)
        for sock in held:
            sock.close()
        self.a, self.b = self.clusters["a"], self.clusters["b"]
        for name, other in (("a", "b"), ("b", "a")):
            c, o = self.clusters[name], self.clusters[other]
            text = c.config_path.read_text().replace('name = "test"', f'name = "{name}"')
            extra = ["", "[[sites]]", f'name = "{other}"', f'mode = "{mode}"',
                     f"secrets = {json.dumps([SECRETS[other]])}",
                     *(f"{k} = {json.dumps(v)}" for k, v in (site or {}).items())]
            for sid, spec in o.servers.items():
                extra += ["[[sites.servers]]", f'id = "{sid}"',
                          f'http = "{spec["host"]}:{spec["http"]}"',
                          f'site_replication = "{spec["host"]}:{self.site_ports[sid]}"']
            pers = (persistence or {}).get(name)
            if pers:
                text = text.replace("[proxy]", "[persistence]\n" + "\n".join(
                    f"{k} = {json.dumps(v)}" for k, v in pers.items()) + "\n\n[proxy]", 1)
            c.config_path.write_text(text + "\n".join(extra) + "\n")

    def start(self) -> TwoSites:
        self.a.start()
        self.b.start()
        return self

    def close(self) -> None:
        for c in self.clusters.values():
            c.close()

    def kill_site(self, name: str) -> None:
        for sid in self.clusters[name].servers:
            self.clusters[name].kill(sid)


def write_then_kill(sites: TwoSites, clients: list[Any], seconds: float) -> tuple[
        dict[int, list[float]], float]:
    """Writes (GET /count) through A's proxy, round robin over the sessions, for `seconds`;
    then kill -9 every server of A at once. Per client (by index) the time each acknowledged
    write was acknowledged (list index + 1 = the counter it acknowledged, from the first
    write here on: the clients' earlier writes are not timed), and when the kill began."""
    acked: dict[int, list[float]] = {i: [] for i in range(len(clients))}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for i, c in enumerate(clients):
            status, body = c.get("/count")
            assert status == 200, body
            acked[i].append(time.monotonic())
    t_kill = time.monotonic()
    for sid in sites.a.servers:  # all at once: no server of A outlives the others
        sites.a.servers[sid]["proc"].send_signal(signal.SIGKILL)
    for sid in sites.a.servers:
        sites.a.servers[sid]["proc"].wait(timeout=20)
    return acked, t_kill


def sent_to(ports: list[int]) -> int:
    """Bytes sent on the established TCP connections to these (local) ports."""
    out = subprocess.run(["ss", "-tinH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    total, current = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):  # a socket's line: local, then peer address
            fields = line.split()
            current = len(fields) >= 4 and int(fields[3].rsplit(":", 1)[1]) in ports
            continue
        m = re.search(r"bytes_sent:(\d+)", line)
        if current and m:
            total += int(m.group(1))
    return total
