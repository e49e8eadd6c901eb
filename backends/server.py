"""One backend server: the app on its `http` address, the replication channel on its
`replication` address, membership, the session manager — started and stopped in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import os
import signal
import sys
import time
from types import TracebackType
from typing import Any

import structlog

from tandem.config import Config
from tandem.logs import configure

from .cluster.peers import Membership, ReplicationListener
from .errors import ConfigError
from .persistence import StoreError
from .serve.asgi import ASGIApp, TandemMiddleware
from .serve.http import HttpServer
from .serve.lifespan import Lifespan
from .serve.wsgi import WsgiToAsgi
from .sessions.manager import SessionManager

__all__ = ["BackendServer", "load_app", "run"]

log = structlog.get_logger("tandem.backend")

# Collections of the youngest generation, in objects allocated and not yet freed. Python's
# default (700) is below what the requests in flight hold (their scopes, messages, futures):
# nearly every loop iteration ran a collection that promoted them to older generations,
# which were then scanned again and again (~15 % of a session-writing request's CPU).
_GC_YOUNG_THRESHOLD = 10_000


def load_app(ref: str, interface: str = "auto") -> ASGIApp:
    """Import `module:attr` and return it as an ASGI app (WSGI apps are adapted)."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--app must be MODULE:ATTR, got {ref!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if interface == "auto":
        # a coroutine function, or an object whose __call__ is one (Starlette, Django ASGI)
        is_async = inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
            type(obj).__call__)
        interface = "asgi" if is_async else "wsgi"
    if interface == "wsgi":
        return WsgiToAsgi(obj)
    if interface != "asgi":
        raise ValueError(f"--interface must be auto, asgi or wsgi, got {interface!r}")
    return obj  # type: ignore[no-any-return]


class BackendServer:
    """Async context manager running one server of the cluster."""

    def __init__(self, *, config: Config, server_id: str, app: ASGIApp) -> None:
        self.config = config
        self.me = config.server(server_id)
        self.membership = Membership(config=config, me=server_id)
        self.manager = SessionManager(config=config, me=server_id, membership=self.membership)
        self.listener = ReplicationListener(membership=self.membership,
                                            handler=self.manager.handle)
        self.middleware = TandemMiddleware(app, manager=self.manager, config=config)
        self.lifespan = Lifespan(app)
        self.http: HttpServer | None = None

    async def __aenter__(self) -> BackendServer:
        # the session store first: a backend that cannot reach its store does not serve
        if self.manager.persister is not None:
            await self.manager.persister.open()
        await self.lifespan.startup()
        await self.listener.start()
        self.membership.start()
        self.manager.start()
        self.http = HttpServer(self.middleware, host=self.me.http.host, port=self.me.http.port,
                               state=self.lifespan.state, shutdown_timeout_s=10.0)
        await self.http.__aenter__()
        log.info("backend_started", http=str(self.me.http),
                 replication=str(self.me.replication), replication_mode=self.manager.mode)
        return self

    async def drain(self) -> None:
        """Refuse new requests (503), finish in-flight ones, hand sessions to the peers."""
        timeout = self.config.cluster.drain_timeout_s
        deadline = time.monotonic() + timeout
        self.manager.draining = True
        log.info("backend_draining", inflight=self.middleware.inflight)
        while self.middleware.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await self.manager.drain(timeout=max(0.0, deadline - time.monotonic()))

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # 1. refuse new requests, finish in-flight ones, hand the sessions over (bounded)
        if not self.manager.draining and self.config.cluster.drain_timeout_s > 0:
            await self.drain()
        # 2. stop the HTTP listener (in-flight requests finish, within a bound)
        if self.http is not None:
            await self.http.close()
        # 3. flush queued replication and store writes, stop background tasks, close the store
        await self.manager.close()
        # 4. say goodbye to the peers, close the replication channel
        await self.membership.close()
        await self.listener.close()
        # 5. the application's own shutdown
        await self.lifespan.shutdown()
        log.info("backend_stopped")


def run(config: Config, server_id: str, app_ref: str, interface: str = "auto") -> int:
    """Run one backend until SIGINT/SIGTERM."""
    configure(component="backend", server=server_id)
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    app = load_app(app_ref, interface)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with BackendServer(config=config, server_id=server_id, app=app):
            # What start-up made (modules, the app, the configuration) lives as long as the
            # process: out of every collection from now on.
            gc.collect()
            gc.freeze()
            gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            await stop.wait()
            log.info("backend_stopping")

    try:
        asyncio.run(main())
    except StoreError as exc:  # unreachable at start-up: the masked DSN and the cause
        log.error("store_unavailable", store=exc.store, where=exc.where, error=str(exc))
        print(f"tandem: backend {server_id} cannot open its session store: {exc}",
              file=sys.stderr)
        return 1
    except ConfigError as exc:
        print(f"tandem: configuration error: {exc}", file=sys.stderr)
        return 2
    return 0
