"""Views of the example: a counter, log in (cycle_key) and log out (flush).

GET /              a page with the counter, a +1 link and a +1 form (URL rewriting at work)
GET|POST /inc      adds 1, redirects to /
GET /api/count     adds 1, returns JSON
GET /api/peek      returns JSON, changes nothing
GET /login?user=U  cycle_key() then remembers U: what django.contrib.auth.login does
GET /logout        flush(): what django.contrib.auth.logout does; the session ends
"""

from __future__ import annotations

from html import escape
from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.middleware.csrf import get_token
from django.views.decorators.http import require_http_methods


def _state(request: HttpRequest) -> dict[str, Any]:
    return {"counter": request.session.get("counter", 0), "user": request.session.get("user"),
            "server": _server(request), "framework": "django"}


def _server(request: HttpRequest) -> str | None:
    """The tandem server handling the request (WSGI: in the environ; ASGI: in the scope)."""
    scope = getattr(request, "scope", None)
    return request.META.get("tandem.server") or (scope or {}).get("tandem.server")


def home(request: HttpRequest) -> HttpResponse:
    state = _state(request)
    csrf = escape(get_token(request))
    return HttpResponse(f"""<!doctype html>
<html><head><title>tandem + Django</title></head><body>
<h1>Count: <span id="count">{state["counter"]}</span></h1>
<p>Served by <span id="server">{escape(str(state["server"]))}</span>.</p>
<p><a id="inc" href="/inc">+1</a></p>
<form action="/inc" method="post"><input type="hidden" name="csrfmiddlewaretoken"
  value="{csrf}"><button id="inc-post" type="submit">+1 (form)</button></form>
<p><a href="/login?user=alice">log in as alice</a> · <a href="/logout">log out</a></p>
</body></html>""")


@require_http_methods(["GET", "POST"])
def inc(request: HttpRequest) -> HttpResponse:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return HttpResponseRedirect("/", status=303)


def api_count(request: HttpRequest) -> HttpResponse:
    request.session["counter"] = request.session.get("counter", 0) + 1
    return JsonResponse(_state(request))


def api_peek(request: HttpRequest) -> HttpResponse:
    return JsonResponse(_state(request))


def login(request: HttpRequest) -> HttpResponse:
    request.session.cycle_key()
    request.session["user"] = request.GET.get("user", "alice")
    return JsonResponse(_state(request))


def logout(request: HttpRequest) -> HttpResponse:
    request.session.flush()
    return HttpResponseRedirect("/", status=303)
