"""The admin listener (`proxy.admin`, aiohttp): status page, Prometheus metrics, and
backend state changes at run time.

- `GET  /__tandem/status`               HTML (refreshes itself); JSON with
                                        `Accept: application/json` or `?format=json`
- `GET  /__tandem/metrics`              Prometheus text exposition
- `POST /__tandem/backends/{id}/state`  body `up`, `draining` or `down`
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from .context import ProxyContext
from .errors import BadStateTransition, UnknownBackend
from .metrics import CONTENT_TYPE, metrics_registry
from .router import Backend
from .status import StatusBoard
from .status_page import render_html
from .worker_stats import WorkerStats

__all__ = ["make_admin_app", "status_snapshot", "CTX_KEY", "BOARD_KEY"]

log = structlog.get_logger("tandem.proxy")

CTX_KEY = web.AppKey("tandem_proxy_context", ProxyContext)
BOARD_KEY = web.AppKey("tandem_status_board", StatusBoard)
_REGISTRY_KEY = web.AppKey("tandem_metrics_registry", CollectorRegistry)
_STATS_KEY = web.AppKey("tandem_worker_stats", WorkerStats)  # (several workers only)


def make_admin_app(ctx: ProxyContext, stats: WorkerStats | None = None) -> web.Application:
    """`stats`: several workers; the metrics are their sums, the status lists them."""
    app = web.Application()
    app[CTX_KEY] = ctx
    app[BOARD_KEY] = StatusBoard(ctx.router)
    if stats is not None:
        app[_STATS_KEY] = stats
    app[_REGISTRY_KEY] = metrics_registry(ctx.metrics, backends=lambda: ctx.router.backends,
                                          connections=lambda: len(ctx.connections),
                                          summed=stats.summed if stats is not None else None)
    app.router.add_get("/__tandem/status", _status)
    app.router.add_get("/__tandem/metrics", _metrics)
    app.router.add_post("/__tandem/backends/{backend_id}/state", _set_state)
    return app


def _backend_info(board: StatusBoard, b: Backend, now: float) -> dict[str, Any]:
    bad_for = max(0.0, b.bad_until - now)
    report = board.report(b)
    return {
        "id": b.id,
        "address": str(b.address),
        # the one state to act on (the status page's legend says what each means)
        "state_summary": report.status.value,
        "state_detail": report.detail,
        "since": round(report.since, 3),  # epoch s: when state_summary last changed
        "since_s_ago": round(report.age_s, 1),
        # the facts it is derived from
        "state": b.state.value,
        "admin_state": b.admin_state.value,
        "healthy": b.healthy,
        "in_view": b.in_view,
        "says_draining": b.says_draining,
        "learned": b.learned,
        "bad": bad_for > 0,
        "bad_for_s": round(bad_for, 3),
        "bad_until": round(time.time() + bad_for, 3) if bad_for > 0 else None,  # epoch s
        "probe_successes": b.probe_successes,
        "probe_failures": b.probe_failures,
        # counters
        "routed": b.routed,
        "failovers": b.failovers,
        "connect_errors": b.connect_errors,
        "io_errors": b.io_errors,
        "idle_connections": b.pool.idle_count if b.pool is not None else 0,
    }


def status_snapshot(ctx: ProxyContext, board: StatusBoard) -> dict[str, Any]:
    """Everything the status page shows, as plain data."""
    m = ctx.metrics
    now = time.monotonic()
    backends = ctx.router.backends
    return {
        "generated_at": round(time.time(), 3),  # epoch s
        "view": ctx.router.view_hash,
        # (a probe has run: the counters of one in a row are never both 0 after it)
        "active_probes": any(b.probe_successes or b.probe_failures for b in backends),
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
        "backends": [_backend_info(board, b, now) for b in backends],
    }


async def _status(request: web.Request) -> web.Response:
    snapshot = status_snapshot(request.app[CTX_KEY], request.app[BOARD_KEY])
    stats = request.app.get(_STATS_KEY)
    if stats is not None:  # (several workers: the counters above are this one's)
        snapshot["workers"] = [{"index": w["index"], "pid": w["pid"],
                                "client_connections": w["connections"],
                                "requests": sum(w["responses"])} for w in stats.workers()]
    wants_json = (request.query.get("format") == "json"
                  or "application/json" in request.headers.get("Accept", ""))
    if wants_json:
        return web.json_response(snapshot)
    return web.Response(text=render_html(snapshot), content_type="text/html",
                        headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[_REGISTRY_KEY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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
    stats = request.app.get(_STATS_KEY)
    if stats is not None:  # the other workers apply it too
        stats.publish_admin_state(b.id, b.admin_state.value)
    return web.json_response(_backend_info(request.app[BOARD_KEY], b, time.monotonic()))
