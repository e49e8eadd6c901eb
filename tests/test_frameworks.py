"""Starlette, FastAPI, Flask and Django apps on tandem's replicated session.

First each framework's session semantics on one in-process backend, then every example app
on real backend processes behind the real proxy, where a counter survives `kill -9` of its
primary.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.urls import path

from backends.serve.wsgi import WsgiToAsgi
from tests.cluster import Client
from tests.test_rewrite import local_backend

# backends/server.py passes shutdown_timeout to TCPSite, which aiohttp 3.10+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:shutdown_timeout:DeprecationWarning")


def jar() -> aiohttp.CookieJar:
    return aiohttp.CookieJar(unsafe=True)  # keeps cookies of 127.0.0.1


def token_of(response: aiohttp.ClientResponse) -> str | None:
    """The JSESSIONID value a response sets ('' when it clears it), None if it sets none."""
    for value in response.headers.getall("Set-Cookie", []):
        name, _, rest = value.partition("=")
        if name == "JSESSIONID":
            return rest.split(";", 1)[0]
    return None


async def get_json(http: aiohttp.ClientSession, url: str, **kw: Any) -> Any:
    async with http.get(url, **kw) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


# --- Starlette and FastAPI ------------------------------------------------------------------


@pytest.mark.parametrize("app", ["examples.starlette_app:app", "examples.fastapi_app:app"])
async def test_request_session_and_websocket_session_are_the_replicated_session(app):
    async with local_backend(app) as base, aiohttp.ClientSession(cookie_jar=jar()) as http:
        assert (await get_json(http, base + "/api/count"))["counter"] == 1
        async with http.ws_connect(base + "/ws") as ws:
            for n in (2, 3):
                await ws.send_str("+1")
                assert (await ws.receive_json())["counter"] == n
        # changes made over the socket are committed when it closes
        assert (await get_json(http, base + "/api/peek"))["counter"] == 3
        async with http.get(base + "/logout", allow_redirects=False) as resp:
            assert resp.status == 303
        assert (await get_json(http, base + "/api/peek"))["counter"] == 0


# --- Flask ----------------------------------------------------------------------------------


def flask_app() -> Any:
    from flask import Flask, flash, get_flashed_messages, jsonify, session

    from backends.frameworks.flask import FlaskSession, SessionInterface

    app = Flask("tandem_flask_test")
    app.session_interface = SessionInterface()
    app.permanent_session_lifetime = timedelta(seconds=120)

    def state(**extra: Any) -> Any:
        assert isinstance(session._get_current_object(), FlaskSession)  # type: ignore[attr-defined]
        return jsonify(counter=session.get("counter"), items=session.get("items"),
                       modified=session.modified, new=session.new,
                       permanent=session.permanent,
                       max_inactive_s=session.tandem.max_inactive_s if session else None,
                       **extra)

    @app.get("/read")
    def read() -> Any:
        return state()

    @app.get("/write")
    def write() -> Any:
        session["counter"] = session.get("counter", 0) + 1
        return state()

    @app.get("/mutate")
    def mutate() -> Any:
        items = session.get("items")
        if items is None:
            session["items"] = items = []
        items.append(len(items))  # in place, without session.modified = True
        return state()

    @app.get("/permanent")
    def permanent() -> Any:
        session.permanent = True
        return state()

    @app.get("/clear")
    def clear() -> Any:
        session.clear()
        return jsonify(modified=session.modified)

    @app.get("/bad")
    def bad() -> Any:
        try:
            session["bad"] = object()
        except TypeError as exc:
            return jsonify(error=str(exc))
        return jsonify(error=None)

    @app.get("/flash")
    def flash_it() -> Any:
        flash("saved", "info")
        return jsonify(ok=True)

    @app.get("/flashes")
    def flashes() -> Any:
        return jsonify(messages=get_flashed_messages(with_categories=True))

    return WsgiToAsgi(app)


async def test_flask_session_modified_new_and_in_place_changes():
    async with local_backend(flask_app()) as base, aiohttp.ClientSession(cookie_jar=jar()) as http:
        async with http.get(base + "/read") as resp:
            body = await resp.json()
            assert body["modified"] is False and body["counter"] is None
            assert token_of(resp) is None  # only read: no session is created
            assert "Cookie" in resp.headers["Vary"]
        body = await get_json(http, base + "/write")
        assert body["modified"] is True and body["new"] is True and body["counter"] == 1
        body = await get_json(http, base + "/read")
        assert body["modified"] is False and body["new"] is False and body["counter"] == 1
        await get_json(http, base + "/mutate")
        body = await get_json(http, base + "/mutate")
        assert body["items"] == [0, 1]
        assert (await get_json(http, base + "/read"))["items"] == [0, 1]


async def test_flask_permanent_session_lives_permanent_session_lifetime():
    async with local_backend(flask_app()) as base, aiohttp.ClientSession(cookie_jar=jar()) as http:
        body = await get_json(http, base + "/write")
        assert body["permanent"] is False and body["max_inactive_s"] == 1800
        await get_json(http, base + "/permanent")
        body = await get_json(http, base + "/read")
        assert body["permanent"] is True and body["max_inactive_s"] == 120


async def test_flask_clear_ends_the_session():
    async with local_backend(flask_app()) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/write") as resp:
            token = token_of(resp)
        cookie = {"Cookie": f"JSESSIONID={token}"}
        async with http.get(base + "/clear", headers=cookie) as resp:
            assert (await resp.json())["modified"] is True
            assert token_of(resp) == ""  # Flask deletes its cookie; tandem clears its token
        # the old token names nothing any more
        body = await get_json(http, base + "/read", headers=cookie)
        assert body["counter"] is None


async def test_flask_unreplicable_value_and_flashed_messages():
    async with local_backend(flask_app()) as base, aiohttp.ClientSession(cookie_jar=jar()) as http:
        body = await get_json(http, base + "/bad")
        assert "'bad'" in body["error"] and "object" in body["error"]
        await get_json(http, base + "/flash")
        assert (await get_json(http, base + "/flashes"))["messages"] == [["info", "saved"]]
        assert (await get_json(http, base + "/flashes"))["messages"] == []


# --- Django ---------------------------------------------------------------------------------
# This module is the test project's URLconf.


def _dj_state(request: HttpRequest, **extra: Any) -> JsonResponse:
    s = request.session
    return JsonResponse({"counter": s.get("counter"), "user": s.get("user"),
                         "key": s.session_key, "modified": s.modified, **extra})


def _dj_count(request: HttpRequest) -> JsonResponse:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return _dj_state(request)


def _dj_login(request: HttpRequest) -> JsonResponse:
    from django.contrib.sessions.backends.base import SessionBase
    assert isinstance(request.session, SessionBase)
    request.session.cycle_key()
    request.session["user"] = "alice"
    return _dj_state(request)


def _dj_logout(request: HttpRequest) -> JsonResponse:
    request.session.flush()
    return _dj_state(request)


def _dj_relogin(request: HttpRequest) -> JsonResponse:
    request.session.flush()  # django.contrib.auth.login with another user: flush, then write
    request.session["user"] = "bob"
    return _dj_state(request)


def _dj_expiry(request: HttpRequest) -> JsonResponse:
    request.session.set_expiry(300)
    return _dj_state(request, age=request.session.get_expiry_age())


def _dj_fail(request: HttpRequest) -> HttpResponse:
    request.session["counter"] = 1000
    return HttpResponse("failed", status=500)


urlpatterns = [
    path("count", _dj_count),
    path("peek", _dj_state),
    path("login", _dj_login),
    path("logout", _dj_logout),
    path("relogin", _dj_relogin),
    path("expiry", _dj_expiry),
    path("fail", _dj_fail),
]


def _dj_auth_login(request: HttpRequest) -> JsonResponse:
    from django.contrib.auth import login
    from django.contrib.auth.models import User

    login(request, User.objects.get(username=request.GET["user"]),
          backend="django.contrib.auth.backends.ModelBackend")
    return _dj_state(request, who=request.user.username)


def _dj_auth_me(request: HttpRequest) -> JsonResponse:
    return _dj_state(request, who=request.user.username)


def _dj_auth_logout(request: HttpRequest) -> JsonResponse:
    from django.contrib.auth import logout

    logout(request)
    return _dj_state(request, who=request.user.username)


urlpatterns += [
    path("auth/login", _dj_auth_login),
    path("auth/me", _dj_auth_me),
    path("auth/logout", _dj_auth_logout),
]


@pytest.fixture(scope="module")
def django_settings(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """This process's Django: this module's URLs, tandem's sessions, auth on SQLite."""
    from django.conf import settings

    if not settings.configured:
        db = tmp_path_factory.mktemp("django") / "db.sqlite3"
        settings.configure(
            SECRET_KEY="test", ALLOWED_HOSTS=["127.0.0.1"], ROOT_URLCONF=__name__,
            INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth"],
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(db)}},
            USE_TZ=True, TIME_ZONE="UTC", SESSION_ENGINE="backends.django",
            MIDDLEWARE=["backends.django.SessionMiddleware",
                        "django.contrib.auth.middleware.AuthenticationMiddleware"])
        import django
        from django.core.management import call_command

        django.setup()
        from django.contrib.auth.models import User

        call_command("migrate", verbosity=0)
        User.objects.create(username="alice")
        User.objects.create(username="bob")
    return settings


def django_app(interface: str) -> Any:
    if interface == "asgi":
        from django.core.handlers.asgi import ASGIHandler
        return ASGIHandler()
    from django.core.handlers.wsgi import WSGIHandler
    return WsgiToAsgi(WSGIHandler())


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
async def test_django_login_cycles_the_key_and_logout_flushes(django_settings, interface):
    async with local_backend(django_app(interface)) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/count") as resp:
            first = token_of(resp)
            body = await resp.json()
        # Django's rule: a new session has its key once it is saved (here: at the response)
        assert first and body["counter"] == 1 and body["key"] is None
        assert not any(c.startswith("sessionid=") for c in resp.headers.getall("Set-Cookie"))
        old = {"Cookie": f"JSESSIONID={first}"}

        async with http.get(base + "/login", headers=old) as resp:
            cycled = token_of(resp)
            assert (await resp.json())["modified"] is True
        assert cycled and cycled.split("!")[0] != first.split("!")[0]  # a new session id
        new = {"Cookie": f"JSESSIONID={cycled}"}
        body = await get_json(http, base + "/peek", headers=new)
        assert body["counter"] == 1 and body["user"] == "alice"  # same data
        assert body["key"] == cycled.split("!")[0]
        assert (await get_json(http, base + "/peek", headers=old))["counter"] is None

        async with http.get(base + "/logout", headers=new) as resp:
            assert token_of(resp) == ""  # the client's token is cleared
        body = await get_json(http, base + "/peek", headers=new)
        assert body["counter"] is None and body["user"] is None and body["key"] is None


async def test_django_flush_then_write_is_a_new_session(django_settings):
    async with local_backend(django_app("wsgi")) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/count") as resp:
            first = token_of(resp)
        async with http.get(base + "/relogin", headers={"Cookie": f"JSESSIONID={first}"}) as r:
            second = token_of(r)
        assert second and second.split("!")[0] != first.split("!")[0]
        body = await get_json(http, base + "/peek", headers={"Cookie": f"JSESSIONID={second}"})
        assert body["user"] == "bob" and body["counter"] is None


async def test_django_expiry_and_5xx(django_settings):
    async with local_backend(django_app("wsgi")) as base, aiohttp.ClientSession(
            cookie_jar=jar()) as http:
        await get_json(http, base + "/count")
        assert (await get_json(http, base + "/expiry"))["age"] == 300
        async with http.get(base + "/fail") as resp:
            assert resp.status == 500
        assert (await get_json(http, base + "/peek"))["counter"] == 1  # not saved on a 5xx


@pytest.mark.parametrize("interface", ["wsgi", "asgi"])
async def test_django_auth_login_and_logout(django_settings, interface):
    async with local_backend(django_app(interface)) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/count") as resp:
            anonymous = token_of(resp)
        async with http.get(base + "/auth/login?user=alice",
                            headers={"Cookie": f"JSESSIONID={anonymous}"}) as resp:
            alice = token_of(resp)
            assert (await resp.json())["who"] == "alice"
        assert alice and alice.split("!")[0] != anonymous.split("!")[0]  # cycle_key()
        as_alice = {"Cookie": f"JSESSIONID={alice}"}
        body = await get_json(http, base + "/auth/me", headers=as_alice)
        assert body["who"] == "alice" and body["counter"] == 1
        assert (await get_json(http, base + "/auth/me",
                               headers={"Cookie": f"JSESSIONID={anonymous}"}))["who"] == ""
        # another user on the same session: login() flushes, then writes
        async with http.get(base + "/auth/login?user=bob", headers=as_alice) as resp:
            bob = token_of(resp)
        assert bob and bob.split("!")[0] != alice.split("!")[0]
        body = await get_json(http, base + "/auth/me", headers={"Cookie": f"JSESSIONID={bob}"})
        assert body["who"] == "bob" and body["counter"] is None
        async with http.get(base + "/auth/logout",
                            headers={"Cookie": f"JSESSIONID={bob}"}) as resp:
            assert token_of(resp) == ""
        body = await get_json(http, base + "/auth/me", headers={"Cookie": f"JSESSIONID={bob}"})
        assert body["who"] == "" and body["key"] is None


async def test_django_own_session_middleware_works_too(django_settings):
    from django.test.utils import override_settings

    stock = ["django.contrib.sessions.middleware.SessionMiddleware"]
    with override_settings(MIDDLEWARE=stock):
        app = django_app("wsgi")
    async with local_backend(app) as base, aiohttp.ClientSession(cookie_jar=jar()) as http:
        async with http.get(base + "/count") as resp:
            cookies = resp.headers.getall("Set-Cookie")
        # its extra cookie holds the bare id; the token is what names the session
        assert any(c.startswith("JSESSIONID=") for c in cookies)
        assert any(c.startswith("sessionid=") for c in cookies)
        assert (await get_json(http, base + "/count"))["counter"] == 2


# --- every example, on real processes, kill -9 of the primary ------------------------------

EXAMPLES = {
    "starlette": "examples.starlette_app:app",
    "fastapi": "examples.fastapi_app:app",
    "flask": "examples.flask_app:app",
    "django": "examples.django_app.wsgi:application",
}


@pytest.mark.parametrize("framework", list(EXAMPLES))
def test_example_counter_survives_kill_of_its_primary_through_the_proxy(make_cluster,
                                                                         framework):
    cluster = make_cluster(app=EXAMPLES[framework], n=3).start(proxy=True)
    c = Client(cluster.proxy_url)
    for n in (1, 2, 3):
        status, body = c.get("/api/count")
        assert status == 200 and body["counter"] == n and body["framework"] == framework
    sid, primary, secondary = c.route
    assert body["server"] == primary and secondary not in ("NONE", primary)

    cluster.kill(primary)

    status, body = c.get("/api/count")
    assert status == 200, body
    assert body["counter"] == 4 and body["server"] == secondary
    assert c.route[:2] == (sid, secondary)
    status, body = c.get("/")
    assert status == 200 and '<span id="count">4</span>' in body  # the page, from the survivor
