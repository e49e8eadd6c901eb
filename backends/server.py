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
from typing import Any, Protocol

import structlog

from tandem.config import Config, ServerConfig
from tandem.logs import configure
from tandem.startup import AppLoadError, StartupError, fail, one_line, warn_demo_secret
from tandem.supervision import ChildLink, child_link

from .cluster.listener import ReplicationListener
from .cluster.membership import Membership
from .errors import ConfigError
from .persistence import StoreError
from .serve.asgi import ASGIApp, TandemMiddleware
from .serve.http_server import HttpServer
from .serve.lifespan import Lifespan
from .serve.wsgi import WsgiToAsgi
from .sessions.manager import SessionManager

__all__ = ["BackendServer", "Runnable", "load_app", "run", "serve", "use_uvloop",
           "warn_cluster_file"]

log = structlog.get_logger("tandem.backend")

# Collections of the youngest generation, in objects allocated and not yet freed. Python's
# default (700) is below what the requests in flight hold (their scopes, messages, futures):
# nearly every loop iteration ran a collection that promoted them to older generations,
# which were then scanned again and again (~15 % of a session-writing request's CPU).
_GC_YOUNG_THRESHOLD = 10_000


def load_app(ref: str, interface: str = "auto") -> ASGIApp:
    """Import `module:attr` and return it as an ASGI app (WSGI apps are adapted);
    AppLoadError (one line: the reference and the cause) if that fails."""
    module_name, _, attr = ref.partition(":")
    try:
        if not module_name or not attr:
            raise ValueError("expected MODULE:ATTR")
        if interface not in ("auto", "asgi", "wsgi"):
            raise ValueError(f"--interface must be auto, asgi or wsgi, got {interface!r}")
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        if not callable(obj):
            raise TypeError(f"{attr} is a {type(obj).__name__}, not an application")
    except (Exception, SystemExit) as exc:  # whatever the module raises at import
        raise AppLoadError(ref=ref, cause=exc) from exc
    if interface == "auto":
        # a coroutine function, or an object whose __call__ is one (Starlette, Django ASGI)
        is_async = inspect.iscoroutinefunction(obj) or inspect.iscoroutinefunction(
            type(obj).__call__)
        interface = "asgi" if is_async else "wsgi"
    if interface == "wsgi":
        return WsgiToAsgi(obj)
    return obj  # type: ignore[no-any-return]


class BackendServer:
    """Async context manager running one server of the cluster."""

    def __init__(self, *, config: Config, server_id: str, app: ASGIApp) -> None:
        # configuration
        self.config = config
        self.me = config.server(server_id)
        if self.me.witness:  # (it would host the app on a server no request is routed to)
            raise ConfigError("is a witness: run it with `tandem witness`", key="servers.id",
                              value=server_id, file=config.source)
        # the parts, started in this order and stopped in the reverse one
        self.membership = Membership(config=config, me=server_id)
        self.manager = SessionManager(config=config, me=server_id, membership=self.membership)
        self.listener = ReplicationListener(membership=self.membership,
                                            handler=self.manager.handle)
        self.middleware = TandemMiddleware(app, manager=self.manager, config=config)
        self.lifespan = Lifespan(app)
        # what the listener binds; `me.http` is what the proxy and the peers dial
        http_bind = self.me.http_bind or self.me.http
        self.http = HttpServer(self.middleware, host=http_bind.host, port=http_bind.port,
                               state=self.lifespan.state, shutdown_timeout_s=10.0,
                               label=f"{server_id}'s http address")
        # how it stops: False when the whole cluster stops (`tandem up`'s Ctrl-C), so no
        # session is handed to a peer that is stopping too
        self.hand_over = True
        # what was started (a failed start stops only that)
        self._store_open = False
        self._app_started = False  # its lifespan task runs
        self._app_ready = False  # its start-up completed
        self._running = False

    async def __aenter__(self) -> BackendServer:
        try:
            # 1. Bind every listener first: a taken address fails here, before a peer is
            #    dialled or a task started (the peers' connections wait in the backlog).
            await self.http.bind()
            await self.listener.bind()
            if self.manager.sites is not None:  # the inter-site listener (docs/sites.md)
                await self.manager.sites.bind()
            # 2. The session store: a backend that cannot reach its store does not serve.
            if self.manager.persister is not None:
                await self.manager.persister.open()
                self._store_open = True
            # 3. The application's own start-up.
            self._app_started = True
            try:
                await self.lifespan.startup()
            except RuntimeError as exc:  # it answered lifespan.startup.failed
                raise StartupError(f"{self.me.id} cannot start: {exc}") from exc
            self._app_ready = True
            # 4. The replication channel, membership and sessions; then the requests.
            self._running = True
            await self.listener.start()
            self.membership.start()
            self.manager.start()
            if self.manager.sites is not None:
                await self.manager.sites.start()
            await self.http.start_serving()
        except BaseException:
            await self.stop()
            raise
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
        await self.stop()

    async def stop(self) -> None:
        """Stop like a runbook: only what was started (a failed start comes here too)."""
        if self._running:
            # 1. Refuse new requests. Leaving alone (SIGTERM): finish in-flight requests and
            #    hand the sessions over, bounded. The whole cluster stopping: nothing to hand
            #    to, and peers that leave are not failures to repair (no promotion).
            if self.hand_over and not self.manager.draining and (
                    self.config.cluster.drain_timeout_s > 0):
                await self.drain()
            self.manager.draining = True
        # 2. Stop the HTTP listener (in-flight requests finish, within a bound), then
        #    close the idle connections to the peers that forwarded requests used.
        await self.http.close()
        self.middleware.forwarder.close()
        # 3. Flush queued replication (the remote sites' first) and store writes, stop
        #    background tasks, close the store.
        if self.manager.sites is not None:
            await self.manager.sites.close()
        if self._running or self._store_open:
            await self.manager.close()
        # 4. Say goodbye to the peers, close the replication channel.
        self.listener.leaving()
        await self.membership.close()
        await self.listener.close()
        # 5. The application's own shutdown (one that never finished starting is cancelled:
        #    it would not answer a shutdown event).
        if self._app_started:
            if not self._app_ready:
                self.lifespan.supported = False
            await self.lifespan.shutdown()
        if self._running:
            log.info("backend_stopped")
        self._running = self._app_started = self._app_ready = self._store_open = False

    def cluster_stopping(self) -> None:
        """The whole cluster stops: refuse new requests, and repair nothing any more — a
        peer leaving now is not a failure, and a stop hands nothing to peers that stop too."""
        self.hand_over = False
        if self._running:
            self.manager.draining = True

    async def leave(self) -> None:
        """Say goodbye to the peers now (a whole-cluster stop's second step): the links
        close each after its goodbye, while every listener is still open."""
        if self._running:
            self.listener.leaving()
            await self.membership.close()

    def summary(self) -> str:
        """What became of the sessions, for the supervisor's line ("s1 stopped (...)")."""
        left = len(self.manager.store.primaries)
        handed = self.manager.stats.get("handed_over", 0)
        parts = [f"{handed} session{'s' * (handed != 1)} handed over"] if handed else []
        if left:
            kept = self.manager.persister is not None
            parts.append(f"{left} session{'s' * (left != 1)} "
                         + ("kept in the store" if kept else "ended with the cluster"))
        return ", ".join(parts)


def run(config: Config, server_id: str, app_ref: str, interface: str = "auto") -> int:
    """Run one backend until SIGINT/SIGTERM (or `tandem up`'s stop); the exit status.

    A failed start is one line (the traceback at DEBUG only): 2 for an app that does not
    load or a bad configuration, 1 for anything else (a taken address, the store, the
    application's own start-up).
    """
    configure(component="backend", server=server_id)
    use_uvloop()
    link = child_link()
    try:
        app = load_app(app_ref, interface)
        server = BackendServer(config=config, server_id=server_id, app=app)
    except AppLoadError as exc:
        return fail(f"tandem: {exc}", exc, code=2)
    except ConfigError as exc:
        return fail(f"tandem: configuration error: {exc}", exc, code=2)
    return serve(server, link)


def warn_cluster_file(config: Config) -> None:
    """Say what the cluster file allows but most likely does not mean (`Config.warnings`):
    a line on stderr and a structured warning each, once the process has started (a failed
    start stays one line)."""
    for line in config.warnings:
        log.warning("cluster_file_warning", warning=line, file=config.source)
        print(f"tandem: warning: {line}", file=sys.stderr, flush=True)


def use_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Runnable(Protocol):
    """What `serve` runs: a `BackendServer`, or a witness (backends.witness)."""

    config: Config
    me: ServerConfig
    hand_over: bool
    membership: Membership

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...
    def cluster_stopping(self) -> None: ...
    async def leave(self) -> None: ...
    def summary(self) -> str: ...


def serve(server: Runnable, link: ChildLink | None) -> int:
    """Run a built server until SIGINT/SIGTERM (or `tandem up`'s stop); the exit status."""
    server_id = server.me.id
    if link is None:  # (under `tandem up`, the supervisor warned for the whole cluster)
        me = server.me  # the bound addresses too: 0.0.0.0 exposes the secret's holder
        warn_demo_secret(server.config, (me.http, me.replication, *filter(None, (
            me.http_bind, me.replication_bind))), plain=True)
    started = False

    async def main() -> None:
        nonlocal started
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        leaving: set[asyncio.Task[None]] = set()
        assert task is not None

        def on_stop() -> None:
            if started:
                stop.set()
            else:  # asked during start-up: what was started is torn down
                task.cancel()

        async def leave() -> None:
            await server.leave()
            assert link is not None
            link.answer("left")

        def on_word(word: str) -> None:  # from `tandem up`: the whole cluster stops
            assert link is not None
            if word == "drain":  # the supervisor of part of the cluster is gone: as SIGTERM
                on_stop()
                return
            server.cluster_stopping()
            if word == "stopping":
                link.answer("stopping")
            elif word == "leave":
                leaving.add(loop.create_task(leave()))
            elif word == "stop":
                on_stop()

        loop.add_signal_handler(signal.SIGTERM, on_stop)
        if server.membership.channel.tls:  # new TLS files for new connections, no restart
            loop.add_signal_handler(signal.SIGHUP, server.membership.channel.reload)
        if link is None:
            loop.add_signal_handler(signal.SIGINT, on_stop)
        else:  # (SIGINT is ignored: a terminal's Ctrl-C is for `tandem up`, which decides)
            link.watch(loop, on_word)
        async with server:
            started = True
            if link is None:  # (under `tandem up`, the supervisor said it once)
                warn_cluster_file(server.config)
            if link is not None:
                link.ready()
            # What start-up made (modules, the app, the configuration) lives as long as the
            # process: out of every collection from now on.
            gc.collect()
            gc.freeze()
            gc.set_threshold(_GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
            await stop.wait()
            log.info("backend_stopping", hand_over=server.hand_over)
        if link is not None:
            link.unwatch()

    who = f"tandem: {server_id}"
    try:
        asyncio.run(main())
    except asyncio.CancelledError:  # stopped by a signal while starting
        return 0 if not started else 1
    except StoreError as exc:  # unreachable at start-up: the masked DSN and the cause
        log.error("store_unavailable", store=exc.store, where=exc.where, error=str(exc))
        return fail(f"{who} cannot open its session store: {exc}", exc)
    except ConfigError as exc:
        return fail(f"tandem: configuration error: {exc}", exc, code=2)
    except StartupError as exc:  # a listener, the app's start-up: the message says which
        return fail(f"tandem: {exc}", exc)
    except Exception as exc:
        if started:
            raise  # not a start-up failure: a bug, with its traceback
        return fail(f"{who} cannot start: {one_line(exc)}", exc)
    if link is not None:
        link.stopped(server.summary())
    return 0
