"""The HTML rewriter (an HTMLParser tokenizer) and URLs read as a browser reads them."""

from __future__ import annotations

import random

import pytest

from backends.serve.rewrite import HtmlRewriter, Origin, rewrite_html, rewrite_url

TOKEN = "c2lk!s1!s2.SIG-x_y"
P = ";jsessionid=" + TOKEN
B = P.encode()


def origin(host: str = "example.com:8080", path: str = "/app/page") -> Origin:
    return Origin({"type": "http", "headers": [(b"host", host.encode())], "scheme": "http",
                   "raw_path": path.encode()})


def rewrite(html: bytes) -> bytes:
    return rewrite_html(html, param="jsessionid", token=TOKEN, origin=origin())


def in_chunks(html: bytes, cuts: list[int], *, max_carry: int = 16384) -> bytes:
    """`html` fed in pieces cut at `cuts`; checks each piece's output is produced at once."""
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=origin(),
                            max_carry_bytes=max_carry)
    out = b""
    bounds = [0, *cuts, len(html)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += rewriter.feed(html[a:b], final=b == len(html))
    return out


# --- what is rewritten, what is not ---------------------------------------------------------


@pytest.mark.parametrize("html,expected", [
    # srcset: each candidate's URL, descriptors and separators kept as written
    (b'<img srcset="/a.png 1x, b.png 2x,c.png,, http://o.example/d.png 3x, /e.png?x=1 4w">',
     b'<img srcset="/a.png' + B + b" 1x, b.png" + B + b" 2x,c.png" + B
     + b",, http://o.example/d.png 3x, /e.png" + B + b'?x=1 4w">'),
    (b"<source srcset='/f.webp'>", b"<source srcset='/f.webp" + B + b"'>"),
    # meta refresh, as the browser reads its content
    (b"<meta http-equiv=\"Refresh\" content=\"0; URL='/next?x=1'\">",
     b"<meta http-equiv=\"Refresh\" content=\"0; URL='/next" + B + b"?x=1'\">"),
    (b"<meta content=\"5;url=/x\" HTTP-EQUIV=refresh>",
     b"<meta content=\"5;url=/x" + B + b"\" HTTP-EQUIV=refresh>"),
    (b'<meta http-equiv="refresh" content="3, /y">',
     b'<meta http-equiv="refresh" content="3, /y' + B + b'">'),
    (b'<meta http-equiv="refresh" content="30">', None),          # a reload: no URL
    (b'<meta name="next" content="/y">', None),                   # not a refresh
    (b'<meta http-equiv="refresh" content="0; url=http://o.example/">', None),
    # SVG: xlink:href and SVG 2 href
    (b'<svg><use xlink:href="/s.svg#i"/><use href="/s.svg#j"/><image XLINK:HREF=\'/p.png\'/>'
     b'<a xlink:href="#top"/></svg>',
     b'<svg><use xlink:href="/s.svg' + B + b'#i"/><use href="/s.svg' + B + b'#j"/>'
     b"<image XLINK:HREF='/p.png" + B + b"'/><a xlink:href=\"#top\"/></svg>"),
    # comments, script, style, textarea, title: their text is not HTML
    (b'<!-- <a href="/c"> --><a href="/d"><!--x--!><a href=/e><!x <a href=/f>>',
     b'<!-- <a href="/c"> --><a href="/d' + B + b'"><!--x--!><a href=/e' + B
     + b"><!x <a href=/f>>"),
    (b'<textarea name=t><a href="/t"></textarea><a href="/after">',
     b'<textarea name=t><a href="/t"></textarea><a href="/after' + B + b'">'),
    (b"<TITLE><a href=/t></TITLE><script>x = '<a href=\"/s\">'</script>"
     b"<style>a[href='/x'] { }</style><a href=/y>",
     b"<TITLE><a href=/t></TITLE><script>x = '<a href=\"/s\">'</script>"
     b"<style>a[href='/x'] { }</style><a href=/y" + B + b">"),
    # the original bytes of a tag: quoting, case, spaces, other attributes
    (b"<A  HREF = '/x'  Class=y\n data-x=\"a>b\">",
     b"<A  HREF = '/x" + B + b"'  Class=y\n data-x=\"a>b\">"),
    (b'<form ACTION=/f><button FormAction="/g">g</button><input type=image src=/i></form>',
     b"<form ACTION=/f" + B + b'><button FormAction="/g' + B
     + b'">g</button><input type=image src=/i' + B + b"></form>"),
    # character references: kept where the token goes in beside them ...
    (b'<a href="/q?a=1&amp;b=2&#38;c=3" title="&eacute;&amp;">',
     b'<a href="/q' + B + b'?a=1&amp;b=2&#38;c=3" title="&eacute;&amp;">'),
    (b'<p>&copy; &amp; &#169; &#xA9; &nbsp &#foo; <a href=/x>&</p>',
     b"<p>&copy; &amp; &#169; &#xA9; &nbsp &#foo; <a href=/x" + B + b">&</p>"),
    # ... read as the browser does: another site spelled with references gets nothing
    (b'<a href="http&#58;//evil.example/x">', None),
    (b'<a href="&#47;&#47;evil.example/x">', None),
    # a path spelled with references: written out anew, escaped
    (b'<a href="&#x2F;x">', b'<a href="/x' + B + b'">'),
    # UTF-8 (any ASCII-compatible charset) passes byte for byte
    ('<a href="/caf\u00e9">caf\u00e9 \u2014 \U0001f600</a>'.encode(),
     '<a href="/caf\u00e9'.encode() + B + '">caf\u00e9 \u2014 \U0001f600</a>'.encode()),
    # not tags, or not URLs
    (b"<p>5 < 6 && 7 > 3 <3 </p ><a data-href=/x title=/y>", None),
    (b"<!DOCTYPE html><?xml-stylesheet href='/x.css'?><![CDATA[<a href=/z>]]>", None),
    # `<![...` other than CDATA is a bogus comment, up to the next '>' (HTMLParser would raise)
    (b"<![if IE]><a href=/x><![endif]><![x <a href=/y><![",
     b"<![if IE]><a href=/x" + B + b"><![endif]><![x <a href=/y><!["),
])
def test_rewritten_and_left_alone(html, expected):
    assert rewrite(html) == (html if expected is None else expected)


@pytest.mark.parametrize("url,expected", [
    # what a browser reads as another site gets no token, however it is spelled
    ("/\\evil.example/x", None),
    ("\\\\evil.example/x", None),
    ("/\t/evil.example/x", None),
    ("http://evil.example\\@example.com:8080/", None),
    ("http:\\\\example.com:8080\\x", None),      # ours, but spelled oddly: left alone
    ("java\tscript:alert(1)", None),
    ("\x01javascript:alert(1)", None),
    (" mailto:a@example.com", None),
    # surrounding spaces stay where they are
    ("  /x  ", "  /x" + P + "  "),
    ("\n//example.com:8080/a\n", "\n//example.com:8080/a" + P + "\n"),
    ("./.", "./." + "/" + P),
])
def test_urls_are_read_as_a_browser_reads_them(url, expected):
    got = rewrite_url(url, param="jsessionid", token=TOKEN, origin=origin())
    assert got == (url if expected is None else expected)


def test_protocol_relative_urls_take_the_page_scheme():
    page = Origin({"type": "http", "headers": [(b"host", b"example.com"),
                                                (b"x-forwarded-proto", b"https")],
                   "raw_path": b"/"})
    assert rewrite_url("//example.com/x", param="jsessionid", token=TOKEN,
                       origin=page) == "//example.com/x" + P
    assert rewrite_url("http://example.com/x", param="jsessionid", token=TOKEN,
                       origin=page) == "http://example.com/x"  # port 80: another origin


# --- streaming --------------------------------------------------------------------------------

PAGE = (b'<!doctype html>\n<html><head><title>a <b> title</title>\n'
        b'<meta http-equiv="refresh" content="600; url=/again">'
        b'<link rel=stylesheet\n  href="/s.css"><style>p{background:url(/bg.png)}</style></head>'
        b"<body><!-- <a href=/commented>\n --><a href='/a?x=1&amp;y=2'>a &amp; b</a>\n\n"
        b'<img src=/i.png srcset="/i.png 1x,\n /i2.png 2x" alt="x > y">'
        b"<script>if (a<b && c) {\n d = '<a href=\"/js\">' }</script>"
        b'<textarea><a href="/ta"></textarea><form action="/f"><button formaction=/g>'
        b'</button></form>\n<svg><use xlink:href="/s.svg#i"/></svg><a HREF=/end>e</a></body>'
        b"</html>\n")


def test_any_cut_gives_the_same_bytes_as_the_whole():
    whole = rewrite(PAGE)
    assert whole.count(B) == 10 and b"/commented>" in whole and b"/ta\"" in whole
    assert b"/js\"" in whole and b"url(/bg.png)" in whole
    for size in (1, 2, 3, 5, 7, 11, 64):
        assert in_chunks(PAGE, list(range(size, len(PAGE), size))) == whole
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(PAGE)), rng.randint(1, 12)))
        assert in_chunks(PAGE, cuts) == whole, cuts


def test_a_tag_cut_across_chunks_is_held_back_only_until_it_ends():
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=origin())
    assert rewriter.feed(b"<p>text</p><a hr") == b"<p>text</p>"
    assert rewriter.feed(b'ef="/x') == b""
    assert rewriter.feed(b'">more') == b'<a href="/x' + B + b'">more'
    assert rewriter.feed(b"", final=True) == b""


def test_raw_text_streams_on_and_its_end_tag_may_be_cut():
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=origin(), max_carry_bytes=100)
    script = b"x = '<a href=\"/in-script\">';" * 100
    out = rewriter.feed(b"<script>" + script[:1000])
    assert out == b"<script>" + script[:1000]  # raw text goes out as it comes
    out += rewriter.feed(script[1000:] + b"</scr")
    assert out == b"<script>" + script  # all but what may be its end tag
    out += rewriter.feed(b"ipt><a href=/after>", final=True)
    assert out == b"<script>" + script + b"</script><a href=/after" + B + b">"


def test_a_long_comment_is_let_go_and_passed_over_to_its_end():
    comment = b"<!-- " + b'<a href="/in-comment"> ' * 50
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=origin(), max_carry_bytes=200)
    out = rewriter.feed(comment[:600])
    assert len(out) >= 590  # not held whole
    out += rewriter.feed(comment[600:] + b"-")
    out += rewriter.feed(b"-><a href=/after>", final=True)
    assert out == comment + b"--><a href=/after" + B + b">"


def test_a_long_start_tag_is_let_go_unchanged():
    tag = b'<a href="/x" data-big="' + b"y" * 500
    out = in_chunks(tag + b'">text<a href=/z>', [len(tag)], max_carry=100)
    assert out == tag + b'">text<a href=/z' + B + b">"


def test_an_unfinished_document_ends_as_it_came():
    for tail in (b"<a href=/x", b"<!-- open", b"<script>open", b"&am", b"<"):
        assert rewrite(b"<p>" + tail) == b"<p>" + tail
