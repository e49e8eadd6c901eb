"""`tandem export nginx`: tandem's routing written in nginx's own configuration language.

Two fragments, for two contexts (docs/front-ends.md says what each rule does):

- `tandem-http.conf` (in `http {}`): the maps that read the token — the cookie
  `session.cookie_name`, else `;jsessionid=` in the path or `?jsessionid=` in the query —
  and take its primary and secondary (`SID!PRIMARY!SECONDARY.SIGNATURE`, unverified: the
  backends check the signature); one upstream per server, and `tandem_all` (every server,
  round-robin) for new sessions and the last stage;
- `tandem-server.conf` (in `server {}`): `location /` proxies to the primary's upstream;
  a 502/503/504 goes on, through `error_page` to named locations, to the secondary's, then
  to `tandem_all` — each step only when tandem's retry rules allow it (`$tandem_retry_*`:
  a 503, or a connection that sent nothing, always; else only idempotent methods).

Stock nginx has no active health checks and no njs here: `tandem sync nginx` probes
`/__tandem/health`, marks the servers that fail `down`, adds the servers of the cluster's
view, rewrites `tandem-http.conf` and reloads nginx.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.address import Address
from tandem.config import Config

from .policy import IDEMPOTENT

__all__ = ["NginxOptions", "render_http", "render_server", "render_complete", "HTTP_FILE",
           "SERVER_FILE"]

HTTP_FILE = "tandem-http.conf"
SERVER_FILE = "tandem-server.conf"
_STAGES = ("secondary", "any")  # the named locations after location /


@dataclass(frozen=True, slots=True)
class NginxOptions:
    """What the cluster file does not say."""

    source: str = ""  # the cluster file, named in the header
    listen: str | None = None  # --complete: default the file's proxy.listen
    prefix: str = "/var/lib/nginx/tandem"  # --complete: pid and temp files
    include_dir: str = "/etc/nginx"  # --complete: where the fragments are


def _s(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


def upstream_of(server_id: str) -> str:
    return "tandem_" + server_id.replace("-", "_")


def servers_of(cfg: Config) -> dict[str, Address]:
    """The app servers of the file (witnesses are no backends)."""
    return {s.id: s.http for s in cfg.servers if not s.witness}


def render_http(cfg: Config, servers: Mapping[str, Address] | None = None, *,
                down: frozenset[str] = frozenset(), options: NginxOptions = NginxOptions()
                ) -> str:
    """The `http {}` fragment; `servers` (default: the file's) and `down` are what
    `tandem sync nginx` learnt."""
    servers = servers_of(cfg) if servers is None else servers
    p, s = cfg.proxy, cfg.session
    # ($cookie_NAME cannot name a cookie with a '-': a map on the Cookie header then)
    cookie_var = ("$cookie_" + s.cookie_name if "-" not in s.cookie_name
                  else "$tandem_cookie")
    param = re.escape(s.cookie_name.lower())
    methods = "|".join(sorted(m.decode() for m in IDEMPOTENT))
    out = [
        f"# tandem's routing for nginx, from {options.source or 'the cluster file'}: include",
        "# in http {} (`tandem export nginx`; docs/front-ends.md). Rewritten by",
        "# `tandem sync nginx`.",
        "",
        "# The route token: the cookie, else ;name= in the path or ?name= in the query.",
        "map $request_uri $tandem_url_token {",
        *([f'    "~[;?&]{param}=([^;/?&#]+)" $1;'] if s.url_rewriting else []),
        '    default "";',
        "}",
        *(["map $http_cookie $tandem_cookie {",
            f'    "~(?:^|;\\s*){re.escape(s.cookie_name)}=([^;]+)" $1;',
            '    default "";',
            "}"] if cookie_var == "$tandem_cookie" else []),
        f"map {cookie_var} $tandem_token {{",
        '    "" $tandem_url_token;',
        f"    default {cookie_var};",
        "}",
        "# SID!PRIMARY!SECONDARY.SIGNATURE ('!' may come as %21 in a query); unverified here:",
        "# the backends check the signature.",
        "map $tandem_token $tandem_primary {",
        '    "~^[^!%]*(?:!|%21)([A-Za-z0-9_-]+)(?:!|%21)" $1;',
        '    default "";',
        "}",
        "map $tandem_token $tandem_secondary {",
        '    "~^[^!%]*(?:!|%21)[A-Za-z0-9_-]+(?:!|%21)([A-Za-z0-9_-]+)[.]" $1;',
        '    default "";',
        "}",
        "map $tandem_primary $tandem_first {",
        *(f"    {sid} {upstream_of(sid)};" for sid in servers),
        "    default tandem_all;",
        "}",
        "# A request's id, the same on every attempt (the backends apply a retry once):",
        "# this host, this worker, when the request began (a map keeps the first reading",
        "# for the whole request), the connection and the request on it. Unique after a",
        "# restart too ($msec), and cheaper than $request_id (random bytes per request).",
        "map $msec $tandem_began {",
        "    default $msec;",
        "}",
        "map $tandem_secondary $tandem_second {",
        *(f"    {sid} {upstream_of(sid)};" for sid in servers),
        "    default tandem_all;",
        "}",
        "",
        "# May the request go on after the last attempt failed? A 503 (declined: nothing",
        "# ran) or a connection that sent nothing: always; otherwise idempotent methods only.",
        "# (One chain per stage: a map's value is kept for the rest of the request.)",
    ]
    for stage in _STAGES:
        out += [
            f"map $upstream_status $tandem_declined_{stage} {{",
            '    "~(^|[ ,:])503$" 1;',
            "    default 0;",
            "}",
            f"map $upstream_bytes_sent $tandem_unsent_{stage} {{",
            '    "~(^|[ ,:])0$" 1;',
            "    default 0;",
            "}",
            f'map "$request_method:$tandem_declined_{stage}$tandem_unsent_{stage}" '
            f"$tandem_retry_{stage} {{",
            *([f'    "~^({methods}):" 1;'] if p.retry != "none" else []),
            '    "~:1.$" 1;',
            '    "~:.1$" 1;',
            f'    "~:" {1 if p.retry == "all" else 0};',
            "}",
        ]
    out.append("")
    for sid, addr in servers.items():
        mark = " down" if sid in down else ""
        out += [f"upstream {upstream_of(sid)} {{",
                f"    server {addr}{mark};",
                "    keepalive 128;",
                "}"]
    # (every server down: nginx answers 502 at once, as tandem's proxy does when all fail)
    out += ["upstream tandem_all {",
            *(f"    server {addr} max_fails=1 fail_timeout={max(1, round(p.max_skip_s))}s"
              f"{' down' if sid in down else ''};" for sid, addr in servers.items()),
            "    keepalive 32;",
            "}"]
    return "\n".join(out) + "\n"


def render_server(cfg: Config, options: NginxOptions = NginxOptions()) -> str:
    """The `server {}` fragment: the three stages as locations."""
    p = cfg.proxy
    common = [
        "    proxy_http_version 1.1;",
        '    proxy_set_header Connection "";',
        "    proxy_set_header Host $host;",
        "    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
        "    proxy_set_header X-Forwarded-Proto $scheme;",
        "    # between the tiers only: a client's are not passed (nginx cannot drop a",
        "    # prefix: every name the backends read is listed)",
        "    proxy_set_header X-Tandem-View \"\";",
        "    proxy_set_header X-Tandem-Cluster \"\";",
        "    proxy_set_header X-Tandem-State \"\";",
        "    # the same on every attempt of this request: a retry applies once",
        "    proxy_set_header X-Tandem-Request-Id "
        "$hostname-$pid-$tandem_began-$connection-$connection_requests;",
        f"    proxy_set_header X-Tandem-Deadline {max(1, round(p.io_timeout_s * 1000))};",
        "    proxy_hide_header X-Tandem-State;",
        "    proxy_hide_header X-Tandem-Cluster;",
        f"    proxy_connect_timeout {_s(p.connect_timeout_s)};",
        f"    proxy_read_timeout {_s(p.io_timeout_s)};",
        f"    proxy_send_timeout {_s(p.io_timeout_s)};",
        # (non-idempotent requests already sent are not passed on: nginx's default)
        "    proxy_next_upstream error timeout http_503;",
    ]
    return "\n".join([
        f"# tandem's routing for nginx, from {options.source or 'the cluster file'}: include",
        "# in server {} (`tandem export nginx`; docs/front-ends.md).",
        "",
        "# 1. the session's primary (no token: any server, round-robin)",
        "location / {",
        "    proxy_pass http://$tandem_first;",
        *common,
        "    proxy_intercept_errors on;",
        "    error_page 502 503 504 = @tandem_secondary;",
        "}",
        "# 2. its secondary",
        "location @tandem_secondary {",
        "    if ($tandem_retry_secondary = 0) { return 502; }",
        "    proxy_pass http://$tandem_second;",
        *common,
        "    proxy_intercept_errors on;",
        "    error_page 502 503 504 = @tandem_any;",
        "}",
        "# 3. any live server (it fetches the session from where it lives)",
        "location @tandem_any {",
        "    if ($tandem_retry_any = 0) { return 502; }",
        "    proxy_pass http://tandem_all;",
        *common,
        "}",
    ]) + "\n"


def render_complete(cfg: Config, options: NginxOptions = NginxOptions()) -> str:
    """A whole nginx.conf that includes the two fragments from `options.include_dir`."""
    listen = options.listen or str(cfg.proxy.listen)
    pre = options.prefix
    return f"""# An example nginx.conf around tandem's fragments (`tandem export nginx --complete`).
worker_processes auto;
pcre_jit on;  # the maps that read the token are regular expressions
pid {pre}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    client_body_temp_path {pre}/client_body;
    proxy_temp_path {pre}/proxy_temp;
    fastcgi_temp_path {pre}/fastcgi;
    uwsgi_temp_path {pre}/uwsgi;
    scgi_temp_path {pre}/scgi;
    include {options.include_dir}/{HTTP_FILE};
    server {{
        listen {listen};
        include {options.include_dir}/{SERVER_FILE};
    }}
}}
"""
