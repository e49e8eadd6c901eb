"""A service calling a tandem cluster with the replica-aware client: no proxy in between
(docs/client.md).

Start the demo cluster (`tandem up`: servers s1–s3 on 127.0.0.1:9001–9003), then, from the
root of this repository, after `pip install '.[client]'`:

    python -m examples.service_client                      # httpx, 30 calls
    python -m examples.service_client --library requests --calls 100

Each call increments the demo app's counter of this service's session (`POST /inc`) and
reads it back (`GET /api`), straight from the server the session's token names. Kill that
server (`kill -9 PID`, the pid each line shows): the next call goes to the session's
secondary, which takes the session over — the count goes on, and the line names the new
server. `tandem up` restarts the killed server, and the client learns it back from the
cluster view.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tandem.client import Cluster, NoServerAvailable
from tandem.logs import configure

BASE = "http://demo"  # names the cluster; the client dials the servers themselves


def with_httpx(cluster: Cluster) -> Any:
    """One session (one cookie jar) through the httpx transport: returns a call function."""
    import httpx

    from tandem.client import TandemTransport

    client = httpx.Client(base_url=BASE, transport=TandemTransport(cluster), timeout=5.0)

    def call() -> dict[str, Any]:
        client.post("/inc")  # (a 303 to "/": not followed)
        answer = client.get("/api")
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    return call


def with_requests(cluster: Cluster) -> Any:
    """The same session through the requests adapter."""
    import requests

    from tandem.client import TandemAdapter

    session = requests.Session()
    session.mount(BASE + "/", TandemAdapter(cluster))

    def call() -> dict[str, Any]:
        session.post(BASE + "/inc", allow_redirects=False, timeout=5.0)
        answer = session.get(BASE + "/api", timeout=5.0)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    return call


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Call a tandem cluster with no proxy.")
    ap.add_argument("--config", default="config/default.toml",
                    help="the cluster file (its servers' http addresses)")
    ap.add_argument("--library", choices=("httpx", "requests"), default="httpx")
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between calls")
    args = ap.parse_args(argv)
    # the client's events (client_failover, client_view_learned) go to stderr
    configure(component="service-example")
    cluster = Cluster.from_file(args.config)
    call = with_httpx(cluster) if args.library == "httpx" else with_requests(cluster)
    for n in range(args.calls):
        try:
            info = call()
        except NoServerAvailable as exc:
            print(f"no server answered: {exc}", file=sys.stderr)
            return 1
        print(f"count {info['count']}  served by {info['server']} (pid {info['pid']}), "
              f"primary {info['primary']}, secondary {info['secondary']}", flush=True)
        if n + 1 < args.calls:
            time.sleep(args.interval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
