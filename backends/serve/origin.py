"""Which URLs of a response lead back to this site, and adding the token to one of them.

`rewrite_url` decides on the URL as a browser reads it (surrounding control characters and
spaces stripped, tabs and newlines removed, `\\` read as `/`), so that no spelling of
another site's address (`/\\evil.example/`, `java\\tscript:`) receives the token, and edits
only the path of the URL as written.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from tandem.token import add_path_param

__all__ = ["Origin", "rewrite_url"]

_DEFAULT_PORTS = {"http": "80", "https": "443"}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
# what a browser strips from both ends of a URL (C0 controls and space)
_EDGES = "".join(map(chr, range(0x21)))
# what it removes inside, and reads as '/' (in http(s) URLs and references)
_AS_BROWSER = str.maketrans({"\t": None, "\n": None, "\r": None, "\\": "/"})


class Origin:
    """The origin a request was made to, as the client sees it, and its path (for links)."""

    __slots__ = ("scheme", "host", "port", "path")

    def __init__(self, scope: Mapping[str, Any]) -> None:
        host = ""
        proto = ""
        for name, value in scope.get("headers", ()):
            if name == b"host" and not host:
                host = value.decode("latin-1").strip().lower()
            elif name == b"x-forwarded-proto" and not proto:
                proto = value.decode("latin-1").split(",", 1)[0].strip().lower()
        self.scheme: str = proto or scope.get("scheme", "http")
        if not host and scope.get("server"):
            server_host, server_port = scope["server"][:2]
            host = f"{server_host}:{server_port}"
        self.host, self.port = _split_host(host, self.scheme)
        raw = scope.get("raw_path") or scope.get("path", "/").encode("utf-8")
        self.path: str = raw.decode("latin-1")

    def same(self, scheme: str, netloc: str) -> bool:
        """Is `scheme://netloc` this origin? (scheme only supplies the default port)"""
        host, port = _split_host(netloc.rpartition("@")[2].lower(), scheme.lower())
        return host == self.host and port == self.port


def _split_host(netloc: str, scheme: str) -> tuple[str, str]:
    if netloc.startswith("["):  # IPv6 literal
        end = netloc.find("]")
        host, rest = netloc[:end + 1], netloc[end + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port = netloc.partition(":")
    return host, port or _DEFAULT_PORTS.get(scheme, "")


def _path_end(url: str) -> int:
    """Where the path of `url` ends (its query or fragment begins)."""
    end = len(url)
    for sep in "?#":
        j = url.find(sep, 0, end)
        if j >= 0:
            end = j
    return end


def rewrite_url(url: str, *, param: str, token: str, origin: Origin) -> str:
    """`url` with `;param=token` when it points to `origin`; otherwise `url` itself."""
    core = url.strip(_EDGES)
    if not core:
        return url
    lead = len(url) - len(url.lstrip(_EDGES))
    head, tail = url[:lead], url[lead + len(core):]  # kept as they are
    seen = core.translate(_AS_BROWSER)  # what the browser will request
    if not seen or seen[0] == "#":
        return url  # this same document: no request is made
    if seen[0] == "?":
        # A query-only reference keeps the current path, and with it any (older) token in
        # the path: name the last segment explicitly so the new token takes its place.
        last = origin.path.rsplit("/", 1)[-1]
        return head + add_path_param("./" + last + core, param, token) + tail
    if seen.startswith("//"):
        scheme, rest = origin.scheme, seen[2:]
    elif _SCHEME.match(seen):
        scheme, _, rest = seen.partition(":")
        if scheme.lower() not in ("http", "https") or not rest.startswith("//"):
            return url  # mailto:, javascript:, data:, tel: ... (or a scheme-relative path)
        rest = rest[2:]
    else:  # a path, relative or absolute
        end = _path_end(seen)
        last = seen[:end].rsplit("/", 1)[-1].partition(";")[0]
        if last in (".", ".."):  # a dot segment with a parameter would no longer be one
            end = _path_end(core)
            core = core[:end] + "/" + core[end:]
        return head + add_path_param(core, param, token) + tail
    cut = len(rest)
    for sep in "/?#":
        j = rest.find(sep, 0, cut)
        if j >= 0:
            cut = j
    if not origin.same(scheme, rest[:cut]):
        return url
    if seen != core:
        return url  # an absolute URL spelled with tabs or backslashes: left as it is
    if cut == len(rest) or rest[cut] != "/":  # no path: the token needs one
        at = len(core) - len(rest) + cut
        core = core[:at] + "/" + core[at:]
    return head + add_path_param(core, param, token) + tail
