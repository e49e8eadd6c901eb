"""The rules every framework shares (docs/frameworks.md), each on a real backend in this
process: the session is a dict, a 5xx commits nothing whoever sends it, `Vary: Cookie`, the
token cookie written with a framework's settings layered over the cluster file's, and
Flask's values and its own test client."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from flask import Flask, jsonify
from flask import session as flask_session
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware as StarletteSessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from structlog.testing import capture_logs

from backends.frameworks.flask import SessionInterface
from backends.serve.wsgi import WsgiToAsgi
from tests.test_rewrite import local_backend

# backends/server.py passes shutdown_timeout to TCPSite, which aiohttp 3.10+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:shutdown_timeout:DeprecationWarning")


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # keeps cookies of 127.0.0.1


def set_cookie(resp: aiohttp.ClientResponse) -> str | None:
    values = resp.headers.getall("Set-Cookie", [])
    return values[0] if values else None


# --- Starlette: the session is a dict ---------------------------------------------------------


def _starlette(middleware: list[Middleware] | None = None) -> Starlette:
    async def view(request: Request) -> JSONResponse:
        return JSONResponse({"session": request.session,
                             "is_dict": isinstance(request.session, dict)})

    async def ops(request: Request) -> JSONResponse:
        s = request.session
        s |= {"a": 1, "b": [1]}
        s.update(c="x")
        s.setdefault("d", {"k": 0})["k"] += 1  # in place, through setdefault's value
        s["b"].append(2)                       # in place, through a read
        popped = s.popitem()                   # the newest key
        copy = s.copy()
        with_more = s | {"z": 0}
        try:
            s["bad"] = object()
        except TypeError as exc:
            error = str(exc)
        return JSONResponse({"popped": popped, "copy_type": type(copy).__name__,
                             "or": with_more, "error": error, "session": s})

    async def put(request: Request) -> JSONResponse:
        request.session.update(await request.json())
        return JSONResponse({"session": request.session})

    async def clear(request: Request) -> JSONResponse:
        request.session.clear()
        return JSONResponse({"session": request.session})

    async def fail(request: Request) -> Response:
        request.session["failed"] = True
        raise RuntimeError("written, then failed")

    async def unavailable(request: Request) -> Response:
        request.session["failed"] = True
        request.session.invalidate()  # not even this: the response is a 5xx
        return Response("later", status_code=503)

    async def nothing(request: Request) -> Response:
        return Response("", headers={"Vary": "Accept-Encoding"})

    async def read(request: Request) -> Response:
        return Response(str(request.session.get("a")), headers={"Vary": "Accept-Encoding"})

    return Starlette(routes=[
        Route("/view", view), Route("/ops", ops, methods=["POST"]),
        Route("/put", put, methods=["POST"]), Route("/clear", clear, methods=["POST"]),
        Route("/fail", fail), Route("/unavailable", unavailable), Route("/nothing", nothing),
        Route("/read", read)], middleware=middleware)


async def test_starlette_session_is_a_dict_with_every_dict_operation() -> None:
    async with local_backend(_starlette()) as base, aiohttp.ClientSession(
            cookie_jar=jar()) as http:
        async with http.get(base + "/view") as resp:
            assert await resp.json() == {"session": {}, "is_dict": True}
        async with http.post(base + "/ops") as resp:
            body = await resp.json()
        assert body["popped"] == ["d", {"k": 1}] and body["copy_type"] == "dict"
        assert body["or"] == {"a": 1, "b": [1, 2], "c": "x", "z": 0}
        assert "'bad'" in body["error"] and "bad" not in body["session"]
        async with http.get(base + "/view") as resp:  # committed, in-place changes too
            assert (await resp.json())["session"] == {"a": 1, "b": [1, 2], "c": "x"}


async def test_clear_ends_the_session_and_deletes_its_cookie() -> None:
    async with local_backend(_starlette()) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(base + "/put", json={"a": 1}) as resp:
            token = set_cookie(resp).split(";")[0]  # type: ignore[union-attr]
        async with http.post(base + "/clear", headers={"Cookie": token}) as resp:
            assert (await resp.json())["session"] == {}
            assert set_cookie(resp).startswith("JSESSIONID=;")  # type: ignore[union-attr]
        async with http.get(base + "/view", headers={"Cookie": token}) as resp:
            assert (await resp.json())["session"] == {}  # the old token names nothing


@pytest.mark.parametrize("path", ["/fail", "/unavailable"])
async def test_a_5xx_commits_nothing_whoever_sends_it(path: str) -> None:
    # /fail: the handler raises after writing; Starlette's ServerErrorMiddleware sends the
    # 500 head. /unavailable: the handler writes, invalidates and answers 503 itself.
    async with local_backend(_starlette()) as base, aiohttp.ClientSession(
            cookie_jar=jar()) as http:
        async with http.get(base + path) as resp:  # a new session, made by a failure
            assert resp.status >= 500 and set_cookie(resp) is None
        async with http.post(base + "/put", json={"a": 1}) as resp:
            assert resp.status == 200
        async with http.get(base + path) as resp:
            assert resp.status >= 500 and set_cookie(resp) is None
        async with http.get(base + "/view") as resp:
            assert (await resp.json())["session"] == {"a": 1}


async def test_vary_cookie_when_the_session_was_read_or_written() -> None:
    async with local_backend(_starlette()) as base, aiohttp.ClientSession(
            cookie_jar=jar()) as http:
        async with http.get(base + "/nothing") as resp:
            assert resp.headers.getall("Vary") == ["Accept-Encoding"]
        async with http.get(base + "/read") as resp:  # read only, no session yet
            assert resp.headers.getall("Vary") == ["Accept-Encoding, Cookie"]
        async with http.post(base + "/put", json={"a": 1}) as resp:
            assert resp.headers.getall("Vary") == ["Cookie"]


async def test_starlette_session_middleware_kept_by_the_app_sets_tandems_cookie() -> None:
    kept = Middleware(StarletteSessionMiddleware, secret_key="unused", session_cookie="sid",
                      max_age=600, path="/", same_site="strict", domain="example.test")
    with capture_logs() as logs:
        async with local_backend(_starlette([kept]), session={
                "cookie_secure": True}) as base, aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.post(base + "/put", json={"a": 1}) as resp:
                cookie = set_cookie(resp)
            token = cookie.split(";")[0]  # type: ignore[union-attr]
            assert cookie == (f"{token}; path=/; Max-Age=600; httponly; samesite=strict; "
                              "domain=example.test; secure")  # the cluster's Secure stays
            async with http.get(base + "/view", headers={"Cookie": token}) as resp:
                assert (await resp.json())["session"] == {"a": 1}  # tandem's, not a cookie's
                assert set_cookie(resp) is None  # read only: Starlette re-sends none
            async with http.post(base + "/put", json={"b": 2}, headers={"Cookie": token}) as r:
                assert set_cookie(r) == cookie  # a write: a new Max-Age, same token
    assert any(e["event"] == "session_cookie_name_ignored" and e["setting"] == "sid"
               for e in logs)


# --- Flask ----------------------------------------------------------------------------------


NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ID = uuid.UUID("12345678-1234-5678-1234-567812345678")


def _flask(**config: Any) -> Flask:
    app = Flask("tandem_rules")
    app.config.update(config)
    app.session_interface = SessionInterface()

    @app.get("/write")
    def write() -> Any:
        flask_session.update(t=(1, 2), b=b"\xff", m=Markup("<b>"), u=ID, d=NOW,
                             tag={" t": "not a tuple"})
        return jsonify(ok=True)

    @app.get("/types")
    def types() -> Any:
        s = flask_session
        return jsonify(t=s["t"] == (1, 2), b=s["b"] == b"\xff", m=type(s["m"]) is Markup,
                       u=s["u"] == ID, d=s["d"] == NOW, tag=s["tag"] == {" t": "not a tuple"})

    @app.get("/bad")
    def bad() -> Any:
        try:
            flask_session["x"] = object()
        except TypeError as exc:
            return jsonify(error=str(exc))
        return jsonify(error=None)

    @app.get("/fail")
    def fail() -> Any:
        flask_session["t"] = "changed"
        raise RuntimeError("written, then failed")  # Flask answers 500 (not TESTING)

    @app.get("/permanent")
    def permanent() -> Any:
        flask_session.permanent = True
        return jsonify(max_inactive_s=flask_session.tandem.max_inactive_s)

    return app


async def test_flask_values_come_back_as_flasks_serializer_gives_them() -> None:
    async with local_backend(WsgiToAsgi(_flask())) as base, aiohttp.ClientSession(
            cookie_jar=jar()) as http:
        async with http.get(base + "/write") as resp:
            assert resp.status == 200
        async with http.get(base + "/types") as resp:  # a later request: the stored form
            assert set((await resp.json()).values()) == {True}
        async with http.get(base + "/bad") as resp:
            assert "'x'" in (await resp.json())["error"]
        async with http.get(base + "/fail") as resp:
            assert resp.status == 500
        async with http.get(base + "/types") as resp:
            assert (await resp.json())["t"] is True  # the failed request's write: dropped


async def test_flask_cookie_settings_layered_over_the_cluster_file() -> None:
    app = _flask(SESSION_COOKIE_NAME="flask_name", SESSION_COOKIE_PATH="/app",
                 SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_DOMAIN="example.test",
                 PERMANENT_SESSION_LIFETIME=timedelta(hours=2))
    with capture_logs() as logs:
        async with local_backend(WsgiToAsgi(app), session={
                "cookie_secure": True}) as base, aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.get(base + "/permanent") as resp:
                cookie = set_cookie(resp) or ""
            async with http.get(base + "/permanent",
                                headers={"Cookie": cookie.split(";")[0]}) as resp:
                assert (await resp.json())["max_inactive_s"] == 7200  # on the servers
    attrs = [a.strip() for a in cookie.split(";")]
    assert attrs[0].startswith("JSESSIONID=")  # the cluster file's name: the proxy's
    assert {"Domain=example.test", "Path=/app", "SameSite=Strict", "HttpOnly",
            "Secure"} <= set(attrs)  # Flask's settings; the cluster's Secure stays
    expires = next(a for a in attrs if a.startswith("Expires="))
    assert str(datetime.now(UTC).year) in expires  # a permanent session: Expires
    assert any(e["event"] == "session_cookie_name_ignored" for e in logs)


def test_flask_own_test_client_and_session_transaction() -> None:
    app = _flask()
    client = app.test_client()
    with client.session_transaction() as sess:
        sess["t"] = (3, 4)
    with client:
        client.get("/write")  # (each value stored as Flask's serializer tags it)
        assert flask_session["t"] == (1, 2)
    assert set(client.get("/types").get_json().values()) == {True}
    with client.session_transaction() as sess:
        assert sess["u"] == ID and type(sess["b"]) is bytes
        sess.clear()
    assert client.get("/types").status_code == 500  # the session ended: no "t"
    assert json.loads(client.get("/bad").data)["error"]


async def test_the_cluster_files_settings_where_the_app_leaves_its_frameworks_defaults() -> None:
    cluster = {"cookie_path": "/c", "cookie_samesite": "Strict"}
    defaults = Middleware(StarletteSessionMiddleware, secret_key="unused")
    async with local_backend(_starlette([defaults]), session=cluster) as base, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(base + "/put", json={"a": 1}) as resp:
            assert set_cookie(resp).endswith(  # type: ignore[union-attr]
                "; path=/c; Max-Age=1209600; httponly; samesite=strict")
    for config, path, samesite in (({}, "Path=/c", "SameSite=Strict"),
                                   ({"APPLICATION_ROOT": "/app", "SESSION_COOKIE_SAMESITE":
                                     "Lax"}, "Path=/app", "SameSite=Lax")):
        async with local_backend(WsgiToAsgi(_flask(**config)), session=cluster) as base, \
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
            async with http.get(base + "/write") as resp:
                attrs = {a.strip() for a in (set_cookie(resp) or "").split(";")}
            assert {path, samesite} <= attrs, attrs
