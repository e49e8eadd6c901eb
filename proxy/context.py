"""What every connection of one proxy shares: settings read once from the cluster file,
the backend table, the token reader, the counters and the set of open client connections.
"""

from __future__ import annotations

import asyncio
import math
import sys
from typing import Any

from tandem.config import Config
from tandem.sites import TrustedCodec

from .metrics import Metrics
from .requestid import RequestIds
from .router import Backend, Router
from .tokens import TokenReader
from .upstream import Pool

__all__ = ["ProxyContext"]


class ProxyContext:
    """Settings and shared state of one running proxy (one event loop)."""

    def __init__(self, config: Config, *, loop: asyncio.AbstractEventLoop,
                 max_idle_per_backend: int = 128, https: bool = False) -> None:
        p = config.proxy
        # configuration (copied to plain attributes: read on every request)
        self.loop = loop
        self.retry = p.retry  # idempotent | all | none
        self.retry_body_max = p.retry_body_max_bytes
        # A body not yet sent anywhere is held up to this size before the client is paused.
        self.pending_max = max(p.retry_body_max_bytes, 65536)
        self.max_head = p.max_head_bytes
        self.max_body = p.max_body_bytes  # 0: unlimited
        self.lane_max_body = p.max_body_bytes or sys.maxsize  # (the same, as a bound)
        self.io_timeout_s = p.io_timeout_s
        self.keepalive_s = p.keepalive_s
        self.max_skip_s = p.max_skip_s
        self.retry_after = str(max(1, math.ceil(p.max_skip_s))).encode("ascii")
        self.default_host = str(p.listen).encode("ascii")
        # what the backends are told the client spoke (X-Forwarded-Proto, Forwarded proto=)
        self.proto = b"https" if https else b"http"

        # shared state
        self.metrics = Metrics()
        self.request_ids = RequestIds()
        # our tokens, and those of the trusted sites (docs/sites.md)
        self.tokens = TokenReader(TrustedCodec(config.cluster.secrets, config.sites),
                                  self.metrics,
                                  cookie_name=config.session.cookie_name,
                                  url_rewriting=config.session.url_rewriting)

        def pool_for(backend: Backend) -> Pool:
            return Pool(backend, loop=loop, connect_timeout_s=p.connect_timeout_s,
                        keepalive_s=p.keepalive_s, max_idle=max_idle_per_backend)

        self.router = Router(config.app_servers, max_skip_s=p.max_skip_s, pool_factory=pool_for)
        for site in config.sites:  # cluster affinity: a remote site's sessions go there first
            for srv in site.servers:
                self.router.add_remote(srv.id, srv.http)
        self.connections: set[Any] = set()  # open ClientProtocol instances
        self.closing = False  # shutting down: finish in-flight requests, keep nothing alive
        # How long a request waiting at a server the cluster reports failed (out of its
        # view) may stay without response data before it fails over, io timeout or not.
        self.view_quiet_s = min(0.5, p.io_timeout_s / 4)

    def check_io_all(self) -> None:
        """Look at every in-flight exchange's io watch (the housekeeping tick; and at
        once when a cluster view drops a server)."""
        now = self.loop.time()
        for conn in list(self.connections):
            if conn.active is not None:
                conn.active.check_io(now)
