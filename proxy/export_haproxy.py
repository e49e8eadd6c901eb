"""`tandem export haproxy`: tandem's routing written in HAProxy's own configuration language.

What each rule does and what HAProxy cannot do that tandem's proxy does: docs/front-ends.md.
In short, per request:

- the token is the cookie `session.cookie_name`, else `;jsessionid=` in the path or
  `?jsessionid=` in the query (`url_param(name,;)` reads both); its primary and secondary
  are fields 2 and 3 of `SID!PRIMARY!SECONDARY.SIGNATURE`. The signature is not checked
  here: the backends verify it, and a forged token only routes a request somewhere;
- `use-server` names the primary, then the secondary: a rule naming a server that is down
  (health check, or marked down at its first connection error) is skipped, and with
  neither usable the balance algorithm picks any live server, which fetches the session;
- retries: connection failures always; a 503 (a backend that declined: nothing ran)
  always; a failure after the request was sent only for idempotent methods — non-idempotent
  requests go to a second backend, `<name>_unsafe`, whose `retry-on` leaves those out
  (HAProxy's `retry-on` is per backend);
- every retry is redispatched (`option redispatch 1`): HAProxy's retry goes to a server of
  the balance algorithm, not to the secondary (the one rule its language cannot say).

Servers are named by their tandem id, so that `use-server %[req.cook(...),field(2,!)]` finds
them, and `tandem sync haproxy` can add the servers that join at run time (`add server`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.config import Config, ServerConfig

from .policy import IDEMPOTENT

__all__ = ["HaproxyOptions", "render", "server_args", "BACKEND", "UNSAFE_SUFFIX"]

BACKEND = "tandem"
UNSAFE_SUFFIX = "_unsafe"
_DEFAULT_CHECK_S = 1.0  # when the cluster file turns tandem's own probes off


@dataclass(frozen=True, slots=True)
class HaproxyOptions:
    """What the cluster file does not say: names and, for `--complete`, the frontend."""

    backend: str = BACKEND
    complete: bool = False
    listen: str | None = None  # default: the file's proxy.listen
    socket: str = "/run/haproxy/tandem.sock"  # the Runtime API, for `tandem sync`
    # False: retry connection failures only (no 503 fail-over, no retry after sending),
    # which spares HAProxy the copy of every request that L7 retries need
    l7_retries: bool = True
    source: str = ""  # the cluster file, named in the header


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def check_interval_ms(cfg: Config) -> int:
    p = cfg.proxy
    return _ms(p.health_interval_s if p.health_interval_s > 0 else _DEFAULT_CHECK_S)


def server_args(cfg: Config, *, track: str | None = None) -> str:
    """The options of one server line (also what `add server` is given: dynamic servers
    do not inherit `default-server`)."""
    if track is not None:
        return f"track {track}"
    p = cfg.proxy
    return (f"check inter {check_interval_ms(cfg)} rise {p.health_rise} fall {p.health_fall} "
            "observe layer4 error-limit 1 on-error mark-down")


def _backend(cfg: Config, name: str, servers: list[ServerConfig], *, unsafe_of: str | None,
             after_send: bool, l7: bool) -> list[str]:
    p, s = cfg.proxy, cfg.session
    param = s.cookie_name.lower()
    retry_on = ("conn-failure" if not l7 else
                "conn-failure empty-response response-timeout 503" if after_send
                else "conn-failure 503")
    cookie = f"req.cook({s.cookie_name})"
    url = f"url_param({param},;)"
    # (no variables: a txn variable costs more per request than reading the cookie twice)
    lines = [
        f"backend {name}",
        "    mode http",
        "    balance roundrobin",
        "    # X-Tandem-* are between the tiers only; the request id is the same on every",
        "    # retry (HAProxy re-sends the same request), which makes a retry apply once.",
        "    http-request del-header X-Tandem- -m beg",
        "    http-request set-header X-Tandem-Request-Id %[uuid]",
        f"    http-request set-header X-Tandem-Deadline {_ms(p.io_timeout_s)}",
        "    http-response del-header X-Tandem-State if { status 503 }",
        "    # The token SID!PRIMARY!SECONDARY.SIGNATURE, unverified (the backends check its",
        "    # signature): the primary, then the secondary, from the cookie; else from",
        "    # ;name= in the path or the query (url_param with ';' reads both). A rule naming",
        "    # a server that is down is skipped; with none usable (or no token) the balance",
        "    # algorithm picks a live server, which fetches the session.",
        f"    use-server %[{cookie},field(2,!)] if {{ {cookie} -m found }}",
        f"    use-server %[{cookie},field(3,!),field(1,.)] if {{ {cookie} -m found }}",
    ]
    if s.url_rewriting:
        token = f"{url},url_dec,field(1,/),field(1,?)"
        when = f"if !{{ {cookie} -m found }} {{ {url} -m found }}"
        lines += [f"    use-server %[{token},field(2,!)] {when}",
                  f"    use-server %[{token},field(3,!),field(1,.)] {when}"]
    lines += [
        "    option redispatch 1",
        f"    retries {max(3, len(servers))}",
        f"    retry-on {retry_on}",
        f"    timeout connect {_ms(p.connect_timeout_s)}",
        f"    timeout server {_ms(p.io_timeout_s)}",
    ]
    if unsafe_of is None:
        lines += [
            "    # Up: answers /__tandem/health, not draining, and holds its lease.",
            "    option httpchk",
            "    http-check send meth GET uri /__tandem/health ver HTTP/1.1 hdr Host tandem",
            '    http-check expect rstring "\\"state\\": \\"up\\".*\\"lease\\": true"',
        ]
    for srv in servers:
        track = None if unsafe_of is None else f"{unsafe_of}/{srv.id}"
        lines.append(f"    server {srv.id} {srv.http} {server_args(cfg, track=track)}")
    return lines


def render(cfg: Config, options: HaproxyOptions = HaproxyOptions()) -> str:
    """The backends (the fragment), or with `options.complete` a whole configuration."""
    servers = [s for s in cfg.servers if not s.witness]
    name = options.backend
    unsafe = name + UNSAFE_SUFFIX
    two = cfg.proxy.retry == "idempotent" and options.l7_retries
    methods = " ".join(sorted(m.decode() for m in IDEMPOTENT))
    head = [
        f"# tandem's routing for HAProxy 2.6+, from {options.source or 'the cluster file'}",
        "# (`tandem export haproxy`; docs/front-ends.md says what each rule does).",
    ]
    use = [f"    use_backend {unsafe} if !{{ method {methods} }}"] if two else []
    use.append(f"    default_backend {name}")
    if not options.complete:
        head += ["# In the frontend that serves the application:",
                 *("#" + line[1:] for line in use)]
    out = [*head, ""]
    if options.complete:
        listen = options.listen or str(cfg.proxy.listen)
        out += [
            "global",
            f"    stats socket {options.socket} mode 600 level admin",
            "    maxconn 4096",
            "",
            "defaults",
            "    mode http",
            "    option http-keep-alive",
            "    option forwardfor",
            "    timeout client 30s",
            f"    timeout http-keep-alive {_ms(cfg.proxy.keepalive_s)}",
            "",
            "frontend app",
            f"    bind {listen}",
            "    http-request set-header X-Forwarded-Proto http",
            *use,
            "",
        ]
    after_send = cfg.proxy.retry != "none"
    out += _backend(cfg, name, servers, unsafe_of=None, after_send=after_send,
                    l7=options.l7_retries)
    if two:
        out += ["", "# Non-idempotent methods: retried after a connection failure or a 503 only.",
                *_backend(cfg, unsafe, servers, unsafe_of=name, after_send=False, l7=True)]
    return "\n".join(out) + "\n"
