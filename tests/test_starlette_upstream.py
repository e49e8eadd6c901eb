"""Starlette's own session tests (`tests/middleware/test_session.py`) against tandem.

The tests build their apps as written, with Starlette's `SessionMiddleware` and its options;
each app is served by a real tandem backend (tests/upstream.py), which puts its own session
in the middleware's place, and the tests' client talks to it over loopback. Only the
`test_client_factory` fixture is ours: it returns an httpx client (what Starlette's
`TestClient` is) whose requests go to that server — same URLs, `Host`, cookies and
redirects — instead of into the app in-process; an exception the app raises reaches the test
as with `TestClient(raise_server_exceptions=True)`. No assertion is changed. The cluster
file names the token cookie `session`, Starlette's default name, as its users would.

The file comes from the installed Starlette's sdist, fetched at test time (tests/sdists.py);
`TANDEM_UPSTREAM_STARLETTE` names a checkout of Starlette's repository (or the test file)
instead.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import httpx2 as httpx
import pytest

from backends.sessions.session import Session as TandemSession
from backends.sessions.store import LocalStore
from tests.upstream import ThreadedBackend, load_module, upstream_file

# backends/server.py passes shutdown_timeout to TCPSite, which aiohttp 3.10+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:shutdown_timeout:DeprecationWarning")

_FILE = upstream_file("TANDEM_UPSTREAM_STARLETTE", "tests/middleware/test_session.py",
                      "starlette")
# The file imports its fixture's type from the suite's tests/types.py, which needs the
# suite's own requirements: a stand-in gives the name.
_types = sys.modules.setdefault("tests.types", ModuleType("tests.types"))
_types.TestClientFactory = Callable[..., httpx.Client]  # type: ignore[attr-defined]
_upstream = load_module(_FILE, "starlette_upstream_test_session")


def _tandem_session(data: dict[str, Any] | None = None) -> TandemSession:
    """`Session(data)` as the suite writes it, made as tandem makes a request's session:
    over a stored session holding `data`. The suite's tests of Starlette's `Session` class
    (its change tracking) run on tandem's."""
    store = LocalStore(max_inactive_s=60)
    first = TandemSession(None, create=store.create)
    first.update(data or {})
    changes = first.collect_changes()
    assert first.record is not None
    first.record.apply(changes.set, changes.deleted)
    return TandemSession(first.record, create=store.create)


_upstream.Session = _tandem_session  # type: ignore[attr-defined]

for _name in dir(_upstream):
    if _name.startswith("test_") and callable(getattr(_upstream, _name)):
        globals()[_name] = getattr(_upstream, _name)


class _Raising:
    """The served app, remembering what it raised (the test client raises it again), and
    checking that its requests ran on tandem's session, not on one of the app's own."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.errors: list[BaseException] = []
        self.foreign: list[BaseException] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tandem = scope.get("session")
        try:
            await self.app(scope, receive, send)
        except Exception as exc:
            self.errors.append(exc)
            raise
        finally:
            if scope.get("session") is not tandem:
                self.foreign.append(AssertionError(
                    f"{scope['path']} ran on a {type(scope.get('session')).__name__}, "
                    f"not on tandem's session: the app's middleware replaced it"))


class _ToServer(httpx.BaseTransport):
    """Sends each request to the tandem backend, unchanged but for the address dialled."""

    def __init__(self, server: ThreadedBackend, served: _Raising, *, raise_errors: bool) -> None:
        self.server = server
        self.served = served
        self.raise_errors = raise_errors
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.server.port)
        sent = httpx.Request(request.method, url, headers=request.headers,
                             content=request.read())
        response = self.inner.handle_request(sent)
        content = response.read()
        if self.served.foreign:
            raise self.served.foreign.pop(0)
        if self.raise_errors and self.served.errors:
            raise self.served.errors.pop(0)
        return httpx.Response(response.status_code, headers=response.headers, content=content)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture
def test_client_factory(anyio_backend_name: str) -> Iterator[Callable[..., httpx.Client]]:
    # (anyio_backend_name: Starlette's suite runs each test once per anyio backend; the
    # server's loop is asyncio in both, the ids stay those of the suite)
    servers: dict[int, tuple[ThreadedBackend, _Raising]] = {}
    clients: list[httpx.Client] = []

    def factory(app: Any, base_url: str = "http://testserver",
                raise_server_exceptions: bool = True, root_path: str = "",
                cookies: Any = None, headers: dict[str, str] | None = None,
                follow_redirects: bool = True,
                client: tuple[str, int] = ("testclient", 50000)) -> httpx.Client:
        assert root_path == "", "a root_path cannot travel to a real server"
        if id(app) not in servers:
            served = _Raising(app)
            servers[id(app)] = (ThreadedBackend(served, session={"cookie_name": "session"})
                                .start(), served)
        server, served = servers[id(app)]
        http = httpx.Client(base_url=base_url, cookies=cookies, follow_redirects=follow_redirects,
                            headers={"user-agent": "testclient", **(headers or {})},
                            transport=_ToServer(server, served,
                                                raise_errors=raise_server_exceptions))
        clients.append(http)
        return http

    yield factory
    for http in clients:
        http.close()
    for server, _ in servers.values():
        server.stop()
