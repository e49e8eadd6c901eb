"""Our outbound replication link to one peer: calls with replies, pings, reconnection,
and the peer's state as this server sees it.

Each server dials every peer once (an outbound `PeerLink` carries our requests and their
replies) and accepts the peers' own links (`listener.ReplicationListener`). Liveness: a link
pings every `heartbeat_interval_s`; a peer is failed when nothing was heard from it for
`missed_heartbeats` intervals, or at once when a replication connection closes unexpectedly.
Failed peers are re-dialled in the background and are alive again after a new handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import itertools
import time
from collections.abc import Callable
from typing import Any

import structlog

from tandem.config import Config, ServerConfig

from ..errors import (
    HandshakeFailed,
    PeerTimeout,
    PeerUnavailable,
    ReplicationError,
    TlsHandshakeFailed,
)
from . import wire
from .roster import announcement
from .tls import Channel

__all__ = ["PeerState", "PeerLink", "Outbox"]

log = structlog.get_logger("tandem.peers")

# A connection that served this long before it dropped is re-dialled at once, so that a
# process killed soon after its links came up (a young cluster, a server just restarted) is
# proven dead as fast as an older one; a peer that accepts and drops at once is re-dialled
# with the back-off instead (a few dials a second at most).
_SERVED_S = 0.2


class PeerState(enum.Enum):
    UNKNOWN = "unknown"  # not reached since this server started
    ALIVE = "alive"      # outbound link authenticated and heard from recently
    DRAINING = "draining"  # alive, but leaving: serves fetches, takes no new replicas
    FAILED = "failed"    # link lost, refused or silent; re-dialled in the background
    LEFT = "left"        # said goodbye (graceful shutdown); re-dialled in the background


class Outbox:
    """The frames written to one connection in one event-loop iteration leave in one write.

    Replication is chatty (a frame per committed request, an answer per frame): one socket
    write per frame cost more than the frame itself, on the primary and on the secondary.
    """

    __slots__ = ("writer", "loop", "_frames", "_failed")

    def __init__(self, writer: asyncio.StreamWriter,
                 failed: Callable[[Outbox, Exception], None]) -> None:
        self.writer = writer
        self._frames: list[bytes] = []
        self._failed = failed  # the transport refused the write (closed under us)
        self.loop = asyncio.get_running_loop()

    def write(self, frame: bytes) -> None:
        if not self._frames:
            self.loop.call_soon(self.flush)
        self._frames.append(frame)

    def flush(self) -> None:
        frames, self._frames = self._frames, []
        if not frames or self.writer.transport.is_closing():
            return
        try:
            self.writer.write(frames[0] if len(frames) == 1 else b"".join(frames))
        except (RuntimeError, OSError) as exc:  # the transport closed under us (uvloop)
            self._failed(self, exc)


class PeerLink:
    """Our outbound connection to one peer: calls with replies, pings, reconnection."""

    def __init__(self, *, me: str, peer: ServerConfig, config: Config,
                 on_state: Callable[[str, PeerState, str], None],
                 stalled: Callable[[], bool] = lambda: False, incarnation: str = "",
                 on_refused: Callable[[str], None] = lambda peer: None,
                 on_heard: Callable[[str, str], None] = lambda peer, inc: None,
                 channel: Channel | None = None) -> None:
        # configuration
        self.me = me
        self._channel = channel or Channel(config=config, me=me)  # plaintext or TLS
        self.incarnation = incarnation  # ours, sent in the handshake
        # our addresses, also in the handshake: a peer that does not know us may admit us
        self._announce = announcement(config.server(me))
        self._stalled = stalled  # were *we* frozen just now? (then its silence is ours)
        self.peer = peer
        self._cluster = config.cluster
        self._on_state = on_state
        self._on_refused = on_refused  # the peer's port refused us: no process there
        self._on_heard = on_heard  # a sign of life of the peer's process (handshake, pong)
        # connection state
        self.state = PeerState.UNKNOWN
        self.peer_incarnation = ""  # the peer's process, as its handshake named it
        self._writer: asyncio.StreamWriter | None = None
        self._outbox: Outbox | None = None  # writes to _writer
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self.last_heard = 0.0
        self._task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()  # wakes the reconnect loop early
        self._closing = False

    @property
    def alive(self) -> bool:
        """Reachable for calls (a draining peer still answers fetches)."""
        return self.state is PeerState.ALIVE or self.state is PeerState.DRAINING

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"peer-link-{self.peer.id}")

    async def close(self, *, goodbye: bool = True) -> None:
        self._closing = True
        if goodbye and self._writer is not None and self.alive:
            with contextlib.suppress(Exception):
                if self._outbox is not None:
                    self._outbox.flush()  # what was sent before goes first
                wire.write_frame(self._writer, {"op": "leaving"})
                await asyncio.wait_for(self._writer.drain(), 0.5)
        self._drop("closing")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # --- calls --------------------------------------------------------------------------

    def send(self, msg: dict[str, Any]) -> bool:
        """Fire and forget; False when the link is down."""
        if not self.alive or self._outbox is None:
            return False
        try:
            self._outbox.write(wire.encode_frame(msg))
        except (RuntimeError, OSError) as exc:  # the transport closed under us (uvloop)
            self._drop(f"write failed: {exc}")
            return False
        return True

    async def call(self, msg: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        """Send `msg` and wait for its reply; PeerUnavailable or PeerTimeout otherwise."""
        if self.alive and self._writer is None:
            await self._reconnected(timeout)  # quietly re-dialling after our own stall
        outbox = self._outbox
        if not self.alive or outbox is None:
            raise PeerUnavailable(f"peer is {self.state.value}", peer=self.peer.id)
        rid = next(self._ids)
        loop = outbox.loop  # (asyncio.get_running_loop() is a getpid() system call)
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending[rid] = fut
        msg["id"] = rid
        # a timer on the reply itself: cheaper than asyncio.wait_for on the sync hot path
        # (in an empty context: the caller's — its request, session, scope — is not kept
        # alive until the timer's deadline after the reply came)
        timer = loop.call_later(timeout, _time_out, fut, context=_NO_CONTEXT)
        try:
            outbox.write(wire.encode_frame(msg))
            return await fut
        except TimeoutError:
            raise PeerTimeout(f"no reply within {timeout:.3g}s", peer=self.peer.id) from None
        except (RuntimeError, OSError) as exc:  # the transport closed under us (uvloop)
            self._drop(f"write failed: {exc}")
            raise PeerUnavailable(f"connection lost: {exc}", peer=self.peer.id) from exc
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    async def _reconnected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self._kick.set()
        while self.alive and self._writer is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def fail(self, cause: str) -> None:
        """Declare the peer failed (timeout, heartbeat loss, inbound closure) and re-dial."""
        if self.state in (PeerState.FAILED, PeerState.LEFT):
            return
        if self._stalled():
            # We were frozen: the peer closed our links because *we* went silent. It is
            # most likely alive; re-dial at once instead of declaring it failed.
            log.info("peer_reconnecting", peer=self.peer.id, cause=cause)
            self._drop(cause)
            self._kick.set()
            return
        self._set_state(PeerState.FAILED, cause)
        self._drop(cause)

    def draining(self) -> None:
        if self.state is PeerState.ALIVE:
            self._set_state(PeerState.DRAINING, "draining")

    def left(self) -> None:
        self._set_state(PeerState.LEFT, "left")
        self._drop("left")

    def kick(self) -> None:
        """Try to reconnect now (the peer just dialled us, so it is probably back)."""
        self._kick.set()

    # --- internals ----------------------------------------------------------------------

    def _set_state(self, state: PeerState, cause: str) -> None:
        if state is self.state:
            return
        self.state = state
        self._on_state(self.peer.id, state, cause)

    def _write_failed(self, outbox: Outbox, exc: Exception) -> None:
        if outbox is self._outbox:  # not one of an earlier connection
            self._drop(f"write failed: {exc}")

    def _drop(self, cause: str) -> None:
        self._outbox = None
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PeerUnavailable(f"connection lost ({cause})", peer=self.peer.id))
        self._pending.clear()

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing:
            served_since = float("inf")
            try:
                await self._connect()
                if self._closing:
                    # close() came while we dialled, and its cancel may have been lost as the
                    # connection came up (Python 3.11's wait_for): serving it would never end
                    self._drop("closing")
                    return
                backoff = 0.05
                served_since = time.monotonic()
                await self._serve()
            except ConnectionRefusedError as exc:
                # No process listens on the peer's replication port: proof that the process
                # we knew is gone (a hung or cut-off one would not refuse).
                if self.state is PeerState.ALIVE:
                    self.fail(f"connection refused: {exc}")
                self._on_refused(self.peer.id)
            except (OSError, ReplicationError, TimeoutError) as exc:
                if self.state is PeerState.ALIVE:
                    self.fail(f"connection lost: {exc}")
                elif self.state is PeerState.UNKNOWN and isinstance(exc, HandshakeFailed) and (
                        not isinstance(exc, TlsHandshakeFailed)):  # (that one logged it)
                    log.warning("peer_refused", peer=self.peer.id, reason=str(exc))
            if self._closing:
                return
            delay = backoff
            if (time.monotonic() - served_since > _SERVED_S
                    and self.state is not PeerState.LEFT):
                # A connection that had served a while dropped: dial again at once. A dead
                # process refuses now, and that refusal lets the majority remove it within
                # milliseconds (the first good response after a kill -9 waits for it).
                delay = 0.005
            self._kick.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kick.wait(), delay)
            backoff = min(backoff * 2, self._cluster.heartbeat_interval_s)

    async def _connect(self) -> None:
        timeout = self._cluster.peer_connect_timeout_s
        # plaintext, or TLS verified as this peer (tls.py)
        reader, writer = await self._channel.open(self.peer, timeout)
        try:
            self.peer_incarnation = await asyncio.wait_for(wire.dial_handshake(
                reader, writer, me=self.me, peer=self.peer.id, cluster=self._cluster.name,
                secrets_=self._cluster.secrets, incarnation=self.incarnation,
                spec=self._announce), timeout)
        except BaseException:
            writer.close()
            raise
        self._reader, self._writer = reader, writer
        self._outbox = Outbox(writer, self._write_failed)
        self.last_heard = time.monotonic()
        self._on_heard(self.peer.id, self.peer_incarnation)
        self._set_state(PeerState.ALIVE, "handshake")

    async def _serve(self) -> None:
        pinger = asyncio.create_task(self._ping())
        frames = wire.FrameReader(self._reader, peer=self.peer.id)
        try:
            while True:
                msg = await frames.read()
                self.last_heard = time.monotonic()
                fut = self._pending.get(msg.get("re", 0))
                if fut is not None:
                    if not fut.done():
                        fut.set_result(msg)
                elif msg.get("op") == "pong":  # (every heartbeat, not on every reply)
                    self._on_heard(self.peer.id, self.peer_incarnation)
        finally:
            pinger.cancel()

    async def _ping(self) -> None:
        interval = self._cluster.heartbeat_interval_s
        limit = interval * self._cluster.missed_heartbeats
        while self.alive and self._writer is not None:
            wire.write_frame(self._writer, {"op": "ping"})
            before = time.monotonic()
            await asyncio.sleep(interval)
            now = time.monotonic()
            if now - before > limit:
                # We were stalled ourselves (stopped, or the loop blocked): the silence is
                # ours, not the peer's. Give it a fresh interval to answer.
                self.last_heard = now
                continue
            if now - self.last_heard > limit:
                self.fail(f"missed {self._cluster.missed_heartbeats} heartbeats")
                return
            if self._writer is not None and self._writer.transport.get_write_buffer_size() > (
                    16 * 1024 * 1024):
                self.fail("peer is not reading its replication connection")
                return


_NO_CONTEXT = contextvars.Context()


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
