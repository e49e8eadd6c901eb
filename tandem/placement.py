"""What one `tandem up` runs of the cluster file: the whole cluster (no selection), the
servers of one host (`--host H`), or named servers (`--servers s1,s2`) — and the proxy
where the file puts it.

A server is on host H when H is the host of its advertised `http` or `replication`
address, or its `machine`. The advertised addresses, because they are what the file says
of where each server is (a bound address is most often the wildcard, the same on every
host); `machine` too, so that a file that names its machines ("node-a") can be started by
machine name (`tandem up --host %H` with systemd, where %H is the host name). IP addresses
compare as addresses (`2001:db8::5` is `2001:DB8:0::5`, brackets or not); names compare
without case.

The proxy is on the hosts `[proxy] hosts` lists; without that key, on the host of its
`listen` address (a wildcard listen address is on no host in particular: such a file says
where with `hosts`). `tandem up` with no selection starts it as always.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from .config import Config, ServerConfig
from .errors import PlacementError

__all__ = ["Placement", "select", "same_host", "server_hosts", "proxy_hosts"]

# What `--proxy` may say: the proxy where the file puts it, not at all, or only it.
PROXY_CHOICES = ("auto", "no", "only")


@dataclass(frozen=True, slots=True)
class Placement:
    """The processes one `tandem up` runs."""

    servers: tuple[ServerConfig, ...]
    proxy: bool
    # every server of the file: the whole cluster runs here and stops together (no hand-over
    # to peers that stop too); else only part of it, and what stops here drains to the rest
    whole: bool
    # what selected them, for the lines it prints: "host 10.0.0.1", "servers s1, s2", ""
    scope: str = ""


def _canonical(host: str) -> str:
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def same_host(a: str, b: str) -> bool:
    """`a` and `b` name the same host (as written in the file, or on the command line)."""
    return _canonical(a) == _canonical(b)


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(_canonical(host)).is_unspecified
    except ValueError:
        return False


def server_hosts(server: ServerConfig) -> tuple[str, ...]:
    """The names a server's host goes by in the file: its advertised hosts, its machine."""
    names: list[str] = []
    for name in (server.http.host, server.replication.host, server.machine):
        if name and not any(same_host(name, n) for n in names):
            names.append(name)
    return tuple(names)


def proxy_hosts(cfg: Config) -> tuple[str, ...]:
    """Where the file puts the proxy: `[proxy] hosts`, else the host of `listen`."""
    if cfg.proxy.hosts:
        return cfg.proxy.hosts
    listen = cfg.proxy.listen.host
    return () if _wildcard(listen) else (listen,)


def _on(host: str, names: Iterable[str]) -> bool:
    return any(same_host(host, n) for n in names)


def _listing(cfg: Config) -> str:
    """Every host of the file and what is on it: `10.0.0.1 (s1, proxy), 10.0.0.2 (s2)`."""
    on: dict[str, list[str]] = {}
    for s in cfg.servers:
        for name in server_hosts(s):
            key = next((k for k in on if same_host(k, name)), name)
            on.setdefault(key, []).append(s.id)
    for name in proxy_hosts(cfg):
        key = next((k for k in on if same_host(k, name)), name)
        on.setdefault(key, []).append("proxy")
    return ", ".join(f"{h} ({', '.join(ids)})" for h, ids in on.items())


def select(cfg: Config, *, host: str | None = None, servers: Iterable[str] | None = None,
           proxy: str = "auto") -> Placement:
    """What to run; PlacementError (one line) if the selection names nothing of the file.

    `proxy`: "auto" — where the file puts it (always with no selection, never with
    `servers`); "no"; "only" — the proxy and no server.
    """
    if proxy not in PROXY_CHOICES:
        raise ValueError(f"proxy must be one of {PROXY_CHOICES}, not {proxy!r}")
    if host is not None and servers is not None:
        raise PlacementError("give --host or --servers, not both", option="--servers",
                             value=",".join(servers), file=cfg.source)
    chosen: tuple[ServerConfig, ...]
    if servers is not None:
        ids = [s.strip() for s in servers if s.strip()]
        unknown = [i for i in ids if i not in cfg.server_ids]
        if unknown or not ids:
            raise PlacementError(
                f"no server {', '.join(unknown) or '(none named)'} in the cluster file; "
                f"its servers: {', '.join(cfg.server_ids)}", option="--servers",
                value=",".join(ids), file=cfg.source)
        if proxy == "only":
            raise PlacementError("--proxy-only starts no server: leave --servers out",
                                 option="--servers", value=",".join(ids), file=cfg.source)
        chosen = tuple(s for s in cfg.servers if s.id in ids)
        return Placement(servers=chosen, proxy=False,
                         whole=len(chosen) == len(cfg.servers),
                         scope=f"servers {', '.join(s.id for s in chosen)}")
    if host is None:
        everything = proxy != "only"
        return Placement(servers=cfg.servers if everything else (), proxy=proxy != "no",
                         whole=everything)
    if not host.strip():
        raise PlacementError("names no host", option="--host", value=host, file=cfg.source)
    chosen = tuple(s for s in cfg.servers if _on(host, server_hosts(s)))
    proxy_here = _on(host, proxy_hosts(cfg))
    if not chosen and not proxy_here:
        raise PlacementError(f"no server or proxy of the cluster file is on this host; "
                             f"its hosts: {_listing(cfg)}", option="--host", value=host,
                             file=cfg.source)
    if proxy == "only":
        if not proxy_here:
            where = ", ".join(proxy_hosts(cfg)) or "no host ([proxy] hosts is not set)"
            raise PlacementError(f"the cluster file puts the proxy on {where}",
                                 option="--host", value=host, file=cfg.source)
        chosen = ()
    if not chosen and (not proxy_here or proxy == "no"):
        raise PlacementError("only the proxy is on this host, and --no-proxy leaves it out",
                             option="--host", value=host, file=cfg.source)
    return Placement(servers=chosen, proxy=proxy_here and proxy != "no",
                     whole=len(chosen) == len(cfg.servers), scope=f"host {host}")
