"""Mutual TLS on the replication channel: real processes on 127.0.0.x, certificates made by
`tandem certs`; refusals of foreign CAs and borrowed identities, rotation without restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from backends.cluster import wire
from backends.errors import HandshakeFailed
from tests.cluster import ROOT, Client, Cluster
from tests.stores import make_redis  # noqa: F401 - a fixture
from tests.test_addresses import _has_ipv6_loopback

HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
TLS_KEYS = {"tls_ca": "certs/ca.crt", "tls_cert": "certs/{id}.crt",
            "tls_key": "certs/{id}.key"}


def certs(config: Path, out: Path, *args: str) -> str:
    """`tandem certs` as an operator runs it; its standard output."""
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "certs", "--config", str(config), "--out",
         str(out), *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def tls_cluster(make_cluster: Any, *, reload_s: float = 0.2, **kwargs: Any) -> Cluster:
    servers = kwargs.pop("servers", [{"id": f"s{i + 1}", "host": h} for i, h in
                                     enumerate(HOSTS)])
    cluster: Cluster = make_cluster(servers=servers, cluster={
        **TLS_KEYS, "tls_reload_interval_s": reload_s}, **kwargs)
    certs(cluster.config_path, cluster.tmp / "certs")
    return cluster


def replication(cluster: Cluster, sid: str) -> tuple[str, int]:
    text = cluster.config_path.read_text()
    entry = text.split(f'id = "{sid}"', 1)[1]
    host, port = entry.split('replication = "', 1)[1].split('"', 1)[0].rsplit(":", 1)
    return host.strip("[]"), int(port)


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def read_frame(sock: socket.socket) -> dict[str, Any] | None:
    """One frame of the replication channel; None when the peer closed instead."""
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        if not chunk:
            return None
        head += chunk
    (size,) = struct.unpack(">I", head)
    body = b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            return None
        body += chunk
    return json.loads(body)  # type: ignore[no-any-return]


def write_frame(sock: socket.socket, msg: dict[str, Any]) -> None:
    body = json.dumps(msg).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)


def dial(addr: tuple[str, int], ctx: ssl.SSLContext) -> dict[str, Any] | None:
    """Dial a server's replication address over TLS as a peer would: its challenge (None:
    closed on us)."""
    with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw) as sock:
        try:
            return read_frame(sock)
        except (ssl.SSLError, ConnectionError):  # TLS 1.3: a refused certificate shows here
            return None


def hello(addr: tuple[str, int], ctx: ssl.SSLContext, *, claim: str, listener: str) -> str:
    """The handshake of a peer naming itself `claim`, with the channel's own code, over
    TLS with `ctx`: "welcome", or why it was refused."""

    async def run() -> str:
        reader, writer = await asyncio.open_connection(*addr, ssl=ctx)
        try:
            await wire.dial_handshake(reader, writer, me=claim, peer=listener, cluster="test",
                                      secrets_=["test-secret"])
            return "welcome"
        except HandshakeFailed as exc:
            return str(exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 2)

    return asyncio.run(run())


def events(cluster: Cluster, name: str, event: str, level: str | None = None) -> list[Any]:
    return [e for e in cluster.events(name) if e.get("event") == event
            and (level is None or e.get("level") == level)]


def wait_linked(cluster: Cluster, a: str, b: str) -> None:
    """`a` and `b` are up and see each other (without the third they hold no view yet: a
    cluster starts serving once every server of its file has been up together)."""
    for sid in (a, b):
        cluster.wait_health(sid)
    wait_for(lambda: cluster.health(a)["peers"][b] == "alive" == cluster.health(b)["peers"][a],
             f"{a} and {b} linked")


def wait_for(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


# --- replication over mutual TLS ------------------------------------------------------------


def test_three_servers_replicate_over_mutual_tls_and_survive_a_kill(make_cluster):
    cluster = tls_cluster(make_cluster).start()
    for sid in ("s1", "s2", "s3"):
        tls = cluster.health(sid)["tls"]
        assert tls["ids"] == [sid] and tls["days_left"] > 360
    client = Client(cluster.proxy_url)
    for n in (1, 2, 3):
        status, body = client.get("/count")
        assert status == 200 and body["counter"] == n
    _, primary, secondary = client.route
    assert secondary not in ("NONE", primary)

    cluster.kill(primary)
    status, body = client.get("/count")
    assert status == 200 and body["counter"] == 4 and body["server"] == secondary

    # The channel speaks TLS: a plaintext dialler gets no challenge (a plaintext listener
    # sends it at once) and is refused; a TLS peer with a certificate of the CA gets it.
    addr = replication(cluster, secondary)
    with socket.create_connection(addr, timeout=5) as raw:
        raw.settimeout(0.5)  # (within the listener's handshake timeout, 1 s)
        with pytest.raises(socket.timeout):
            raw.recv(1)
        write_frame(raw, {"op": "hello", "id": "s9"})
        raw.settimeout(5.0)
        assert raw.recv(100) == b""  # closed on us
    refused = cluster.wait_event(secondary, "tls_handshake_failed")
    assert refused and refused[0]["side"] == "accept" and refused[0]["level"] == "warning"
    assert refused[0]["reason"] == "wrong version number"
    c = cluster.tmp / "certs"
    ctx = client_context(c / "ca.crt", c / f"{primary}.crt", c / f"{primary}.key")
    challenge = dial(addr, ctx)
    assert challenge is not None and challenge["op"] == "challenge"
    assert challenge["server"] == secondary


def test_a_plaintext_cluster_still_sends_its_challenge_at_once(make_cluster):
    """The check above tells TLS from plaintext: without tls_ca the listener speaks first."""
    cluster = make_cluster(n=2).start(proxy=False)
    assert cluster.health("s1")["tls"] is None
    with socket.create_connection(replication(cluster, "s1"), timeout=5) as raw:
        frame = read_frame(raw)
    assert frame is not None and frame["op"] == "challenge"


@pytest.mark.parametrize("mode", ["witness", "redis"])
def test_two_servers_and_a_witness_or_a_store_over_tls(make_cluster, request, mode):
    """The witness dials and is dialled over TLS like a server; with the view in a store,
    the servers' own channel is TLS all the same."""
    if mode == "witness":
        servers = [{"id": "s1", "host": HOSTS[0]}, {"id": "s2", "host": HOSTS[1]},
                   {"id": "w", "host": HOSTS[2], "witness": True}]
        cluster = tls_cluster(make_cluster, servers=servers)
    else:
        redis = request.getfixturevalue("make_redis")()
        servers = [{"id": "s1", "host": HOSTS[0]}, {"id": "s2", "host": HOSTS[1]}]
        cluster = make_cluster(servers=servers, cluster={
            **TLS_KEYS, "membership": "redis", "membership_url": redis.url})
        certs(cluster.config_path, cluster.tmp / "certs")
    cluster.start()
    assert all(cluster.health(sid)["tls"]["ids"] == [sid] for sid in cluster.servers)
    client = Client(cluster.proxy_url)
    for n in (1, 2):
        assert client.get("/count")[1]["counter"] == n
    _, primary, secondary = client.route
    cluster.kill(primary)
    status, body = client.get("/count")
    assert status == 200 and body["counter"] == 3 and body["server"] == secondary


def test_a_server_joins_a_running_cluster_over_tls(make_cluster):
    from tests.test_join import join, members, wait_until

    cluster = tls_cluster(make_cluster).start()
    # its certificate, from the cluster's CA (a file naming it, wherever it will listen)
    plan = cluster.tmp / "plan-s4.toml"
    plan.write_text(cluster.config_path.read_text() + '\n[[servers]]\nid = "s4"\n'
                    'http = "127.0.0.4:1"\nreplication = "127.0.0.4:2"\n')
    assert "s4:" in certs(plan, cluster.tmp / "certs", "--server", "s4")
    join(cluster, "s4", seeds=["s1"])
    cluster.wait_health("s4")
    wait_until(lambda: all(members(cluster, sid) == ["s1", "s2", "s3", "s4"]
                           for sid in ("s1", "s2", "s3", "s4")), "s4 in every view")
    assert cluster.health("s4")["tls"]["ids"] == ["s4"]
    assert all(v == "alive" for v in cluster.health("s4")["peers"].values())


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
def test_tls_over_ipv6(make_cluster):
    cluster = tls_cluster(make_cluster, servers=[{"id": f"s{i}"} for i in (1, 2, 3)],
                          host="::1").start()
    client = Client(cluster.proxy_url)
    assert client.get("/count")[1]["counter"] == 1
    _, primary, secondary = client.route
    cluster.kill(primary)
    status, body = client.get("/count")
    assert status == 200 and body["counter"] == 2 and body["server"] == secondary
    # a plaintext dialler is refused, and logged with its IPv6 address
    with socket.create_connection(replication(cluster, secondary), timeout=5) as raw:
        write_frame(raw, {"op": "hello"})
        assert raw.recv(100) == b""
    refused = cluster.wait_event(secondary, "tls_handshake_failed")
    assert refused and refused[0]["remote"].startswith("[::1]:")


# --- refusals ---------------------------------------------------------------------------------


def test_a_peer_with_a_certificate_of_another_ca_is_refused_and_logged_once(make_cluster):
    cluster = tls_cluster(make_cluster)
    # s3 runs from a file of its own: certificates of another CA, and a bundle that trusts
    # both (so it would accept the others; they must not accept it)
    certs(cluster.config_path, cluster.tmp / "other")
    bundle = cluster.tmp / "both.crt"
    bundle.write_bytes((cluster.tmp / "certs" / "ca.crt").read_bytes()
                       + (cluster.tmp / "other" / "ca.crt").read_bytes())
    rogue = cluster.tmp / "rogue.toml"
    rogue.write_text(cluster.config_path.read_text()
                     .replace('tls_ca = "certs/ca.crt"', 'tls_ca = "both.crt"')
                     .replace('"certs/{id}', '"other/{id}'))
    cluster.start_server("s1", wait=False)
    cluster.start_server("s2", wait=False)
    cluster.servers["s3"]["proc"] = cluster._spawn("s3", [
        "backend", "--config", str(rogue), "--server", "s3", "--app", cluster.app])
    cluster.wait_health("s3")
    wait_linked(cluster, "s1", "s2")
    time.sleep(3.0)  # s3 re-dials s1 and s2 every few hundred milliseconds meanwhile

    for sid in ("s1", "s2"):
        assert cluster.health(sid)["peers"]["s3"] != "alive"
        warned = events(cluster, sid, "tls_handshake_failed", "warning")
        # one line for s3 dialling it, one for it dialling s3 — however often they tried
        assert sorted(e["side"] for e in warned) == ["accept", "dial"], warned
        for line in warned:
            # (s3 sends its CA along with its certificate: the chain ends in a root that
            # is not ours)
            assert line["reason"] == ("certificate verify failed: self-signed certificate "
                                      "in certificate chain"), line
        dialled = next(e for e in warned if e["side"] == "dial")
        assert dialled["peer"] == "s3" and dialled["remote"].startswith("127.0.0.3:")
        assert len(events(cluster, sid, "tls_handshake_failed")) > 2  # the repeats: DEBUG
    assert all(v != "alive" for v in cluster.health("s3")["peers"].values())
    text = "".join(cluster.log(n) for n in ("s1", "s2", "s3"))
    assert "PRIVATE KEY" not in text and "BEGIN CERTIFICATE" not in text


def test_a_certificate_of_one_server_cannot_speak_as_another(make_cluster):
    cluster = tls_cluster(make_cluster)
    cluster.start_server("s1", wait=False)
    cluster.start_server("s2", wait=False)
    wait_linked(cluster, "s1", "s2")
    c = cluster.tmp / "certs"
    s1 = replication(cluster, "s1")

    as_s2 = client_context(c / "ca.crt", c / "s2.crt", c / "s2.key")
    answer = hello(s1, as_s2, claim="s3", listener="s1")
    assert answer == "s1: refused: certificate names another server"
    refused = cluster.wait_event("s1", "peer_refused")
    assert refused and refused[0]["reason"] == "s3: its certificate names s2, not s3"
    # the same hello with s3's own certificate is welcome: the certificate made the refusal
    as_s3 = client_context(c / "ca.crt", c / "s3.crt", c / "s3.key")
    assert hello(s1, as_s3, claim="s3", listener="s1") == "welcome"


def test_a_listener_whose_certificate_names_another_server_is_not_dialled(make_cluster):
    """s1 dials s3's address, where a process presents s2's (valid) certificate."""
    cluster = tls_cluster(make_cluster)
    c = cluster.tmp / "certs"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(c / "s2.crt", c / "s2.key")
    host, port = replication(cluster, "s3")
    listener = socket.create_server((host, port))
    listener.settimeout(0.2)
    stop = threading.Event()

    def impostor() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(2)
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)  # s1 hangs up once it has seen the certificate
            except OSError:
                pass

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        cluster.start_server("s1")
        found = cluster.wait_event("s1", "tls_handshake_failed", timeout=10)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert found and found[0]["side"] == "dial" and found[0]["peer"] == "s3"
    assert found[0]["reason"] == "its certificate names s2, not s3"
    assert cluster.health("s1")["peers"]["s3"] != "alive"


# --- rotation without a restart ---------------------------------------------------------------


def _issuer_cn(addr: tuple[str, int], ctx: ssl.SSLContext) -> str:
    with socket.create_connection(addr, timeout=5) as raw, ctx.wrap_socket(raw) as sock:
        cert = sock.getpeercert()
    assert cert is not None
    return dict(x[0] for x in cert["issuer"])["commonName"]  # type: ignore[no-any-return]


def _signing_cn(bundle: Path) -> str:
    first = x509.load_pem_x509_certificates(bundle.read_bytes())[0]
    return str(first.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value)


def test_rotating_to_a_new_ca_needs_no_restart(make_cluster):
    cluster = tls_cluster(make_cluster).start(proxy=False)
    c = cluster.tmp / "certs"
    pids = {sid: s["proc"].pid for sid, s in cluster.servers.items()}
    old = cluster.tmp / "old"
    shutil.copytree(c, old)
    old_cn = _signing_cn(c / "ca.crt")

    def step(*args: str, reloading: tuple[str, ...] = ("s1", "s2", "s3")) -> str:
        """Run `tandem certs` with `args`; wait until `reloading` have read the files."""
        before = {sid: len(events(cluster, sid, "tls_reloaded")) for sid in reloading}
        out = certs(cluster.config_path, c, *args)
        wait_for(lambda: all(len(events(cluster, sid, "tls_reloaded")) > n
                             for sid, n in before.items()), f"{args} read by {reloading}")
        return out

    # 1. a new CA: every server trusts both
    out = step("--new-ca")
    assert "the bundle trusts it and 1 older" in out
    assert len(x509.load_pem_x509_certificates((c / "ca.crt").read_bytes())) == 2
    new_cn = _signing_cn(c / "ca.crt")
    assert new_cn != old_cn
    # 2. s2 first: its new certificate, from the new CA, is what new connections see
    step("--server", "s2", reloading=("s2",))
    probe = client_context(c / "ca.crt", old / "s3.crt", old / "s3.key")  # trusts both
    assert _issuer_cn(replication(cluster, "s2"), probe) == new_cn
    assert _issuer_cn(replication(cluster, "s1"), probe) == old_cn
    # new connections between old and new certificates: s3 restarts and dials both
    cluster.kill("s3")
    cluster.start_server("s3")
    cluster.wait_formed()
    # 3. everybody else, then the old CA is dropped
    step()
    step("--drop-old-cas")
    # a certificate of the old CA is refused now (by a peer that trusts only the new one)
    old_cert = client_context(c / "ca.crt", old / "s3.crt", old / "s3.key")
    assert dial(replication(cluster, "s1"), old_cert) is None
    refused = cluster.wait_event("s1", "tls_handshake_failed")
    assert refused and refused[-1]["side"] == "accept"
    assert "certificate verify failed" in refused[-1]["reason"]
    cluster.kill("s1")
    cluster.start_server("s1")
    cluster.wait_formed()
    assert all(cluster.servers[sid]["proc"].pid == pids[sid] for sid in ("s2",))
    for sid in ("s1", "s2", "s3"):
        assert cluster.health(sid)["tls"]["ids"] == [sid]


def test_sighup_reloads_and_a_bad_file_keeps_the_certificate_in_use(make_cluster):
    cluster = tls_cluster(make_cluster, reload_s=0).start(proxy=False)
    c = cluster.tmp / "certs"
    s1 = cluster.servers["s1"]["proc"]
    good = (c / "s1.crt").read_bytes()
    (c / "s1.crt").write_text("not a certificate\n")
    s1.send_signal(signal.SIGHUP)
    failed = cluster.wait_event("s1", "tls_reload_failed")
    s1.send_signal(signal.SIGHUP)  # the same bad file again: not said again
    time.sleep(0.5)
    assert len(events(cluster, "s1", "tls_reload_failed")) == 1
    assert failed[0]["level"] == "error"
    assert str(c / "s1.crt") in failed[0]["error"] and "no PEM certificate" in failed[0]["error"]
    # still serving new connections with the certificate it had
    as_s2 = client_context(c / "ca.crt", c / "s2.crt", c / "s2.key")
    frame = dial(replication(cluster, "s1"), as_s2)
    assert frame is not None and frame["op"] == "challenge"
    (c / "s1.crt").write_bytes(good)
    s1.send_signal(signal.SIGHUP)
    assert cluster.wait_event("s1", "tls_reloaded")
    assert s1.poll() is None
    cluster.kill("s2")
    cluster.start_server("s2")
    cluster.wait_formed()
