"""Adding the session token to the URLs of an HTML body, streamed chunk by chunk.

The body is tokenized by the standard library's incremental `html.parser.HTMLParser`
(character references left as they are). Only start tags are looked at: same-origin URLs
in `href` (HTML, and SVG 2), `xlink:href`, `src`, `action`, `formaction`, each candidate of
`srcset` and the URL of `<meta http-equiv="refresh" content="0; url=...">` get the token
(`origin.rewrite_url` decides). Every byte it does not change goes out as it came: a changed
tag is its original text (`get_starttag_text()`) with only those attribute values replaced,
quotes, case, spaces and character references kept. A value is judged as the browser reads
it (references decoded), so `http&#58;//evil.example/` gets no token. Comments, declarations
and the text of `<script>`, `<style>`, `<textarea>`, `<title>` and the other raw-text
elements are never rewritten.

Bytes are read as latin-1 (one character per byte): positions are byte offsets and any
ASCII-compatible charset (UTF-8, ISO-8859-*, windows-125*) comes out byte for byte.

Streaming: after each chunk, what the parser has handled goes out; it keeps back only an
unfinished construct (a tag cut by the chunk's end, a comment not closed yet, what may be
the start of a raw-text element's end tag). Raw text goes out as it arrives. A construct
held longer than `max_carry_bytes` is let go unchanged: such a start tag goes out as text,
such a comment is passed over up to its `-->`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser

import structlog

from .html_values import attr_text, map_srcset, refresh_url_span, rewrite_value
from .origin import Origin, rewrite_url

__all__ = ["HtmlRewriter", "rewrite_html"]

log = structlog.get_logger("tandem.http")

_URL_ATTRS = frozenset({"href", "src", "action", "formaction", "xlink:href"})
_LOOKED_AT = _URL_ATTRS | {"srcset", "http-equiv"}
# Raw-text (and RCDATA) elements besides script and style, which HTMLParser knows: no tags
# inside. (<noscript> is parsed: its links are followed when scripts are off.)
_MORE_RAW_TEXT = frozenset({"textarea", "title", "xmp", "iframe", "noembed", "noframes",
                            "plaintext"})
_TAG_NAME = re.compile(r"<[^\t\n\f\r />]*")
# One attribute, as the HTML tokenizer splits them: name, then '=' and a value (double-,
# single- or un-quoted), group 2 with its quotes.
_ATTR = re.compile(r"""([^\t\n\f\r />][^\t\n\f\r /=>]*)"""
                   r"""(?:[\t\n\f\r ]*=[\t\n\f\r ]*("[^"]*"|'[^']*'|[^\t\n\f\r >]*))?""")
# what, at the end of raw text, may still become its end tag (kept back, at most 64 chars)
_END_TAG_START = re.compile(r"<(?:/[^>]*)?\Z")
_COMMENT_END = re.compile(r"--!?>")


class _Tokenizer(HTMLParser):
    """HTMLParser reporting the start tags that may hold URLs to its rewriter."""

    def __init__(self, on_tag: Callable[[str], None]) -> None:
        super().__init__(convert_charrefs=False)
        self._on_tag = on_tag

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _MORE_RAW_TEXT:
            self.set_cdata_mode(tag)
        self.handle_startendtag(tag, attrs)

    def parse_html_declaration(self, i: int) -> int:
        # `<![` other than `<![CDATA[` is a bogus comment to a browser (`<![if IE]>`), up to
        # the next '>'; HTMLParser would raise on most of them.
        if self.rawdata.startswith("<![", i):
            head = self.rawdata[i:i + 9]
            if len(head) < 9 and "<![CDATA[".startswith(head):
                return -1  # (may still become one)
            if head != "<![CDATA[":
                return self.parse_bogus_comment(i)
        return super().parse_html_declaration(i)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # (`<x/>` opens no raw text, as HTMLParser has it for script and style, and as in
        # SVG, where `<title/>` is common)
        for name, _ in attrs:
            if name in _LOOKED_AT:
                self._on_tag(tag)
                return


class HtmlRewriter:
    """Rewrites the URLs in the tags of an HTML body fed to it chunk by chunk."""

    __slots__ = ("param", "token", "origin", "max_carry_bytes", "_parser", "_buf", "_line",
                 "_col", "_newlines", "_edits", "_in_comment", "_comment_tail", "_broken")

    def __init__(self, *, param: str, token: str, origin: Origin,
                 max_carry_bytes: int = 16384) -> None:
        # configuration
        self.param = param
        self.token = token
        self.origin = origin
        self.max_carry_bytes = max_carry_bytes
        # the body's state
        self._parser = _Tokenizer(self._on_tag)
        self._in_comment = False  # in a comment too long to hold: passing it over
        self._comment_tail = ""   # (what may be the start of its `-->`)
        self._broken = False      # the parser failed: the rest passes as it is
        # one run of the parser over its buffer
        self._buf = ""            # the parser's buffer when the run began
        self._line = self._col = 0  # the parser's position of its first character
        self._newlines: list[int] = []  # where its first lines end, found on demand
        self._edits: list[tuple[int, int, str]] = []  # (start, end, new text) in _buf

    def feed(self, data: bytes, *, final: bool = False) -> bytes:
        """The rewritten output for `data` so far; with `final`, everything that is left."""
        if self._broken:
            return data
        text = data.decode("latin-1")
        out: list[str] = []
        if self._in_comment:
            text = self._pass_comment(text, out, final)
        if text:
            self._run(text, out, end=False)
        self._settle(out, final)
        if final:
            self._run("", out, end=True)
            p = self._parser
            out.append(p.rawdata)  # raw text left open by the end of the body
            p.rawdata = ""
        return "".join(out).encode("latin-1")

    # --- driving the parser -------------------------------------------------------------

    def _run(self, text: str, out: list[str], *, end: bool) -> None:
        """Parse on with `text`; what the parser handled goes to `out`, rewritten."""
        p = self._parser
        buf = p.rawdata + text
        self._buf = buf
        self._line, self._col = p.getpos()
        self._newlines.clear()
        self._edits.clear()
        try:
            if end:
                p.rawdata = buf
                p.close()
            else:
                p.feed(text)
        except AssertionError:
            # HTMLParser gave up on some markup (it has asserts for what it does not know):
            # the rest of the body goes out as it is.
            log.warning("html_rewriting_stopped", reason="markup the parser does not know")
            self._broken = True
            p.rawdata = ""
        done = len(buf) - len(p.rawdata)
        pos = 0
        for start, stop, new in self._edits:
            out += (buf[pos:start], new)
            pos = stop
        out.append(buf[pos:done])

    def _settle(self, out: list[str], final: bool) -> None:
        """Let out what need not wait for the next chunk; bound what waits."""
        p = self._parser
        while p.rawdata:
            if p.cdata_elem is not None:
                # Raw text needs no parsing: out it goes, but for a possible end tag.
                held = p.rawdata
                lt = held.rfind("<", max(0, len(held) - 64))
                cut = lt if lt >= 0 and _END_TAG_START.match(held, lt) else len(held)
                out.append(held[:cut])
                p.rawdata = held[cut:]
                return
            # HTMLParser may stop short of the end (after a `&#` that is no reference):
            # run it again as long as that moves it on.
            before = len(p.rawdata)
            self._run("", out, end=False)
            if len(p.rawdata) >= before:
                break
        held = p.rawdata
        if final or len(held) <= self.max_carry_bytes:
            return
        # Too long to be what it began as: let it go unchanged.
        p.rawdata = ""
        if held.startswith("<!--"):
            self._in_comment = True
            out.append(held[:-3])
            self._comment_tail = held[-3:]
        else:
            out.append(held)

    def _pass_comment(self, text: str, out: list[str], final: bool) -> str:
        """Pass over a long comment's text up to its end; returns what follows it."""
        buf = self._comment_tail + text
        end = _COMMENT_END.search(buf)
        if end is not None:
            self._in_comment = False
            self._comment_tail = ""
            out.append(buf[:end.end()])
            return buf[end.end():]
        keep = 0 if final else min(3, len(buf))
        out.append(buf[:len(buf) - keep])
        self._comment_tail = buf[len(buf) - keep:]
        return ""

    def _where(self) -> int:
        """Where the parser's current event begins, in `_buf`."""
        line, col = self._parser.getpos()
        if line == self._line:
            return col - self._col
        lines = line - self._line
        nl = self._newlines
        while len(nl) < lines:
            nl.append(self._buf.index("\n", nl[-1] + 1 if nl else 0))
        return nl[lines - 1] + 1 + col

    # --- a start tag --------------------------------------------------------------------

    def _on_tag(self, tag: str) -> None:
        text = self._parser.get_starttag_text()
        if text is None:
            return
        new = self._rewrite_tag(tag, text)
        if new is None:
            return
        start = self._where()
        if self._buf.startswith(text, start):  # (never edit anything but that tag)
            self._edits.append((start, start + len(text), new))

    def _rewrite_tag(self, tag: str, text: str) -> str | None:
        """`text` (one whole start tag) with its URLs rewritten; None: nothing to change."""
        name_end = _TAG_NAME.match(text)
        assert name_end is not None
        values = [(m.group(1).lower(), m.start(2), m.end(2))
                  for m in _ATTR.finditer(text, name_end.end(), len(text) - 1)
                  if m.group(2) is not None]
        refresh = tag == "meta" and any(
            name == "http-equiv" and attr_text(text[s:e]).lower() == "refresh"
            for name, s, e in values)
        out: list[str] = []
        pos = 0
        for name, s, e in values:
            op: Callable[[str], str]
            if name in _URL_ATTRS:
                op = self._url
            elif name == "srcset":
                op = self._srcset
            elif name == "content" and refresh:
                op = self._refresh
            else:
                continue
            new = rewrite_value(text[s:e], op)
            if new is not None:
                out += (text[pos:s], new)
                pos = e
        if not out:
            return None
        out.append(text[pos:])
        return "".join(out)

    def _url(self, url: str) -> str:
        return rewrite_url(url, param=self.param, token=self.token, origin=self.origin)

    def _srcset(self, value: str) -> str:
        return map_srcset(value, self._url)

    def _refresh(self, content: str) -> str:
        span = refresh_url_span(content)
        if span is None:
            return content
        start, end = span
        return content[:start] + self._url(content[start:end]) + content[end:]


def rewrite_html(html: bytes, *, param: str, token: str, origin: Origin) -> bytes:
    """A whole HTML document, rewritten."""
    return HtmlRewriter(param=param, token=token, origin=origin).feed(html, final=True)
