"""The replica-aware client (tandem.client, docs/client.md): httpx transports (sync, async)
and a requests adapter that route each request to its session's primary and fail over by
themselves, with no proxy.

Real backend processes on loopback (`make_cluster(...).start(proxy=False)`); the retry
rules for a 503, the request id and TLS are checked against small stdlib servers on
loopback that answer as a backend would.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

from tandem.client import (
    AsyncTandemTransport,
    Cluster,
    ClusterSpecError,
    NoServerAvailable,
    TandemAdapter,
    TandemTransport,
    read_route,
)
from tandem.token import Route, TokenCodec
from tests.cluster import ROOT, free_ports
from tests.test_join import join

BASE = "http://orders"  # the cluster's name in the callers' URLs: never dialled


# --- one caller's session through the client --------------------------------------------------


class Caller:
    """One session of a service calling the cluster: `kind` is the library and where the
    token travels (httpx: its cookie jar, or the URL; requests: its Session's jar)."""

    def __init__(self, kind: str, cluster: Cluster) -> None:
        self.kind = kind
        self.next = "/count"
        self.httpx: httpx.Client | None = None
        self.ahttpx: httpx.AsyncClient | None = None
        self.requests: requests.Session | None = None
        if kind in ("httpx", "httpx-url"):
            self.httpx = httpx.Client(base_url=BASE, transport=TandemTransport(cluster))
        elif kind == "httpx-async":
            self.ahttpx = httpx.AsyncClient(base_url=BASE,
                                            transport=AsyncTandemTransport(cluster))
        else:
            self.requests = requests.Session()
            self.requests.mount(BASE + "/", TandemAdapter(cluster))

    async def get(self, path: str | None = None) -> tuple[int, Any]:
        path = path or self.next
        if self.httpx is not None:
            r = self.httpx.get(path)
            status, body = r.status_code, r.json()
            if self.kind == "httpx-url":  # a caller that keeps no cookie: the URL has it
                self.httpx.cookies.clear()
                self.next = body["next"]
                assert ";jsessionid=" in self.next
        elif self.ahttpx is not None:
            ar = await self.ahttpx.get(path)
            status, body = ar.status_code, ar.json()
        else:
            assert self.requests is not None
            rr = self.requests.get(BASE + path, timeout=10)
            status, body = rr.status_code, rr.json()
        return status, body

    def token(self) -> str | None:
        if self.kind == "httpx-url":
            return self.next.split("=", 1)[1]
        jar = (self.httpx.cookies if self.httpx is not None else self.ahttpx.cookies
               if self.ahttpx is not None else self.requests.cookies)  # type: ignore[union-attr]
        return jar.get("JSESSIONID")

    async def close(self) -> None:
        if self.httpx is not None:
            self.httpx.close()
        if self.ahttpx is not None:
            await self.ahttpx.aclose()
        if self.requests is not None:
            self.requests.close()


async def callers_on(kind: str, cluster: Cluster, primary: str, count: int) -> list[Caller]:
    """New sessions through the client until `count` of them live on `primary` (the
    client places new sessions round-robin over the servers it knows)."""
    kept: list[Caller] = []
    made = 0
    while len(kept) < count:
        c = Caller(kind, cluster)
        made += 1
        status, body = await c.get()
        assert status == 200 and body["counter"] == 1
        if body["primary"] == primary:
            kept.append(c)
        else:
            await c.close()
        assert made < 10 * count, "new sessions are not spread over the servers"
    return kept


# --- kill -9 of the primary of 20 sessions ------------------------------------------------


@pytest.mark.parametrize("kind", ["httpx", "httpx-async", "requests", "httpx-url"])
async def test_twenty_sessions_go_on_at_their_secondary_when_their_primary_is_killed(
        make_cluster: Any, kind: str) -> None:
    tc = make_cluster(n=3).start(proxy=False)
    cluster = Cluster.from_file(tc.config_path)
    callers = await callers_on(kind, cluster, "s1", 20)
    assert sorted(cluster.in_view()) == ["s1", "s2", "s3"]  # learned from the first answer
    before: dict[int, str] = {}  # each session's secondary
    for c in callers:
        for n in (2, 3):
            status, body = await c.get()
            assert status == 200 and body["counter"] == n and body["server"] == "s1"
        before[id(c)] = body["secondary"]

    tc.kill("s1")  # kill -9

    for c in callers:
        secondary = before[id(c)]
        status, body = await c.get()
        assert status == 200, body
        assert body["counter"] == 4  # every acknowledged increment is there
        assert body["server"] == secondary  # straight to the secondary, no proxy
        route = read_route(c.token() or "")
        assert route is not None and route.primary == secondary  # the new token's
        assert route.secondary not in (None, "s1", secondary)
    stats = [tc.health(s)["stats"] for s in ("s2", "s3")]
    assert sum(st["promoted"] for st in stats) == 20, stats
    assert sorted(cluster.in_view()) == ["s2", "s3"]  # the view the survivors sent
    for c in callers:  # plain affinity again
        status, body = await c.get()
        assert status == 200 and body["counter"] == 5
        await c.close()


# --- what is sent again, and what is not ----------------------------------------------------


def _send(kind: str, cluster: Cluster, method: str, path: str, token: str) -> Any:
    """One request with the session's token (none: ""), through the httpx transport or the
    adapter; returns (status, body, the token after it), or raises what the library raised."""
    cookies = {"JSESSIONID": token} if token else {}
    if kind == "httpx":
        with httpx.Client(base_url=BASE, transport=TandemTransport(cluster), cookies=cookies,
                          timeout=10) as client:
            r = client.request(method, path)
            return r.status_code, r.json(), r.cookies.get("JSESSIONID") or token
    with requests.Session() as s:
        s.mount(BASE + "/", TandemAdapter(cluster))
        s.cookies.update(cookies)
        rr = s.request(method, BASE + path, timeout=10)
        return rr.status_code, rr.json(), rr.cookies.get("JSESSIONID") or token


def _in_flight(fn: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = fn()
        except Exception as exc:  # handed to the test
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_a_post_cut_by_its_primary_dying_is_not_sent_again_unless_the_caller_opts_in(
        make_cluster: Any, kind: str) -> None:
    # (the WSGI app: each request sleeps in its own thread, so all three are in their
    # handlers at once when s1 dies)
    tc = make_cluster(n=3, app="tests.apps:wsgi_counter").start(proxy=False)
    idempotent = Cluster.from_file(tc.config_path)
    opted_in = Cluster.from_file(tc.config_path, retry="all")
    token = {}
    for name in ("post", "get", "all"):  # three sessions on s1
        while True:
            status, body, token[name] = _send(kind, idempotent, "GET", "/count", "")
            if body["primary"] == "s1":
                break
    # each request sets its key, then sleeps in the handler: s1 dies meanwhile
    post, post_out = _in_flight(lambda: _send(
        kind, idempotent, "POST", "/set?key=k&value=post&sleep=2", token["post"]))
    get, get_out = _in_flight(lambda: _send(
        kind, idempotent, "GET", "/set?key=k&value=get&sleep=2", token["get"]))
    opt, opt_out = _in_flight(lambda: _send(
        kind, opted_in, "POST", "/set?key=k&value=all&sleep=2", token["all"]))
    time.sleep(1.0)  # all three are in their handlers on s1, none has answered
    tc.kill("s1")
    for t in (post, get, opt):
        t.join(timeout=20)

    # the POST was sent, then its connection died: not sent again, the error is the library's
    error = post_out.get("error")
    assert error is not None, post_out
    assert isinstance(error, httpx.TransportError if kind == "httpx"
                      else requests.exceptions.ConnectionError)
    assert not isinstance(error, NoServerAvailable)
    assert any("not retried on another server" in n for n in error.__notes__)
    # ... and nothing of it was applied (s1 died before its commit)
    status, body, _ = _send(kind, idempotent, "GET", "/peek", token["post"])
    assert status == 200 and "k" not in body["values"] and body["counter"] == 1
    # the GET and the opted-in POST went on at the secondary
    for name, out in (("get", get_out), ("all", opt_out)):
        assert "error" not in out, out
        status, body, _ = out["result"]
        assert status == 200 and body["server"] != "s1"
        assert body["values"]["k"] == name
        assert body["counter"] == 1

    # the primary is gone now: a POST fails to connect, and so goes on at the secondary
    fresh = Cluster.from_file(tc.config_path)  # (no bad mark for s1 yet)
    status, body, _ = _send(kind, fresh, "POST", "/count", token["post"])
    assert status == 200 and body["counter"] == 2 and body["server"] != "s1"


# --- learning the cluster -------------------------------------------------------------------


async def test_the_client_learns_a_joined_server_from_the_view_and_routes_to_it(
        make_cluster: Any) -> None:
    tc = make_cluster(n=3).start(proxy=False)
    cluster = Cluster.from_file(tc.config_path)  # s1, s2, s3: the file knows no s4
    first = Caller("httpx", cluster)
    assert (await first.get())[0] == 200
    assert "s4" not in cluster.servers()
    join(tc, "s4")
    tc.wait_health("s4")
    tc.wait_formed()
    # the next answer carries the new view: the client's was older
    assert (await first.get())[0] == 200
    assert cluster.servers()["s4"] == f"127.0.0.4:{tc.servers['s4']['http']}"
    assert sorted(cluster.in_view()) == ["s1", "s2", "s3", "s4"]
    # new sessions are placed on it too, and its sessions' requests go straight to it
    (on_s4,) = await callers_on("httpx", cluster, "s4", 1)
    status, body = await on_s4.get()
    assert status == 200 and body["server"] == "s4" and body["counter"] == 2
    secondary = body["secondary"]
    tc.kill("s4")
    status, body = await on_s4.get()
    assert status == 200 and body["counter"] == 3 and body["server"] == secondary
    await first.close()
    await on_s4.close()


def test_a_dead_cluster_is_one_clear_error_listing_what_was_tried() -> None:
    ports = free_ports(3)  # nothing listens there: each connect is refused
    cluster = Cluster({f"s{i + 1}": f"127.0.0.1:{p}" for i, p in enumerate(ports)})
    with httpx.Client(base_url=BASE, transport=TandemTransport(cluster)) as client:
        with pytest.raises(httpx.ConnectError) as caught:
            client.post("/orders", content=b"{}")
    assert isinstance(caught.value, NoServerAvailable)
    assert sorted(caught.value.tried) == ["s1", "s2", "s3"]
    assert "no server of the cluster could take POST (tried s" in str(caught.value)
    with requests.Session() as s:
        s.mount(BASE + "/", TandemAdapter(cluster))
        with pytest.raises(requests.exceptions.ConnectionError) as rcaught:
            s.get(BASE + "/orders")
    assert isinstance(rcaught.value, NoServerAvailable)
    assert len(rcaught.value.tried) == 3


# --- 503, the request id, TLS: small servers that answer as a backend would -----------------


class _Backend(http.server.ThreadingHTTPServer):
    """Answers every request with `status` (and `state` in X-Tandem-State); records the
    request ids and Host headers it was sent."""

    daemon_threads = True

    def __init__(self, status: int, state: str | None = None, *,
                 tls: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.status = status
        self.state = state
        self.seen: list[tuple[str, str, str, str]] = []  # method, request id, host, view
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Backend
    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        srv = self.server
        srv.seen.append((self.command, self.headers.get("X-Tandem-Request-Id", ""),
                         self.headers.get("Host", ""), self.headers.get("X-Tandem-View", "")))
        body = json.dumps({"port": srv.server_address[1]}).encode()
        self.send_response(srv.status)
        if srv.state:
            self.send_header("X-Tandem-State", srv.state)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def backends() -> Iterator[list[_Backend]]:
    made: list[_Backend] = []
    yield made
    for b in made:
        b.stop()


_ROUTE = Route("sid-of-a-test-session-000", "s1", "s2")


def _token(route: Route) -> str:
    return TokenCodec(["any-secret"]).encode(route)  # (the client reads, never verifies)


@pytest.mark.parametrize("state, marks_bad", [("draining", True), ("unprotected", False)])
@pytest.mark.parametrize("kind", ["httpx", "requests"])
def test_a_503_goes_on_to_the_next_server_whatever_the_method_with_one_request_id(
        backends: list[_Backend], kind: str, state: str, marks_bad: bool) -> None:
    declining, serving = _Backend(503, state), _Backend(200)
    backends += [declining, serving]
    cluster = Cluster({"s1": declining.address, "s2": serving.address})
    status, body, _ = _send(kind, cluster, "POST", "/orders", _token(_ROUTE))
    assert status == 200 and body["port"] == serving.server_address[1]
    (d_method, d_rid, d_host, d_view), = declining.seen
    (s_method, s_rid, s_host, s_view), = serving.seen
    assert d_method == s_method == "POST"
    assert d_rid and d_rid == s_rid  # one logical request: one id, on every attempt
    assert d_host == s_host == "orders"  # the caller's Host, as a proxy would pass it
    assert d_view == s_view == "-"  # no view learned yet: ask for one
    # a server-wide 503 puts its server last for max_skip_s; one session's trouble does not
    assert [t.server for t in cluster.candidates(_ROUTE)] == (
        ["s2", "s1"] if marks_bad else ["s1", "s2"])
    # a new request gets a new id
    _send(kind, cluster, "GET", "/orders", _token(_ROUTE))
    assert serving.seen[-1][1] not in ("", s_rid)


def test_the_last_503_is_handed_to_the_caller(backends: list[_Backend]) -> None:
    only = _Backend(503, "draining")
    backends.append(only)
    cluster = Cluster({"s1": only.address})
    status, _, _ = _send("httpx", cluster, "GET", "/orders", _token(_ROUTE))
    assert status == 503


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (it makes the test certificate)")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_is_tls_to_each_server_with_the_callers_verification(
        backends: list[_Backend], tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    serving = _Backend(200, tls=server_ctx)
    backends.append(serving)
    dead = free_ports(1)[0]
    cluster = Cluster({"s1": f"127.0.0.1:{dead}", "s2": serving.address})
    trusted = ssl.create_default_context(cafile=str(cert))
    # the primary is down: the secondary, over TLS, verified with the caller's settings
    with httpx.Client(base_url="https://orders", verify=trusted, cookies={
            "JSESSIONID": _token(_ROUTE)}, transport=TandemTransport(cluster, verify=trusted)
            ) as client:
        assert client.get("/orders").json()["port"] == serving.server_address[1]
    with requests.Session() as s:
        s.mount("https://orders/", TandemAdapter(cluster))
        s.cookies.set("JSESSIONID", _token(_ROUTE))
        # (per request: requests lets REQUESTS_CA_BUNDLE override a Session's verify)
        reply = s.get("https://orders/orders", verify=str(cert))
        assert reply.json()["port"] == serving.server_address[1]
    # a certificate the caller does not trust is raised at once, not failed over
    before = len(serving.seen)
    with httpx.Client(base_url="https://orders", transport=TandemTransport(
            Cluster({"s2": serving.address, "s1": f"127.0.0.1:{dead}"}))) as client:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED") as caught:
            client.get("/orders")
    assert not isinstance(caught.value, NoServerAvailable)
    assert len(serving.seen) == before


# --- the pieces without a network -----------------------------------------------------------


def test_the_client_reads_the_route_of_a_token_without_verifying_it() -> None:
    token = _token(Route("abc", "s1", None))
    assert read_route(token) == Route("abc", "s1", None)
    assert read_route("no-signature") is None
    assert read_route("a!b.sig") is None
    cluster = Cluster({"s1": "127.0.0.1:1", "s2": "127.0.0.1:2"})
    assert cluster.route_of(f"other=1; JSESSIONID={token}", "/") == Route("abc", "s1", None)
    assert cluster.route_of(None, f"/cart;jsessionid={token}?x=1") == Route("abc", "s1", None)
    assert cluster.route_of(None, f"/cart?jsessionid={token}") == Route("abc", "s1", None)
    assert cluster.route_of(None, "/cart") is None


def test_views_are_adopted_by_number_and_seeds_by_address_are_identified() -> None:
    cluster = Cluster(["127.0.0.1:9001", "127.0.0.1:9002"])
    assert cluster.servers() == {} and len(cluster.candidates(None)) == 2
    assert cluster.learn("5; s1=127.0.0.1:9001, s2=127.0.0.1:9002, s3=127.0.0.3:9001")
    assert cluster.servers() == {"s1": "127.0.0.1:9001", "s2": "127.0.0.1:9002",
                                 "s3": "127.0.0.3:9001"}
    assert len(cluster.candidates(None)) == 3  # the seeds are s1 and s2 now
    # an older view (a server cut off from the majority) is not adopted
    assert not cluster.learn("4; s1=127.0.0.1:9001")
    assert cluster.learn("6; s2=127.0.0.1:9002, s3=127.0.0.3:9001")
    # primary, secondary, the view's others, then those out of the view
    assert [t.server for t in cluster.candidates(Route("x", "s3", "s1"))] == ["s3", "s2", "s1"]
    assert not cluster.learn("7; s1=not an address")
    assert cluster.view == "6"


def test_a_bad_cluster_description_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ClusterSpecError, match="names no server"):
        Cluster([])
    with pytest.raises(ClusterSpecError, match=r"server s1: expected host:port \(got 'x'\)"):
        Cluster({"s1": "x"})
    with pytest.raises(ClusterSpecError, match=r"server s1: a server is host:port, not a URL"):
        Cluster({"s1": "http://h:1"})
    assert len(Cluster("127.0.0.1:9001").candidates(None)) == 1  # one address, as a str
    with pytest.raises(ClusterSpecError, match="wildcard"):
        Cluster(["0.0.0.0:9001"])
    with pytest.raises(ClusterSpecError, match="retry: must be one of"):
        Cluster(["127.0.0.1:9001"], retry="sometimes")
    from tandem.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot read file"):
        Cluster.from_file(tmp_path / "missing.toml")


# --- the example ------------------------------------------------------------------------------


@pytest.mark.parametrize("library", ["httpx", "requests"])
def test_the_service_example_calls_the_demo_cluster_with_no_proxy(
        make_cluster: Any, library: str) -> None:
    tc = make_cluster(n=3, app="backends.demo:app").start(proxy=False)
    run = subprocess.run(
        [sys.executable, "-m", "examples.service_client", "--config", str(tc.config_path),
         "--library", library, "--calls", "3", "--interval", "0"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
        text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2", "3"]
    assert len({line.split("served by ")[1].split()[0] for line in lines}) == 1  # affinity


def test_a_missing_library_is_one_clear_import_error() -> None:
    """Without httpx, `tandem.client` imports and `Cluster` works; naming the transport says
    what to install (run in a fresh interpreter where `import httpx` fails)."""
    code = ("import sys; sys.modules['httpx'] = None\n"
            "from tandem.client import Cluster, MissingDependency\n"
            "Cluster(['127.0.0.1:9001'])\n"
            "try:\n"
            "    from tandem.client import TandemTransport\n"
            "except MissingDependency as exc:\n"
            "    assert isinstance(exc, ImportError)\n"
            "    print(exc)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == ("tandem.client needs 'httpx' for this transport: "
                                  "pip install 'tandem-proxy[client]' (or pip install httpx)")
