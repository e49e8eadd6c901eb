"""The Django project of tests/test_django_flows.py, served by real tandem backends.

    tandem backend ... --app tests.django_flows_app:application    (WSGI)
    tandem backend ... --app tests.django_flows_app:asgi_application

`django.contrib.auth` (users in the SQLite file `$TANDEM_TEST_DJANGO_DB`, shared by the
servers), CSRF tokens kept in the session (`CSRF_USE_SESSIONS`), `django.contrib.messages`
kept in the session, and `SESSION_ENGINE = "backends.django"` with the session middleware
named by `$TANDEM_TEST_DJANGO_MIDDLEWARE` (tandem's, or Django's own); more settings may
come as JSON in `$TANDEM_TEST_DJANGO_SETTINGS`. Views answer JSON.
"""

from __future__ import annotations

import datetime
import json
import os
import pickle
import time
from typing import Any

import django
from django.conf import settings

MIDDLEWARE = {
    "tandem": "backends.django.SessionMiddleware",
    "django": "django.contrib.sessions.middleware.SessionMiddleware",
}

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="django-flows-test", ALLOWED_HOSTS=["127.0.0.1", "testserver"],
        ROOT_URLCONF=__name__, USE_TZ=True, TIME_ZONE="UTC",
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions", "django.contrib.messages"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3",
                               "NAME": os.environ.get("TANDEM_TEST_DJANGO_DB", ":memory:")}},
        MIDDLEWARE=[MIDDLEWARE[os.environ.get("TANDEM_TEST_DJANGO_MIDDLEWARE", "tandem")],
                    "django.middleware.common.CommonMiddleware",
                    "django.middleware.csrf.CsrfViewMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware",
                    "django.contrib.messages.middleware.MessageMiddleware"],
        SESSION_ENGINE="backends.django",
        CSRF_USE_SESSIONS=True,
        MESSAGE_STORAGE="django.contrib.messages.storage.session.SessionStorage",
        PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"],  # (fast)
        **json.loads(os.environ.get("TANDEM_TEST_DJANGO_SETTINGS", "{}")),
    )
    django.setup()

from django.contrib import messages  # noqa: E402 - Django is configured first
from django.contrib.auth import authenticate, login, logout  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.middleware.csrf import get_token  # noqa: E402
from django.shortcuts import redirect  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.http import require_POST  # noqa: E402


def _state(request: HttpRequest, **extra: Any) -> JsonResponse:
    scope = getattr(request, "scope", None) or {}
    return JsonResponse({
        "user": request.user.get_username() if request.user.is_authenticated else None,
        "messages": [str(m) for m in messages.get_messages(request)],
        "notes": request.session.get("notes", []),
        "csrf": get_token(request),
        "key": request.session.session_key,
        "server": request.META.get("tandem.server") or scope.get("tandem.server"),
        **extra})


def home(request: HttpRequest) -> HttpResponse:
    return _state(request)


def login_view(request: HttpRequest) -> HttpResponse:
    if request.method == "GET":
        return JsonResponse({"csrf": get_token(request)})  # the form's token
    user = authenticate(request, username=request.POST["username"],
                        password=request.POST["password"])
    if user is None:
        return JsonResponse({"error": "bad credentials"}, status=403)
    login(request, user)
    messages.success(request, f"welcome {user.get_username()}")
    return redirect("/home")


@require_POST
def note(request: HttpRequest) -> HttpResponse:
    request.session["notes"] = [*request.session.get("notes", []), request.POST["text"]]
    messages.info(request, f"noted {request.POST['text']}")  # shown by the next page
    return JsonResponse({"notes": request.session["notes"]})


@require_POST
def logout_view(request: HttpRequest) -> HttpResponse:
    logout(request)
    messages.info(request, "logged out")  # written after the flush: a new session
    return redirect("/home")


@require_POST
def logout_quietly(request: HttpRequest) -> HttpResponse:
    logout(request)
    return HttpResponse(status=204)


def new_key(request: HttpRequest) -> HttpResponse:
    """Django's idiom for a key before any value: save() makes the session."""
    if not request.session.session_key:
        request.session.save()
    return JsonResponse({"key": request.session.session_key})


def empty(request: HttpRequest) -> HttpResponse:
    """clear() (not flush()): the session stays, with its key and no values."""
    request.session.clear()
    return JsonResponse({"key": request.session.session_key})


def append_in_place(request: HttpRequest) -> HttpResponse:
    """Changes a value in place, without an assignment (Django's middleware saves that only
    with `session.modified = True`; tandem's saves it)."""
    request.session["notes"].append("in place")
    return JsonResponse({"notes": request.session["notes"]})


def expire_now(request: HttpRequest) -> HttpResponse:
    request.session["notes"] = ["doomed"]
    request.session.set_expiry(int(request.GET.get("seconds", "-1")))
    return JsonResponse({"age": request.session.get_expiry_age()})


def slow_note(request: HttpRequest) -> HttpResponse:
    """Reads the session, waits (while another request logs out), then writes."""
    request.session.get("notes")
    time.sleep(float(request.GET.get("wait", "1")))
    request.session["notes"] = [*request.session.get("notes", []), "late"]
    return JsonResponse({"ok": True})


class PickleSerializer:
    """A project's own SESSION_SERIALIZER (Django 5 dropped its pickle one): any type."""

    def dumps(self, obj: Any) -> bytes:
        return pickle.dumps(obj)

    def loads(self, data: bytes) -> Any:
        return pickle.loads(data)  # noqa: S301 - the test's own data


def store_values(request: HttpRequest) -> HttpResponse:
    """Stores a few values of various types; says what an unserializable one raises."""
    if "json" not in request.GET:  # (what Django's JSON serializer cannot take)
        request.session["values"] = {
            "when": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),
            "pair": (1, 2), "raw": b"\x00\xff", "tags": {"a"}}
    request.session["pair"] = (3, 4)
    try:
        request.session["bad"] = lambda: None
    except TypeError as exc:
        error = str(exc)
    else:
        error = None
    return JsonResponse({"error": error})


def read_values(request: HttpRequest) -> HttpResponse:
    return JsonResponse({key: repr(request.session.get(key)) for key in ("values", "pair")})


def fail(request: HttpRequest) -> HttpResponse:
    request.session["notes"] = ["from a failed request"]
    return HttpResponse("failed", status=500)


urlpatterns = [
    path("home", home), path("login", login_view), path("note", note),
    path("logout", logout_view), path("logout-quietly", logout_quietly),
    path("new-key", new_key), path("empty", empty), path("expire", expire_now),
    path("slow-note", slow_note), path("in-place", append_in_place),
    path("fail", fail), path("values", store_values), path("values/read", read_values),
]


def make_users(*names: str) -> None:
    """Create the database and the users (password: the name backwards)."""
    from django.contrib.auth.models import User
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    for name in names:
        User.objects.create_user(name, password=name[::-1])


def client_flow() -> dict[str, Any]:
    """What a project's own test suite does, no tandem server anywhere: Django's test client
    (`login()`, `session`, requests, `logout()`) calling the app in this process."""
    from django.test import Client

    client, seen = Client(), {}
    seen["login"] = client.login(username="alice", password="ecila")
    seen["home"] = client.get("/home").json()
    session = client.session  # a store by key, outside any request
    session["notes"] = ["from the test"]
    session.save()
    seen["notes"] = client.get("/home").json()["notes"]
    seen["note"] = client.post("/note", {"text": "b"}).json()["notes"]
    client.logout()
    seen["after_logout"] = client.get("/home").json()["user"]
    return seen


def __getattr__(name: str) -> Any:
    # the WSGI or ASGI handler, made when the server asks for it
    if name == "application":
        from django.core.handlers.wsgi import WSGIHandler
        return WSGIHandler()
    if name == "asgi_application":
        from django.core.handlers.asgi import ASGIHandler
        return ASGIHandler()
    raise AttributeError(name)
