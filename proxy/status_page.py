"""The proxy's status page: one row per backend with its one state, since when, and a
legend saying what each state means and what to do. The page reloads itself every
`REFRESH_S` seconds; it is rendered from `proxy.admin.status_snapshot`.
"""

from __future__ import annotations

import html
import time
from typing import Any

from .status import LEGEND, Status, clock_time

__all__ = ["render_html", "REFRESH_S"]

REFRESH_S = 5

_CSS_CLASS = {
    Status.SERVING: "serving",
    Status.DRAINING: "draining",
    Status.DOWN_ADMIN: "down",
    Status.FAILING: "failing",
    Status.OUT_OF_VIEW: "outside",
    Status.SKIPPED: "skipped",
}

_STYLE = """
body{font-family:system-ui,sans-serif;font-size:15px;margin:1.5em 2em;color:#1d1d1f}
h1{margin:0 0 .2em}h2{margin:1.6em 0 .4em;font-size:1.15em}
.meta{color:#666;margin:.2em 0 1em}
table{border-collapse:collapse}
td,th{border:1px solid #d0d0d0;padding:.35em .7em;text-align:left;vertical-align:top}
th{background:#f3f3f3}
td.num{text-align:right}td.detail{min-width:12em}
.ago{color:#666;font-size:.9em}
.st{display:inline-block;padding:.1em .55em;border-radius:.8em;font-weight:600;
white-space:nowrap}
.serving{background:#d8f3dc;color:#1b5e20}
.draining{background:#fff3c4;color:#7a5b00}
.down{background:#e0e0e0;color:#333}
.failing{background:#ffd6d6;color:#9b1111}
.outside{background:#ffe2c6;color:#8a4100}
.skipped{background:#fff0b3;color:#6b5300}
table.legend td:first-child{white-space:nowrap}
"""


def render_html(s: dict[str, Any]) -> str:
    esc = html.escape
    rows = []
    for b in s["backends"]:
        status = Status(b["state_summary"])
        bad = f"bad mark {b['bad_for_s']:.0f} s" if b["bad"] else "no bad mark"
        facts = (f"admin {b['admin_state']} · probes "
                 f"{'passing' if b['healthy'] else 'failing'} · "
                 f"{'in' if b['in_view'] else 'not in'} view · {bad}")
        since = (f"{esc(clock_time(b['since']))}<br>"
                 f"<span class=\"ago\">{esc(_ago(b['since_s_ago']))}</span>")
        cells = [
            f"<td>{esc(b['id'])}</td>",
            f"<td>{esc(b['address'])}</td>",
            f"<td><span class=\"st {_CSS_CLASS[status]}\" title=\"{esc(facts)}\">"
            f"{esc(status.value)}</span></td>",
            f"<td title=\"{esc(_full_time(b['since']))}\">{since}</td>",
            f"<td class=\"detail\">{esc(b['state_detail'])}</td>",
            *(f"<td class=\"num\">{b[k]}</td>" for k in (
                "routed", "failovers", "connect_errors", "io_errors", "idle_connections")),
        ]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = "\n".join(
        f"<tr><td><span class=\"st {_CSS_CLASS[st]}\">{esc(st.value)}</span></td>"
        f"<td>{esc(means)}</td><td>{esc(todo)}</td></tr>" for st, means, todo in LEGEND)
    failovers = ", ".join(f"{esc(k)}: {v}" for k, v in s["failovers"].items()) or "none"
    req = s["requests"]
    classes = " · ".join(f"{k} {req[k]}" for k in ("2xx", "3xx", "4xx", "5xx"))
    probes = ("on" if s["active_probes"] else
              "off (proxy.health_interval_s = 0): a server that died is seen only when a "
              "request to it fails")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>tandem proxy</title><style>{_STYLE}</style></head>
<body><h1>tandem proxy</h1>
<p class="meta">As of {esc(_full_time(s['generated_at']))} · this page reloads every
{REFRESH_S} s · active health probes: {esc(probes)}</p>
<p>Requests: {req['total']} ({classes}) · failovers: {failovers} ·
retries: {s['retries']} · bad tokens: {s['bad_tokens']} ·
client connections: {s['client_connections']} · cluster view: {esc(s['view'])}</p>
<table><tr><th>backend</th><th>address</th><th>state</th><th>since</th><th>detail</th>
<th>requests routed</th><th>fail&shy;overs</th><th>connect errors</th><th>io errors</th>
<th>idle connections</th></tr>
{''.join(rows)}
</table>
<h2>States</h2>
<p class="meta">Each backend shows the first of these that holds (hover a state for the
facts behind it).</p>
<table class="legend"><tr><th>state</th><th>what it means</th><th>what to do</th></tr>
{legend}
</table></body></html>
"""


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} days ago"


def _full_time(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(epoch_s))
