"""The `tandem` command: up, backend, witness, proxy, status, certs, site-down, export,
sync."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib import metadata

from tandem import config as cluster_config
from tandem import supervision
from tandem.errors import ConfigError

__all__ = ["main"]

_INTERFACES = ("auto", "asgi", "wsgi")
_INTERFACE_HELP = ("how to call the app: asgi, wsgi, or auto (ASGI if it is a coroutine "
                   "function or its __call__ is one, else WSGI; default: auto)")
_DEBUG_HELP = "show tracebacks of start-up errors and log at DEBUG (as TANDEM_LOG_LEVEL=DEBUG)"


def _version() -> str:
    try:
        return metadata.version("tandem-proxy")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        return "unknown (not installed)"


def _up_epilog() -> str:
    """What `tandem up` runs with no --config, read from the embedded cluster file itself."""
    from .up import RESTART_LIMIT, RESTART_WINDOW_S

    try:
        cfg = cluster_config.load(cluster_config.default_config_path())
        machines = sorted({s.machine for s in cfg.servers})
        servers = "\n".join(
            f"    {s.id}  http {s.http}, replication {s.replication}, machine {s.machine}"
            for s in cfg.servers)
        admin = (f" and its status page at http://{cfg.proxy.admin}/__tandem/status"
                 if cfg.proxy.admin else "")
        default = (
            f"Without --config: the embedded demo cluster, {len(cfg.servers)} servers on "
            f"{len(machines)} \"machines\" ({', '.join(machines)})\n"
            "(a session's secondary is on another machine than its primary where it can be),\n"
            f"{servers}\n"
            f"the proxy at http://{cfg.proxy.listen}/{admin},\n"
            "and the demo counter app (backends.demo:app).\n")
    except ConfigError as exc:  # pragma: no cover - a broken install
        default = f"(the embedded demo cluster cannot be read: {exc})\n"
    return default + (
        "\n"
        "Once every server and the proxy listen, it prints the proxy's URL. A process that\n"
        f"exits is restarted; {RESTART_LIMIT} exits of one process within "
        f"{RESTART_WINDOW_S:g} s, or a restarted process\n"
        "that cannot start, stop the whole cluster (exit status 1).\n"
        "\n"
        "Signals: Ctrl-C (SIGINT) or SIGTERM stops all of it, one line per process;\n"
        "SIGHUP restarts the servers one at a time (a rolling restart: each hands its\n"
        "sessions to their secondaries, restarts and rejoins before the next one goes).\n"
        "With --host or --servers (part of the cluster, the other hosts running the rest),\n"
        "Ctrl-C or SIGTERM drains this part's servers one at a time to the others, then\n"
        "stops its proxy (docs/deployment.md).\n"
        "\n"
        "The servers and the proxy log at WARNING here (TANDEM_LOG_LEVEL, or --debug).\n"
        "Exit status: 0 stopped by a signal, 1 a process failed, 2 bad configuration or app.")


def _add_placement(up: argparse.ArgumentParser) -> None:
    """`tandem up`'s part of the cluster (tandem.placement; docs/deployment.md)."""
    part = up.add_argument_group(
        "one host of several", "Start part of the cluster; the other hosts start the rest, "
        "and the servers find each other at their replication addresses. Ctrl-C then "
        "drains this part's servers to the others.")
    which = part.add_mutually_exclusive_group()
    which.add_argument("--host", metavar="HOST",
                       help="only the servers on HOST (the host of their http or "
                            "replication address, or their machine), and the proxy if the "
                            "file puts it there ([proxy] hosts, else the host of listen)")
    which.add_argument("--servers", metavar="ID,ID", type=lambda v: v.split(","),
                       help="only these servers (no proxy)")
    proxy = part.add_mutually_exclusive_group()
    proxy.add_argument("--no-proxy", dest="proxy", action="store_const", const="no",
                       default="auto", help="no proxy, wherever the file puts it")
    proxy.add_argument("--proxy-only", dest="proxy", action="store_const", const="only",
                       help="only the proxy (with --host: if the file puts it there)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem", description=(
        "HTTP reverse proxy with session affinity and failover, and a backend runtime "
        "that replicates sessions from a primary server to a secondary one."))
    p.add_argument("--version", action="version", version=f"tandem {_version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser(
        "up", help="run the cluster on this machine (servers + proxy), or this host's part",
        description="Run every server of the cluster file and the proxy on this machine "
                    "(or, with --host or --servers, this host's part of them), as child "
                    "processes, and supervise them (a server with witness = true runs as "
                    "`tandem witness`).",
        epilog=_up_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--config", metavar="FILE",
                    help="cluster file (default: the embedded demo cluster, below)")
    up.add_argument("--app", default="backends.demo:app", metavar="MODULE:ATTR",
                    help="the WSGI or ASGI app every server runs, imported from the current "
                         "directory or the path (default: backends.demo:app, the demo counter)")
    up.add_argument("--interface", default="auto", choices=_INTERFACES, help=_INTERFACE_HELP)
    up.add_argument("--no-restart", action="store_true",
                    help="stop the cluster when a process exits instead of restarting it")
    up.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    _add_placement(up)

    be = sub.add_parser(
        "backend", help="run one backend server of the cluster",
        description="Run one server of the cluster file: the app on its http address, the "
                    "replication channel on its replication address. SIGTERM or Ctrl-C "
                    "drains it (its sessions go to their secondaries), then it exits.")
    be.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    be.add_argument("--server", required=True, metavar="ID",
                    help="which server of the cluster file this is (its id)")
    be.add_argument("--app", required=True, metavar="MODULE:ATTR",
                    help="the WSGI or ASGI app, imported from the current directory or the path")
    be.add_argument("--interface", default="auto", choices=_INTERFACES, help=_INTERFACE_HELP)
    be.add_argument("--debug", action="store_true", help=_DEBUG_HELP)

    wi = sub.add_parser(
        "witness", help="run a witness of the cluster (a third voter for two servers)",
        description="Run a server of the cluster file that has witness = true: it votes in "
                    "the cluster's view and grants leases, so that two servers can fail over "
                    "to each other; it hosts no app and no sessions, and its http address "
                    "answers only /__tandem/health. SIGTERM or Ctrl-C stops it.")
    wi.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    wi.add_argument("--server", required=True, metavar="ID",
                    help="which server of the cluster file this is (its id)")
    wi.add_argument("--debug", action="store_true", help=_DEBUG_HELP)

    px = sub.add_parser(
        "proxy", help="run the proxy tier",
        description="Run the proxy: its listen address, and its status page on the admin "
                    "address (the [proxy] section of the cluster file).")
    px.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    px.add_argument("--debug", action="store_true", help=_DEBUG_HELP)

    st = sub.add_parser(
        "status", help="show the state of every server and of the proxy",
        description="Ask every server of the cluster file and the proxy how they are; "
                    "exit status 1 if a server is down.")
    st.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    st.add_argument("--json", action="store_true", help="machine-readable output")

    ce = sub.add_parser(
        "certs", help="make a CA and a certificate per server, for TLS between the servers",
        description="Write a CA (ca.crt, ca.key) and a certificate and key per server of the "
                    "cluster file (<id>.crt, <id>.key; witnesses included) into a directory, "
                    "for TLS on the replication channel, and print the lines the cluster "
                    "file needs. A CA already in the directory is used again: running it "
                    "again renews the servers' certificates. Keys are written mode 0600.",
        epilog="Rotating the CA: --new-ca (every server then trusts both CAs), once every "
               "server has reloaded it a plain run (new certificates from the new CA), "
               "then --drop-old-cas. The servers read changed files without a restart.")
    ce.add_argument("--config", required=True, metavar="FILE", help="cluster file")
    ce.add_argument("--out", required=True, metavar="DIR", help="where the files go")
    ce.add_argument("--server", action="append", default=[], metavar="ID",
                    help="only this server's certificate (repeatable; default: every server)")
    ce.add_argument("--days", type=int, default=365,
                    help="how long the servers' certificates are valid (default: 365)")
    rotation = ce.add_mutually_exclusive_group()
    rotation.add_argument("--new-ca", action="store_true",
                          help="add a new CA to the bundle and sign with it from now on")
    rotation.add_argument("--drop-old-cas", action="store_true",
                          help="leave only the signing CA in the bundle")

    sd = sub.add_parser(
        "site-down", help="declare a remote site down at every server of this site",
        description="Tell every server of this site (the cluster file's) that the remote "
                    "site is down: they take its sessions over at their next request. Only "
                    "for a site that is really down or fenced (hosts off, cut off and "
                    "stopped): a site that still serves would serve the same sessions "
                    "(docs/sites.md). Safe to repeat; exit status 1 if a server refused "
                    "(a server of that site still answers it) or could not be reached.")
    sd.add_argument("--config", required=True, metavar="FILE", help="this site's cluster file")
    sd.add_argument("--site", required=True, metavar="NAME",
                    help="the remote site (its [[sites]] name)")
    from .front_end_cli import add_commands
    add_commands(sub)  # export, sync (HAProxy and nginx)
    return p


def main(argv: list[str] | None = None) -> int:
    if supervision.ENV in os.environ:
        # Under `tandem up`: a terminal's Ctrl-C reaches every process of its group, but
        # it is for the supervisor, which tells each process how to stop.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = _parser().parse_args(argv)
    if getattr(args, "debug", False):
        os.environ["TANDEM_LOG_LEVEL"] = "DEBUG"  # this process and its children
    try:
        path = args.config or str(cluster_config.default_config_path())
        cfg = cluster_config.load(path)
    except ConfigError as exc:
        from tandem.startup import fail
        return fail(f"tandem: configuration error: {exc}", exc, code=2)
    if args.command == "witness":
        from backends.witness import run as run_witness
        return run_witness(cfg, args.server)
    if args.command == "backend":
        from backends.server import run as run_backend
        return run_backend(cfg, args.server, args.app, args.interface)
    if args.command in ("export", "sync"):
        from . import front_end_cli
        run = front_end_cli.run_export if args.command == "export" else front_end_cli.run_sync
        return run(cfg, args, path)
    if args.command == "proxy":
        from .server import run as run_proxy
        return run_proxy(cfg)
    if args.command == "certs":
        from tandem.certs import run as run_certs
        return run_certs(cfg, args.out, servers=args.server, days=args.days,
                         new_ca=args.new_ca, drop_old_cas=args.drop_old_cas)
    if args.command == "up":
        from tandem.errors import PlacementError
        from tandem.placement import select

        from .up import run_up
        try:
            here = select(cfg, host=args.host, servers=args.servers, proxy=args.proxy)
        except PlacementError as exc:
            from tandem.startup import fail
            return fail(f"tandem: {exc}", exc, code=2)
        return run_up(cfg, path, app=args.app, interface=args.interface,
                      restart=not args.no_restart, placement=here)
    if args.command == "site-down":
        from backends.sites.command import run_site_down
        return run_site_down(cfg, args.site, path)
    from .up import print_status
    return print_status(cfg, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
