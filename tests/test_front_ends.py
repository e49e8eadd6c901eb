"""tandem's routing in real HAProxy and real nginx, configured only by `tandem export`:
the end-to-end failover test of tests/test_e2e_failover.py through each, and `tandem sync`
adding a server the exported file did not name."""

from __future__ import annotations

import json
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Client
from tests.front_ends import ENGINES, FrontEnd, have, tandem


@pytest.fixture
def front_end(tmp_path: Path) -> Iterator[object]:
    made: list[FrontEnd] = []

    def factory(engine: str, cluster: object, **kwargs: object) -> FrontEnd:
        if not have(engine):
            pytest.skip(f"{engine} is not installed")
        fe = FrontEnd(engine, cluster, tmp_path / f"{engine}{len(made)}",  # type: ignore[arg-type]
                      **kwargs)  # type: ignore[arg-type]
        made.append(fe)
        return fe.start()

    yield factory
    for fe in made:
        fe.close()


def sessions_on(base: str, primary: str, count: int, *, cookies: bool) -> list[Client]:
    clients: list[Client] = []
    while sum(c.route[1] == primary for c in clients) < count:
        c = Client(base, cookies=cookies)
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1, body
        clients.append(c)
        assert len(clients) < 10 * count, "new sessions are not spread over the servers"
    return clients


@pytest.mark.parametrize("cookies", [True, False], ids=["cookie", "url-rewriting"])
@pytest.mark.parametrize("engine", ENGINES)
def test_kill_primary_through_exported_config(make_cluster, front_end, engine, cookies):
    cluster = make_cluster().start(proxy=False)
    fe = front_end(engine, cluster)
    clients = sessions_on(fe.url, "s1", 20, cookies=cookies)
    for c in clients:
        for n in (2, 3):
            status, body = c.get()
            assert status == 200 and body["counter"] == n
            # affinity: every request of a session reached its primary
            assert body["server"] == c.route[1]
    if not cookies:
        assert all(";jsessionid=" in c.next_path for c in clients)
    before = {id(c): c.route for c in clients}
    assert all(r[2] not in ("NONE", r[1]) for r in before.values())

    cluster.kill("s1")

    # (in a random order: sessions are made round-robin, and a balance algorithm's turn
    # could otherwise line up with the secondaries by chance)
    random.shuffle(clients)
    by_secondary = 0
    for c in clients:
        sid, primary, secondary = before[id(c)]
        status, body = c.get()
        assert status == 200, (engine, body, fe.log())
        assert body["counter"] == 4, (before[id(c)], body)
        new_sid, new_primary, new_secondary = c.route
        assert new_sid == sid
        assert body["server"] == new_primary and new_primary != "s1"
        assert new_secondary not in ("s1", new_primary, "NONE")
        if primary == "s1":
            by_secondary += body["server"] == secondary
        else:
            assert body["server"] == primary
    moved = sum(1 for r in before.values() if r[1] == "s1")
    if engine == "nginx":
        # nginx's error_page chain goes to the secondary itself
        assert by_secondary == moved
    else:
        # HAProxy's retry after the first failed connection is redispatched (any live
        # server, which fetches the session); the primary is then marked down and the
        # sessions' next requests go to their secondaries by rule
        assert by_secondary >= moved - 1, by_secondary
    # the next rounds are plain affinity again, counters intact
    for n in (5, 6):
        for c in clients:
            status, body = c.get()
            assert status == 200 and body["counter"] == n and body["server"] == c.route[1]


def _send(base: str, method: str, path: str, token: str) -> tuple[int, Any]:
    req = urllib.request.Request(base + path, method=method,
                                 headers={"Cookie": f"JSESSIONID={token}"})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


@pytest.mark.parametrize("engine", ENGINES)
def test_retry_rules_through_exported_config(make_cluster, front_end, engine):
    """The primary dies while it holds a POST and a GET: the GET is sent again (to the
    secondary), the POST is not (it may have run); a POST whose connection fails is."""
    cluster = make_cluster().start(proxy=False)
    fe = front_end(engine, cluster)
    post, get = [c for c in sessions_on(fe.url, "s1", 2, cookies=True) if c.route[1] == "s1"]
    with ThreadPoolExecutor(2) as pool:
        in_post = pool.submit(_send, fe.url, "POST", "/set?key=k&value=p&sleep=2", post.token)
        in_get = pool.submit(_send, fe.url, "GET", "/set?key=k&value=g&sleep=2", get.token)
        time.sleep(0.7)
        cluster.kill("s1")
        status_post, _ = in_post.result()
        status_get, body_get = in_get.result()
    assert status_post in (502, 504), status_post  # sent, and not sent again
    # The GET was sent again: answered by a server (a 503 when the one it reached had not
    # yet seen the cluster remove the dead primary: nothing ran), not the engine's 502.
    assert status_get in (200, 503), (status_get, body_get)
    if status_get == 200:
        assert body_get["values"] == {"k": "g"}
        if engine == "nginx":
            assert body_get["server"] == get.route[2], body_get
        else:  # (HAProxy's retry goes to a server of its balance algorithm)
            assert body_get["server"] in ("s2", "s3"), body_get
    # nothing of the failed POST was applied; the next POST (no connection to its
    # primary, or the primary known down) goes on to the secondary
    # (its secondary, or — when that one had not yet seen the view without s1 and declined
    # with a 503 — another live server, which fetched the session)
    status, body = _send(fe.url, "POST", "/count", post.token)
    assert status == 200 and body["counter"] == 2 and "k" not in body["keys"], body
    assert body["server"] in ("s2", "s3")


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_token_through_exported_config_is_a_new_session(make_cluster, front_end, engine):
    from tandem.token import Route, TokenCodec

    cluster = make_cluster().start(proxy=False)
    fe = front_end(engine, cluster)
    c = Client(fe.url)
    c.get("/count")
    sid, primary, secondary = c.route
    c.token = TokenCodec(["someone-else"]).encode(Route(sid, primary, secondary))
    status, body = c.get("/count")
    assert status == 200 and body["counter"] == 1 and c.route[0] != sid


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_adds_a_server_the_export_did_not_name(make_cluster, front_end, engine,
                                                    tmp_path):
    """Exported from a file that names s1 and s2 only: s3 gets no new session until
    `tandem sync` has applied the cluster's view."""
    cluster = make_cluster().start(proxy=False)
    text = cluster.config_path.read_text()
    head, _, rest = text.partition("[[servers]]")
    servers = ["[[servers]]" + part for part in rest.split("[[servers]]")]
    partial = tmp_path / "two-of-three.toml"
    partial.write_text(head + "".join(s for s in servers if '"s3"' not in s))
    fe = front_end(engine, cluster, config=partial)
    before = [Client(fe.url) for _ in range(9)]
    for c in before:
        assert c.get("/count")[0] == 200
    assert {c.route[1] for c in before} <= {"s1", "s2"}

    if engine == "haproxy":
        done = tandem("sync", "haproxy", "--config", str(partial), "--socket",
                      str(fe.socket), "--once")
    else:
        done = tandem("sync", "nginx", "--config", str(partial), "-o",
                      str(fe.where / "tandem-http.conf"), "--reload", fe.reload_command(),
                      "--once")
    assert done.returncode == 0, done.stderr + done.stdout
    applied = [json.loads(line) for line in done.stdout.splitlines() + done.stderr.splitlines()
               if line.startswith("{")]
    if engine == "haproxy":
        assert any(e.get("event") == "sync_applied" and "added tandem/s3" in e["change"]
                   for e in applied), applied
    else:
        assert any(e.get("event") == "sync_applied" and "reloaded" in e["change"]
                   for e in applied), applied
        assert "upstream tandem_s3 {" in (fe.where / "tandem-http.conf").read_text()

    def new_on_s3() -> Client | None:
        for _ in range(30):
            c = Client(fe.url)
            assert c.get("/count")[0] == 200
            if c.route[1] == "s3":
                return c
        return None

    deadline = time.monotonic() + 10  # (HAProxy: the added server's first checks)
    c = new_on_s3()
    while c is None and time.monotonic() < deadline:
        time.sleep(0.5)
        c = new_on_s3()
    assert c is not None, fe.log()
    for n in (2, 3):
        status, body = c.get()
        assert status == 200 and body["counter"] == n and body["server"] == "s3"


@pytest.mark.parametrize("engine", ENGINES)
def test_sync_loop_follows_a_server_that_joins_at_run_time(make_cluster, front_end, engine):
    """`tandem sync` running beside the engine: a fourth server joins the running cluster
    (not in any file the engine's configuration came from), the loop adds it, new sessions
    reach it, and one of them survives its kill -9."""
    import os
    import subprocess
    import sys

    from tests.cluster import ROOT
    from tests.test_join import join

    cluster = make_cluster(n=3).start(proxy=False)
    fe = front_end(engine, cluster)
    args = ["--socket", str(fe.socket)] if engine == "haproxy" else [
        "-o", str(fe.where / "tandem-http.conf"), "--reload", fe.reload_command()]
    log = open(fe.where / "sync.log", "wb")  # noqa: SIM115 - closed below
    loop = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "sync", engine, "--config",
         str(cluster.config_path), "--interval", "0.3", *args],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=log,
        stderr=subprocess.STDOUT)
    try:
        join(cluster, "s4")
        cluster.wait_health("s4")
        cluster.wait_formed()
        on_s4 = None
        deadline = time.monotonic() + 20
        while on_s4 is None and time.monotonic() < deadline:
            for _ in range(8):
                c = Client(fe.url)
                assert c.get("/count")[0] == 200
                if c.route[1] == "s4":
                    on_s4 = c
                    break
            else:
                time.sleep(0.3)
        assert on_s4 is not None, (fe.where / "sync.log").read_text()[-3000:]
        assert loop.poll() is None
        for n in (2, 3):
            status, body = on_s4.get("/count")
            assert status == 200 and body["counter"] == n and body["server"] == "s4"
        secondary = on_s4.route[2]
        cluster.kill("s4")
        status, body = on_s4.get("/count")
        assert status == 200 and body["counter"] == 4 and body["server"] != "s4", body
        if engine == "nginx":
            assert body["server"] == secondary
    finally:
        loop.terminate()
        loop.wait(timeout=10)
        log.close()


def test_sync_marks_a_dead_server_down_in_nginx(make_cluster, front_end):
    """nginx has no active health checks: `tandem sync` marks a dead primary `down`, and
    its sessions' requests then go to their secondaries without trying it first."""
    cluster = make_cluster().start(proxy=False)
    fe = front_end("nginx", cluster)
    (c,) = [c for c in sessions_on(fe.url, "s1", 1, cookies=True) if c.route[1] == "s1"]
    cluster.kill("s1")
    done = tandem("sync", "nginx", "--config", str(cluster.config_path), "-o",
                  str(fe.where / "tandem-http.conf"), "--reload", fe.reload_command(), "--once")
    assert done.returncode == 0, done.stderr
    s1 = f"server 127.0.0.1:{cluster.servers['s1']['http']}"
    assert f"{s1} down;" in (fe.where / "tandem-http.conf").read_text()
    time.sleep(0.5)  # (the reload: new workers)
    errors = fe.where / "error.log"
    tried = errors.read_text().count("connect() failed")
    status, body = c.get("/count")
    assert status == 200 and body["counter"] == 2 and body["server"] != "s1", body
    assert errors.read_text().count("connect() failed") == tried  # s1 was not tried


@pytest.mark.parametrize("engine", ENGINES)
def test_hyphenated_cookie_name_routes(make_cluster, front_end, engine):
    """nginx's $cookie_NAME cannot name `my-sess`: the export reads the Cookie header."""
    cluster = make_cluster(session={"cookie_name": "my-sess"}).start(proxy=False)
    fe = front_end(engine, cluster)
    clients = [Client(fe.url, cookie_name="my-sess") for _ in range(6)]
    for n in (1, 2, 3):
        for c in clients:
            status, body = c.get("/count")
            assert status == 200 and body["counter"] == n and body["server"] == c.route[1]
    assert len({c.route[1] for c in clients}) == 3  # (new sessions spread round-robin)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("retry", ["idempotent", "all", "none"])
@pytest.mark.parametrize("rewriting", [True, False], ids=["url-rewriting", "cookies-only"])
def test_every_setting_gives_a_configuration_the_engine_accepts(tmp_path, engine, retry,
                                                               rewriting):
    from tests.cluster import free_ports
    from tests.front_ends import binary

    if not have(engine):
        pytest.skip(f"{engine} is not installed")
    http, repl = free_ports(2)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[session]\ncookie_name = "my-sess"\nurl_rewriting = {str(rewriting).lower()}'
                   f'\n[proxy]\nretry = "{retry}"\n[[servers]]\nid = "a-1"\n'
                   f'http = "127.0.0.1:{http}"\nreplication = "127.0.0.1:{repl}"\n')
    if engine == "haproxy":
        done = tandem("export", "haproxy", "--config", str(cfg), "--complete", "--socket",
                      str(tmp_path / "s.sock"), "-o", str(tmp_path / "h.cfg"))
        assert done.returncode == 0, done.stderr
        check = [binary("haproxy"), "-c", "-f", str(tmp_path / "h.cfg")]
    else:
        done = tandem("export", "nginx", "--config", str(cfg), "--complete", "--prefix",
                      str(tmp_path), "-o", str(tmp_path))
        assert done.returncode == 0, done.stderr
        check = [binary("nginx"), "-t", "-c", str(tmp_path / "nginx.conf"), "-p",
                 str(tmp_path), "-e", str(tmp_path / "error.log")]
    import subprocess
    result = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_export_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[proxy]\nretry = \"sometimes\"\n")
    done = tandem("export", "haproxy", "--config", str(bad))
    assert done.returncode == 2 and "proxy.retry" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = tandem("sync", "haproxy", "--config", str(Path(__file__).parent.parent / "config"
                                                      / "default.toml"))
    assert done.returncode == 2 and "--socket" in done.stderr


class _Recorder:
    """A stand-in server that notes each request's X-Tandem-Request-Id and answers with
    `status` (health probes: up): what the engine sends on each attempt."""

    def __init__(self, name: str, status: int, seen: list[tuple[str, str]]) -> None:
        import http.server
        import threading

        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                code, body = 200, b'{"state": "up", "lease": true}'
                if not self.path.startswith("/__tandem/"):
                    seen.append((name, self.headers.get("X-Tandem-Request-Id", "")))
                    code, body = recorder.status, b"{}"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.status = status
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("engine", ENGINES)
def test_every_attempt_of_a_request_carries_its_one_request_id(tmp_path, front_end, engine):
    """The backends apply a retried request once by its id: the exported config must send
    the same id on every attempt of a request (primary declines, secondary answers), and a
    new one for every request."""
    from tandem.token import Route, TokenCodec
    from tests.cluster import free_ports

    seen: list[tuple[str, str]] = []
    primary, secondary = _Recorder("a", 503, seen), _Recorder("b", 200, seen)
    try:
        cfg = tmp_path / "c.toml"
        cfg.write_text("[cluster]\nsecrets = [\"s3cret-for-the-test\"]\n" + "".join(
            f'[[servers]]\nid = "{sid}"\nhttp = "127.0.0.1:{rec.port}"\n'
            f'replication = "127.0.0.1:{free_ports(1)[0]}"\n'
            for sid, rec in (("a", primary), ("b", secondary))))

        class Named:
            config_path = cfg

        fe = front_end(engine, Named)
        token = TokenCodec(["s3cret-for-the-test"]).encode(Route("x" * 32, "a", "b"))
        time.sleep(1.5)  # (HAProxy: the first health checks have passed)
        for _ in range(3):
            status, _body = _send(fe.url, "GET", "/count", token)
            assert status == 200, (status, seen)
        ids = [rid for _, rid in seen]
        assert all(ids) and len(set(ids)) == 3, seen
        # each request: declined by the primary, answered by the secondary, one id
        for rid in set(ids):
            attempts = [name for name, r in seen if r == rid]
            assert attempts[0] == "a" and attempts[-1] == "b", seen
    finally:
        primary.close()
        secondary.close()
