"""Remote sites: the `[[sites]]` section of the cluster file, and the trust between sites.

A site is another cluster (its own cluster file, secrets and quorum) that keeps copies of
this cluster's sessions, and whose sessions this cluster keeps. Server ids are unique across
the sites, so a token's PRIMARY names the session's site. Trust is explicit: a site entry
lists the remote site's secrets; they verify its tokens (never sign ours) and authenticate
its servers on the inter-site channel (docs/sites.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .address import Address
from .errors import BadSignature, ConfigError, MalformedToken
from .fields import build, shown
from .token import Route, TokenCodec

__all__ = ["SiteServer", "SiteConfig", "parse_sites", "check_sites", "TrustedCodec", "rank_remote"]

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class SiteServer:
    """One server of a remote site, as this site dials it."""

    id: str
    http: Address               # where this site's proxy sends the remote site's sessions
    site_replication: Address   # its inter-site listener


@dataclass(frozen=True, slots=True)
class SiteConfig:
    name: str
    # "man": every acknowledged write is held by a remote backup too (with remote_sync);
    # "wan": the remote copy is sent in batches and kept in the remote site's store.
    mode: str = field(default="man", metadata={"choices": ("man", "wan")})
    # man: false sends the remote copy right after the response (not waited for)
    remote_sync: bool = True
    # wan (and man's catch-up after a link failure): batches every interval, or sooner when
    # this many sessions are waiting
    flush_interval_s: float = field(default=1.0, metadata={"min": 0.0, "exclusive": True})
    flush_threshold: int = field(default=100, metadata={"min": 1})
    # Unsafe under partitions, off (0) by default: take the remote site's sessions over once
    # no server of it has answered for this long, though none refused (a site that is
    # only cut off keeps serving them: two primaries). docs/sites.md, "The site-down rule".
    takeover_after_s: float = field(default=0.0, metadata={"min": 0.0})
    # the remote site's secrets: verify its tokens, authenticate its servers
    secrets: tuple[str, ...] = field(default=(), repr=False)
    # the remote site's CA (PEM; relative to this file): with cluster.tls_ca, the channel
    # between the sites is mutual TLS, the remote servers' certificates checked against it
    tls_ca: str = ""
    servers: tuple[SiteServer, ...] = ()

    def server(self, server_id: str) -> SiteServer | None:
        for s in self.servers:
            if s.id == server_id:
                return s
        return None


def parse_sites(raw: Any, *, local_name: str, local_ids: Iterable[str],
                source: str) -> tuple[SiteConfig, ...]:
    """The `[[sites]]` entries of a cluster file, validated (ConfigError naming the key)."""
    if not isinstance(raw, list):
        raise ConfigError("must be an array of tables ([[sites]])", key="sites",
                          value=shown("sites", raw), file=source)
    seen_ids = set(local_ids)
    names: set[str] = set()
    out: list[SiteConfig] = []
    for i, entry in enumerate(raw):
        where = f"sites[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError("must be a table", key=where, value=shown(where, entry),
                              file=source)
        table = dict(entry)
        servers_raw = table.pop("servers", None)
        site = build(SiteConfig, table, prefix=where, source=source)
        if not _ID_RE.fullmatch(site.name) or site.name == local_name or site.name in names:
            raise ConfigError("must be 1-64 of [A-Za-z0-9_-], unique, and not this "
                              "cluster's own name", key=f"{where}.name", value=site.name,
                              file=source)
        names.add(site.name)
        if not site.secrets or any(not s for s in site.secrets):
            raise ConfigError("the remote site's secrets are required (the trust between "
                              "the sites)", key=f"{where}.secrets", value="***", file=source)
        if not isinstance(servers_raw, list) or not servers_raw:
            raise ConfigError("at least one [[sites.servers]] entry is required",
                              key=f"{where}.servers", value=servers_raw, file=source)
        servers: list[SiteServer] = []
        for j, s in enumerate(servers_raw):
            skey = f"{where}.servers[{j}]"
            if not isinstance(s, dict):
                raise ConfigError("must be a table", key=skey, value=s, file=source)
            srv = build(SiteServer, s, prefix=skey, source=source)
            if not _ID_RE.fullmatch(srv.id) or srv.id == "NONE" or srv.id in seen_ids:
                # a token's PRIMARY must name one server of one site
                raise ConfigError("server ids must be unique across the sites (and not "
                                  "NONE)", key=f"{skey}.id", value=srv.id, file=source)
            seen_ids.add(srv.id)
            for what in ("http", "site_replication"):
                if getattr(srv, what).wildcard:
                    raise ConfigError("must be an address this site can dial",
                                      key=f"{skey}.{what}", value=str(getattr(srv, what)),
                                      file=source)
            servers.append(srv)
        out.append(dataclasses.replace(site, servers=tuple(servers)))
    return tuple(out)


def check_sites(sites: Sequence[SiteConfig], servers: Sequence[Any], persistence: str,
                source: str, *, tls: bool = False) -> None:
    """What naming remote sites requires of this site's own file."""
    for i, site in enumerate(sites):
        if tls and not site.tls_ca:
            raise ConfigError("required: cluster.tls_ca turns TLS on, between the sites too; "
                              "name the remote site's CA here", key=f"sites[{i}].tls_ca",
                              value=None, file=source)
        if site.tls_ca and not tls:
            raise ConfigError("set without cluster.tls_ca: the channel between the sites is "
                              "TLS only when this site's own is", key=f"sites[{i}].tls_ca",
                              value=site.tls_ca, file=source)
    for i, srv in enumerate(servers):
        if srv.witness:
            continue
        addr = srv.site_replication
        if addr is None:
            raise ConfigError("required on every app server when [[sites]] are named (the "
                              "remote sites dial it)", key=f"servers[{i}].site_replication",
                              value=None, file=source)
        if addr.wildcard or addr in (srv.http, srv.replication):
            raise ConfigError("must be a dialable address of its own (not a wildcard, not "
                              "the http or replication address)",
                              key=f"servers[{i}].site_replication", value=str(addr),
                              file=source)
    for i, site in enumerate(sites):
        if site.mode == "wan" and persistence == "none":
            # the remote site sends its sessions here the same way: they are kept in our
            # store, so one is required
            raise ConfigError('a "wan" site needs session.persistence (the remote copies '
                              "are kept in the store)", key=f"sites[{i}].mode",
                              value=site.mode, file=source)


def rank_remote(sid: str, servers: Sequence[SiteServer]) -> list[SiteServer]:
    """A remote site's servers in the order they are asked to keep session `sid`'s copy
    (rendezvous hashing: the same order everywhere, spread evenly, stable as servers come
    and go)."""
    return sorted(servers, key=lambda s: hashlib.sha256(
        f"{sid}|{s.id}".encode()).digest())


class TrustedCodec(TokenCodec):
    """Our own tokens (our secrets sign, all verify), and the tokens of trusted sites: each
    verified with that site's secrets only, and only when it names one of that site's
    servers as primary — a site's trust covers its own sessions, nothing else."""

    def __init__(self, secrets: Sequence[str], sites: Sequence[SiteConfig] = (), *,
                 cache_size: int = 16384) -> None:
        super().__init__(secrets, cache_size=cache_size)
        self._trusted = [(TokenCodec(s.secrets, cache_size=cache_size),
                          frozenset(srv.id for srv in s.servers)) for s in sites]

    def decode(self, token: str) -> Route:
        try:
            return super().decode(token)
        except BadSignature:
            if not self._trusted:
                raise
        for codec, ids in self._trusted:
            try:
                route = codec.decode(token)
            except BadSignature:
                continue
            if route.primary not in ids:
                raise MalformedToken("a trusted site's token names a server of another site")
            return route
        raise BadSignature("route token signature does not verify")
