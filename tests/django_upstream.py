"""Django's own session tests (`tests/sessions_tests` of its sdist) run against tandem.

    python -m tests.django_upstream UPSTREAM_TESTS_DIR RESULTS.json WORKDIR

Run by tests/test_django_upstream.py in a process of its own (Django is configured once per
process, and tests/test_frameworks.py configures it otherwise). Nothing of Django's tests is
copied or changed: this module only binds them to tandem's engine —

- a real cluster: servers s2 and s3 are `tandem backend` processes; s1 runs here, in a
  thread, serving a Django app; `SESSION_ENGINE = "backends.django"`;
- outside a request, the engine's sessions are s1's (`backends.django.use(manager, ...)`):
  every `save()` is s1's commit, replicated to the session's secondary;
- in a request: each test runs inside a request served by s1 (a view runs it), so the
  stores it makes are that request's tandem session.

Django's `SessionMiddlewareTests` run with Django's own `SessionMiddleware` and with
`backends.django.SessionMiddleware` (the name the tests call is pointed at it for the
test's duration). Tests that cannot apply are skipped here with the reason
(`NOT_APPLICABLE`); each test's outcome goes to RESULTS.json.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import json
import sys
import threading
import time
import traceback
import unittest
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

COOKIE_TESTS = {
    "test_secure_session_cookie", "test_httponly_session_cookie",
    "test_samesite_session_cookie", "test_no_httponly_session_cookie",
    "test_session_delete_on_end", "test_session_delete_on_end_with_custom_domain_and_path",
    "test_save_every_request_with_non_empty_session_renews_session_cookie",
}
_DB_MODEL = ("reads the session back from Django's database model (Session.objects.get); "
             "tandem's sessions are not rows of a table")
_OUR_COOKIE = ("asserts Django's own `sessionid` cookie on the response; in a request served "
               "by tandem, backends.django.SessionMiddleware sends none — tandem's token "
               "cookie names the session, written with the SESSION_COOKIE_* settings "
               "(tests/test_django_flows.py)")

# suite -> test -> why it cannot apply
NOT_APPLICABLE: dict[str, dict[str, str]] = {
    "middleware-django-outside": {"test_empty_session_saved": _DB_MODEL},
    "middleware-ours-outside": {"test_empty_session_saved": _DB_MODEL},
    "middleware-django-request": {"test_empty_session_saved": _DB_MODEL},
    "middleware-ours-request": {"test_empty_session_saved": _DB_MODEL,
                                **dict.fromkeys(COOKIE_TESTS, _OUR_COOKIE)},
}
# suite -> test -> why it fails by design (docs/frameworks.md); none now
DIFFERENCES: dict[str, dict[str, str]] = {}
SUITES = {
    "mixin-outside": "SessionTestsMixin, outside a request (sessions by key, s1's manager)",
    "mixin-request": "SessionTestsMixin, in a request served by tandem",
    "middleware-django-outside": "SessionMiddlewareTests, Django's SessionMiddleware, outside",
    "middleware-ours-outside": "SessionMiddlewareTests, backends.django.SessionMiddleware, "
                               "outside",
    "middleware-django-request": "SessionMiddlewareTests, Django's SessionMiddleware, in a "
                                 "request",
    "middleware-ours-request": "SessionMiddlewareTests, backends.django.SessionMiddleware, in "
                               "a request",
}


def configure(upstream: Path) -> None:
    sys.path.append(str(upstream))  # (last: its `backends` package is not ours)
    from django.conf import settings

    settings.configure(
        DEBUG=False, SECRET_KEY="django-upstream-harness",
        ALLOWED_HOSTS=["127.0.0.1", "testserver"], ROOT_URLCONF=__name__, MIDDLEWARE=[],
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions", "sessions_tests"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
        USE_TZ=True, TIME_ZONE="UTC", SESSION_ENGINE="backends.django",
        # Set, as a project does: Django's default would leave the cluster file's lifetime
        # (the layering rule, docs/frameworks.md) — test_default_expiry compares with it.
        SESSION_COOKIE_AGE=1209600)
    import django

    django.setup()


def build_classes() -> dict[str, type[unittest.TestCase]]:
    """The upstream test classes bound to tandem's engine, by suite."""
    from django.test import SimpleTestCase

    # Django's test package, from the sdist (not a distribution: imported by name)
    upstream: Any = importlib.import_module("sessions_tests.tests")

    from backends.django import SessionMiddleware as OurMiddleware
    from backends.django import SessionStore

    class TandemSessionTests(upstream.SessionTestsMixin, SimpleTestCase):  # type: ignore[misc]
        backend = SessionStore

    class DjangoMiddlewareTests(upstream.SessionMiddlewareTests):  # type: ignore[misc]
        pass

    class OurMiddlewareTests(upstream.SessionMiddlewareTests):  # type: ignore[misc]
        def setUp(self) -> None:
            # the tests call `SessionMiddleware` from their module: ours, for this test
            stock = upstream.SessionMiddleware
            upstream.SessionMiddleware = OurMiddleware
            self.addCleanup(setattr, upstream, "SessionMiddleware", stock)
            super().setUp()

    classes: dict[str, type[unittest.TestCase]] = {}
    for suite, base in (("mixin-outside", TandemSessionTests),
                        ("mixin-request", TandemSessionTests),
                        ("middleware-django-outside", DjangoMiddlewareTests),
                        ("middleware-ours-outside", OurMiddlewareTests),
                        ("middleware-django-request", DjangoMiddlewareTests),
                        ("middleware-ours-request", OurMiddlewareTests)):
        skips = {name: unittest.skip(reason)(lambda self: None)
                 for name, reason in NOT_APPLICABLE.get(suite, {}).items()}
        classes[suite] = type(f"{base.__name__}_{suite.replace('-', '_')}", (base,), skips)
    return classes


class Outcomes(unittest.TestResult):
    """Each test's outcome: pass, fail, error or skip, with the traceback or the reason."""

    def __init__(self) -> None:
        super().__init__()
        self.outcomes: dict[str, dict[str, str]] = {}

    def _put(self, test: unittest.TestCase, outcome: str, detail: str = "") -> None:
        name = test.id().rsplit(".", 1)[-1]
        if name.startswith(("setUpClass", "tearDownClass")) or " " in name:
            name = test.id()  # a class fixture or a subtest: its whole description
        if self.outcomes.get(name, {}).get("outcome") in ("fail", "error"):
            return  # a subtest failed already: that stays
        self.outcomes[name] = {"outcome": outcome, "detail": detail}

    def addSuccess(self, test: unittest.TestCase) -> None:
        self._put(test, "pass")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._put(test, "fail", self._exc_info_to_string(err, test))

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        self._put(test, "error", self._exc_info_to_string(err, test))

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self._put(test, "skip", reason)

    def addSubTest(self, test: unittest.TestCase, subtest: Any, err: Any) -> None:
        if err is not None:
            kind = "fail" if issubclass(err[0], test.failureException) else "error"
            self._put(test, kind, self._exc_info_to_string(err, test))

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        self._put(test, "fail", "expected failure: " + self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self._put(test, "pass")


def run_one(cls: type[unittest.TestCase], name: str) -> dict[str, str]:
    result = Outcomes()
    unittest.TestSuite([cls(name)]).run(result)
    return result.outcomes.get(name) or {"outcome": "error",
                                         "detail": json.dumps(result.outcomes)}


# --- the app s1 serves: a view that runs one test inside its request ------------------------

CLASSES: dict[str, type[unittest.TestCase]] = {}


def run_view(request: Any) -> Any:
    from django.http import JsonResponse

    from backends.serve.asgi import current_session

    assert current_session.get() is not None, "not in a request served by tandem"
    return JsonResponse(run_one(CLASSES[request.GET["suite"]], request.GET["test"]))


def _urls() -> list[Any]:
    from django.urls import path

    return [path("run", run_view), path("touch", touch_view)]


class ThreadedServer:
    """Server s1 of the cluster file, in a thread of this process (its own event loop)."""

    def __init__(self, config_path: Path, app: Any) -> None:
        self.config_path, self.app = config_path, app
        self.loop: asyncio.AbstractEventLoop | None = None
        self.server: Any = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-s1", daemon=True)

    def start(self) -> ThreadedServer:
        self._thread.start()
        self._ready.wait(60)
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start()
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        from backends.server import BackendServer
        from tandem.config import load

        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = BackendServer(config=load(self.config_path), server_id="s1", app=self.app)
        async with self.server:
            self._ready.set()
            await self._stop.wait()


def main(upstream: Path, out: Path, workdir: Path) -> int:
    configure(upstream)
    from django.core.handlers.wsgi import WSGIHandler
    from django.test.utils import setup_databases, setup_test_environment

    import backends.django
    from backends.serve.wsgi import WsgiToAsgi
    from tests.cluster import Cluster

    global urlpatterns
    urlpatterns = _urls()
    CLASSES.update(build_classes())
    setup_test_environment()
    setup_databases(verbosity=0, interactive=False)

    cluster = Cluster(workdir, n=3, app="tests.apps:asgi_counter", log_level="INFO")
    s1: ThreadedServer | None = None
    try:
        for sid in ("s2", "s3"):
            cluster.start_server(sid, wait=False)
        s1 = ThreadedServer(cluster.config_path, WsgiToAsgi(WSGIHandler())).start()
        for sid in ("s2", "s3"):
            cluster.wait_health(sid)
        cluster.wait_formed(["s1", "s2", "s3"], timeout=60)
        manager = s1.server.manager
        backends.django.use(manager, loop=s1.loop)

        results: dict[str, Any] = {}
        for suite, cls in CLASSES.items():
            names = unittest.TestLoader().getTestCaseNames(cls)
            outcomes = {}
            for name in names:
                if suite.endswith("-request"):
                    outcomes[name] = _in_request(cluster.url("s1"), suite, name)
                else:
                    outcomes[name] = run_one(cls, name)
            results[suite] = {"title": SUITES[suite], "tests": outcomes}
        results["s1_stats"] = dict(manager.stats)
        results["request_views_left"] = _views_left(cluster.url("s1"), manager)
        out.write_text(json.dumps(results, indent=1))
        return 0
    finally:
        backends.django.use(None)
        if s1 is not None:
            s1.stop()
        cluster.close()


def touch_view(request: Any) -> Any:
    """A request that makes a session and saves a value in it (tagged for _views_left)."""
    from django.http import JsonResponse

    from backends.django import SessionStore

    session = SessionStore()
    session["touched"] = True
    session.save()
    return JsonResponse({"key": session.session_key})


def _views_left(base: str, manager: Any) -> int:
    """How many of a few finished requests the engine still holds something of."""
    from backends.frameworks import django_request

    for _ in range(5):
        with urllib.request.urlopen(f"{base}/touch", timeout=10) as resp:
            resp.read()
    # (once the replication link's reply timers are past: a cancelled one keeps the
    # context of the request that made it until its deadline)
    time.sleep(manager.config.cluster.replication_timeout_s + 0.5)
    gc.collect()
    # (an entry goes when its session is collected: each one left is a live session)
    views = list(django_request._views.values())
    return sum(1 for view in views if dict.get(view.session, "touched"))


def _in_request(base: str, suite: str, name: str) -> dict[str, str]:
    query = urllib.parse.urlencode({"suite": suite, "test": name})
    try:
        with urllib.request.urlopen(f"{base}/run?{query}", timeout=60) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]
    except Exception:  # the request itself failed: that is the test's outcome
        return {"outcome": "error", "detail": traceback.format_exc()}


urlpatterns: list[Any] = []

if __name__ == "__main__":
    started = time.monotonic()
    code = main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    print(f"django upstream session tests: {time.monotonic() - started:.1f}s", file=sys.stderr)
    sys.exit(code)
