"""`tandem sync`: keep HAProxy's or nginx's server list what the cluster says it is.

Every `interval_s` the loop asks each server it knows (the cluster file's, and those the
views added) for `GET /__tandem/health`, adopts the answer with the highest view number
(views are adopted by number, as tandem's proxy does: a server cut off from the majority
knows only older ones), and applies it:

- HAProxy, through its Runtime API (the `stats socket ... level admin` of the config):
  a member the backend lacks is added (`add server`, with the options of an exported
  server line, health checks on), in both backends (each checks it: a dynamic server
  cannot be tracked); a member whose address changed gets
  it (`set server ... addr`). HAProxy's own health checks keep the states.
- nginx: `tandem-http.conf` rewritten with the members, and the servers whose health
  answer failed or said they do not serve marked `down` (stock nginx has no active
  health checks); when the text changed, nginx is reloaded (its graceful reload).

Servers leave HAProxy only by hand (`del server`): one out of the view fails its checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tandem.address import Address
from tandem.config import Config

from . import export_haproxy, export_nginx
from .errors import SyncError
from .headers import parse_cluster_header

__all__ = ["Observed", "observe", "HaproxyRuntime", "sync_haproxy", "sync_nginx", "run"]

log = structlog.get_logger("tandem.sync")

_HEALTH_TIMEOUT_S = 2.0
_MAX_HEALTH_BYTES = 65536


@dataclass(slots=True)
class Observed:
    """One round of health answers: the newest view, and who serves."""

    view: int = -1
    members: dict[str, Address] = field(default_factory=dict)
    serving: set[str] = field(default_factory=set)  # answered: up, holding its lease
    asked: set[str] = field(default_factory=set)  # (a member learnt this round was not)


async def _health(address: Address) -> dict[str, object] | None:
    """One server's health JSON, or None (no answer in time, not 200, not JSON)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address.host, address.port), _HEALTH_TIMEOUT_S)
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(f"GET /__tandem/health HTTP/1.1\r\nHost: {address}\r\n"
                     "User-Agent: tandem-sync\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(_MAX_HEALTH_BYTES), _HEALTH_TIMEOUT_S)
        while len(raw) < _MAX_HEALTH_BYTES and (more := await asyncio.wait_for(
                reader.read(_MAX_HEALTH_BYTES), _HEALTH_TIMEOUT_S)):
            raw += more
    except (OSError, TimeoutError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")):
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


async def observe(known: Mapping[str, Address]) -> Observed:
    """Ask every known server; the newest view that any of them reports."""
    ids = list(known)
    answers = await asyncio.gather(*(_health(known[i]) for i in ids))
    seen = Observed(asked=set(ids))
    for sid, data in zip(ids, answers, strict=True):
        if data is None:
            continue
        if data.get("state") == "up" and data.get("lease") is True:
            seen.serving.add(sid)
        listing = data.get("cluster")
        if not isinstance(listing, str):
            continue  # a server of an older release: no listing
        try:
            number, members = parse_cluster_header(listing)
            view = int(number)
        except ValueError as exc:
            log.warning("sync_bad_view", server=sid, error=str(exc))
            continue
        if view > seen.view:
            seen.view, seen.members = view, members
    return seen


# --- HAProxy ------------------------------------------------------------------------------


class HaproxyRuntime:
    """HAProxy's Runtime API: one command per connection (a path, or host:port)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def command(self, line: str) -> str:
        try:
            if "/" in self.where or ":" not in self.where:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                target: str | tuple[str, int] = self.where
            else:
                addr = Address.parse(self.where)
                sock = socket.socket(socket.AF_INET6 if ":" in addr.host else socket.AF_INET)
                target = (addr.host, addr.port)
            with sock:
                sock.settimeout(_HEALTH_TIMEOUT_S)
                sock.connect(target)
                sock.sendall(line.encode() + b"\n")
                chunks = []
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
        except OSError as exc:
            raise SyncError(f"HAProxy's Runtime API at {self.where}: {exc}",
                            where=self.where) from exc
        return b"".join(chunks).decode(errors="replace")

    def servers(self, backend: str) -> dict[str, str]:
        """name -> "addr:port" of a backend's servers (`show servers state`)."""
        out: dict[str, str] = {}
        text = self.command(f"show servers state {backend}")
        for row in text.splitlines():
            cols = row.split()
            # be_id be_name srv_id srv_name srv_addr ... srv_port is column 18
            if len(cols) > 18 and cols[1] == backend and not row.startswith("#"):
                out[cols[3]] = f"{cols[4]}:{cols[18]}"
        if not out and "Can't find backend" in text:
            raise SyncError(f"HAProxy has no backend {backend!r}: {text.strip()}",
                            where=self.where)
        return out


def _ok(answer: str) -> bool:
    text = answer.strip()
    return not text or text.startswith("New server registered") or "changed from" in text


def sync_haproxy(cfg: Config, api: HaproxyRuntime, seen: Observed, *,
                 backend: str = export_haproxy.BACKEND) -> list[str]:
    """Apply a view to HAProxy; returns what it changed (one line each)."""
    changes: list[str] = []
    backends = [backend]
    if cfg.proxy.retry == "idempotent":
        backends.append(backend + export_haproxy.UNSAFE_SUFFIX)
    for be in backends:
        current = api.servers(be)
        for sid, addr in seen.members.items():
            if sid not in current:
                # (each backend checks an added server itself: HAProxy cannot `track` a
                # dynamic server)
                args = export_haproxy.server_args(cfg)
                steps = [f"add server {be}/{sid} {addr} {args}",
                         f"enable health {be}/{sid}", f"enable server {be}/{sid}"]
                for step in steps:
                    answer = api.command(step)
                    if not _ok(answer):
                        raise SyncError(f"HAProxy refused `{step}`: {answer.strip()}",
                                        where=api.where)
                changes.append(f"added {be}/{sid} {addr}")
            elif current[sid] != f"{addr.host}:{addr.port}":
                step = f"set server {be}/{sid} addr {addr.host} port {addr.port}"
                answer = api.command(step)
                if not _ok(answer):
                    raise SyncError(f"HAProxy refused `{step}`: {answer.strip()}",
                                    where=api.where)
                changes.append(f"moved {be}/{sid} to {addr}")
    return changes


# --- nginx --------------------------------------------------------------------------------


def sync_nginx(cfg: Config, known: Mapping[str, Address], seen: Observed, *, path: Path,
               reload: list[str], options: export_nginx.NginxOptions) -> list[str]:
    """Rewrite the http fragment with `known` and the view's members, servers that do not
    serve marked down; reload nginx when the text changed."""
    servers = {**known, **seen.members}
    down = frozenset(sid for sid in servers if sid in seen.asked and sid not in seen.serving)
    if down and len(down) == len(servers):
        down = frozenset()  # nobody answered: no news (nginx keeps trying them all)
    text = export_nginx.render_http(cfg, servers, down=down, options=options)
    try:
        if path.exists() and path.read_text() == text:
            return []
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise SyncError(f"cannot write {path}: {exc}", where=str(path)) from exc
    try:
        done = subprocess.run(reload, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SyncError(f"reload `{shlex.join(reload)}` failed: {exc}",
                        where=str(path)) from exc
    if done.returncode != 0:
        raise SyncError(f"reload `{shlex.join(reload)}` exited {done.returncode}: "
                        f"{(done.stderr or done.stdout).strip()[-300:]}", where=str(path))
    return [f"wrote {path} ({len(servers)} servers, down: {', '.join(sorted(down)) or '-'})"
            ", reloaded"]


# --- the loop -----------------------------------------------------------------------------


async def run(cfg: Config, *, engine: str, interval_s: float, once: bool,
              socket_path: str | None = None, output: Path | None = None,
              reload: list[str] | None = None, source: str = "") -> int:
    """Observe and apply every `interval_s` until cancelled (`once`: one round)."""
    known: dict[str, Address] = export_nginx.servers_of(cfg)
    api = HaproxyRuntime(socket_path) if socket_path else None
    options = export_nginx.NginxOptions(source=source)
    while True:
        seen = await observe(known)
        if seen.view < 0:
            log.warning("sync_no_view", asked=len(known))
        try:
            if engine == "haproxy":
                assert api is not None
                changes = sync_haproxy(cfg, api, seen) if seen.view >= 0 else []
            else:
                assert output is not None and reload is not None
                changes = sync_nginx(cfg, known, seen, path=output, reload=reload,
                                     options=options)
        except SyncError as exc:
            if once:
                raise
            log.error("sync_failed", error=str(exc))
            changes = []
        for change in changes:
            log.info("sync_applied", engine=engine, view=seen.view, change=change)
        known.update(seen.members)
        if once:
            return 0
        await asyncio.sleep(interval_s)
