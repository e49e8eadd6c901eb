"""Assembly of the proxy: the client listener, the admin listener, health probes and
housekeeping, started and stopped as one async context manager; `run()` for the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import structlog
from aiohttp import web

from tandem.config import Config
from tandem.errors import ConfigError
from tandem.logs import configure
from tandem.startup import StartupError, fail, listen_errors, warn_demo_secret
from tandem.supervision import child_link

from .admin import make_admin_app
from .client import ClientProtocol
from .context import ProxyContext
from .health import HealthProber
from .tls import ListenerTls
from .worker_stats import WorkerStats
from .workers import run_workers, worker_count

__all__ = ["ProxyServer", "run"]

log = structlog.get_logger("tandem.proxy")


class ProxyServer:
    """A running proxy: `async with ProxyServer(cfg) as srv:` binds, serves, shuts down."""

    def __init__(self, config: Config, *, drain_timeout_s: float = 10.0,
                 max_idle_per_backend: int = 128, tls: ListenerTls | None = None,
                 worker: tuple[int, Path] | None = None) -> None:
        # configuration
        self.config = config
        self.tls = tls  # TLS on the client listener (None: plain HTTP)
        # one of several workers (proxy/workers.py): its index, the counters' directory
        self.worker = worker
        self._drain_timeout_s = drain_timeout_s
        self._max_idle_per_backend = max_idle_per_backend
        # lifetime of one start/stop
        self.ctx: ProxyContext | None = None
        self.listen_address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._admin: web.AppRunner | None = None
        self._prober: HealthProber | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._stats_writer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProxyServer:
        loop = asyncio.get_running_loop()
        p = self.config.proxy
        ctx = self.ctx = ProxyContext(self.config, loop=loop,
                                      max_idle_per_backend=self._max_idle_per_backend,
                                      https=self.tls is not None)
        try:
            # Both listeners first: a taken address fails here (ListenError), before the
            # probes start.
            with listen_errors(p.listen.host, p.listen.port):
                self._server = await loop.create_server(
                    lambda: ClientProtocol(ctx), p.listen.host, p.listen.port, backlog=1024,
                    ssl=self.tls.context if self.tls is not None else None,
                    reuse_port=self.worker is not None)
            self.listen_address = _bound(self._server.sockets[0].getsockname())
            stats = None
            if self.worker is not None:
                index, directory = self.worker
                stats = WorkerStats(ctx, directory=directory, index=index)
                # (worker 0 serves the admin listener and sums the others' counters)
                self._stats_writer = loop.create_task(stats.run_forever())
            if p.admin is not None and (stats is None or stats.index == 0):
                self._admin = web.AppRunner(make_admin_app(ctx, stats), access_log=None,
                                            handle_signals=False)
                await self._admin.setup()
                site = web.TCPSite(self._admin, p.admin.host, p.admin.port)
                with listen_errors(p.admin.host, p.admin.port, "the proxy's status page"):
                    await site.start()
                self.admin_address = _bound(self._admin.addresses[0])
            self._prober = HealthProber(
                ctx.router, interval_s=p.health_interval_s, rise=p.health_rise,
                fall=p.health_fall,
                timeout_s=min(p.io_timeout_s, p.connect_timeout_s + max(1.0, p.health_interval_s)))
            await self._prober.__aenter__()
            self._housekeeping = loop.create_task(self._housekeep())
        except BaseException:
            await self.shutdown()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.shutdown()

    async def _housekeep(self) -> None:
        """Enforce io timeouts (every io_timeout_s / 4 at most); close idle client
        connections and expired pooled ones (about once a second)."""
        ctx = self.ctx
        assert ctx is not None
        tick = min(1.0, ctx.io_timeout_s / 4, ctx.keepalive_s / 2)
        sweep_every = min(1.0, ctx.keepalive_s / 2)
        next_sweep = ctx.loop.time() + sweep_every
        while True:
            await asyncio.sleep(tick)
            ctx.check_io_all()
            now = ctx.loop.time()
            if now >= next_sweep:
                next_sweep = now + sweep_every
                for conn in list(ctx.connections):
                    conn.close_if_idle(now, ctx.keepalive_s)
                for b in ctx.router.backends:
                    b.pool.sweep()

    async def shutdown(self) -> None:
        """Stop like a runbook; safe to call more than once."""
        ctx = self.ctx
        # 1. Stop accepting: no new client connection from here on.
        if self._server is not None:
            self._server.close()
        if ctx is not None:
            # 2. Drain: idle keep-alive connections and tunnels close now, in-flight
            #    requests get their response (with Connection: close), within a bound.
            ctx.closing = True
            for conn in list(ctx.connections):
                if conn.is_idle() or conn.tunnel is not None:
                    conn.close()
            deadline = ctx.loop.time() + self._drain_timeout_s
            while ctx.connections and ctx.loop.time() < deadline:
                await asyncio.sleep(0.02)
            for conn in list(ctx.connections):
                log.warning("drain_timeout_abort", client=conn.client_ip.decode("ascii"))
                if conn.transport is not None:
                    conn.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        # 3. Stop background tasks: the counters' writer, housekeeping, health probes.
        if self._stats_writer is not None:
            self._stats_writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stats_writer
            self._stats_writer = None
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
            self._housekeeping = None
        if self._prober is not None:
            await self._prober.__aexit__(None, None, None)
            self._prober = None
        # 4. Close the keep-alive pools to the backends.
        if ctx is not None:
            ctx.router.close()
        # 5. Close the admin listener last: status stays visible while draining.
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None


def _bound(sockname: object) -> tuple[str, int]:
    assert isinstance(sockname, tuple)
    return str(sockname[0]), int(sockname[1])


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return None
    return uvloop.new_event_loop


def run(config: Config) -> int:
    """Run the proxy until SIGINT or SIGTERM (or `tandem up`'s stop); the exit status.

    A failed start is one line (the traceback at DEBUG only), exit status 1.
    """
    configure(component="proxy")
    p = config.proxy
    if child_link() is None:  # (under `tandem up`, the supervisor warned for the cluster)
        warn_demo_secret(config, [a for a in (p.listen, p.admin) if a is not None], plain=True)
    tls = None
    if ListenerTls.enabled(config):
        try:  # (before the loop: a bad file is one line, the proxy does not start)
            tls = ListenerTls(config)
        except ConfigError as exc:
            return fail(f"tandem: configuration error: {exc}", exc, code=2)

    def serve(config: Config, index: int | None = None, directory: Path | None = None) -> int:
        worker = None if index is None or directory is None else (index, directory)
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                return runner.run(_serve(config, tls, worker))
        except StartupError as exc:
            return fail(f"tandem: {exc}", exc)

    n = worker_count(config)
    if n > 1 and child_link() is not None:
        # (`tandem up` supervises one process per proxy: its workers would be unseen)
        log.warning("proxy_workers_ignored", workers=n,
                    reason="under tandem up the proxy runs as one process")
    elif n > 1:
        try:
            return run_workers(config, n, serve)
        except StartupError as exc:
            return fail(f"tandem: {exc}", exc)
    return serve(config)


async def _serve(config: Config, tls: ListenerTls | None,
                 worker: tuple[int, Path] | None = None) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    link = child_link()
    signals = [signal.SIGTERM]
    if link is None:
        signals.append(signal.SIGINT)
    else:  # (SIGINT is ignored: a terminal's Ctrl-C is for `tandem up`, which decides)
        def on_word(word: str) -> None:
            if word in ("stopping", "leave"):  # (steps for servers: nothing to do here)
                link.answer("stopping" if word == "stopping" else "left")
            elif word in ("stop", "drain"):
                stop.set()

        link.watch(loop, on_word)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    if tls is not None:  # new handshakes use the files as they are now
        signals.append(signal.SIGHUP)
        loop.add_signal_handler(signal.SIGHUP, tls.reload)
        tls.say_loaded()
    try:
        async with ProxyServer(config, tls=tls, worker=worker) as srv:
            log.info("proxy_started",
                     listen="{}:{}".format(*srv.listen_address or ("?", 0)),
                     tls=tls is not None, worker=worker[0] if worker else None,
                     admin="{}:{}".format(*srv.admin_address) if srv.admin_address else None,
                     backends=[f"{s.id}={s.http}" for s in config.app_servers],
                     loop=type(loop).__module__.split(".")[0])
            if link is not None:
                link.ready(*("{}:{}".format(*a) for a in (srv.listen_address,
                                                          srv.admin_address) if a))
            if worker is not None:  # (the parent: this worker started; proxy/workers.py)
                (worker[1] / f"ready-{os.getpid()}").touch()
            await stop.wait()
            log.info("proxy_stopping")
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if link is not None:
            link.unwatch()
    log.info("proxy_stopped")
    if link is not None:
        link.stopped()
    return 0
