"""Flask's own session tests (the session and flashing tests of `tests/test_basic.py`) against
tandem's session interface.

The fixtures are Flask's (tests/conftest.py: `app` with `TESTING` and a `SECRET_KEY`,
`client`, `req_ctx`) plus the one line a user writes, `app.session_interface =
SessionInterface()`. Each test runs twice:

- `served`: every request of the test client goes over loopback to a real tandem backend
  hosting the app (tests/upstream.py), whose session, commit and `Set-Cookie` it gets. The
  app runs there on the very environ the client built, so what Flask's test client keeps of
  a request (`with client:` contexts, `request_ctx._session`) and what the app raises
  (`TESTING`) reach the test as they do in-process. The cluster file names the token cookie
  `session`, Flask's default name, as its users would.
- `own-client`: Flask's test client calls the app in-process, as a user's own test suite
  does; the interface then keeps the sessions in the test process.

No assertion is changed. Two tests of the group cannot apply and are reported as skipped with
the reason: both test the signing of Flask's cookie with `SECRET_KEY`, which tandem's
sessions do not use (the cookie carries a token signed with the cluster's secret).

The file comes from the installed Flask's sdist, fetched at test time (tests/sdists.py);
`TANDEM_UPSTREAM_FLASK` names a checkout of Flask's repository (or tests/test_basic.py) instead.
"""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.datastructures import Headers
from werkzeug.wsgi import get_current_url

from backends.frameworks.flask import SessionInterface
from backends.serve.wsgi import WsgiToAsgi
from tests.upstream import ThreadedBackend, load_module, upstream_file

# backends/server.py passes shutdown_timeout to TCPSite, which aiohttp 3.10+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:shutdown_timeout:DeprecationWarning")

_FILE = upstream_file("TANDEM_UPSTREAM_FLASK", "tests/test_basic.py", "Flask")
_upstream = load_module(_FILE, "flask_upstream_test_basic")

APPLICABLE = [
    "test_session_accessed",
    "test_session_path",
    "test_session_using_application_root",
    "test_session_using_session_settings",
    "test_session_using_samesite_attribute",
    "test_session_expiration",
    "test_session_stored_last",
    "test_session_special_types",
    "test_session_cookie_setting",
    "test_session_vary_cookie",
    "test_session_refresh_vary",
    "test_flashes",
    "test_extended_flashing",
]
NOT_APPLICABLE = {
    "test_missing_session": "without SECRET_KEY Flask has no session; tandem's sessions do "
                            "not need one",
    "test_session_secret_key_fallbacks": "rotating SECRET_KEY makes Flask's signed cookie "
                                         "unreadable; tandem's token is signed with the "
                                         "cluster's secrets (TANDEM_SECRETS rotates those)",
    "test_session_transactions_no_null_sessions": "(tests/test_testing.py) without "
                                                  "SECRET_KEY Flask opens no session; "
                                                  "tandem's sessions do not need one",
}

for _name in APPLICABLE:
    globals()[_name] = getattr(_upstream, _name)

# tests/test_testing.py: the test client's session support, which users' own suites rely on
_testing = load_module(_FILE.parent / "test_testing.py", "flask_upstream_test_testing")
APPLICABLE_TESTING = [
    "test_redirect_session",
    "test_session_transactions",
    "test_session_transactions_keep_context",
    "test_session_transaction_needs_cookies",
]
# `client.session_transaction()` opens and saves the session in the test process, where a
# user's own suite calls the app too; served, the app's sessions are on the server
IN_PROCESS_ONLY = {"test_session_transactions", "test_session_transactions_keep_context",
                   "test_session_transaction_needs_cookies"}
for _name in APPLICABLE_TESTING:
    globals()[_name] = getattr(_testing, _name)


def _not_applicable(reason: str) -> Any:
    def test() -> None:
        pytest.skip(f"not applicable: {reason}")
    return test


for _name, _reason in NOT_APPLICABLE.items():
    globals()[_name] = _not_applicable(_reason)


# --- the app, served by a real tandem backend -------------------------------------------------


class _Served:
    """A Flask app hosted by a tandem backend in this process, reached over loopback."""

    HEADER = "X-Upstream-Environ"

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.server: ThreadedBackend | None = None
        self.environs: dict[str, dict[str, Any]] = {}  # request key -> the client's environ
        self.errors: dict[str, BaseException] = {}

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        """What the backend hosts: the app, on the environ the test client built, with the
        session tandem opened for this request."""
        key = environ["HTTP_" + self.HEADER.upper().replace("-", "_")]
        original = self.environs.pop(key)
        original["tandem.session"] = environ["tandem.session"]
        original["tandem.server"] = environ["tandem.server"]
        try:
            return self.app(original, start_response)  # type: ignore[no-any-return]
        except BaseException as exc:
            self.errors[key] = exc
            raise

    def forward(self, environ: dict[str, Any]) -> tuple[Iterable[bytes], str, Headers]:
        if self.server is None:
            self.server = ThreadedBackend(WsgiToAsgi(self.wsgi),
                                          session={"cookie_name": "session"}).start()
        key = uuid.uuid4().hex
        body = environ["wsgi.input"].read()
        environ["wsgi.input"] = BytesIO(body)
        self.environs[key] = environ
        path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
        target = quote(path.encode("latin-1"), safe="/;=,@!$&'()*+:~")
        if environ.get("QUERY_STRING"):
            target += "?" + environ["QUERY_STRING"]
        headers = {k[5:].replace("_", "-"): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        headers[self.HEADER] = key
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        try:
            conn.request(environ["REQUEST_METHOD"], target, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            status, got = f"{resp.status} {resp.reason}", Headers(resp.getheaders())
        finally:
            conn.close()
        error = self.errors.pop(key, None)
        if error is not None:
            raise error  # as the app raised it in-process (TESTING propagates exceptions)
        return [data], status, got

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


class _ThroughTandem(FlaskClient):
    """Flask's test client, its requests sent to the tandem backend serving the app."""

    def run_wsgi_app(self, environ: dict[str, Any], buffered: bool = False,
                     ) -> tuple[Iterable[bytes], str, Headers]:
        # as werkzeug's Client.run_wsgi_app, with the call of the app replaced
        self._add_cookies_to_wsgi(environ)
        served: _Served = self.application.extensions["tandem_upstream"]
        rv = served.forward(environ)
        url = urlsplit(get_current_url(environ))
        self._update_cookies_from_response(url.hostname or "localhost", url.path,
                                           rv[2].getlist("Set-Cookie"))
        return rv


# --- Flask's fixtures (tests/conftest.py), with tandem's session interface --------------------


@pytest.fixture(params=["served", "own-client"])
def app(request: pytest.FixtureRequest) -> Iterator[Flask]:
    test = getattr(request.node, "originalname", request.node.name)
    if request.param == "served" and test in IN_PROCESS_ONLY:
        pytest.skip("a session transaction runs in the test process: it applies to the "
                    "app called in-process (own-client), as in a user's own suite")
    app = Flask("flask_test", root_path=str(_FILE.parent))
    app.config.update(TESTING=True, SECRET_KEY="test key")
    app.session_interface = SessionInterface()
    served: _Served | None = None
    if request.param == "served":
        served = _Served(app)
        app.extensions["tandem_upstream"] = served
        app.test_client_class = _ThroughTandem
    yield app
    if served is not None:
        served.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[Any]:
    with app.app_context() as ctx:
        yield ctx


@pytest.fixture
def req_ctx(app: Flask) -> Iterator[Any]:
    with app.test_request_context() as ctx:
        yield ctx
