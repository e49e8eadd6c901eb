"""How long URL rewriting takes on a 100 KB HTML page (backends.serve.html_rewriter).

    python bench/rewrite_html.py [--size-kb 100] [--repeat 30] [--baseline PATH]

Times, on one generated page (links, images with srcset, forms, scripts, styles,
comments, character references), the median of `--repeat` runs of: the rewriter on the
whole page in one message; the same page streamed in 4 KiB and 1 KiB chunks; and, as the
floor of any HTMLParser-based rewriter, `html.parser.HTMLParser` alone with no handlers.
`--baseline PATH` also times the `rewrite_html` of another module file (an older
`rewrite.py`, from git) for comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import time
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

from backends.serve.html_rewriter import HtmlRewriter
from backends.serve.origin import Origin

TOKEN = "c2lkc2lkc2lkc2lkc2lkc2lkc2lkc2lk!s1!s2.SIGNATURESIGNATURESIGNATURESIGNATURE-x_"
SCOPE = {"type": "http", "headers": [(b"host", b"example.com:8080")], "scheme": "http",
         "raw_path": b"/app/page"}


def page(size: int, seed: int = 1) -> bytes:
    """A page of about `size` bytes, in the proportions of a content-heavy site."""
    rng = random.Random(seed)
    words = ("tandem session failover replica primary secondary cookie proxy token "
             "server cluster request response &amp; &copy; caf\u00e9").split()
    parts = ["<!doctype html><html><head><meta charset=utf-8><title>bench &amp; page</title>",
             '<link rel="stylesheet" href="/static/site.css?v=3">',
             "<style>body{font:16px/1.5 sans-serif}a[href^='/x']{color:red}</style>",
             '<meta http-equiv="refresh" content="600; url=/app/page?fresh=1"></head><body>']
    n = 0
    while sum(map(len, parts)) < size:
        n += 1
        kind = rng.random()
        text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
        if kind < 0.45:
            parts.append(f'<p class="para">{text} <a href="/articles/{n}?ref=list&amp;p=2">'
                         f"more</a> <a href='https://other.example/{n}'>elsewhere</a></p>\n")
        elif kind < 0.6:
            parts.append(f'<figure><img src="/img/{n}.jpg" srcset="/img/{n}.jpg 1x, '
                         f'/img/{n}@2x.jpg 2x" alt="picture {n} &gt; thumbnail" loading=lazy>'
                         f"<figcaption>{text[:80]}</figcaption></figure>\n")
        elif kind < 0.7:
            parts.append(f'<form action="/search" method=get><input name=q value="{n}">'
                         f'<button formaction="/search/advanced">go</button></form>\n')
        elif kind < 0.8:
            parts.append(f"<script>window.items = window.items || []; items.push({{id: {n}, "
                         f"html: '<a href=\"/js/{n}\">x</a>'}}); if (a < b && c) {{ }}</script>\n")
        elif kind < 0.88:
            parts.append(f"<!-- block {n}: <a href=\"/old/{n}\">old link</a> -->\n")
        else:
            parts.append(f"<ul>{''.join(f'<li><a href=/tags/{n}-{i}>{w}</a></li>' for i, w in enumerate(text.split()[:8]))}</ul>\n")  # noqa: E501
    parts.append("</body></html>\n")
    return "".join(parts).encode("utf-8")


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def rewrite_in(body: bytes, chunk: int) -> bytes:
    rewriter = HtmlRewriter(param="jsessionid", token=TOKEN, origin=Origin(SCOPE))
    out = [rewriter.feed(body[i:i + chunk], final=i + chunk >= len(body))
           for i in range(0, len(body), chunk)]
    return b"".join(out)


def parse_only(body: bytes) -> None:
    parser = HTMLParser(convert_charrefs=False)
    parser.feed(body.decode("latin-1"))
    parser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--size-kb", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--baseline", help="a module file with rewrite_html and Origin to compare")
    args = ap.parse_args()
    body = page(args.size_kb * 1024)
    out = rewrite_in(body, len(body))
    print(f"page: {len(body)} bytes, {out.count(b';jsessionid=')} URLs rewritten, "
          f"{len(out) - len(body)} bytes added")
    rows = [("rewriter, one message", lambda: rewrite_in(body, len(body))),
            ("rewriter, 4 KiB chunks", lambda: rewrite_in(body, 4096)),
            ("rewriter, 1 KiB chunks", lambda: rewrite_in(body, 1024)),
            ("HTMLParser alone (floor)", lambda: parse_only(body))]
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_rewrite", args.baseline)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        origin = mod.Origin(SCOPE)
        rows.append((f"baseline {args.baseline}", lambda: mod.rewrite_html(
            body, param="jsessionid", token=TOKEN, origin=origin)))
    for name, fn in rows:
        ms = median_ms(fn, args.repeat)
        print(f"{name:<40} {ms:8.2f} ms  {len(body) / ms / 1000:7.1f} MB/s")


if __name__ == "__main__":
    main()
