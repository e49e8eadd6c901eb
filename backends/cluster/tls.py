"""How this server's replication connections are made: plaintext with the HMAC handshake
only (no `cluster.tls_ca`), or mutual TLS with the HMAC handshake on top.

With TLS, each connection is made with the contexts current when it starts: the listener
accepts each socket itself and runs the handshake with them (so that a failed handshake is
ours to log, with the peer's address), the dialler dials with them. New files — seen by
their stat changing, every `cluster.tls_reload_interval_s`, or at SIGHUP — make new
contexts for new connections; the connections already up keep theirs. A set of files that
fails (a half-written pair, a key that does not match) keeps the old contexts and is logged
once.

A peer's identity is the server id its certificate names (`tandem:server:<id>`): the
dialler checks the listener's before anything is sent, the listener hands the ids to the
HMAC handshake, which refuses a dialler claiming another.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal

import structlog

from tandem.config import Config, ServerConfig
from tandem.startup import listen_errors, listen_now
from tandem.tls import TlsFiles, files_for, ids_named

from ..errors import TlsHandshakeFailed
from .tls_context import TlsContexts, load_contexts

__all__ = ["Channel", "TlsServer", "EXPIRY_WARNING_DAYS"]

log = structlog.get_logger("tandem.tls")

EXPIRY_WARNING_DAYS = 14
# The same refusal (side, peer host, reason) is logged once per this many seconds: a peer
# with a bad certificate re-dials every heartbeat and would fill the log.
_REPEAT_LOG_S = 300.0

Connected = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Channel:
    """The transport of one server's replication connections: plaintext or mutual TLS."""

    def __init__(self, *, config: Config, me: str,
                 files: TlsFiles | None | Literal["replication"] = "replication") -> None:
        # configuration
        self.me = me
        # (`files`: another set than the replication channel's — the channel between sites)
        self._files: TlsFiles | None = (files_for(config, me) if isinstance(files, str)
                                        else files)
        self._interval = config.cluster.tls_reload_interval_s
        # the contexts in use (None: plaintext); at start a bad file is a ConfigError here
        self._ctx: TlsContexts | None = None
        if self._files is not None:
            self._ctx = load_contexts(self._files, me)
        self._loaded_stat = self._stat()
        self._failed_stat: object = None  # the files' stat when a reload of them failed
        self._seen_stat: object = self._loaded_stat
        self._refusals: dict[tuple[str, ...], tuple[float, int]] = {}
        self._warned_expiry = 0.0
        self._task: asyncio.Task[None] | None = None

    @property
    def tls(self) -> bool:
        return self._ctx is not None

    def status(self) -> dict[str, Any] | None:
        """For the health JSON: our certificate's ids and expiry (None: plaintext)."""
        ctx = self._ctx
        if ctx is None:
            return None
        return {"ids": sorted(ctx.ids), "not_after": _iso(ctx.not_after),
                "days_left": round(ctx.days_left, 1), "loaded_at": _iso(ctx.loaded_at)}

    # --- lifetime: watching the files ---------------------------------------------------

    def start(self) -> None:
        if self._ctx is None:
            return
        self._say_loaded("tls_loaded")
        self._task = asyncio.create_task(self._watch(), name="tls-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def reload(self) -> bool:
        """Read the files again now (SIGHUP); False (logged) keeps the contexts in use."""
        if self._files is None:
            return False
        stat = self._stat()
        try:
            ctx = load_contexts(self._files, self.me)
        except Exception as exc:  # ConfigError naming the file; OSError of a vanished one
            if stat != self._failed_stat:
                log.error("tls_reload_failed", error=str(exc), kept="the certificate loaded "
                          f"at {_iso(self._ctx.loaded_at) if self._ctx else '?'}")
            self._failed_stat = stat
            return False
        self._ctx, self._loaded_stat, self._failed_stat = ctx, stat, None
        self._say_loaded("tls_reloaded")
        return True

    async def _watch(self) -> None:
        while True:
            # (interval 0: the files are read on SIGHUP only; the expiry is still watched)
            await asyncio.sleep(self._interval or 3600.0)
            stat = self._stat()
            # Files are often replaced one after the other (certificate, then key): reload
            # once they have stayed the same for one interval, not between the two.
            if self._interval and stat != self._loaded_stat and stat == self._seen_stat and (
                    stat != self._failed_stat):
                self.reload()
            self._seen_stat = stat
            if time.time() - self._warned_expiry > 86400:
                self._warn_expiry()

    def _stat(self) -> object:
        if self._files is None:
            return None
        out: list[tuple[int | None, int, int]] = []
        for file in self._files.all():
            try:
                st = os.stat(file.path)  # (follows a symbolic link swapped to a new file)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError as exc:
                out.append((exc.errno, 0, 0))
        return tuple(out)

    def _say_loaded(self, event: str) -> None:
        ctx, files = self._ctx, self._files
        assert ctx is not None and files is not None
        log.info(event, cert=str(files.cert.path), ca=str(files.ca.path),
                 ids=sorted(ctx.ids), not_after=_iso(ctx.not_after))
        with contextlib.suppress(OSError):
            mode = os.stat(files.key.path).st_mode & 0o777
            if mode & 0o077:  # whoever reads it can speak as this server (with the secret)
                log.warning("tls_key_readable_by_others", key=str(files.key.path),
                            mode=f"{mode:04o}")
        self._warn_expiry()

    def _warn_expiry(self) -> None:
        ctx, files = self._ctx, self._files
        if ctx is not None and files is not None and ctx.days_left < EXPIRY_WARNING_DAYS:
            self._warned_expiry = time.time()
            log.warning("tls_cert_expiring", cert=str(files.cert.path),
                        not_after=_iso(ctx.not_after), days_left=round(ctx.days_left, 1))

    # --- dialling -------------------------------------------------------------------------

    async def open(self, peer: ServerConfig, timeout: float
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to `peer`'s replication address; with TLS, verified as that peer."""
        addr = peer.replication
        ctx = self._ctx
        if ctx is None:
            return await asyncio.wait_for(asyncio.open_connection(addr.host, addr.port),
                                          timeout)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(
                addr.host, addr.port, ssl=ctx.client, ssl_handshake_timeout=timeout), timeout)
        except ssl.SSLError as exc:
            raise self.refused("dial", str(addr), _reason(exc), peer=peer.id) from exc
        named = self.certified(writer) or frozenset()
        if peer.id not in named:
            writer.close()
            raise self.refused("dial", str(addr), "its certificate names "
                               f"{', '.join(sorted(named)) or 'no server'}, not {peer.id}",
                               peer=peer.id)
        return reader, writer

    @staticmethod
    def certified(writer: asyncio.StreamWriter) -> frozenset[str] | None:
        """The server ids the connection's peer certificate names (None: plaintext)."""
        if writer.get_extra_info("ssl_object") is None:
            return None
        cert = writer.get_extra_info("peercert") or {}
        return ids_named(cert.get("subjectAltName", ()))

    def refused(self, side: str, remote: str, reason: str, *, peer: str = "?",
                event: str = "tls_handshake_failed") -> TlsHandshakeFailed:
        """Log a refused handshake — once per event, peer host and reason in a while (a
        refused peer re-dials every heartbeat) — and return the error to raise."""
        host = remote.rsplit(":", 1)[0]
        now = time.monotonic()
        key = (event, side, host, reason)
        last, repeats = self._refusals.get(key, (-1e9, 0))
        if now - last >= _REPEAT_LOG_S:
            log.warning(event, side=side, remote=remote, peer=peer, reason=reason,
                        **({"repeats": repeats} if repeats else {}))
            self._refusals[key] = (now, 0)
        else:
            log.debug(event, side=side, remote=remote, peer=peer, reason=reason)
            self._refusals[key] = (last, repeats + 1)
        return TlsHandshakeFailed(reason, peer=peer, remote=remote)

    # --- listening ------------------------------------------------------------------------

    async def listen(self, connected: Connected, host: str, port: int, *, what: str,
                     handshake_timeout_s: float) -> asyncio.Server | TlsServer:
        """Bind and listen on `host:port`, not accepting until `start_serving` (the peers
        wait in the backlog); a taken address fails here in one line (ListenError, `what`
        naming the address). With TLS each connection's handshake is ours (TlsServer)."""
        with listen_errors(host, port, what):
            if self._ctx is not None:
                return TlsServer(self, connected, host, port, handshake_timeout_s)
            server = await asyncio.start_server(connected, host, port, start_serving=False)
            listen_now(server)
            return server

    def _server_context(self) -> ssl.SSLContext:
        assert self._ctx is not None
        return self._ctx.server


class TlsServer:
    """The replication listener's socket with TLS: each accepted connection is handshaken
    with the contexts current at that moment, and handed on once authenticated by TLS."""

    def __init__(self, channel: Channel, connected: Connected, host: str, port: int,
                 handshake_timeout_s: float) -> None:
        self._channel = channel
        self._connected = connected
        self._timeout = handshake_timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        info = socket.getaddrinfo(host, port, family if ":" in host else socket.AF_UNSPEC,
                                  socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(100)  # connections wait in the backlog until start_serving
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._accepting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    async def start_serving(self) -> None:
        if self._accepting is None:
            self._accepting = asyncio.create_task(self._accept_loop(), name="tls-accept")

    def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        for task in list(self._tasks):
            task.cancel()  # handshakes in progress; authenticated ones are the listener's
        self._sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._accepting, *self._tasks) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, addr = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of descriptors, say: not a reason to stop listening
                log.warning("replication_accept_failed", error=str(exc))
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handshake(conn, addr))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handshake(self, conn: socket.socket, addr: Any) -> None:
        loop = asyncio.get_running_loop()
        remote = f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
        reader = asyncio.StreamReader(limit=2 ** 16, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self._channel._server_context(),
                ssl_handshake_timeout=self._timeout)
        except ssl.SSLError as exc:
            self._channel.refused("accept", remote, _reason(exc))
            conn.close()
            return
        except (OSError, TimeoutError) as exc:  # it hung up, or never finished
            log.info("peer_dial_abandoned", remote=remote, reason=str(exc) or "timeout")
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
        await self._connected(reader, writer)  # (the listener's: it closes what it adopts)


def _reason(exc: ssl.SSLError) -> str:
    """The reason of a failed handshake, for a log line (no certificate, no key)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    reason = exc.reason or type(exc).__name__
    return str(reason).lower().replace("_", " ")


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
