"""A Django app's real flows through a 3-server cluster behind the proxy.

`django.contrib.auth` login and logout, CSRF tokens kept in the session
(`CSRF_USE_SESSIONS`), `django.contrib.messages` kept in the session — with
`SESSION_ENGINE = "backends.django"` and tandem's session middleware or Django's own — while
the session's primary is killed (`kill -9`) in the middle. The app is
tests/django_flows_app.py; its users live in a SQLite file the servers share.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
APPS = {"wsgi": "tests.django_flows_app:application",
        "asgi": "tests.django_flows_app:asgi_application"}


@pytest.fixture
def django_cluster(make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Starts the flows app on a 3-server cluster behind the proxy (users alice and bob)."""

    def start(*, middleware: str = "tandem", interface: str = "wsgi",
              settings: str = "{}") -> Cluster:
        db = tmp_path / "users.sqlite3"
        monkeypatch.setenv("TANDEM_TEST_DJANGO_DB", str(db))
        monkeypatch.setenv("TANDEM_TEST_DJANGO_MIDDLEWARE", middleware)
        monkeypatch.setenv("TANDEM_TEST_DJANGO_SETTINGS", settings)
        if not db.exists():
            subprocess.run([sys.executable, "-c", "from tests.django_flows_app import "
                            "make_users; make_users('alice', 'bob')"], cwd=ROOT, check=True,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        cluster: Cluster = make_cluster(app=APPS[interface], n=3)
        return cluster.start(proxy=True)

    return start


class Browser:
    """A client keeping its cookies, as a browser does (redirects are not followed)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.close()

    async def get(self, path: str, **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False, **kw) as resp:
            return resp.status, await _body(resp), resp

    async def post(self, path: str, data: dict[str, str],
                   **kw: Any) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False,
                                  **kw) as resp:
            return resp.status, await _body(resp), resp

    @property
    def token(self) -> str | None:
        values = [c.value for c in self.http.cookie_jar if c.key == "JSESSIONID"]
        return values[0] if values and values[0] else None

    @property
    def route(self) -> tuple[str, str, str]:
        assert self.token is not None
        sid, primary, rest = self.token.split("!")
        return sid, primary, rest.split(".", 1)[0]


async def _body(resp: aiohttp.ClientResponse) -> Any:
    if resp.content_type == "application/json":
        return await resp.json()
    return await resp.text()


def set_cookies(resp: aiohttp.ClientResponse, name: str) -> list[str]:
    return [v for v in resp.headers.getall("Set-Cookie", []) if v.startswith(name + "=")]


async def log_in(b: Browser, user: str) -> str:
    """Django's login form, its CSRF token from the session; the token the client holds."""
    status, form, _ = await b.get("/login")
    assert status == 200
    anonymous = b.route[0]
    status, _, resp = await b.post("/login", {"username": user, "password": user[::-1],
                                              "csrfmiddlewaretoken": form["csrf"]})
    assert status == 302 and resp.headers["Location"] == "/home"
    assert b.route[0] != anonymous  # auth.login cycled the key: a new session id
    return form["csrf"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("middleware,interface", [
    ("tandem", "wsgi"), ("django", "wsgi"), ("tandem", "asgi")])
async def test_login_csrf_messages_survive_kill_of_the_primary_and_logout_ends_it(
        django_cluster: Any, middleware: str, interface: str) -> None:
    cluster = django_cluster(middleware=middleware, interface=interface)
    async with Browser(cluster.proxy_url) as b:
        form_csrf = await log_in(b, "alice")
        status, page, resp = await b.get("/home")
        assert status == 200 and page["user"] == "alice"
        assert page["messages"] == ["welcome alice"]
        assert "Cookie" in resp.headers.get("Vary", "")
        csrf = page["csrf"]  # (masked anew by each get_token(); its secret is the session's)
        sid, primary, secondary = b.route
        assert page["server"] == primary and secondary not in ("NONE", primary)
        status, page, _ = await b.post("/note", {"text": "a", "csrfmiddlewaretoken": csrf})
        assert status == 200 and page["notes"] == ["a"]

        cluster.kill(primary)  # kill -9, with a message waiting in the session

        status, page, _ = await b.get("/home")
        assert status == 200, page
        assert page["server"] == secondary and b.route[:2] == (sid, secondary)
        assert page["user"] == "alice" and page["notes"] == ["a"]
        assert page["messages"] == ["noted a"]  # delivered, once
        status, page, _ = await b.get("/home")
        assert page["messages"] == [] and page["user"] == "alice"
        # the CSRF token from before the failover is still the session's
        status, page, _ = await b.post("/note", {"text": "b", "csrfmiddlewaretoken": csrf})
        assert status == 200 and page["notes"] == ["a", "b"]
        for wrong in ("x" * 64, form_csrf):  # (the login form's: rotated by the login)
            status, _, _ = await b.post("/note", {"text": "c", "csrfmiddlewaretoken": wrong})
            assert status == 403

        before_logout = b.token
        status, _, _ = await b.post("/logout", {"csrfmiddlewaretoken": csrf})
        assert status == 302
        # the message written after the flush is a new session's
        assert b.token is not None and b.route[0] != sid
        status, page, _ = await b.get("/home")
        assert page["user"] is None and page["notes"] == []
        assert page["messages"] == ["logged out"]

    # the session that was logged out is gone: its token names nothing any more
    async with Browser(cluster.proxy_url) as other:
        status, page, _ = await other.get(
            "/home", headers={"Cookie": f"JSESSIONID={before_logout}"})
        assert status == 200 and page["user"] is None and page["notes"] == []

        # a logout writing nothing after it ends the session: the token is cleared
        await log_in(other, "bob")
        status, page, _ = await other.get("/home")
        assert page["user"] == "bob"
        bob = other.token
        status, _, resp = await other.post("/logout-quietly",
                                           {"csrfmiddlewaretoken": page["csrf"]})
        assert status == 204
        cleared = set_cookies(resp, "JSESSIONID")
        assert len(cleared) == 1 and "Max-Age=0" in cleared[0], cleared
        assert other.token is None
        if middleware == "django":  # and Django's own cookie is deleted as Django does
            django_cookie = set_cookies(resp, "sessionid")
            assert len(django_cookie) == 1 and "Max-Age=0" in django_cookie[0]
        status, page, _ = await other.get("/home", headers={"Cookie": f"JSESSIONID={bob}"})
        assert page["user"] is None


@pytest.mark.parametrize("middleware", ["tandem", "django"])
async def test_save_makes_the_key_expiry_ends_it_and_5xx_saves_nothing(
        django_cluster: Any, middleware: str) -> None:
    cluster = django_cluster(middleware=middleware)
    async with Browser(cluster.proxy_url) as b:
        # `if not request.session.session_key: request.session.save()`
        status, page, resp = await b.get("/new-key")
        assert status == 200 and page["key"] is not None and page["key"] == b.route[0]
        # no SESSION_COOKIE_AGE of the project's: the cluster file's browser-session cookie
        (cookie,) = set_cookies(resp, "JSESSIONID")
        assert "Max-Age" not in cookie and "expires" not in cookie.lower()
        status, page, _ = await b.get("/new-key")
        assert page["key"] == b.route[0]  # the same session
        key = page["key"]
        status, page, _ = await b.get("/empty")  # clear(), not flush(): it stays
        assert status == 200 and page["key"] == key and b.route[0] == key
        assert (await b.get("/new-key"))[1]["key"] == key

        # set_expiry() in the past ends the session: the values are gone
        token = b.token
        status, page, resp = await b.get("/expire?seconds=-1")
        assert status == 200 and page["age"] == -1
        assert b.token is None, set_cookies(resp, "JSESSIONID")
        status, page, _ = await b.get("/home", headers={"Cookie": f"JSESSIONID={token}"})
        assert page["notes"] == []

        # set_expiry(seconds): the session's lifetime, and the cookie's as Django sets it
        status, page, resp = await b.get("/expire?seconds=300")
        assert page["age"] == 300
        (cookie,) = set_cookies(resp, "JSESSIONID")
        assert "Max-Age=300" in cookie and "HttpOnly" in cookie
        status, page, _ = await b.get("/home")
        assert page["notes"] == ["doomed"]

        # a 5xx response saves nothing (Django's rule, with either middleware)
        status, _, _ = await b.get("/fail")
        assert status == 500
        status, page, _ = await b.get("/home")
        assert page["notes"] == ["doomed"]

        # a change in place: saved by tandem's middleware; by Django's only with `modified`
        status, page, _ = await b.get("/in-place")
        assert status == 200 and page["notes"] == ["doomed", "in place"]
        status, page, _ = await b.get("/home")
        assert page["notes"] == (["doomed", "in place"] if middleware == "tandem"
                                 else ["doomed"])


async def test_django_json_serializer_values_come_back_as_from_djangos_engines(
        django_cluster: Any) -> None:
    cluster = django_cluster()  # SESSION_SERIALIZER: Django's default, JSON
    async with Browser(cluster.proxy_url) as b:
        status, page, _ = await b.get("/values?json=1")
        assert status == 200
        # what JSON cannot take is refused at the assignment, naming the key
        assert "session['bad']" in page["error"] and "function" in page["error"]
        status, page, _ = await b.get("/values/read")
        assert page["pair"] == "[3, 4]"  # a tuple comes back a list, as from Django's engines


async def test_a_projects_session_serializer_decides_what_a_value_is(
        django_cluster: Any) -> None:
    cluster = django_cluster(
        settings='{"SESSION_SERIALIZER": "tests.django_flows_app.PickleSerializer"}')
    async with Browser(cluster.proxy_url) as b:
        status, page, _ = await b.get("/values")
        assert status == 200
        # what the serializer cannot take is refused at the assignment, naming the key
        assert "session['bad']" in page["error"] and "function" in page["error"]
        _, primary, _ = b.route
        cluster.kill(primary)  # what comes back comes from the secondary's copy
        status, page, _ = await b.get("/values/read")
        assert status == 200
        assert page["values"] == repr({
            "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
            "pair": (1, 2), "raw": b"\x00\xff", "tags": {"a"}})
        assert page["pair"] == "(3, 4)"


async def test_session_cookie_settings_shape_the_token_cookie(django_cluster: Any) -> None:
    cluster = django_cluster(settings='{"SESSION_COOKIE_SAMESITE": "Strict", '
                                      '"SESSION_COOKIE_DOMAIN": "127.0.0.1", '
                                      '"SESSION_COOKIE_HTTPONLY": false, '
                                      '"SESSION_COOKIE_SECURE": true, '
                                      '"SESSION_COOKIE_AGE": 600}')
    async with aiohttp.ClientSession() as http:
        async with http.get(cluster.proxy_url + "/new-key") as resp:
            (cookie,) = set_cookies(resp, "JSESSIONID")
            assert resp.headers.getall("Set-Cookie") == [cookie]  # no `sessionid` of Django
    attrs = {a.strip().split("=")[0].lower(): a.strip().partition("=")[2]
             for a in cookie.split(";")[1:]}
    assert attrs["samesite"] == "Strict" and attrs["domain"] == "127.0.0.1"
    assert attrs["max-age"] == "600" and "expires" in attrs and "secure" in attrs
    assert "httponly" not in attrs and attrs["path"] == "/"


async def test_write_racing_a_logout_is_interrupted(django_cluster: Any) -> None:
    """Django's rule: a request saving a session that a concurrent request deleted raises
    SessionInterrupted (400), rather than resurrect it or drop its write silently."""
    cluster = django_cluster()
    async with Browser(cluster.proxy_url) as b:
        await log_in(b, "alice")
        status, page, _ = await b.get("/home")
        csrf = page["csrf"]
        slow = asyncio.ensure_future(b.get("/slow-note?wait=1.5"))
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as other:  # the same session, another tab
            async with other.post(cluster.proxy_url + "/logout-quietly",
                                  data={"csrfmiddlewaretoken": csrf},
                                  headers={"Cookie": f"JSESSIONID={b.token}"}) as resp:
                assert resp.status == 204
        status, body, _ = await slow
        assert status == 400, body


def test_a_projects_own_test_client_works_unchanged(tmp_path: Path) -> None:
    """Outside tandem (a project's test suite, Django's test client) the engine keeps the
    sessions in the process: login, the client's session, logout work as with Django's."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_TEST_DJANGO_MIDDLEWARE="tandem",
               TANDEM_TEST_DJANGO_DB=str(tmp_path / "users.sqlite3"))
    script = ("import json; from tests.django_flows_app import make_users, client_flow; "
              "make_users('alice'); print(json.dumps(client_flow()))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, timeout=120,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["login"] is True and seen["home"]["user"] == "alice"
    assert seen["home"]["messages"] == [] and seen["notes"] == ["from the test"]
    assert seen["note"] == ["from the test", "b"] and seen["after_logout"] is None
