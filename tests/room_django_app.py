"""A room in a Django view (`--app tests.room_django_app:application`, or
`:asgi_application`), for tests/test_app_sessions.py.

    GET /post?room=K&msg=M    (a sync view) room K: append M to "log", incr "n"
    GET /apost?room=K&msg=M   (an async view) the same, `await`ing the room
"""

from __future__ import annotations

from typing import Any

import django
from django.conf import settings

if not settings.configured:
    settings.configure(
        DEBUG=False, SECRET_KEY="room-test", ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=__name__, USE_TZ=True, INSTALLED_APPS=["django.contrib.sessions"],
        MIDDLEWARE=["backends.django.SessionMiddleware"], SESSION_ENGINE="backends.django")
    django.setup()

from django.core.asgi import get_asgi_application  # noqa: E402 - Django is configured first
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402


def _answer(request: HttpRequest, room: Any) -> JsonResponse:
    return JsonResponse({"room": dict(room), "members": room.members,
                         "primary": room.primary, "server": request.META.get("tandem.server")
                         or request.scope["tandem.server"]})


def post(request: HttpRequest) -> JsonResponse:
    room = request.session.app_session(request.GET["room"])
    room.append("log", request.GET["msg"])
    room.incr("n")
    return _answer(request, room)


async def apost(request: HttpRequest) -> JsonResponse:
    room = await request.session.app_session(request.GET["room"])
    room.append("log", request.GET["msg"])
    room.incr("n")
    return _answer(request, room)


urlpatterns = [path("post", post), path("apost", apost)]
application = get_wsgi_application()
asgi_application = get_asgi_application()
