"""`tandem site-down`: an operator declares a remote site down at every server of this site.

For a site whose hosts are off or cut off: no connection to them is refused, so the
site-down rule (takeover.py) never fires, and its sessions get 503 (`site-up`) here. After
the command, each server of this site takes them over at their next request. Only for a
site that is really down or fenced: a site that still serves its sessions would serve them
beside this one (docs/sites.md, "When a site is lost").

The command goes to each server's `site_replication` listener (channel.py): the listener
that already authenticates the other site's servers, reachable only from the sites'
networks — not the http port, which faces the clients through the proxy. It is proven
with this cluster's own secrets (a challenge per connection, so it cannot be replayed);
each server refuses it while a server of that site still answers it (a link is up).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys

from tandem.config import Config, ServerConfig
from tandem.tls import site_files_for

from ..cluster import wire
from ..cluster.tls import Channel
from ..errors import ReplicationError
from .channel import CHANNEL_NAME, OPERATOR, command_mac

__all__ = ["declare_site_down", "run_site_down"]


async def _open(cfg: Config, srv: ServerConfig) -> tuple[asyncio.StreamReader,
                                                       asyncio.StreamWriter]:
    """A connection to `srv`'s site listener: plaintext, or TLS with the certificate of a
    server of this site whose files this host has (the listener takes an operator's command
    only with one of this site's own certificates)."""
    addr = srv.site_replication
    assert addr is not None
    timeout = cfg.cluster.peer_connect_timeout_s
    if not cfg.cluster.tls_ca:
        return await asyncio.open_connection(addr.host, addr.port)
    for own in cfg.servers:
        files = site_files_for(cfg, own.id)
        if files is not None and all(os.access(f.path, os.R_OK) for f in files.all()):
            channel = Channel(config=cfg, me=own.id, files=files)
            return await channel.open(dataclasses.replace(srv, replication=addr), timeout)
    raise OSError("no server's TLS certificate and key are readable on this host")


async def _declare(cfg: Config, srv: ServerConfig, site: str) -> tuple[bool, str]:
    """Tell one server; (done, what it said)."""
    addr = srv.site_replication
    assert addr is not None  # (required on every app server when [[sites]] are named)
    secrets = cfg.cluster.secrets
    try:
        async with asyncio.timeout(cfg.cluster.peer_connect_timeout_s
                                   + cfg.cluster.replication_timeout_s):
            reader, writer = await _open(cfg, srv)
            try:
                await wire.dial_handshake(reader, writer, me=OPERATOR, peer=srv.id,
                                          cluster=CHANNEL_NAME, secrets_=secrets)
                challenge = await wire.read_frame(reader, peer=srv.id)
                nonce = challenge.get("nonce")
                if challenge.get("op") != "operator_challenge" or not isinstance(nonce, str):
                    return False, f"unexpected answer {challenge.get('op')!r}"
                msg = {"op": "site_down", "site": site}
                wire.write_frame(writer, {**msg, "mac": command_mac(secrets[0], srv.id,
                                                                    nonce, msg)})
                reply = await wire.read_frame(reader, peer=srv.id)
            finally:
                writer.close()
    except (OSError, TimeoutError, ReplicationError) as exc:
        return False, f"unreachable at {addr} ({exc or type(exc).__name__})"
    if not reply.get("ok"):
        return False, f"refused: {reply.get('error')}"
    if reply.get("already"):
        return True, f"site {site} was declared down already"
    return True, f"site {site} declared down: its sessions are taken over at their next request"


async def declare_site_down(cfg: Config, site: str) -> dict[str, tuple[bool, str]]:
    """Every app server of this site, told at once: server id -> (done, what it said)."""
    servers = [s for s in cfg.servers if not s.witness]
    results = await asyncio.gather(*(_declare(cfg, s, site) for s in servers))
    return {s.id: r for s, r in zip(servers, results, strict=True)}


def run_site_down(cfg: Config, site: str, source: str) -> int:
    """The command: one line per server; exit status 0 when every one has the site down,
    1 when one refused or could not be reached (run it again), 2 for a bad site name."""
    names = [s.name for s in cfg.sites]
    if site not in names:
        print(f"tandem: site-down: no site named {site!r} in {source} (its [[sites]]: "
              f"{', '.join(names) or 'none'})", file=sys.stderr)
        return 2
    results = asyncio.run(declare_site_down(cfg, site))
    for server, (_, said) in results.items():
        print(f"{server}: {said}")
    return 0 if all(done for done, _ in results.values()) else 1
