"""The ASGI middleware that gives every request its replicated session.

It reads the route token (cookie, then `;jsessionid=` path parameter, then query parameter),
removes the path parameter from the path the app sees, puts the session at
`scope["session"]`, and when the response head is ready commits the session and adds
`Set-Cookie` if the token changed (written with a framework's cookie settings when its glue
set them on the session) and `Vary: Cookie` if the app read or wrote the session. A 5xx
response commits nothing of its request (docs/frameworks.md). It also answers
`/__tandem/health` and piggy-backs the cluster view for the proxy (`X-Tandem-Cluster`) when
the proxy's `X-Tandem-View` is stale. A proxied request the proxy no longer waits for is
neither run nor committed (`X-Tandem-Deadline`: backends.serve.deadline).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote

import structlog

from tandem.config import Config, SessionSection
from tandem.logs import short
from tandem.sites import TrustedCodec
from tandem.token import (
    Route,
    TokenCodec,
    cookie_values,
    path_param,
    query_param,
    strip_path_param,
)

from ..errors import NotServing, TokenError
from ..sessions.app_sessions import AppSessions
from ..sessions.committing import CommitResult
from ..sessions.manager import SessionManager, SessionMoved
from ..sessions.session import Session
from ..sessions.store import Primary
from .deadline import DEADLINE_HEADER, Deadline, send_late
from .forward import HOP_HEADER, Forwarder
from .metrics import CONTENT_TYPE, METRICS_PATH, metrics_registry, render
from .origin import Origin, rewrite_url
from .rewrite import UrlRewriteMiddleware, token_in_urls

__all__ = ["TandemMiddleware", "ASGIApp", "current_session"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = structlog.get_logger("tandem.http")

HEALTH_PATH = "/__tandem/health"

# The session of the request being handled, for glue that cannot see the scope or environ
# (Django's SessionStore); WSGI worker threads run in a copy of the request's context.
current_session: ContextVar[Session | None] = ContextVar("tandem_session", default=None)


class TandemMiddleware:
    """Wraps an ASGI app with tandem's sessions."""

    def __init__(self, app: ASGIApp, *, manager: SessionManager, config: Config) -> None:
        # configuration
        if "starlette.middleware.sessions" in sys.modules:
            # the app may keep Starlette's SessionMiddleware: ours takes its place
            from ..frameworks.starlette import adopt
            app = adopt(app, cookie_name=config.session.cookie_name)
        self.app = app
        self.manager = manager
        # our tokens, and those of the trusted sites (docs/sites.md)
        self.codec: TokenCodec = TrustedCodec(config.cluster.secrets, config.sites)
        s = config.session
        self.cookie_name = s.cookie_name
        self.param_name = s.cookie_name.lower()
        self.url_rewriting = s.url_rewriting
        attrs = f"; Path={s.cookie_path}; HttpOnly; SameSite={s.cookie_samesite}"
        if s.cookie_secure or s.cookie_samesite == "None":
            attrs += "; Secure"
        self._cookie_attrs = attrs
        self.cookie_secure = s.cookie_secure  # a framework's cookie settings keep it Secure
        self.cluster_settings = s  # what a framework's settings are layered over
        self.app_sessions = manager.app_sessions  # session.app_session(key)
        # requests of sessions whose primary is another live server go there
        self.forwarder = Forwarder(manager=manager, config=config)
        self._clear_cookie = (f"{s.cookie_name}=; Max-Age=0{attrs}").encode("latin-1")
        # With URL rewriting, links in responses to cookie-less clients carry the token.
        self._rewriter: UrlRewriteMiddleware | None = None
        if s.url_rewriting:
            self._rewriter = UrlRewriteMiddleware(self._handle, param_name=self.param_name,
                                                  token_of=self._url_token)
        self._registry = metrics_registry(manager)  # /__tandem/metrics
        # run-time state
        self.bad_tokens = 0
        self.inflight = 0  # requests being handled (a drain waits for them)

    # --- SessionContext -----------------------------------------------------------------

    def route_of(self, record: Primary) -> Route:
        return Route(record.sid, self.manager.me.id, self.manager.planned_secondary(record))

    def encode_url(self, url: str, route: Route) -> str:
        # The context of a request whose URLs carry no token (by the rule of
        # backends.serve.rewrite); the others have a _RequestContext.
        return url

    def _url_token(self, scope: Scope) -> str | None:
        session = scope.get("session")
        route = session.route if session is not None else None
        return None if route is None else self.codec.encode(route)

    # --- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"] == HEALTH_PATH:
            await self._health(send)
            return
        if scope["path"] == METRICS_PATH:
            await self._metrics(send)
            return
        if self.manager.draining:
            # Sessions are being handed over: the proxy fails this over to the secondary;
            # a request of a session that lives elsewhere (or was handed over already) is
            # forwarded there. (Not in flight: nothing of it runs here.)
            if kind == "http" and self.forwarder.forwarding:
                await self._handle(scope, receive, send, draining=True)
            else:
                await _send_unavailable(send, _DRAINING, kind)
            return
        self.inflight += 1
        try:
            await self._handle(scope, receive, send)
        finally:
            self.inflight -= 1

    async def _handle(self, scope: Scope, receive: Receive, send: Send, *,
                      draining: bool = False) -> None:
        kind = scope["type"]
        cookie: str | None = None
        proxy_view: bytes | None = None
        rid: str | None = None  # the proxy's id of this client request, same on retries
        budget: bytes | None = None  # the proxy's X-Tandem-Deadline (ms)
        hop: bytes | None = None  # X-Tandem-Hop: forwarded by a peer (backends.serve.hop)
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie = value.decode("latin-1") if cookie is None else (
                    cookie + "; " + value.decode("latin-1"))
            elif name == b"x-tandem-view":
                proxy_view = value
            elif name == b"x-tandem-request-id":
                rid = value.decode("latin-1")
            elif name == DEADLINE_HEADER:
                budget = value
            elif name == HOP_HEADER:
                hop = value
        route, via = self._route(scope, cookie)
        deadline: Deadline | None = None
        if budget is not None and kind == "http":
            deadline = Deadline.of(scope, budget, rid=rid, sid=route.sid if route else None)
            if deadline is not None and deadline.missed(stage="start"):
                # The proxy has answered for it already: nothing of it runs here.
                await send_late(send, b"request past its deadline: not applied\n")
                return
        if kind == "http" and (hop is not None or (
                budget is None and route is not None and self.forwarder.foreign(route))):
            # Its primary may be another live server: then it answers
            # (backends.serve.forward); if it cannot, the request is handled here. (Not
            # a request of tandem's proxy, `budget`: it has chosen this server itself.)
            local = await self.forwarder.handle(scope, receive, send, hop=hop, rid=rid,
                                                route=route if budget is None else None)
            if local is None:
                return
            receive, rid = local
        if draining:
            await _send_unavailable(send, _DRAINING, kind)
            return
        # Whether this response's URLs carry the token: the rule of backends.serve.rewrite,
        # decided once per request, for the rewriter and session.encode_url alike.
        in_urls = self.url_rewriting and token_in_urls(via, cookie_sent=via == "cookie" or (
            cookie is not None and any(True for _ in cookie_values(cookie, self.cookie_name))))
        if (via == "cookie" and self.url_rewriting and kind == "http"
                and scope["method"] in ("GET", "HEAD") and b";" in scope.get("raw_path", b";")
                and await self._redirect_without_token(scope, send)):
            return
        if self._rewriter is not None and in_urls and kind == "http":
            # The rewriter sits outside the commit: it sees the token the client must hold
            # after this response.
            send = self._rewriter.wrap(scope, send)
        # Stripped even when URL rewriting is off (then the token there is ignored), so
        # that links rewritten earlier still lead to the page.
        if ";" in scope["path"]:
            scope["path"] = strip_path_param(scope["path"], self.param_name)
            raw = scope.get("raw_path")
            if raw:
                scope["raw_path"] = strip_path_param(raw.decode("latin-1"),
                                                     self.param_name).encode("latin-1")

        manager = self.manager
        try:
            record = await manager.open(route, rid=rid)
        except SessionMoved as exc:
            # Another server owns it now (or may, right after our own stall), or this one
            # may not serve it (X-Tandem-State says why): the proxy fails the request over;
            # nothing ran here.
            await _send_unavailable(send, exc, kind)
            return
        context = _RequestContext(self, scope) if in_urls else None
        session = Session(record, create=manager.new_session,
                          context=self if context is None else context)
        scope["session"] = session
        scope["tandem.server"] = manager.me.id
        scope["tandem.token_via"] = via  # "cookie" | "path" | "query" | None
        committed = False
        replaced = False  # the app's response was replaced by ours (session moved, late)
        dropped = False  # a server error: nothing of the request is committed

        async def send_wrapper(message: Message) -> None:
            nonlocal committed, replaced, dropped
            if replaced:
                return
            mtype = message["type"]
            if not committed and mtype in ("http.response.start", "websocket.accept"):
                committed = True
                if deadline is not None and deadline.missed(stage="commit"):
                    replaced = True  # (and what the app changes later is not committed)
                    await self._drop_refused(session)
                    await send_late(send, b"request past its deadline: not applied\n")
                    return
                start = mtype == "http.response.start"
                try:
                    if start and message["status"] >= 500:
                        # A 5xx, whoever sent it (the app, or Starlette's error middleware
                        # after the app raised): nothing of the request is committed.
                        dropped = True
                        result = await self._drop_failed(session)
                    else:
                        if session.modified:
                            session.settle()  # emptied: it ends
                        # (a session may move to a less loaded server only when its token
                        # comes by cookie: links in pages would still name this one)
                        result = await manager.commit(session, rid=rid,
                                                      migrate=via == "cookie")
                except SessionMoved as exc:
                    await _send_unavailable(send, exc, kind)
                    replaced = True
                    return
                if deadline is not None and deadline.committed_late():
                    # Applied (and replicated) after the proxy gave up: it stays, but is
                    # not acknowledged — the proxy answered 502/503 for it, and a retry
                    # with its request id is undone first (exactly-once).
                    replaced = True
                    await send_late(send, b"applied past its deadline: not acknowledged\n")
                    return
                added: list[tuple[bytes, bytes]] = []
                cookie = session.cookie  # a framework's settings (None: the cluster file's)
                if result.cleared:
                    if route is not None or session.cookie_refresh:
                        added.append((b"set-cookie", self._clear_cookie if cookie is None
                                      else cookie.clear(self.cookie_name,
                                                        secure=self.cookie_secure)))
                elif result.route is not None and (result.route != route
                                                   or session.cookie_refresh):
                    token = self.codec.encode(result.route)
                    added.append((b"set-cookie", (
                        f"{self.cookie_name}={token}{self._cookie_attrs}").encode("latin-1")
                        if cookie is None else cookie.set(self.cookie_name, token,
                                                          secure=self.cookie_secure)))
                if proxy_view is not None:
                    view_hash, view_header = manager.membership.view()
                    if proxy_view != view_hash.encode() and _older(proxy_view, view_hash):
                        added.append((b"x-tandem-cluster", view_header.encode("latin-1")))
                vary = start and session.accessed  # read or written: Vary: Cookie
                if added or vary:  # (the app's message is left as it is)
                    headers = [*message.get("headers", ()), *added]
                    if vary:
                        _vary_cookie(headers)
                    message = {**message, "headers": headers}
            await send(message)

        bound = current_session.set(session)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            if not committed and session.record is not None:
                # The handler failed: its changes are dropped, the session stays as it was.
                committed = True
                with contextlib.suppress(SessionMoved):
                    await self._drop_failed(session)
            raise
        finally:
            current_session.reset(bound)
            if context is not None:
                # scope -> session -> context -> scope: a cycle only the collector would free,
                # with the session's values in it (large sessions: megabytes per request)
                context.release()
        if (not replaced and not dropped and session.record is not None
                and not session.invalidated and session.dirty):
            # Changes made after the response head (streaming handlers, websockets).
            session.settle()
            try:
                await manager.commit(session, rid=rid)
            except SessionMoved:
                pass

    async def _drop_failed(self, session: Session) -> CommitResult:
        """A request answered 5xx (or whose app raised) commits nothing: not its changes,
        not an invalidation; a session it created is removed again."""
        session.discard()
        record = session.record
        if record is not None and record.version == 0:
            session.invalidate()
        return await self.manager.commit(session, discard=True)

    async def _drop_refused(self, session: Session) -> None:
        """A request refused at its commit leaves nothing behind: its changes are not
        committed, and a session it created is removed again."""
        record = session.record
        if record is None or record.version != 0:
            return
        if not session.invalidated:
            session.invalidate()
        with contextlib.suppress(SessionMoved):
            await self.manager.commit(session)

    def _route(self, scope: Scope, cookie: str | None) -> tuple[Route | None, str | None]:
        """The verified route of the request and where its token came from.

        Tokens are tried in order (cookies, then the path, then the query) until one
        verifies; the ones after it are not looked at.
        """
        if cookie is not None:
            for t in cookie_values(cookie, self.cookie_name):
                route = self._verify(t)
                if route is not None:
                    return route, "cookie"
        if self.url_rewriting:
            raw = scope.get("raw_path")
            target = raw.decode("latin-1") if raw else scope["path"]
            if ";" in target:
                in_path = path_param(target, self.param_name)
                if in_path and (route := self._verify(in_path)) is not None:
                    return route, "path"
            qs = scope.get("query_string") or b""
            if qs:
                q = query_param("?" + qs.decode("latin-1"), self.param_name)
                if q and (route := self._verify(unquote(q) if "%" in q else q)) is not None:
                    return route, "query"
        return None, None

    async def _redirect_without_token(self, scope: Scope, send: Send) -> bool:
        """A request whose token came by cookie and whose path carries one too: redirect it
        to its URL without the path's (True), unless that URL would read as another site's.
        """
        raw = scope.get("raw_path")
        target = raw.decode("latin-1") if raw else scope["path"]
        clean = strip_path_param(target, self.param_name)
        if clean == target or clean[1:2] in ("/", "\\"):  # `//host`: not ours to send to
            return False
        qs = scope.get("query_string") or b""
        location = clean.encode("latin-1") + (b"?" + qs if qs else b"")
        await send({"type": "http.response.start", "status": 302, "headers": [
            (b"location", location), (b"content-length", b"0"),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b""})
        return True

    def _verify(self, token: str) -> Route | None:
        try:
            return self.codec.decode(token)
        except TokenError as exc:
            self.bad_tokens += 1
            sid = token.split("!", 1)[0] if "!" in token else None
            log.warning("bad_token", reason=type(exc).__name__, sid=short(sid))
            return None

    async def _health(self, send: Send) -> None:
        m = self.manager
        body = json.dumps({
            "server": m.me.id,
            "state": "draining" if m.draining else "up",
            "peers": m.membership.states(),
            "primaries": len(m.store.primaries),
            "replicas": len(m.store.replicas),
            "view": m.membership.view()[0],
            # the view's members and http addresses, as X-Tandem-Cluster lists them (what
            # `tandem sync` reads to keep HAProxy's or nginx's server list)
            "cluster": m.membership.view()[1],
            "members": list(m.membership.quorum.view.members),
            "standing": m.membership.quorum.standing.value,
            "lease": m.membership.serving_state() is None,
            "stats": m.stats,
            # session.max_memory_mb / offload (docs/memory.md): accounted bytes, stubs
            **({"memory": m.ctx.budget.used_bytes()} if m.ctx.budget is not None else {}),
            "loop": m.loop_lag.health(),  # how long the event loop was held
            "tls": m.membership.channel.status(),  # null: plaintext replication
            **({"sites": m.sites.health()} if m.sites is not None else {}),
        }).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


    async def _metrics(self, send: Send) -> None:
        body = render(self._registry)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", CONTENT_TYPE.encode()),
            (b"content-length", str(len(body)).encode()), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})


class _RequestContext:
    """A session's server as one request sees it: its URLs carry the token (the rule of
    backends.serve.rewrite said so for this request)."""

    __slots__ = ("_mw", "_scope", "_origin")

    def __init__(self, mw: TandemMiddleware, scope: Scope) -> None:
        self._mw = mw
        self._scope = scope
        self._origin: Origin | None = None  # made when first needed

    def route_of(self, record: Primary) -> Route:
        return self._mw.route_of(record)

    def release(self) -> None:
        """The request is over: let go of its scope (the origin, if made, stays)."""
        self._scope = _NO_SCOPE

    @property
    def cluster_settings(self) -> SessionSection:
        return self._mw.cluster_settings

    @property
    def app_sessions(self) -> AppSessions:
        return self._mw.app_sessions

    def encode_url(self, url: str, route: Route) -> str:
        if self._origin is None:
            self._origin = Origin(self._scope)
        mw = self._mw
        # same-origin URLs only: a token never goes to another site
        return rewrite_url(url, param=mw.param_name, token=mw.codec.encode(route),
                           origin=self._origin)


_NO_SCOPE: Scope = {}  # (a released context's: never written to)


def _older(proxy_view: bytes, ours: str) -> bool:
    """Is the proxy's view older than ours (then it is sent ours)? Not when ours is the older
    one: a server cut off from the majority must not push its view on the proxy."""
    try:
        return int(proxy_view) < int(ours)
    except ValueError:  # "-" (the proxy knows none yet), or a hash of an older release
        return True


_DRAINING = NotServing("server draining", peer="-", state="draining")


_VARY_COOKIE = (b"vary", b"Cookie")


def _vary_cookie(headers: list[Any]) -> None:
    """Add Cookie to the response's Vary (one header, as Starlette and Flask keep it)."""
    for name, _ in headers:  # (most responses have no Vary: one cheap pass, then append)
        if len(name) == 4 and name.lower() == b"vary":
            break
    else:
        headers.append(_VARY_COOKIE)
        return
    for i, (name, value) in enumerate(headers):
        if name.lower() == b"vary":
            if any(t.strip() in (b"cookie", b"*") for t in value.lower().split(b",")):
                return
            headers[i] = (name, value + b", Cookie")
            return


async def _send_unavailable(send: Send, exc: SessionMoved, kind: str) -> None:
    """503 (server-initiated failover at the proxy) with `X-Tandem-State`: `moved`, or why
    this server may not serve the session now; a websocket is closed with 1012."""
    if kind == "websocket":
        await send({"type": "websocket.close", "code": 1012})
        return
    body = (b"session moved to another server; retry\n" if exc.state == "moved"
            else b"server draining; retry\n" if exc.state == "draining"
            else b"memory budget reached: no new session here; retry\n"
            if exc.state == "memory-budget"
            else f"not serving this session here ({exc.state}); retry\n".encode())
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"0"), (b"x-tandem-state", exc.state.encode("ascii"))]})
    await send({"type": "http.response.body", "body": body})
