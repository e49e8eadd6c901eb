"""The chaos harness across sites: the global load balancer in front of the two sites'
proxies, and the clients it sends (bench/chaos_sites.py).

The balancer (not part of tandem; DNS failover, anycast or a GSLB in a real deployment)
monitors each site: it probes every server's `/__tandem/health` every 0.25 s (0.5 s
timeout), and a site is up while one of its servers answers. A client goes to its home
site while that site is up, and to the other site while it is not (and back when it is up
again); a client of group `ab` is made at A's proxy and then sends everything through B's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from bench.chaos_load import Attempt, SessionClient
from tests.sites import TwoSites

__all__ = ["Balancer", "SiteClient"]


class Balancer:
    """The global load balancer's health monitor: which sites are up (see the docstring)."""

    def __init__(self, sites: TwoSites, t0: float, *, interval_s: float = 0.25,
                 timeout_s: float = 0.5) -> None:
        self.servers = {name: [(c.servers[s]["host"], c.servers[s]["http"]) for s in c.servers]
                        for name, c in sites.clusters.items()}
        self.proxies = {name: c.proxy_port for name, c in sites.clusters.items()}
        self.up = dict.fromkeys(self.servers, True)
        self.changes: list[tuple[float, str, bool]] = []  # (t, site, up)
        self._t0, self._interval_s, self._timeout_s = t0, interval_s, timeout_s

    def site_for(self, home: str) -> str:
        other = "b" if home == "a" else "a"
        return home if self.up[home] or not self.up[other] else other

    async def _answers(self, host: str, port: int) -> bool:
        try:
            async with asyncio.timeout(self._timeout_s):
                reader, writer = await asyncio.open_connection(host, port)
                try:
                    writer.write(b"GET /__tandem/health HTTP/1.0\r\nHost: glb\r\n\r\n")
                    line = await reader.readline()
                finally:
                    writer.close()
            return line.split(b" ")[1:2] == [b"200"]
        except (OSError, TimeoutError, IndexError):
            return False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for site, addrs in self.servers.items():
                up = any(await asyncio.gather(*(self._answers(h, p) for h, p in addrs)))
                if up != self.up[site]:
                    self.up[site] = up
                    self.changes.append((round(time.monotonic() - self._t0, 3), site, up))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._interval_s)


@dataclass
class SiteClient(SessionClient):
    """A client of one group: before each request, the proxy its group goes to now."""

    group: str = "a"
    balancer: Balancer | None = None
    via: str = ""  # the site whose proxy the last request went to

    async def once(self, t0: float) -> Attempt:
        assert self.balancer is not None
        if self.group == "ab":
            site = "a" if self.token is None else "b"
        else:
            site = self.balancer.site_for(self.group)
        port = self.balancer.proxies[site]
        if port != self.port:
            self.close()
            self.port = port
        self.via = site
        return await super().once(t0)
