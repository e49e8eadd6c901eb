"""URL rewriting for cookie-less clients: the rewriter alone, then behind a real backend."""

from __future__ import annotations

import contextlib
import gzip
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from backends.serve.rewrite import (
    HtmlRewriter,
    Origin,
    UrlRewriteMiddleware,
    rewrite_html,
    rewrite_url,
)
from backends.server import BackendServer, load_app
from tandem.config import loads
from tests.cluster import free_ports

# backends/server.py passes shutdown_timeout to TCPSite, which aiohttp 3.10+ deprecates
pytestmark = pytest.mark.filterwarnings("ignore:shutdown_timeout:DeprecationWarning")

TOKEN = "c2lk!s1!s2.SIG-x_y"
P = ";jsessionid=" + TOKEN


@contextlib.asynccontextmanager
async def local_backend(app: Any, *, session: dict[str, Any] | None = None,
                        ) -> AsyncIterator[str]:
    """One real backend server in this process (no peers); yields its base URL."""
    http, repl = free_ports(2)
    lines = ["[cluster]", 'name = "t"', 'secrets = ["test-secret"]', "[session]",
             'replication = "none"']
    lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}"
              for k, v in (session or {}).items()]
    lines += ["[[servers]]", 'id = "s1"', f'http = "127.0.0.1:{http}"',
              f'replication = "127.0.0.1:{repl}"']
    config = loads("\n".join(lines))
    asgi = load_app(app) if isinstance(app, str) else app
    async with BackendServer(config=config, server_id="s1", app=asgi):
        yield f"http://127.0.0.1:{http}"


def origin(host: str = "example.com:8080", path: str = "/app/page") -> Origin:
    return Origin({"type": "http", "headers": [(b"host", host.encode())], "scheme": "http",
                   "raw_path": path.encode()})


# --- single URLs --------------------------------------------------------------------------


@pytest.mark.parametrize("url,expected", [
    ("/x", "/x" + P),
    ("x", "x" + P),
    ("../x?a=1#f", "../x" + P + "?a=1#f"),
    ("/x;jsessionid=OLD?q=1", "/x" + P + "?q=1"),       # a stale token is replaced
    ("..", "../" + P),                                   # still a dot segment
    ("?page=2", "./page" + P + "?page=2"),               # keeps the path, new token
    ("http://example.com:8080", "http://example.com:8080/" + P),
    ("http://example.com:8080/a?b#c", "http://example.com:8080/a" + P + "?b#c"),
    ("HTTP://EXAMPLE.COM:8080/Z", "HTTP://EXAMPLE.COM:8080/Z" + P),
    ("//example.com:8080/y", "//example.com:8080/y" + P),
    ("http://user@example.com:8080/u", "http://user@example.com:8080/u" + P),
    # left alone: other origins, same document, other schemes
    ("http://example.com/x", None),                      # port 80 is another origin
    ("http://evil.example/x", None),
    ("//evil.example/y", None),
    ("#top", None),
    ("", None),
    ("mailto:a@example.com", None),
    ("javascript:void(0)", None),
    ("data:text/html,hi", None),
])
def test_rewrite_url(url, expected):
    got = rewrite_url(url, param="jsessionid", token=TOKEN, origin=origin())
    assert got == (url if expected is None else expected)


def test_default_ports_and_ipv6_hosts_compare_as_origins():
    assert rewrite_url("http://example.com:80/x", param="jsessionid", token=TOKEN,
                       origin=origin("example.com")) == "http://example.com:80/x" + P
    assert rewrite_url("http://[::1]:9000/x", param="jsessionid", token=TOKEN,
                       origin=origin("[::1]:9000")) == "http://[::1]:9000/x" + P


# --- HTML -----------------------------------------------------------------------------------

PAGE = (b'<!doctype html><html><head><link rel="stylesheet" href="/s.css"></head><body>'
        b'<a href="/a">a</a> <A HREF=b>b</A> <img src=\'/i.png\' alt="x > y">'
        b'<form action="/f" method="post"><button formaction="/g">go</button></form>'
        b'<a title="1 > 0" href="/q?x=1&amp;y=2">q</a> <a data-href="/no" href="http://o.example/">'
        b"o</a><p>5 < 6 and 7 > 3</p><script>if (a<b) { x = '<a href=\"/js\">' } // don't"
        b'</script><a href="#top">top</a><a href="mailto:m@example.com">m</a><a href=/end>'
        b"</a></body></html>")
EXPECTED = (b'<!doctype html><html><head><link rel="stylesheet" href="/s.css' + P.encode()
            + b'"></head><body><a href="/a' + P.encode() + b'">a</a> <A HREF=b' + P.encode()
            + b'>b</A> <img src=\'/i.png' + P.encode() + b'\' alt="x > y"><form action="/f'
            + P.encode() + b'" method="post"><button formaction="/g' + P.encode()
            + b'">go</button></form><a title="1 > 0" href="/q' + P.encode()
            + b'?x=1&amp;y=2">q</a> <a data-href="/no" href="http://o.example/">o</a>'
            b"<p>5 < 6 and 7 > 3</p><script>if (a<b) { x = '<a href=\"/js\">' } // don't"
            b'</script><a href="#top">top</a><a href="mailto:m@example.com">m</a><a href=/end'
            + P.encode() + b"></a></body></html>")


def test_rewrite_html_whole_page():
    assert rewrite_html(PAGE, param="jsessionid", token=TOKEN, origin=origin()) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 61])
def test_rewrite_html_in_chunks_gives_the_same_bytes(size):
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=origin())
    out = b""
    for i in range(0, len(PAGE), size):
        part = rewriter.feed(PAGE[i:i + size], final=i + size >= len(PAGE))
        out += part
        assert len(out) >= i + size - 40  # only a cut tag is held back
    assert out == EXPECTED


# --- the middleware alone -------------------------------------------------------------------


async def run(app: Any, *, via: str | None = None, token: str | None = TOKEN,
              method: str = "GET", max_carry: int = 16384) -> list[dict[str, Any]]:
    """Run `app` behind the rewriter; returns the messages that reached the server."""
    sent: list[dict[str, Any]] = []
    scope = {"type": "http", "method": method, "path": "/app/page", "raw_path": b"/app/page",
             "query_string": b"", "scheme": "http", "headers": [(b"host", b"example.com:8080")],
             "tandem.token_via": via}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw = UrlRewriteMiddleware(app, param_name="jsessionid", token_of=lambda s: token,
                              max_carry_bytes=max_carry)
    await mw(scope, receive, send)
    return sent


def html_app(chunks: list[bytes], *, headers: list[tuple[bytes, bytes]] | None = None,
             status: int = 200, content_type: bytes = b"text/html; charset=utf-8") -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", content_type),
            (b"content-length", str(sum(map(len, chunks))).encode()), *(headers or [])]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk,
                        "more_body": i < len(chunks) - 1})
    return app


def head_of(sent: list[dict[str, Any]]) -> dict[bytes, bytes]:
    assert sent[0]["type"] == "http.response.start"
    return dict(sent[0]["headers"])


def body_of(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


async def test_one_message_html_gets_its_exact_content_length():
    sent = await run(html_app([PAGE]))
    assert body_of(sent) == EXPECTED
    assert head_of(sent)[b"content-length"] == str(len(EXPECTED)).encode()


async def test_streamed_html_is_rewritten_chunk_wise_and_loses_content_length():
    chunks = [PAGE[i:i + 50] for i in range(0, len(PAGE), 50)]
    sent = await run(html_app(chunks))
    assert body_of(sent) == EXPECTED
    assert b"content-length" not in head_of(sent)
    assert len(sent) > 5  # streamed on, not gathered into one message


async def test_head_request_drops_content_length():
    sent = await run(html_app([b""]), method="HEAD")
    assert b"content-length" not in head_of(sent)


async def test_a_long_non_tag_is_let_go_unchanged():
    junk = b"<a " + b"x" * 5000
    sent = await run(html_app([junk, b' href="/a">', b"end"]), max_carry=1000)
    assert body_of(sent) == junk + b' href="/a">end'


async def test_non_html_streams_through_untouched():
    seen: list[int] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"application/json"), (b"content-length", b"20")]})
        for i in range(4):
            seen.append(len(sent))  # what had reached the server when this chunk was made
            await send({"type": "http.response.body", "body": b'"/a" ', "more_body": i < 3})

    scope = {"type": "http", "method": "GET", "path": "/", "raw_path": b"/",
             "query_string": b"", "headers": [(b"host", b"h")], "tandem.token_via": None}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    mw = UrlRewriteMiddleware(app, param_name="jsessionid", token_of=lambda s: TOKEN)
    await mw(scope, lambda: None, send)  # type: ignore[arg-type]
    assert seen == [1, 2, 3, 4]  # head and each chunk passed on at once, nothing held
    assert head_of(sent)[b"content-length"] == b"20" and body_of(sent) == b'"/a" ' * 4


async def test_compressed_html_is_left_alone():
    packed = gzip.compress(PAGE)
    sent = await run(html_app([packed], headers=[(b"content-encoding", b"gzip")]))
    assert body_of(sent) == packed
    assert head_of(sent)[b"content-length"] == str(len(packed)).encode()


@pytest.mark.parametrize("via,token", [("cookie", TOKEN), (None, None)],
                         ids=["token-by-cookie", "no-session"])
async def test_nothing_is_rewritten_without_reason(via, token):
    sent = await run(html_app([PAGE]), via=via, token=token)
    assert body_of(sent) == PAGE


@pytest.mark.parametrize("location,expected", [
    (b"/next", b"/next" + P.encode()),
    (b"http://example.com:8080/n?x=1", b"http://example.com:8080/n" + P.encode() + b"?x=1"),
    (b"https://elsewhere.example/", b"https://elsewhere.example/"),
])
async def test_redirect_location(location, expected):
    sent = await run(html_app([b""], status=303, headers=[(b"location", location)]))
    assert head_of(sent)[b"location"] == expected


# --- behind a real backend ------------------------------------------------------------------


async def page_app(scope: Any, receive: Any, send: Any) -> None:
    """HTML counter: / shows links, /go redirects, anything else echoes the path it saw."""
    if scope["type"] != "http":
        return
    session = scope["session"]
    session["n"] = session.get("n", 0) + 1
    if scope["path"] == "/go":
        await send({"type": "http.response.start", "status": 302,
                    "headers": [(b"location", b"/")]})
        await send({"type": "http.response.body", "body": b""})
        return
    body = (f'<p id="n">{session["n"]}</p><p id="path">{scope["path"]}</p>'
            '<a href="/next">next</a><a href="http://elsewhere.example/">away</a>').encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"text/html"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def link(html: str) -> str:
    m = re.search(r'href="(/next[^"]*)"', html)
    assert m is not None
    return m.group(1)


async def test_cookieless_client_keeps_its_session_through_rewritten_links():
    async with local_backend(page_app) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/") as resp:
            html = await resp.text()
            assert "JSESSIONID=" in resp.headers["Set-Cookie"]  # offered all the same
            assert resp.headers["Content-Length"] == str(len(html.encode()))
        href = link(html)
        assert href.startswith("/next;jsessionid=") and "elsewhere.example/\"" in html
        async with http.get(base + href) as resp:
            html = await resp.text()
            assert "Set-Cookie" not in resp.headers  # same token: nothing new to say
        assert '<p id="n">2</p>' in html and '<p id="path">/next</p>' in html
        assert link(html) == href
        # a redirect keeps it too
        token = href.split("=", 1)[1]
        async with http.get(f"{base}/go;jsessionid={token}", allow_redirects=False) as resp:
            assert resp.status == 302 and resp.headers["Location"] == "/;jsessionid=" + token
        # and the query parameter is a token too
        async with http.get(f"{base}/x?jsessionid={token}") as resp:
            assert '<p id="n">4</p>' in await resp.text()


async def test_client_with_a_cookie_gets_plain_links():
    async with local_backend(page_app) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/") as resp:
            token = resp.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        async with http.get(base + "/", headers={"Cookie": f"JSESSIONID={token}"}) as resp:
            html = await resp.text()
        assert '<p id="n">2</p>' in html and link(html) == "/next"


async def test_url_rewriting_off_rewrites_nothing_and_ignores_url_tokens():
    async with local_backend(page_app, session={"url_rewriting": False}) as base, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/") as resp:
            html = await resp.text()
            token = resp.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]
        assert link(html) == "/next"
        # a valid token in the URL is not used (a new session), and the app sees a clean path
        async with http.get(f"{base}/next;jsessionid={token}") as resp:
            html = await resp.text()
            assert resp.headers["Set-Cookie"].split(";")[0].split("=", 1)[1] != token
        assert '<p id="n">1</p>' in html and '<p id="path">/next</p>' in html
        async with http.get(f"{base}/?jsessionid={token}") as resp:
            assert '<p id="n">1</p>' in await resp.text()
