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

import html
import re
from collections.abc import Callable
from html.entities import html5
from html.parser import HTMLParser

from .origin import Origin, rewrite_url

__all__ = ["HtmlRewriter", "rewrite_html"]

_URL_ATTRS = frozenset({"href", "src", "action", "formaction", "xlink:href"})
_LOOKED_AT = _URL_ATTRS | {"srcset", "http-equiv"}
# Raw-text (and RCDATA) elements besides script and style, which HTMLParser knows: no tags
# inside. (<noscript> is parsed: its links are followed when scripts are off.)
_MORE_RAW_TEXT = frozenset({"textarea", "title", "xmp", "iframe", "noembed", "noframes",
                            "plaintext"})
_WS = " \t\n\r\f"  # HTML's whitespace (not str.isspace's)
_DIGITS = "0123456789"

_TAG_NAME = re.compile(r"<[^\t\n\f\r />]*")
# One attribute, as the HTML tokenizer splits them: name, then '=' and a value (double-,
# single- or un-quoted), group 2 with its quotes.
_ATTR = re.compile(r"""([^\t\n\f\r />][^\t\n\f\r /=>]*)"""
                   r"""(?:[\t\n\f\r ]*=[\t\n\f\r ]*("[^"]*"|'[^']*'|[^\t\n\f\r >]*))?""")
# what, at the end of raw text, may still become its end tag (kept back, at most 64 chars)
_END_TAG_START = re.compile(r"<(?:/[^>]*)?\Z")
_COMMENT_END = re.compile(r"--!?>")
_CHAR_REF = re.compile(r"&(?:#[xX][0-9A-Fa-f]+;?|#[0-9]+;?|([A-Za-z][A-Za-z0-9]*)(;?))")


class _Tokenizer(HTMLParser):
    """HTMLParser reporting the start tags that may hold URLs to its rewriter."""

    def __init__(self, on_tag: Callable[[str], None]) -> None:
        super().__init__(convert_charrefs=False)
        self._on_tag = on_tag

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _MORE_RAW_TEXT:
            self.set_cdata_mode(tag)
        self.handle_startendtag(tag, attrs)

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
                 "_col", "_newlines", "_edits", "_in_comment", "_comment_tail")

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
        # one run of the parser over its buffer
        self._buf = ""            # the parser's buffer when the run began
        self._line = self._col = 0  # the parser's position of its first character
        self._newlines: list[int] = []  # where its first lines end, found on demand
        self._edits: list[tuple[int, int, str]] = []  # (start, end, new text) in _buf

    def feed(self, data: bytes, *, final: bool = False) -> bytes:
        """The rewritten output for `data` so far; with `final`, everything that is left."""
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
        if end:
            p.rawdata = buf
            p.close()
        else:
            p.feed(text)
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
            name == "http-equiv" and _attr_text(text[s:e]).lower() == "refresh"
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
            new = _rewrite_value(text[s:e], op)
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
        return _each_candidate(value, self._url)

    def _refresh(self, content: str) -> str:
        span = _refresh_url(content)
        if span is None:
            return content
        start, end = span
        return content[:start] + self._url(content[start:end]) + content[end:]


def rewrite_html(html: bytes, *, param: str, token: str, origin: Origin) -> bytes:
    """A whole HTML document, rewritten."""
    return HtmlRewriter(param=param, token=token, origin=origin).feed(html, final=True)


# --- attribute values -------------------------------------------------------------------------


def _rewrite_value(value: str, op: Callable[[str], str]) -> str | None:
    """An attribute value as written (with its quotes) after `op`; None: unchanged.

    `op` is judged on the value as the browser reads it, and applied to the value as
    written when that reads the same (its references stay); otherwise the result is
    written out anew, quoted and escaped.
    """
    quote = value[:1] if value[:1] in ("'", '"') else ""
    written = value[1:-1] if quote else value
    if "&" not in written:
        new = op(written)
        return None if new == written else quote + new + quote
    read = _unescape_attr(written)
    wanted = op(read)
    if wanted == read:
        return None
    new = op(written)
    if _unescape_attr(new) == wanted:
        return quote + new + quote
    return '"' + html.escape(wanted, quote=True) + '"'


def _attr_text(value: str) -> str:
    """An attribute value as written (with its quotes) as the browser reads it."""
    if value[:1] in ("'", '"'):
        value = value[1:-1]
    return _unescape_attr(value)


def _unescape_attr(value: str) -> str:
    """Character references decoded as in an attribute value (HTML's rule for `&name`
    without `;`: a legacy name only, and not before `=`)."""
    if "&" not in value:
        return value
    return _CHAR_REF.sub(_decode_ref, value)


def _decode_ref(m: re.Match[str]) -> str:
    name = m.group(1)
    if name is None:  # numeric
        return html.unescape(m.group())
    if m.group(2):
        return html5.get(name + ";", m.group())
    if m.string.startswith("=", m.end()):
        return m.group()
    return html5.get(name, m.group())  # (only the legacy names are there without ';')


def _each_candidate(srcset: str, rewrite: Callable[[str], str]) -> str:
    """`srcset` with `rewrite` applied to the URL of each image candidate (HTML's parse)."""
    out: list[str] = []
    i, n = 0, len(srcset)
    while i < n:
        j = i
        while j < n and (srcset[j] in _WS or srcset[j] == ","):
            j += 1
        out.append(srcset[i:j])
        i = j
        while j < n and srcset[j] not in _WS:
            j += 1
        url = srcset[i:j]
        bare = url.rstrip(",")  # trailing commas end the candidate: no descriptors
        out += (rewrite(bare) if bare else bare, url[len(bare):])
        i = j
        if len(bare) < len(url):
            continue
        depth = 0  # descriptors run to the next comma outside parentheses
        while j < n:
            c = srcset[j]
            if c == "(":
                depth += 1
            elif c == ")" and depth:
                depth -= 1
            elif c == "," and not depth:
                break
            j += 1
        out.append(srcset[i:j])
        i = j
    return "".join(out)


def _refresh_url(content: str) -> tuple[int, int] | None:
    """Where the URL is in a refresh `content` (HTML's declarative refresh steps)."""
    n = len(content)
    i = 0
    while i < n and content[i] in _WS:
        i += 1
    j = i
    while j < n and content[j] in _DIGITS:
        j += 1
    if j == i and not content.startswith(".", j):
        return None  # no time: not a refresh
    while j < n and (content[j] in _DIGITS or content[j] == "."):
        j += 1
    i = j
    if i < n and content[i] not in _WS and content[i] not in ";,":
        return None
    while i < n and content[i] in _WS:
        i += 1
    if i < n and content[i] in ";,":
        i += 1
    while i < n and content[i] in _WS:
        i += 1
    if i >= n:
        return None  # no URL: this same document again
    if content[i] in "Uu":
        if content[i + 1:i + 2] not in ("R", "r") or content[i + 2:i + 3] not in ("L", "l"):
            return i, n
        k = i + 3
        while k < n and content[k] in _WS:
            k += 1
        if not content.startswith("=", k):
            return i, n  # `url` is where the URL begins
        k += 1
        while k < n and content[k] in _WS:
            k += 1
        i = k
    quote = content[i:i + 1]
    if quote in ("'", '"'):
        i += 1
        end = content.find(quote, i)
        return i, end if end >= 0 else n
    return i, n
