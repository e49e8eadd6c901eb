"""`proxy.workers = N`: N proxy processes sharing the listen address (SO_REUSEPORT: the
kernel spreads new connections over them), under a parent that restarts a worker that dies.

Worker 0 also serves the admin listener; its metrics are every worker's counters summed
(proxy/worker_stats.py). The parent serves nothing: it holds the listen port (bound, not
listening, so that port 0 is one port for all), forwards SIGTERM/SIGINT (stop) and SIGHUP
(TLS reload) to the workers, and restarts an exited worker — unless it exited before it
listened (it said why, in one line: the admin address is taken, say), or workers exit
RESTART_LIMIT times within RESTART_WINDOW_S; then it stops them all (exit status 1).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import structlog

from tandem.address import Address
from tandem.config import Config
from tandem.startup import listen_errors

__all__ = ["run_workers", "worker_count", "RESTART_LIMIT", "RESTART_WINDOW_S"]

log = structlog.get_logger("tandem.proxy")

RESTART_LIMIT = 5
RESTART_WINDOW_S = 30.0
_PR_SET_PDEATHSIG = 1  # prctl(2)

# (index of the worker, the directory of the workers' counters) -> exit status
Serve = Callable[[Config, int, Path], int]


def worker_count(config: Config) -> int:
    """`proxy.workers`, 0 meaning one per core."""
    return config.proxy.workers or os.cpu_count() or 1


def _hold_port(config: Config) -> tuple[socket.socket, Config]:
    """Bind (not listen) the listen address with SO_REUSEPORT: port 0 becomes the port every
    worker binds, and a taken address fails here, once."""
    listen = config.proxy.listen
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with listen_errors(listen.host, listen.port):
        sock.bind((listen.host, listen.port))
    port = sock.getsockname()[1]
    proxy = dataclasses.replace(config.proxy, listen=Address(listen.host, port))
    return sock, dataclasses.replace(config, proxy=proxy)


def _stop_with(parent: int) -> None:
    """In a worker: SIGTERM when the parent dies (kill -9 of it leaves no orphan worker
    holding the port; Linux), or exit now if it is already gone."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent:
        os._exit(0)


def run_workers(config: Config, n: int, serve: Serve) -> int:
    """Run `n` workers until SIGTERM/SIGINT; the exit status."""
    held, config = _hold_port(config)
    directory = Path(tempfile.mkdtemp(prefix="tandem-proxy-"))
    pids: dict[int, int] = {}  # pid -> worker index
    stopping = False

    parent = os.getpid()

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its event loop installs its own handlers
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                _stop_with(parent)
                held.close()
                code = serve(config, index, directory)
            finally:
                os._exit(code)
        pids[pid] = index

    def forward(sig: int) -> None:
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def on_stop(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        forward(signal.SIGTERM)

    def on_hup(sig: int, _frame: FrameType | None) -> None:
        if config.proxy.tls_cert:  # (the workers' TLS reload; without TLS: nothing to do)
            forward(signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    exits: deque[float] = deque(maxlen=RESTART_LIMIT)
    status = 0
    try:
        for index in range(n):
            spawn(index)
        log.info("proxy_workers_started", workers=n, listen=str(config.proxy.listen),
                 pids=sorted(pids))
        while pids:
            pid, code = os.wait()
            index = pids.pop(pid, -1)
            if index < 0 or stopping:
                continue
            exits.append(time.monotonic())
            log.warning("proxy_worker_exited", worker=index, pid=pid,
                        status=os.waitstatus_to_exitcode(code))
            started = directory / f"ready-{pid}"
            if not started.exists():  # (it said why; starting it again would say it again)
                status, stopping = 1, True
                forward(signal.SIGTERM)
                continue
            started.unlink()
            if len(exits) == RESTART_LIMIT and exits[-1] - exits[0] < RESTART_WINDOW_S:
                log.error("proxy_workers_failing", exits=RESTART_LIMIT,
                          within_s=RESTART_WINDOW_S)
                status, stopping = 1, True
                forward(signal.SIGTERM)
                continue
            spawn(index)
            log.info("proxy_worker_restarted", worker=index,
                     pid=next(p for p, i in pids.items() if i == index))
    finally:
        held.close()
        shutil.rmtree(directory, ignore_errors=True)
    return status
