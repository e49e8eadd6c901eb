"""Start-up of a tandem process, said plainly: a listener that cannot be bound, an app that
does not import, a process that cannot start — one line a person can act on (the traceback
only when the log level is DEBUG); and the warning for the demo secret on an address that
is not loopback.

Listeners are bound and listening before anything else of a process runs (no peer is
dialled, no task started), so a taken address fails at once, with nothing to tear down.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
import traceback
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import structlog

from .config import Address, Config
from .errors import AppLoadError, ClusterError, ListenError, StartupError
from .supervision import child_link

__all__ = [
    "DEMO_SECRET",
    "StartupError",
    "ListenError",
    "AppLoadError",
    "listen_errors",
    "listen_now",
    "is_loopback",
    "demo_secret_exposed",
    "warn_demo_secret",
    "debug_enabled",
    "one_line",
    "fail",
]

log = structlog.get_logger("tandem.startup")

DEMO_SECRET = "change-me"  # the secret of the embedded demo cluster (tandem/default.toml)


# --- listeners --------------------------------------------------------------------------------


def _shown(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def listen_errors(host: str, port: int, what: str | None = None) -> Iterator[None]:
    """Binding `host:port` inside: OSError becomes ListenError naming the address."""
    try:
        yield
    except socket.gaierror as exc:
        raise ListenError(address=_shown(host, port), what=what,
                          reason=f"cannot resolve host {host!r}", errno=exc.errno) from exc
    except OSError as exc:
        if exc.errno is not None:
            text = os.strerror(exc.errno)
            reason = text[:1].lower() + text[1:]  # "Address already in use" → mid-sentence
        else:
            reason = str(exc)
        raise ListenError(address=_shown(host, port), what=what, reason=reason,
                          errno=exc.errno) from exc


class _Sockets(Protocol):
    @property
    def sockets(self) -> Any: ...


def listen_now(server: _Sockets, backlog: int = 100) -> None:
    """Listen on a server created with `start_serving=False`: connections wait in the
    backlog until it serves, and an address another socket took meanwhile fails here.

    (`start_serving=False` only binds: with SO_REUSEADDR a second, not yet listening socket
    may bind the same port, and the conflict would surface later, mid-start.)
    """
    for transport_socket in server.sockets:
        with transport_socket.dup() as sock:  # the same socket; the duplicate fd is closed
            sock.listen(backlog)


# --- the demo secret --------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Only this machine can reach `host` (an unresolvable name counts as reachable)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def demo_secret_exposed(config: Config, addresses: Iterable[Address]) -> list[str]:
    """The addresses, among `addresses`, that others could reach while the cluster secret
    is still the demo's (empty when the secret was changed)."""
    if DEMO_SECRET not in config.cluster.secrets:
        return []
    return [str(a) for a in addresses if not is_loopback(a.host)]


def warn_demo_secret(config: Config, addresses: Iterable[Address], *, plain: bool) -> bool:
    """Warn (a structlog warning, and with `plain` one line on stderr) when the demo secret
    guards an address that is not loopback: whoever reaches it can forge route tokens and
    join the replication channel. True if it warned."""
    exposed = demo_secret_exposed(config, addresses)
    if not exposed:
        return False
    log.warning("demo_secret_exposed", addresses=exposed, secret_source=config.source)
    if plain:
        verb = "is" if len(exposed) == 1 else "are"
        print(f"tandem: warning: the cluster secret is the demo's {DEMO_SECRET!r} and "
              f"{', '.join(exposed)} {verb} not loopback: anyone who reaches it can forge "
              "session tokens; set TANDEM_SECRETS", file=sys.stderr, flush=True)
    return True


# --- saying why a process cannot start ------------------------------------------------------


def debug_enabled() -> bool:
    """`--debug`, or TANDEM_LOG_LEVEL=DEBUG: tracebacks are shown."""
    return os.environ.get("TANDEM_LOG_LEVEL", "").upper() == "DEBUG"


def one_line(exc: BaseException) -> str:
    """The exception as one line: our errors' own message, or `Type: message`."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ClusterError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fail(line: str, exc: BaseException | None = None, *, code: int = 1) -> int:
    """Say in `line` why this process cannot start and return `code` (its exit status).

    Under `tandem up` the line goes to the supervisor, which prints it once for the whole
    cluster; otherwise to stderr. The traceback is printed before it only at DEBUG.
    """
    if exc is not None and debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    link = child_link()
    if link is None or not link.failed(line):
        print(line, file=sys.stderr, flush=True)
    return code
