"""A witness: a third voter for clusters of two servers (`witness = true` in the cluster file).

It runs what a server runs for the view and the leases — the membership, the replication
listener, the quorum: it votes, grants leases and holds its own — and nothing else. It hosts
no app and no session: the servers never choose it as a secondary, never name it in the
view they tell the proxy, and the proxy does not route to it. Its http address answers
`GET /__tandem/health` only (the same JSON as a server's, `"role": "witness"`).

Why a process and not a store: the embedded default runs with no other service, and a
witness is the smallest thing that makes two servers a majority of three (docs/consistency.md).
"""

from __future__ import annotations

import json
from types import TracebackType
from typing import Any

import structlog

from tandem.config import Config
from tandem.logs import configure
from tandem.supervision import child_link

from .cluster.listener import ReplicationListener, Reply
from .cluster.membership import Membership
from .errors import ConfigError
from .serve.asgi import Receive, Scope, Send
from .serve.http_server import HttpServer
from .server import serve, use_uvloop

__all__ = ["WitnessServer", "run"]

log = structlog.get_logger("tandem.witness")

_HEALTH = "/__tandem/health"


class WitnessServer:
    """Async context manager running one witness of the cluster."""

    def __init__(self, *, config: Config, server_id: str) -> None:
        # configuration
        self.config = config
        self.me = config.server(server_id)
        if not self.me.witness:
            raise ConfigError("is not a witness (witness = true in its [[servers]] entry); "
                              "run it with `tandem backend`", key="servers.id",
                              value=server_id, file=config.source)
        # the parts, started in this order and stopped in the reverse one
        self.membership = Membership(config=config, me=server_id)
        self.listener = ReplicationListener(membership=self.membership, handler=self._handle)
        # what the listener binds; `me.http` is what the proxy and the peers dial
        http_bind = self.me.http_bind or self.me.http
        self.http = HttpServer(self._app, host=http_bind.host, port=http_bind.port,
                               shutdown_timeout_s=2.0, label=f"{server_id}'s http address")
        self.hand_over = False  # (nothing to hand over: `serve` logs it)
        self._running = False

    async def __aenter__(self) -> WitnessServer:
        try:
            # Bind both listeners first: a taken address fails before a peer is dialled.
            await self.http.bind()
            await self.listener.bind()
            self._running = True
            await self.listener.start()
            self.membership.start()
            await self.http.start_serving()
        except BaseException:
            await self.stop()
            raise
        log.info("witness_started", http=str(self.me.http),
                 replication=str(self.me.replication))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop: the health listener, then goodbyes to the peers (they may remove us at
        once, as a drained server), then the replication channel."""
        await self.http.close()
        self.listener.leaving()
        await self.membership.close()
        await self.listener.close()
        if self._running:
            log.info("witness_stopped")
        self._running = False

    def cluster_stopping(self) -> None:
        """The whole cluster stops (`tandem up`): nothing to refuse or hand over here."""

    async def leave(self) -> None:
        """Say goodbye to the peers now (a whole-cluster stop's second step)."""
        if self._running:
            self.listener.leaving()
            await self.membership.close()

    def summary(self) -> str:
        return ""

    # --- the replication channel: pings and the servers' broadcasts only ----------------

    def _handle(self, peer: str, msg: dict[str, Any]) -> Reply:
        op = msg.get("op")
        if op == "ping":
            return {"op": "pong"}
        if op in ("load", "draining"):  # broadcasts to every peer: nothing to do with them
            return None
        # No server sends a witness sessions (it is never a secondary nor in a token); one
        # that did is told so rather than left waiting for a reply.
        return {"ok": False, "error": f"{self.me.id} is a witness: it holds no sessions"}

    # --- http: the health endpoint --------------------------------------------------------

    def health(self) -> dict[str, Any]:
        m = self.membership
        return {
            "server": self.me.id,
            "role": "witness",
            "state": "up",
            "peers": m.states(),
            "view": m.view()[0],
            "members": list(m.quorum.view.members),
            "standing": m.quorum.standing.value,
            "lease": m.serving_state() is None,
            "tls": m.channel.status(),  # null: plaintext replication
        }

    async def _app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # a websocket: refused
        if scope["path"] == _HEALTH and scope["method"] in ("GET", "HEAD"):
            status, body = 200, json.dumps(self.health()).encode()
            ctype = b"application/json"
        else:
            status, body = 404, b"a tandem witness serves only " + _HEALTH.encode() + b"\n"
            ctype = b"text/plain; charset=utf-8"
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})


def run(config: Config, server_id: str) -> int:
    """Run one witness until SIGINT/SIGTERM (or `tandem up`'s stop); the exit status
    (2: a bad configuration, such as a server that is not a witness; 1: a failed start)."""
    from tandem.startup import fail

    configure(component="witness", server=server_id)
    use_uvloop()
    link = child_link()
    try:
        witness = WitnessServer(config=config, server_id=server_id)
    except ConfigError as exc:
        return fail(f"tandem: configuration error: {exc}", exc, code=2)
    return serve(witness, link)
