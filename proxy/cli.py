"""The `tandem` command: up, backend, proxy, status."""

from __future__ import annotations

import argparse
import sys

from backends import config as cluster_config
from backends.errors import ConfigError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=(
        "HTTP reverse proxy with session affinity and failover, and a backend runtime "
        "that replicates sessions from a primary server to a secondary one."))
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole cluster on this machine (servers + proxy)")
    up.add_argument("--config", help="cluster file (default: the embedded demo cluster)")
    up.add_argument("--app", default="backends.demo:app", help="MODULE:ATTR of the app")
    up.add_argument("--interface", default="auto", choices=("auto", "asgi", "wsgi"))
    up.add_argument("--no-restart", action="store_true",
                    help="do not restart a server process that dies")

    be = sub.add_parser("backend", help="run one backend server of the cluster")
    be.add_argument("--config", required=True)
    be.add_argument("--server", required=True, help="server id from the cluster file")
    be.add_argument("--app", required=True, help="MODULE:ATTR of the WSGI/ASGI app")
    be.add_argument("--interface", default="auto", choices=("auto", "asgi", "wsgi"))

    px = sub.add_parser("proxy", help="run the proxy tier")
    px.add_argument("--config", required=True)

    st = sub.add_parser("status", help="show the state of every server and of the proxy")
    st.add_argument("--config", required=True)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        path = args.config or str(cluster_config.default_config_path())
        cfg = cluster_config.load(path)
    except ConfigError as exc:
        print(f"tandem: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "backend":
        from backends.server import run as run_backend
        return run_backend(cfg, args.server, args.app, args.interface)
    if args.command == "proxy":
        from .server import run as run_proxy
        return run_proxy(cfg)
    if args.command == "up":
        from .up import run_up
        return run_up(cfg, path, app=args.app, interface=args.interface,
                      restart=not args.no_restart)
    from .up import print_status
    return print_status(cfg, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
