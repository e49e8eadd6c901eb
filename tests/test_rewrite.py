"""URL rewriting for cookie-less clients: the rewriter alone, then behind a real backend."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
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


# --- the rule: which responses put the token in URLs -------------------------------------------


def cookie_token(resp: aiohttp.ClientResponse) -> str:
    return resp.headers["Set-Cookie"].split(";")[0].split("=", 1)[1]


def hrefs(html: str) -> list[str]:
    return re.findall(r'(?:href|action)="([^"]*)"', html)


async def test_first_response_carries_the_token_then_the_cookie_ends_it():
    async with local_backend(page_app) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        # a new session: nothing tells yet whether this client keeps cookies
        async with http.get(base + "/") as resp:
            html = await resp.text()
            token = cookie_token(resp)
        href = link(html)
        assert href == "/next;jsessionid=" + token
        # it does: the link from that page comes back with the cookie, and is redirected
        # to the same URL without the token, before the app runs
        for method in ("GET", "HEAD"):
            async with http.request(method, base + href + "?a=1",
                                    allow_redirects=False) as resp:
                assert resp.status == 302 and resp.headers["Location"] == "/next?a=1"
        async with http.get(base + href) as resp:
            html = await resp.text()
            assert [str(r.headers["Location"]) for r in resp.history] == ["/next"]
            assert resp.url.path == "/next" and "Set-Cookie" not in resp.headers
        assert '<p id="n">2</p>' in html  # the redirects ran nothing
        assert hrefs(html) == ["/next", "http://elsewhere.example/"]
        async with http.get(base + "/go") as resp:  # redirects: plain Location
            assert [str(r.headers["Location"]) for r in resp.history] == ["/"]
            assert hrefs(await resp.text()) == ["/next", "http://elsewhere.example/"]
        # a POST to a URL with the token is served as it is, its response not rewritten
        async with http.post(base + href) as resp:
            html = await resp.text()
        assert resp.status == 200 and not resp.history and '<p id="n">5</p>' in html
        assert hrefs(html) == ["/next", "http://elsewhere.example/"]


async def test_a_cleaned_url_that_would_name_another_site_is_not_a_redirect():
    async with local_backend(page_app) as base:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http, \
                http.get(base + "/") as resp:
            token = cookie_token(resp)
        host, port = base.rsplit("/", 1)[1].split(":")
        for path in ("//evil.example/", "/\\evil.example/"):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(f"GET {path};jsessionid={token} HTTP/1.1\r\nHost: {host}\r\n"
                         f"Cookie: JSESSIONID={token}\r\nConnection: close\r\n\r\n".encode())
            head = (await reader.read()).split(b"\r\n\r\n", 1)[0]
            writer.close()
            assert head.startswith(b"HTTP/1.1 200") and b"location" not in head.lower()


async def json_app(scope: Any, receive: Any, send: Any) -> None:
    """What `session.encode_url` gives the app, as JSON."""
    if scope["type"] != "http":
        return
    session = scope["session"]
    session["n"] = session.get("n", 0) + 1
    body = json.dumps({"n": session["n"], "next": session.encode_url("/next?x=1"),
                       "away": session.encode_url("http://elsewhere.example/x"),
                       "here": session.encode_url(f"http://{scope['server'][0]}:"
                                                  f"{scope['server'][1]}")}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def test_encode_url_follows_the_same_rule():
    async with local_backend(json_app) as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/") as resp:  # a new session: in the URL
            got = await resp.json()
            token = cookie_token(resp)
        assert got["next"] == f"/next;jsessionid={token}?x=1"
        assert got["away"] == "http://elsewhere.example/x"  # never to another site
        assert got["here"] == f"{base}/;jsessionid={token}"
        async with http.get(base + "/", headers={"Cookie": f"JSESSIONID={token}"}) as resp:
            got = await resp.json()  # by cookie: never
        assert got["n"] == 2 and got["next"] == "/next?x=1" and got["here"] == base
        async with http.get(f"{base}/;jsessionid={token}") as resp:
            got = await resp.json()  # in the URL: always
        assert got["n"] == 3 and got["next"] == f"/next;jsessionid={token}?x=1"
        # a cookie of ours that does not verify still shows that the client keeps cookies
        async with http.get(base + "/", headers={"Cookie": "JSESSIONID=garbage"}) as resp:
            got = await resp.json()
            assert cookie_token(resp) != token
        assert got["n"] == 1 and got["next"] == "/next?x=1"
    async with local_backend(json_app, session={"url_rewriting": False}) as base, \
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http, \
            http.get(base + "/") as resp:
        assert (await resp.json())["next"] == "/next?x=1"


def tokens_in(resp: aiohttp.ClientResponse, html: str) -> list[str]:
    """Every URL of a response chain that carries a token: redirects, final URL, links."""
    urls = [str(r.headers["Location"]) for r in resp.history]
    urls += [str(resp.url), *hrefs(html)]
    return [u for u in urls if ";jsessionid=" in u]


async def test_demo_keeps_tokens_out_of_the_urls_of_a_client_with_cookies():
    async with local_backend("backends.demo:app") as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        async with http.get(base + "/") as resp:
            first = await resp.text()
        inc = re.search(r'id="inc" href="([^"]*)"', first)
        assert inc is not None and ";jsessionid=" in inc.group(1)  # the first response
        async with http.get(base + inc.group(1)) as resp:  # its link, with the cookie
            html = await resp.text()
            assert tokens_in(resp, html) == [] and resp.url.path == "/"
        for n in (2, 3, 4):
            async with http.get(base + "/inc") as resp:
                html = await resp.text()
                assert tokens_in(resp, html) == []
            assert f'id="count">{n}<' in html
        async with http.get(base + "/api") as resp:
            assert (await resp.json())["pid"] == os.getpid()


async def test_demo_page_names_its_process_and_how_to_stop_it():
    async with local_backend("backends.demo:app") as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http, http.get(base + "/") as resp:
        html = await resp.text()
    pid = os.getpid()  # (the backend runs in this process)
    assert f'id="pid">{pid}<' in html
    assert f"kill -9 {pid}" in html and f"kill -STOP {pid}" in html and "Ctrl-Z" not in html


async def test_demo_links_carry_the_token_for_a_client_without_cookies():
    async with local_backend("backends.demo:app") as base, aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.get(base + "/") as resp:
            html = await resp.text()
        for n in (1, 2, 3):
            inc = re.search(r'id="inc" href="([^"]*)"', html)
            assert inc is not None and ";jsessionid=" in inc.group(1)
            async with http.get(base + inc.group(1)) as resp:
                html = await resp.text()
                assert ";jsessionid=" in str(resp.history[0].headers["Location"])
            assert f'id="count">{n}<' in html
