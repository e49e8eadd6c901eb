"""`tandem export` and `tandem sync`: tandem's routing in HAProxy and nginx (docs/front-ends.md)."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
from pathlib import Path

from tandem.config import Config

__all__ = ["add_commands", "run_export", "run_sync"]

_ENGINES = ("haproxy", "nginx")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "export", help="write HAProxy or nginx configuration that routes as tandem's proxy",
        description="Write configuration with which stock HAProxy 2.6+ or nginx routes by the "
                    "session token — primary, then secondary, then any live server — with "
                    "tandem's health checks and retry rules (docs/front-ends.md).")
    ex.add_argument("engine", choices=_ENGINES, help="which front end: haproxy or nginx")
    ex.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    ex.add_argument("--complete", action="store_true",
                    help="a whole example configuration (frontend or server, listening on "
                         "--listen) instead of the fragment")
    ex.add_argument("--listen", metavar="ADDR",
                    help="--complete: where it listens (default: the file's proxy.listen)")
    ex.add_argument("-o", "--output", metavar="PATH", type=Path,
                    help="haproxy: the file to write (default: standard output); nginx: the "
                         "directory for tandem-http.conf, tandem-server.conf and, with "
                         "--complete, nginx.conf (default: both fragments on standard output)")
    ex.add_argument("--socket", default="/run/haproxy/tandem.sock", metavar="PATH",
                    help="haproxy --complete: the Runtime API socket (for `tandem sync`)")
    ex.add_argument("--connect-retries-only", action="store_true",
                    help="haproxy: retry connection failures only — no fail-over on a 503, "
                         "no retry after sending — which spares HAProxy the copy of every "
                         "request that its L7 retries need (docs/front-ends.md)")
    ex.add_argument("--prefix", default="/var/lib/nginx/tandem", metavar="DIR",
                    help="nginx --complete: where nginx keeps its pid and temporary files")

    sy = sub.add_parser(
        "sync", help="keep HAProxy's or nginx's server list in step with the cluster",
        description="Every --interval seconds, read the cluster's view from the servers' "
                    "/__tandem/health and apply it: HAProxy through its Runtime API (servers "
                    "that joined are added), nginx by rewriting tandem-http.conf (servers "
                    "that joined added, servers that fail their health marked down) and "
                    "reloading it.")
    sy.add_argument("engine", choices=_ENGINES, help="which front end: haproxy or nginx")
    sy.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    sy.add_argument("--socket", metavar="PATH|HOST:PORT",
                    help="haproxy: the Runtime API (`stats socket ... level admin`)")
    sy.add_argument("-o", "--output", metavar="FILE", type=Path,
                    help="nginx: the tandem-http.conf to rewrite")
    sy.add_argument("--reload", default="nginx -s reload", metavar="COMMAND",
                    help="nginx: how to reload it (default: %(default)s)")
    sy.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                    help="seconds between rounds (default: %(default)s)")
    sy.add_argument("--once", action="store_true", help="one round, then exit")


def run_export(cfg: Config, args: argparse.Namespace, source: str) -> int:
    if args.engine == "haproxy":
        from .export_haproxy import HaproxyOptions, render
        text = render(cfg, HaproxyOptions(complete=args.complete, listen=args.listen,
                                          socket=args.socket, source=source,
                                          l7_retries=not args.connect_retries_only))
        return _emit(text, args.output)
    from . import export_nginx as ng
    options = ng.NginxOptions(source=source, listen=args.listen, prefix=args.prefix,
                              include_dir=str(args.output.resolve()) if args.output else
                              "/etc/nginx")
    files = {ng.HTTP_FILE: ng.render_http(cfg, options=options),
             ng.SERVER_FILE: ng.render_server(cfg, options)}
    if args.complete:
        files["nginx.conf"] = ng.render_complete(cfg, options)
    if args.output is None:
        sys.stdout.write("\n".join(f"# ===== {name} =====\n{text}"
                                   for name, text in files.items()))
        return 0
    try:
        args.output.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (args.output / name).write_text(text)
    except OSError as exc:
        print(f"tandem: cannot write {args.output}: {exc}", file=sys.stderr)
        return 1
    return 0


def _emit(text: str, output: Path | None) -> int:
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        output.write_text(text)
    except OSError as exc:
        print(f"tandem: cannot write {output}: {exc}", file=sys.stderr)
        return 1
    return 0


def run_sync(cfg: Config, args: argparse.Namespace, source: str) -> int:
    from tandem.logs import configure

    from .errors import SyncError
    from .sync import run

    if args.engine == "haproxy" and not args.socket:
        print("tandem: sync haproxy needs --socket (the Runtime API)", file=sys.stderr)
        return 2
    if args.engine == "nginx" and args.output is None:
        print("tandem: sync nginx needs --output (the tandem-http.conf to rewrite)",
              file=sys.stderr)
        return 2
    if args.interval <= 0:
        print(f"tandem: --interval must be positive (got {args.interval})", file=sys.stderr)
        return 2
    configure(component="sync")
    try:
        return asyncio.run(run(cfg, engine=args.engine, interval_s=args.interval,
                               once=args.once, socket_path=args.socket, output=args.output,
                               reload=shlex.split(args.reload), source=source))
    except SyncError as exc:
        print(f"tandem: sync failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
