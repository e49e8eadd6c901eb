"""The cost of a session-writing request: tandem in each persistence mode vs aiohttp-session.

    python bench/sessions.py --runs 5 --duration 5 --connections 32

The same counter app (read `counter` from the session, add one, write it back, answer JSON)
runs behind:

- tandem: two backends on loopback (the primary s1 and its secondary s2),
  `session.replication = "sync"`, and each `session.persistence` store in `sync` and
  `batched` mode (file, SQLite, PostgreSQL, Redis), plus `none` (in-memory replication only);
- aiohttp-session with its Redis storage (`RedisStorage`), one aiohttp process.

wrk drives `GET /count` over `--connections` keep-alive connections, cycling through
`--sessions` sessions created beforehand (one Cookie each), straight at the primary. For
each run: requests/s from wrk, and CPU-µs per request of the server side — every backend
process plus the store's processes (utime+stime from /proc, the whole process tree for
PostgreSQL) — divided by the requests wrk completed. All configurations run side by side;
after a warm-up run each, the measured runs take turns (run 1 of every configuration, then
run 2...), so a change in the machine's load hits all of them alike. The table shows
medians. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from backends.serve.lifespan import acknowledge_lifespan  # noqa: E402  (needs ROOT on the path)
from bench.procstat import descendants, proc_stats  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")

CONFIGS = ["tandem-memory", "tandem-file-sync", "tandem-file-batched", "tandem-sqlite-sync",
           "tandem-sqlite-batched", "tandem-postgresql-sync", "tandem-postgresql-batched",
           "tandem-redis-sync", "tandem-redis-batched", "aiohttp-session-redis",
           "tandem-starlette", "uvicorn-starlette-cookie"]


# --- the app, for both sides ------------------------------------------------------------------


async def counter(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """ASGI counter hosted by `tandem backend --app bench.sessions:counter`."""
    if scope["type"] == "lifespan":
        await acknowledge_lifespan(receive, send)
        return
    session = scope["session"]
    n = session.get("counter", 0) + 1
    session["counter"] = n
    body = b'{"counter": %d}' % n
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def serve_aiohttp_session(port: int, redis_url: str) -> None:
    """The same counter on aiohttp + aiohttp-session's RedisStorage (run in a subprocess)."""
    import asyncio

    import redis.asyncio as aioredis
    from aiohttp import web
    from aiohttp_session import get_session, setup
    from aiohttp_session.redis_storage import RedisStorage

    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass

    async def count(request: web.Request) -> web.Response:
        session = await get_session(request)
        n = session.get("counter", 0) + 1
        session["counter"] = n
        return web.Response(body=b'{"counter": %d}' % n, content_type="application/json")

    async def make_app() -> web.Application:
        app = web.Application()
        pool = aioredis.from_url(redis_url)
        setup(app, RedisStorage(pool, max_age=1800))
        app.router.add_get("/count", count)

        async def close(_: web.Application) -> None:
            await pool.aclose()
        app.on_cleanup.append(close)
        return app

    web.run_app(make_app(), host="127.0.0.1", port=port, access_log=None, print=None)


# --- processes and their CPU ------------------------------------------------------------------


def cpu_ticks(pids: list[int], trees: list[int]) -> int:
    """utime+stime of `pids`, plus every descendant of `trees` (and what they reaped)."""
    total = 0
    stats = proc_stats()
    todo = list(pids)
    for root in trees:
        todo += descendants(stats, root)
        if root in stats:   # cutime+cstime: children that exited already
            total += int(stats[root][13]) + int(stats[root][14])
    for pid in set(todo):
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])   # utime, stime
    return total


class Side:
    """One system under test: where to send requests, which processes to charge."""

    def __init__(self, *, url: str, cookie_name: str, pids: list[int], trees: list[int],
                 state_in_cookie: bool = False):
        self.url = url
        self.cookie_name = cookie_name
        self.pids = pids
        self.trees = trees
        # the session is the cookie itself (signed-cookie sessions): the server keeps nothing
        # to count, and each request writes a new cookie that the load does not send back
        self.state_in_cookie = state_in_cookie

    def cpu(self) -> int:
        return cpu_ticks(self.pids, self.trees)


def _counter(url: str, cookie: str) -> int:
    req = urllib.request.Request(url + "/count", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=5) as resp:
        return int(json.loads(resp.read())["counter"])


def _new_cookie(url: str, name: str) -> str:
    with urllib.request.urlopen(url + "/count", timeout=5) as resp:
        for value in resp.headers.get_all("Set-Cookie") or []:
            key, _, rest = value.partition("=")
            if key == name:
                return f"{name}={rest.split(';', 1)[0]}"
    raise RuntimeError(f"no {name} cookie from {url}")


@contextmanager
def redis_server(tmp: Path) -> Iterator[tuple[str, int]]:
    from tests.stores import RedisServer
    server = RedisServer(tmp / "redis").start()
    try:
        assert server.proc is not None
        yield server.url, server.proc.pid
    finally:
        server.stop()


@contextmanager
def postgres_server() -> Iterator[tuple[str, int]]:
    from tests.stores import Postgres
    server = Postgres()
    # durable settings (fsync on): a sync write means a committed, flushed transaction
    try:
        server.start()
        assert server.proc is not None
        yield server.dsn(), server.proc.pid
    finally:
        server.destroy()


@contextmanager
def tandem_side(tmp: Path, persistence: str, mode: str,
                app: str = "bench.sessions:counter") -> Iterator[Side]:
    from tests.cluster import Cluster

    class BenchCluster(Cluster):
        def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
            log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - closed in close()
            self._logs.append(log)
            env = dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_LOG_LEVEL="WARNING")
            env.pop("TANDEM_SECRETS", None)
            return subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], cwd=ROOT,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)

    with ExitStack() as stack:
        keys: dict[str, Any] = {"mode": mode}
        store_pids: list[int] = []
        if persistence == "file":
            keys["path"] = str(tmp / "sessions")
        elif persistence == "sqlite":
            keys["path"] = str(tmp / "sessions.db")
        elif persistence == "redis":
            url, pid = stack.enter_context(redis_server(tmp))
            keys["url"] = url
            store_pids.append(pid)
        elif persistence == "postgresql":
            dsn, pid = stack.enter_context(postgres_server())
            keys["dsns"] = [dsn]
        cluster = BenchCluster(tmp, n=2, app=app, interface="asgi",
                               session={"persistence": persistence, "replication": "sync"})
        stack.callback(cluster.close)
        if persistence != "none":
            with open(cluster.config_path, "a") as f:
                f.write("\n[persistence]\n" + "".join(
                    f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
        cluster.start(proxy=False)
        pids = [s["proc"].pid for s in cluster.servers.values()]
        trees = [pid] if persistence == "postgresql" else []
        yield Side(url=cluster.url("s1"), cookie_name="JSESSIONID", pids=pids + store_pids,
                   trees=trees)


@contextmanager
def aiohttp_session_side(tmp: Path) -> Iterator[Side]:
    from tests.cluster import free_ports
    with redis_server(tmp) as (url, redis_pid):
        port = free_ports(1)[0]
        log = open(tmp / "aiohttp.log", "ab")  # noqa: SIM115 - closed below
        proc = subprocess.Popen([sys.executable, __file__, "serve-aiohttp-session",
                                 "--port", str(port), "--redis", url], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    _new_cookie(base, "AIOHTTP_SESSION")
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError((tmp / "aiohttp.log").read_text()) from None
                    time.sleep(0.1)
            yield Side(url=base, cookie_name="AIOHTTP_SESSION", pids=[proc.pid, redis_pid],
                       trees=[])
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
            log.close()


@contextmanager
def uvicorn_side(tmp: Path) -> Iterator[Side]:
    """The Starlette counter on uvicorn (httptools, uvloop) with the signed-cookie sessions."""
    from tests.cluster import free_ports
    port = free_ports(1)[0]
    log = open(tmp / "uvicorn.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                             "bench.starlette_counter:cookie_app", "--port", str(port),
                             "--http", "httptools", "--loop", "uvloop", "--log-level",
                             "warning", "--no-access-log"], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                _new_cookie(base, "STARLETTE_SESSION")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "uvicorn.log").read_text()) from None
                time.sleep(0.1)
        yield Side(url=base, cookie_name="STARLETTE_SESSION", pids=[proc.pid], trees=[],
                   state_in_cookie=True)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
        log.close()


# --- load -------------------------------------------------------------------------------------


def wrk_script(tmp: Path, cookies: list[str]) -> Path:
    path = tmp / "sessions.lua"
    listed = ",\n".join(json.dumps(c) for c in cookies)
    path.write_text(f"""local cookies = {{
{listed}
}}
local i = math.random(#cookies)
local threads = {{}}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {{}} end
request = function()
  i = i % #cookies + 1
  return wrk.format("GET", "/count", {{["Cookie"] = cookies[i]}})
end
function response(status, headers, body)
  if status >= 300 then statuses[status] = (statuses[status] or 0) + 1 end
end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do
      io.write(string.format("status %d: %d\\n", code, n))
    end
  end
end
""")
    return path


def run_wrk(side: Side, script: Path, *, duration: float, connections: int,
            threads: int) -> dict[str, float]:
    before, t0 = side.cpu(), time.monotonic()
    done = subprocess.run(["wrk", "-t", str(threads), "-c", str(connections),
                           "-d", f"{max(1, round(duration))}s", "-s", str(script),
                           side.url + "/count"],
                          capture_output=True, text=True, check=True)
    if done.stderr.strip():
        # wrk reports a broken script here and then runs without it (no cookies sent)
        raise RuntimeError(f"wrk: {done.stderr.strip()}")
    out = done.stdout
    elapsed, used = time.monotonic() - t0, side.cpu() - before
    total = re.search(r"(\d+) requests in", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: (.*)", out)
    statuses = dict(re.findall(r"status (\d+): (\d+)", out))
    requests = int(total.group(1)) if total else 0
    if not requests:
        raise RuntimeError(f"wrk completed no request:\n{out}")
    return {"rps": requests / elapsed, "cpu_us": used / TICKS * 1e6 / requests,
            "requests": requests, "errors": int(errors.group(1)) if errors else 0,
            "socket_errors": sock.group(1) if sock else "",
            "statuses": {int(k): int(v) for k, v in statuses.items()}}


def measure(names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start every configuration, then run them in turns: run 1 of each, run 2 of each...
    so that a change of the machine's load over time hits every configuration alike."""
    tmp = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        with ExitStack() as stack:
            sides: dict[str, tuple[Side, Path]] = {}
            cookies_of: dict[str, list[str]] = {}
            for name in names:
                where = tmp / name
                where.mkdir()
                side = stack.enter_context(maker(name)(where))
                cookies = [_new_cookie(side.url, side.cookie_name)
                           for _ in range(args.sessions)]
                sides[name] = side, wrk_script(where, cookies)
                cookies_of[name] = cookies
                print(f"  started {name}", flush=True)
            for name, (side, script) in sides.items():
                run_wrk(side, script, duration=args.warmup, connections=args.connections,
                        threads=args.threads)
                # the load must write the sessions created above, not start new ones
                if not side.state_in_cookie and _counter(side.url, cookies_of[name][0]) < 3:
                    raise RuntimeError(f"{name}: the warm-up did not use the sessions' cookies")
            for i in range(args.runs):
                for name, (side, script) in sides.items():
                    r = run_wrk(side, script, duration=args.duration,
                                connections=args.connections, threads=args.threads)
                    runs[name].append(r)
                    print(f"  run {i + 1} {name:28s} {r['rps']:7.0f} req/s "
                          f"{r['cpu_us']:7.1f} CPU-µs/req {r['statuses'] or ''}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{"config": name, "runs": rs,
             "rps": statistics.median(r["rps"] for r in rs),
             "cpu_us": statistics.median(r["cpu_us"] for r in rs),
             "errors": sum(r["errors"] for r in rs)} for name, rs in runs.items()]


def maker(name: str) -> Callable[[Path], Any]:
    if name == "aiohttp-session-redis":
        return aiohttp_session_side
    if name == "uvicorn-starlette-cookie":
        return uvicorn_side
    if name == "tandem-starlette":
        return lambda tmp: tandem_side(tmp, "none", "sync", app="bench.starlette_counter:app")
    _, persistence, *rest = name.split("-")
    if persistence == "memory":
        return lambda tmp: tandem_side(tmp, "none", "sync")
    return lambda tmp: tandem_side(tmp, persistence, rest[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve-aiohttp-session")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--redis", required=True)
    parser.add_argument("--only", nargs="*", choices=CONFIGS, default=CONFIGS)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, not measured")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--sessions", type=int, default=256)
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)
    if args.command == "serve-aiohttp-session":
        serve_aiohttp_session(args.port, args.redis)
        return 0
    if shutil.which("wrk") is None:
        print("wrk not found (apt-get install wrk)", file=sys.stderr)
        return 2
    print(f"{os.cpu_count()} CPUs; {args.runs} runs x {args.duration:g}s, "
          f"{args.connections} connections, {args.sessions} sessions", flush=True)
    results = measure(args.only, args)
    print()
    print("| configuration | req/s (median) | CPU-µs/req (median) | non-2xx |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['config']} | {r['rps']:.0f} | {r['cpu_us']:.1f} | {r['errors']} |")
    base = {r["config"]: r for r in results}
    if "tandem-memory" in base and "aiohttp-session-redis" in base:
        ratio = base["tandem-memory"]["rps"] / base["aiohttp-session-redis"]["rps"]
        print(f"\ntandem (in-memory sync replication) / aiohttp-session+Redis: "
              f"{ratio:.2f}x the requests/s (target >= 3x)")
    if "tandem-starlette" in base and "uvicorn-starlette-cookie" in base:
        t, u = base["tandem-starlette"], base["uvicorn-starlette-cookie"]
        print(f"Starlette app, tandem backend (sync replication, both servers counted) / "
              f"uvicorn + SessionMiddleware: {t['rps'] / u['rps']:.2f}x the requests/s, "
              f"{t['cpu_us'] / u['cpu_us']:.2f}x the CPU per request")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
