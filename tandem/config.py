"""The cluster file: one TOML file read by every tier, loaded into frozen dataclasses.

Unknown keys and bad values are errors at load time that name the key, the value and the
file. `TANDEM_SECRETS` (comma-separated) overrides `cluster.secrets`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .address import Address
from .errors import ConfigError
from .fields import build, shown
from .sites import SiteConfig, check_sites, parse_sites
from .tls import check as check_tls
from .tls import warnings as tls_warnings

__all__ = [
    "Address",
    "ClusterSection",
    "SessionSection",
    "ProxySection",
    "PersistenceSection",
    "ServerConfig",
    "Config",
    "load",
    "loads",
    "parse_server",
    "default_config_path",
]

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# The URL schemes each store-backed membership accepts (cluster.membership_url).
_MEMBERSHIP_SCHEMES = {
    "redis": ("redis://", "rediss://", "unix://"),
    "postgresql": ("postgresql://", "postgres://"),
}


def _check_proxy_tls(proxy: ProxySection, source: str) -> None:
    """tls_cert and tls_key together; more certificates only beside a default one."""
    if bool(proxy.tls_cert) != bool(proxy.tls_key):
        missing = "proxy.tls_key" if proxy.tls_cert else "proxy.tls_cert"
        given = "proxy.tls_cert" if proxy.tls_cert else "proxy.tls_key"
        raise ConfigError(f"set without {missing}: a certificate needs its key",
                          key=given, value=getattr(proxy, given.split(".")[1]), file=source)
    if proxy.tls_certs and not proxy.tls_cert:
        raise ConfigError("set without proxy.tls_cert (the default certificate, for clients "
                          "without SNI or whose name no certificate has)", key="proxy.tls_certs",
                          value=[c for c, _ in proxy.tls_certs], file=source)


def parse_server(entry: object, *, where: str, source: str) -> ServerConfig:
    """One `[[servers]]` table (or a joining server's announcement of itself), checked."""
    if not isinstance(entry, dict):
        raise ConfigError("must be a table", key=where, value=entry, file=source)
    srv: ServerConfig = build(ServerConfig, entry, prefix=where, source=source)
    if not _ID_RE.fullmatch(srv.id) or srv.id == "NONE":
        raise ConfigError("server id must be 1-64 of [A-Za-z0-9_-] and not NONE",
                          key=f"{where}.id", value=srv.id, file=source)
    if srv.witness:
        # Where a witness hosts nothing, these would be silently ignored.
        for key in ("machine", "group", "preferred_secondary_group"):
            if key in entry:
                raise ConfigError("a witness hosts no sessions: remove it",
                                  key=f"{where}.{key}", value=entry[key], file=source)
    for what in ("http", "replication"):
        addr: Address = getattr(srv, what)
        if addr.wildcard:
            # A peer cannot dial "every interface"; guessing one of this host's
            # addresses would advertise the wrong one on a multi-homed host.
            raise ConfigError(
                f"{addr.host} cannot be dialled by the proxy or the peers: set {what} to "
                f'the address they dial and {what}_bind = "{addr}" to listen on every '
                "interface", key=f"{where}.{what}", value=str(addr), file=source)
    if not srv.machine:
        srv = dataclasses.replace(srv, machine=srv.http.host)
    if (srv.http_bind or srv.replication_bind) and (
            (srv.http_bind or srv.http) == (srv.replication_bind or srv.replication)):
        raise ConfigError("binds the same address as the http listener",
                          key=f"{where}.replication" + ("_bind" if srv.replication_bind else ""),
                          value=str(srv.replication_bind or srv.replication), file=source)
    return srv


def _check_membership_url(cluster: ClusterSection, source: str) -> None:
    kind, url = cluster.membership, cluster.membership_url
    if kind != "embedded" and not url:
        raise ConfigError(f'required when cluster.membership = "{kind}"',
                          key="cluster.membership_url", value=None, file=source)
    if not url:
        return
    if kind == "embedded":
        # set but unused would be silently ignored: say so (the value may hold a password)
        raise ConfigError('set only with cluster.membership = "redis" or "postgresql"',
                          key="cluster.membership_url", value="***", file=source)
    schemes = _MEMBERSHIP_SCHEMES[kind]
    if not url.startswith(schemes):
        raise ConfigError(f"must be a {', '.join(schemes)} URL "
                          f'with cluster.membership = "{kind}"',
                          key="cluster.membership_url", value="***", file=source)


def _check_memory(session: SessionSection, persistence: PersistenceSection,
                  source: str) -> None:
    """Offload needs its store; a session must fit in the budget it is counted in."""
    if persistence.mode == "offload" and session.persistence != "redis":
        raise ConfigError('offload keeps sessions in Redis: set session.persistence = "redis"',
                          key="persistence.mode", value="offload", file=source)
    budget = session.max_memory_mb * 1024 * 1024
    if budget and session.max_session_bytes > budget:
        raise ConfigError(f"larger than session.max_memory_mb ({session.max_memory_mb} MiB): "
                          "such a session could never be held", key="session.max_session_bytes",
                          value=session.max_session_bytes, file=source)


def _check_proxy_hosts(hosts: tuple[str, ...], source: str) -> None:
    for host in hosts:
        bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            ip = ipaddress.ip_address(bare)
        except ValueError:
            ip = None
        if ip is None and not re.fullmatch(r"[A-Za-z0-9._-]{1,253}", host):
            raise ConfigError("expected a host name or an IP address, without a port",
                              key="proxy.hosts", value=host, file=source)
        if ip is not None and ip.is_unspecified:
            raise ConfigError("a wildcard is no host: name the host the proxy runs on",
                              key="proxy.hosts", value=host, file=source)


def _choice(*allowed: str) -> dict[str, Any]:
    return {"choices": allowed}


def _positive() -> dict[str, Any]:
    return {"min": 0.0, "exclusive": True}


@dataclass(frozen=True, slots=True)
class ClusterSection:
    name: str = "tandem"
    secrets: tuple[str, ...] = field(default=("change-me",), repr=False)
    heartbeat_interval_s: float = field(default=10.0, metadata=_positive())
    # A peer silent this many intervals is suspected; a lease lasts one interval less, so at
    # least 2 (docs/consistency.md, "Leases").
    missed_heartbeats: int = field(default=3, metadata={"min": 2})
    # What a server cut off from the majority does (docs/consistency.md, "Availability"):
    # "consistent" — it acknowledges nothing (503) until it is back. No other mode yet.
    partitions: str = field(default="consistent", metadata=_choice("consistent"))
    # Who keeps the view and the leases (docs/consistency.md, "Views"): "embedded" — the
    # servers' own consensus; "redis" — one Redis at `membership_url` (its own setting, not
    # persistence.url: it must be a single Redis whose acknowledged writes survive);
    # "postgresql" — one PostgreSQL database, `membership_url` a postgresql:// DSN.
    membership: str = field(default="embedded",
                            metadata=_choice("embedded", "redis", "postgresql"))
    membership_url: str = field(default="", repr=False)
    # How long a replicate or fetch may wait for a peer before it is declared failed.
    replication_timeout_s: float = field(default=2.0, metadata=_positive())
    # How long a connection attempt to a peer's replication address may take.
    peer_connect_timeout_s: float = field(default=1.0, metadata=_positive())
    # SIGTERM: how long a server may take to finish requests and hand its sessions over.
    drain_timeout_s: float = field(default=30.0, metadata={"min": 0.0})
    # An overloaded server hands sessions to less loaded peers, one per request, with the
    # new token in that response (after a rolling restart, say).
    rebalance: bool = True
    # TLS on the replication channel (tandem/tls.py, docs/deployment.md): on when tls_ca is
    # set. "{id}" in tls_cert / tls_key stands for the server's id. The files are read
    # again when they change (checked every tls_reload_interval_s; 0: on SIGHUP only).
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_reload_interval_s: float = field(default=5.0, metadata={"min": 0.0})


@dataclass(frozen=True, slots=True)
class SessionSection:
    cookie_name: str = "JSESSIONID"
    url_rewriting: bool = True
    max_inactive_s: float = field(default=1800.0, metadata=_positive())
    replication: str = field(default="sync", metadata=_choice("sync", "async", "none"))
    persistence: str = field(
        default="none", metadata=_choice("none", "file", "sqlite", "postgresql", "redis")
    )
    cookie_secure: bool = False
    cookie_samesite: str = field(default="Lax", metadata=_choice("Lax", "Strict", "None"))
    cookie_path: str = "/"
    # A request for a session whose primary is another live server: "forward" it to the
    # primary and relay the answer (behind a plain load balancer), or "take_over" the
    # session here (backends/serve/forward.py, docs/operations.md).
    foreign_requests: str = field(default="forward", metadata=_choice("forward", "take_over"))
    # async replication: flush when this many changes are queued, or after this interval.
    async_flush_threshold: int = field(default=100, metadata={"min": 1})
    async_flush_interval_s: float = field(default=0.05, metadata=_positive())
    # The memory budget of one server's sessions, primaries and replicas (docs/memory.md):
    # past it the least recently used go to the store, leaving a stub; without a store, new
    # sessions get 503 (`memory-budget`). 0: unbounded.
    max_memory_mb: int = field(default=0, metadata={"min": 0})
    # The most one session may hold (keys + serialized values, bytes); an assignment past
    # it raises SessionTooLarge at once. 0: unbounded.
    max_session_bytes: int = field(default=0, metadata={"min": 0})


@dataclass(frozen=True, slots=True)
class ProxySection:
    # Port 0 on the proxy's own listeners: the system picks a free port.
    listen: Address = field(default=Address("127.0.0.1", 8080), metadata={"port_0": True})
    admin: Address | None = field(default=Address("127.0.0.1", 8081), metadata={"port_0": True})
    # The hosts `tandem up --host H` starts the proxy on (tandem.placement); empty: the
    # host of `listen`. A host, no port: "10.0.0.1", "node-a", "2001:db8::1".
    hosts: tuple[str, ...] = ()
    connect_timeout_s: float = field(default=2.0, metadata=_positive())
    io_timeout_s: float = field(default=300.0, metadata=_positive())
    max_skip_s: float = field(default=10.0, metadata={"min": 0.0})
    retry: str = field(default="idempotent", metadata=_choice("idempotent", "all", "none"))
    retry_body_max_bytes: int = field(default=65536, metadata={"min": 0})
    # Limits on what a client may send.
    max_head_bytes: int = field(default=65536, metadata={"min": 1024})
    max_body_bytes: int = field(default=0, metadata={"min": 0})  # 0: unlimited
    keepalive_s: float = field(default=20.0, metadata=_positive())
    # Active health probes of GET /__tandem/health; interval 0 disables them.
    health_interval_s: float = field(default=0.0, metadata={"min": 0.0})
    health_rise: int = field(default=2, metadata={"min": 1})
    health_fall: int = field(default=3, metadata={"min": 1})
    # TLS on the client listener (proxy/tls.py, docs/operations.md): on when tls_cert is
    # set. tls_cert / tls_key: the default certificate (no SNI, or no other matches);
    # tls_certs: more, each chosen when the client's SNI matches one of its DNS names.
    # Paths relative to the cluster file; read again on SIGHUP.
    tls_cert: str = ""
    tls_key: str = ""
    tls_certs: tuple[tuple[str, str], ...] = ()
    # Processes sharing the listen address (SO_REUSEPORT; proxy/workers.py); 0: one per
    # core. Default 1: see docs/operations.md, "Several proxy workers".
    workers: int = field(default=1, metadata={"min": 0})


@dataclass(frozen=True, slots=True)
class PersistenceSection:
    path: str = "/var/lib/tandem"
    dsns: tuple[str, ...] = ()
    url: str = "redis://127.0.0.1:6379/0"
    urls: tuple[str, ...] = ()
    # "offload": the store is the home of session state, the servers a bounded cache
    # (docs/memory.md); Redis only for now.
    mode: str = field(default="sync", metadata=_choice("sync", "batched", "offload"))
    flush_interval_s: float = field(default=1.0, metadata=_positive())
    flush_threshold: int = field(default=100, metadata={"min": 1})
    # How long one store operation (or a connection attempt) may take before it counts
    # as failed; a request never waits longer than this on the store.
    timeout_s: float = field(default=2.0, metadata=_positive())


@dataclass(frozen=True, slots=True)
class ServerConfig:
    id: str
    # The addresses the proxy and the peers dial (what the view advertises): never a
    # wildcard. They are also what the server binds unless `*_bind` says otherwise.
    http: Address
    replication: Address
    # What the listeners bind when it is not the dialled address: "0.0.0.0:9001" (every
    # interface), an address behind NAT... None: bind `http` / `replication` themselves.
    http_bind: Address | None = field(default=None, metadata={"no_off": True})
    replication_bind: Address | None = field(default=None, metadata={"no_off": True})
    # empty: the host of the `http` address (filled at load), so that servers on one
    # host count as one machine when a secondary is chosen
    machine: str = ""
    group: str = ""
    preferred_secondary_group: str = ""
    # A third voter for the view and the leases (clusters of two): hosts no app and no
    # session, answers only /__tandem/health on its http address (`tandem witness`).
    witness: bool = False
    # This server's certificate and key (instead of cluster.tls_cert / tls_key).
    tls_cert: str = ""
    tls_key: str = ""
    # Its inter-site listener (docs/sites.md): required on every app server when the file
    # names remote [[sites]], which dial it.
    site_replication: Address | None = field(default=None, metadata={"no_off": True})


@dataclass(frozen=True, slots=True)
class Config:
    cluster: ClusterSection
    session: SessionSection
    proxy: ProxySection
    persistence: PersistenceSection
    servers: tuple[ServerConfig, ...]
    source: str = "<memory>"
    sites: tuple[SiteConfig, ...] = ()  # remote sites (docs/sites.md)

    def server(self, server_id: str) -> ServerConfig:
        for s in self.servers:
            if s.id == server_id:
                return s
        known = ", ".join(s.id for s in self.servers)
        raise ConfigError(f"no such server (known: {known})", key="servers.id",
                          value=server_id, file=self.source)

    @property
    def server_ids(self) -> tuple[str, ...]:
        """Every server, witnesses included: the voters of the view."""
        return tuple(s.id for s in self.servers)

    @property
    def app_servers(self) -> tuple[ServerConfig, ...]:
        """The servers that host the app and its sessions (every one but the witnesses):
        the proxy's backends, the candidates for a secondary."""
        return tuple(s for s in self.servers if not s.witness)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What is allowed but most likely not meant, one line each (said at start)."""
        plaintext = tls_warnings(self)  # replication across a network without TLS
        if len(self.app_servers) == 2 and len(self.servers) == 2:
            a, b = (s.id for s in self.servers)
            return (f"{a} and {b} cannot fail over without a third voter (a majority of two "
                    "is two); add a [[servers]] entry with witness = true "
                    f"({self.source})", *plaintext)
        return plaintext


_SECTIONS: dict[str, type] = {
    "cluster": ClusterSection,
    "session": SessionSection,
    "proxy": ProxySection,
    "persistence": PersistenceSection,
}


def default_config_path() -> Path:
    """The embedded default cluster of `tandem up` (installed copy, else the checkout's)."""
    try:
        p = resources.files("tandem") / "default.toml"
        if p.is_file():
            return Path(str(p))
    except (ModuleNotFoundError, FileNotFoundError):  # pragma: no cover - odd installs
        pass
    return Path(__file__).resolve().parent.parent / "config" / "default.toml"


def load(path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a cluster file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read file: {exc.strerror}", key="<file>", value=str(p),
                          file=str(p)) from exc
    return loads(text, source=str(p), environ=environ)


def loads(text: str, *, source: str = "<memory>",
          environ: Mapping[str, str] | None = None) -> Config:
    """Parse cluster-file text; `source` names it in errors."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", key="<file>", value=None, file=source) from exc
    env = os.environ if environ is None else environ

    unknown = set(raw) - set(_SECTIONS) - {"servers", "sites"}
    for key in sorted(unknown):
        raise ConfigError("unknown section or key", key=key, value=shown(key, raw[key]),
                          file=source)

    sections: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        table = raw.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError("must be a table", key=name, value=table, file=source)
        sections[name] = build(cls, table, prefix=name, source=source)

    secrets_env = env.get("TANDEM_SECRETS")
    if secrets_env:
        secrets = tuple(s.strip() for s in secrets_env.split(",") if s.strip())
        if not secrets:
            raise ConfigError("no secret given", key="TANDEM_SECRETS", value="***", file="<env>")
        sections["cluster"] = dataclasses.replace(sections["cluster"], secrets=secrets)
    if not sections["cluster"].secrets or any(not s for s in sections["cluster"].secrets):
        raise ConfigError("needs at least one non-empty secret", key="cluster.secrets",
                          value="***", file=source)
    if sections["proxy"].io_timeout_s <= sections["cluster"].replication_timeout_s:
        # A request waiting for a slow secondary's ack would be retried elsewhere by the
        # proxy and applied twice.
        raise ConfigError(
            "must be greater than cluster.replication_timeout_s "
            f"({sections['cluster'].replication_timeout_s})", key="proxy.io_timeout_s",
            value=sections["proxy"].io_timeout_s, file=source)
    cluster = sections["cluster"]
    _check_membership_url(cluster, source)
    _check_proxy_hosts(sections["proxy"].hosts, source)
    _check_proxy_tls(sections["proxy"], source)
    _check_memory(sections["session"], sections["persistence"], source)
    cookie = sections["session"].cookie_name
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cookie):
        raise ConfigError("must be letters, digits, '-' or '_'", key="session.cookie_name",
                          value=cookie, file=source)

    servers_raw = raw.get("servers", [])
    if not isinstance(servers_raw, list) or not servers_raw:
        raise ConfigError("at least one [[servers]] entry is required", key="servers",
                          value=servers_raw, file=source)
    servers: list[ServerConfig] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(servers_raw):
        srv = parse_server(entry, where=f"servers[{i}]", source=source)
        for what, addr in (("http", srv.http), ("replication", srv.replication)):
            if str(addr) in seen:
                raise ConfigError(f"address already used by {seen[str(addr)]}",
                                  key=f"servers[{i}].{what}", value=str(addr), file=source)
            seen[str(addr)] = f"{srv.id}.{what}"
        if srv.id in {s.id for s in servers}:
            raise ConfigError("duplicate server id", key=f"servers[{i}].id", value=srv.id,
                              file=source)
        servers.append(srv)
    check_tls(cluster, servers, source)
    if all(s.witness for s in servers):
        raise ConfigError("at least one server must host the app (witness = false)",
                          key="servers", value=[s.id for s in servers], file=source)
    sites = parse_sites(raw.get("sites", []), local_name=cluster.name,
                        local_ids=[s.id for s in servers], source=source)
    if sites:
        check_sites(sites, servers, sections["session"].persistence, source,
                    tls=bool(cluster.tls_ca))
    return Config(servers=tuple(servers), source=source, sites=sites, **sections)
