"""HTML attribute values as a browser reads them: character references, `srcset`, and
the `content` of `<meta http-equiv="refresh">` (the parses of the HTML standard)."""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from html.entities import html5

__all__ = ["rewrite_value", "attr_text", "unescape_attr", "map_srcset", "refresh_url_span"]

_WS = " \t\n\r\f"  # HTML's whitespace (not str.isspace's)
_DIGITS = "0123456789"
_CHAR_REF = re.compile(r"&(?:#[xX][0-9A-Fa-f]+;?|#[0-9]+;?|([A-Za-z][A-Za-z0-9]*)(;?))")


def rewrite_value(value: str, op: Callable[[str], str]) -> str | None:
    """An attribute value as written (with its quotes) after `op`; None: unchanged.

    `op` is judged on the value as the browser reads it, and applied to the value as
    written when that reads the same (its references stay); otherwise the result is
    written out anew, double-quoted, `&` and `"` escaped.
    """
    quote = value[:1] if value[:1] in ("'", '"') else ""
    written = value[1:-1] if quote else value
    if "&" not in written:
        new = op(written)
        return None if new == written else quote + new + quote
    read = unescape_attr(written)
    wanted = op(read)
    if wanted == read:
        return None
    new = op(written)
    if unescape_attr(new) == wanted:
        return quote + new + quote
    return '"' + wanted.replace("&", "&amp;").replace('"', "&quot;") + '"'


def attr_text(value: str) -> str:
    """An attribute value as written (with its quotes) as the browser reads it."""
    if value[:1] in ("'", '"'):
        value = value[1:-1]
    return unescape_attr(value)


def unescape_attr(value: str) -> str:
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


def map_srcset(srcset: str, rewrite: Callable[[str], str]) -> str:
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


def refresh_url_span(content: str) -> tuple[int, int] | None:
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
