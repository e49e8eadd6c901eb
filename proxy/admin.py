"""The admin listener (`proxy.admin`, aiohttp): status page, Prometheus metrics, and
backend state changes at run time.

- `GET  /__tandem/status`               HTML; JSON with `Accept: application/json`
                                        or `?format=json`
- `GET  /__tandem/metrics`              Prometheus text exposition
- `POST /__tandem/backends/{id}/state`  body `up`, `draining` or `down`
"""

from __future__ import annotations

import html
import time
from typing import Any

import structlog
from aiohttp import web

from .context import ProxyContext
from .errors import BadStateTransition, UnknownBackend
from .metrics import CONTENT_TYPE
from .router import Backend

__all__ = ["make_admin_app", "status_snapshot", "CTX_KEY"]

log = structlog.get_logger("tandem.proxy")

CTX_KEY = web.AppKey("tandem_proxy_context", ProxyContext)


def make_admin_app(ctx: ProxyContext) -> web.Application:
    app = web.Application()
    app[CTX_KEY] = ctx
    app.router.add_get("/__tandem/status", _status)
    app.router.add_get("/__tandem/metrics", _metrics)
    app.router.add_post("/__tandem/backends/{backend_id}/state", _set_state)
    return app


def _backend_info(ctx: ProxyContext, b: Backend, now: float) -> dict[str, Any]:
    bad_for = max(0.0, b.bad_until - now)
    return {
        "id": b.id,
        "address": str(b.address),
        "state": b.state.value,
        "admin_state": b.admin_state.value,
        "healthy": b.healthy,
        "in_view": b.in_view,
        "learned": b.learned,
        "bad": bad_for > 0,
        "bad_for_s": round(bad_for, 3),
        "bad_until": round(time.time() + bad_for, 3) if bad_for > 0 else None,  # epoch s
        "routed": b.routed,
        "failovers": b.failovers,
        "connect_errors": b.connect_errors,
        "io_errors": b.io_errors,
        "idle_connections": b.pool.idle_count if b.pool is not None else 0,
    }


def status_snapshot(ctx: ProxyContext) -> dict[str, Any]:
    """Everything the status page shows, as plain data."""
    m = ctx.metrics
    now = time.monotonic()
    return {
        "view": ctx.router.view_hash,
        "client_connections": len(ctx.connections),
        "requests": {
            "total": sum(m.responses),
            **{f"{i}xx": m.responses[i] for i in range(1, 6)},
        },
        "failovers": dict(sorted(m.failovers.items())),
        "retries": m.retries,
        "stale_retries": m.stale_retries,
        "bad_tokens": m.bad_tokens,
        "no_backend": m.no_backend,
        "backends": [_backend_info(ctx, b, now) for b in ctx.router.backends],
    }


async def _status(request: web.Request) -> web.Response:
    snapshot = status_snapshot(request.app[CTX_KEY])
    wants_json = (request.query.get("format") == "json"
                  or "application/json" in request.headers.get("Accept", ""))
    if wants_json:
        return web.json_response(snapshot)
    return web.Response(text=_render_html(snapshot), content_type="text/html")


async def _metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    body = ctx.metrics.render(ctx.router.backends, connections=len(ctx.connections))
    return web.Response(body=body.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})


async def _set_state(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    backend_id = request.match_info["backend_id"]
    text = (await request.text()).strip()
    if request.content_type == "application/json" and text.startswith("{"):
        try:
            text = str((await request.json()).get("state", ""))
        except ValueError:
            raise web.HTTPBadRequest(text="body is not valid JSON") from None
    try:
        b = ctx.router.set_admin_state(backend_id, text)
    except UnknownBackend as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except BadStateTransition as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    log.info("backend_state_changed", backend=b.id, state=b.state.value, by="admin")
    return web.json_response(_backend_info(ctx, b, time.monotonic()))


def _render_html(s: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for b in s["backends"]:
        bad = f"{b['bad_for_s']:.1f}s" if b["bad"] else ""
        rows.append(
            "<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in (
                b["id"], b["address"], b["state"], "yes" if b["healthy"] else "no",
                "yes" if b["in_view"] else "no", bad, b["routed"], b["failovers"],
                b["idle_connections"])) + "</tr>")
    failovers = ", ".join(f"{esc(k)}: {v}" for k, v in s["failovers"].items()) or "none"
    req = s["requests"]
    classes = " · ".join(f"{k} {req[k]}" for k in ("2xx", "3xx", "4xx", "5xx"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tandem proxy</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .8em;text-align:left}}</style></head>
<body><h1>tandem proxy</h1>
<p>Requests: {req['total']} ({classes}) · failovers: {failovers} ·
retries: {s['retries']} · bad tokens: {s['bad_tokens']} ·
client connections: {s['client_connections']} · view: {esc(s['view'])}</p>
<table><tr><th>backend</th><th>address</th><th>state</th><th>healthy</th><th>in view</th>
<th>bad for</th><th>requests routed</th><th>failovers</th><th>idle connections</th></tr>
{''.join(rows)}
</table></body></html>
"""
