"""Live flows through a 3-server cluster behind the proxy, the session's primary killed (-9)
in the middle: Flask-Login logging in and out, and a FastAPI app answering with the session
itself as JSON (apps: tests/framework_apps.py)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from email.message import Message
from typing import Any
from urllib.parse import urlencode

from tests.cluster import Cluster


class Browser:
    """One client holding the token cookie (`JSESSIONID`, the cluster file's name)."""

    def __init__(self, base: str, *, cookie_name: str = "JSESSIONID") -> None:
        self.base = base
        self.cookie_name = cookie_name
        self.token: str | None = None
        self.set_cookies: list[str] = []  # of the last response

    def request(self, method: str, path: str, *, json_body: Any = None,
                form: dict[str, str] | None = None) -> tuple[int, Any, Message]:
        data, headers = None, {}
        if json_body is not None:
            data, headers["Content-Type"] = json.dumps(json_body).encode(), "application/json"
        elif form is not None:
            data = urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if self.token:
            headers["Cookie"] = f"{self.cookie_name}={self.token}"
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as resp:
                status, body, got = resp.status, resp.read(), resp.headers
        except urllib.error.HTTPError as exc:
            status, body, got = exc.code, exc.read(), exc.headers
        self.set_cookies = got.get_all("Set-Cookie") or []
        for value in self.set_cookies:
            name, _, rest = value.partition("=")
            if name == self.cookie_name:
                self.token = rest.split(";", 1)[0] or None
        try:
            return status, json.loads(body), got
        except ValueError:
            return status, body.decode(errors="replace"), got

    @property
    def route(self) -> tuple[str, str, str]:
        assert self.token is not None
        sid, primary, rest = self.token.split("!")
        return sid, primary, rest.split(".", 1)[0]


def _varies_on_cookie(headers: Message) -> bool:
    return any("cookie" in (v or "").lower() for v in headers.get_all("Vary") or [])


def test_flask_login_login_logout_across_a_kill_of_the_primary(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(app="tests.framework_apps:flask_login_app", n=3).start()
    b = Browser(cluster.proxy_url)
    status, _, got = b.request("GET", "/me")
    assert status == 401 and b.token is None  # Flask-Login read the session: none made
    assert _varies_on_cookie(got)
    assert b.request("GET", "/hello")[0] == 200
    anonymous = b.route[0]

    status, body, got = b.request("POST", "/login", form={"user": "alice"})
    assert status == 200 and body["user"] == "alice"
    assert b.route[0] != anonymous  # a new id at login
    cookie = b.set_cookies[0]
    assert "HttpOnly" in cookie and "Path=/" in cookie  # written as Flask writes its own
    for visits in (1, 2):
        status, body, _ = b.request("GET", "/me")
        assert status == 200 and body["user"] == "alice" and body["visits"] == visits
    _, primary, secondary = b.route
    assert body["server"] == primary and secondary not in ("NONE", primary)

    cluster.kill(primary)  # mid-flow: logged in, a message flashed and not yet shown

    status, body, _ = b.request("GET", "/me")
    assert status == 200, body
    assert body["user"] == "alice" and body["visits"] == 3 and body["server"] == secondary
    status, body, _ = b.request("GET", "/flashes")
    assert body["flashes"] == [["info", "welcome alice"]] and body["tuples"] is True
    assert b.request("GET", "/flashes")[1]["flashes"] == []

    status, body, _ = b.request("GET", "/fail")  # writes, then answers 500: not committed
    assert status == 500
    assert b.request("GET", "/me")[1]["visits"] == 4

    status, body, _ = b.request("GET", "/logout")
    assert status == 200 and body["user"] is None
    assert b.request("GET", "/me")[0] == 401
    status, body, _ = b.request("POST", "/login", form={"user": "bob"})
    assert status == 200 and b.request("GET", "/me")[1]["user"] == "bob"


def test_fastapi_session_as_json_across_a_kill_of_the_primary(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(app="tests.framework_apps:fastapi_app", n=3).start()
    b = Browser(cluster.proxy_url)
    status, body, got = b.request("POST", "/session", json_body={"a": 1})
    assert status == 200 and body["session"] == {"a": 1} and b.token is not None
    assert _varies_on_cookie(got)
    status, body, _ = b.request("POST", "/session",
                                json_body={"b": [1, 2], "c": {"x": "y"}, "d": None})
    assert body["session"] == {"a": 1, "b": [1, 2], "c": {"x": "y"}, "d": None}
    status, body, _ = b.request("POST", "/popitem")
    assert body["popped"] == ["d", None]  # the newest key, as a dict's popitem
    sid, primary, secondary = b.route
    assert secondary not in ("NONE", primary)

    cluster.kill(primary)  # mid-flow

    status, body, _ = b.request("GET", "/session")
    assert status == 200, body
    assert body == {"session": {"a": 1, "b": [1, 2], "c": {"x": "y"}}, "server": secondary}
    assert b.route[:2] == (sid, secondary)

    status, _, _ = b.request("GET", "/fail")  # writes, raises: Starlette's 500 page
    assert status == 500
    assert b.request("GET", "/session")[1]["session"] == {"a": 1, "b": [1, 2],
                                                          "c": {"x": "y"}}

    token = b.token
    status, body, _ = b.request("POST", "/clear")
    assert status == 200 and body["session"] == {} and b.token is None  # cookie cleared
    b.token = token  # the old token names nothing any more
    status, body, got = b.request("GET", "/session")
    assert status == 200 and body["session"] == {} and not b.set_cookies


def test_popitem_takes_the_newest_key_after_a_failover(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(app="tests.framework_apps:fastapi_app", n=3).start()
    b = Browser(cluster.proxy_url)
    keys = [f"k{i}" for i in range(8)]
    b.request("POST", "/session", json_body={"a": 1})  # (sent whole to the secondary)
    b.request("POST", "/session", json_body=dict.fromkeys(keys, 0))  # a change of 8 keys
    cluster.kill(b.route[1])
    popped = [b.request("POST", "/popitem")[1]["popped"][0] for _ in keys]
    assert popped == keys[::-1]  # (right by chance once in 8! = 40320 runs)
