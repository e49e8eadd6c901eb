"""TLS on the replication channel, as the cluster file states it: which files, and whom a
certificate names.

TLS is on when `cluster.tls_ca` is set: then every server (witnesses included) needs a
certificate and a key — `cluster.tls_cert` / `cluster.tls_key` for all of them (`{id}` in
the path stands for the server's id), or its own `tls_cert` / `tls_key` in `[[servers]]`.
Without `tls_ca` the channel is plaintext with the HMAC handshake only, and a certificate
given anywhere is an error: a cluster where some servers speak TLS and others do not could
not form. Relative paths are relative to the cluster file's directory.

A certificate names the servers it may speak as by URI subject-alternative names
`tandem:server:<id>` (`identity`): a peer presenting another server's certificate cannot
pass as that one.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # (config.py imports this module)
    from .config import ClusterSection, Config, ServerConfig

__all__ = ["IDENTITY_PREFIX", "identity", "ids_named", "TlsFile", "TlsFiles", "check",
           "files_for", "site_files_for", "warnings"]

IDENTITY_PREFIX = "tandem:server:"


def identity(server_id: str) -> str:
    """The URI a certificate of `server_id` carries as a subject-alternative name."""
    return IDENTITY_PREFIX + server_id


def ids_named(subject_alt_names: Sequence[tuple[str, str]]) -> frozenset[str]:
    """The server ids a certificate names (its `tandem:server:` URIs), from the
    `subjectAltName` entries of `ssl.SSLSocket.getpeercert()`."""
    return frozenset(value[len(IDENTITY_PREFIX):] for kind, value in subject_alt_names
                     if kind == "URI" and value.startswith(IDENTITY_PREFIX))


@dataclass(frozen=True, slots=True)
class TlsFile:
    """One file of a server's TLS set: where it is, and the key of the cluster file naming
    it (for the error that says which line to fix)."""

    path: Path
    key: str  # "cluster.tls_ca", "servers[1].tls_cert", ...
    written: str  # the value as the file has it


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """The CA bundle a server trusts, and its own certificate (chain) and key."""

    ca: TlsFile
    cert: TlsFile
    key: TlsFile
    source: str  # the cluster file
    # more CAs trusted (the channel between the sites: the remote sites' CAs)
    extra_cas: tuple[TlsFile, ...] = ()

    def all(self) -> tuple[TlsFile, ...]:
        return (self.ca, self.cert, self.key, *self.extra_cas)


def check(cluster: ClusterSection, entries: Sequence[ServerConfig], source: str) -> None:
    """At load: TLS for every server or for none (ConfigError naming the key otherwise)."""
    if not cluster.tls_ca:
        for key in ("tls_cert", "tls_key"):
            if getattr(cluster, key):
                raise ConfigError("set without cluster.tls_ca (the CA the peers' "
                                  "certificates are checked against): TLS is off",
                                  key=f"cluster.{key}", value=getattr(cluster, key),
                                  file=source)
        for i, srv in enumerate(entries):
            for key in ("tls_cert", "tls_key"):
                if getattr(srv, key):
                    raise ConfigError("set without cluster.tls_ca: TLS is on for every "
                                      "server or for none", key=f"servers[{i}].{key}",
                                      value=getattr(srv, key), file=source)
        return
    for i, srv in enumerate(entries):
        for key in ("tls_cert", "tls_key"):
            if not (getattr(srv, key) or getattr(cluster, key)):
                raise ConfigError(f"required: cluster.tls_ca turns TLS on for every server; "
                                  f"set it here, or cluster.{key} for all of them (\"{{id}}\" "
                                  "in the path stands for the server's id)",
                                  key=f"servers[{i}].{key}", value=None, file=source)


def files_for(config: Config, server_id: str) -> TlsFiles | None:
    """The TLS files of one server, paths resolved; None when TLS is off."""
    cluster = config.cluster
    if not cluster.tls_ca:
        return None
    index = config.server_ids.index(server_id)
    srv = config.servers[index]
    base = Path(config.source).resolve().parent if config.source != "<memory>" else Path.cwd()

    def resolve(written: str, key: str) -> TlsFile:
        path = Path(os.path.expanduser(written.replace("{id}", server_id)))
        return TlsFile(path if path.is_absolute() else base / path, key, written)

    def own(name: str) -> TlsFile:
        if getattr(srv, name):
            return resolve(getattr(srv, name), f"servers[{index}].{name}")
        return resolve(getattr(cluster, name), f"cluster.{name}")

    return TlsFiles(ca=resolve(cluster.tls_ca, "cluster.tls_ca"), cert=own("tls_cert"),
                    key=own("tls_key"), source=config.source)


def site_files_for(config: Config, server_id: str) -> TlsFiles | None:
    """The TLS files of one server on the channel between the sites: its own certificate,
    its own CA and every remote site's (`sites[].tls_ca`); None when TLS is off."""
    files = files_for(config, server_id)
    if files is None:
        return None
    base = Path(config.source).resolve().parent if config.source != "<memory>" else Path.cwd()
    extra = []
    for i, site in enumerate(config.sites):
        path = Path(os.path.expanduser(site.tls_ca))
        extra.append(TlsFile(path if path.is_absolute() else base / path,
                             f"sites[{i}].tls_ca", site.tls_ca))
    return dataclasses.replace(files, extra_cas=tuple(extra))


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def warnings(config: Config) -> tuple[str, ...]:
    """Without TLS, a replication address that is not loopback: the sessions would cross
    a network readable (one line for `Config.warnings`)."""
    if config.cluster.tls_ca:
        return ()
    exposed = [f"{s.id} {s.replication_bind or s.replication}" for s in config.servers
               if not _loopback((s.replication_bind or s.replication).host)]
    if not exposed:
        return ()
    return (f"the replication channel is plaintext and {', '.join(exposed)} "
            f"{'is' if len(exposed) == 1 else 'are'} not loopback: session data crosses the "
            "network readable; set cluster.tls_ca (`tandem certs`, docs/deployment.md) "
            f"({config.source})",)
