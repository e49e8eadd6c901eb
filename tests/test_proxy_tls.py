"""TLS on the proxy's client listener: real proxy processes, real backends, real HTTPS
clients trusting a CA made here."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import http.server
import ipaddress
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tandem.config import loads
from tandem.errors import ConfigError
from tests.cluster import ROOT, Client

# --- certificates -------------------------------------------------------------------------


class CA:
    """A test CA that signs server certificates for DNS names and 127.0.0.1."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tandem test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - datetime.timedelta(minutes=1))
                     .not_valid_after(now + datetime.timedelta(days=1))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                     .sign(self.key, hashes.SHA256()))
        self.path = where / "ca.crt"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, cn: str, names: list[str]) -> tuple[str, str]:
        """Write <stem>.crt and <stem>.key; their names relative to the cluster file."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(self.cert.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(sans), False)
                .sign(self.key, hashes.SHA256()))
        (self.where / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.where / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        return f"{stem}.crt", f"{stem}.key"

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.path))
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx


def tls_cluster(make_cluster: Any, *, more: dict[str, list[str]] | None = None,
                **kwargs: Any) -> tuple[Any, CA]:
    """A cluster whose proxy listens with TLS: default certificate "proxy" (CN default,
    names localhost), and in tls_certs one per `more` entry (CN: its DNS names)."""
    cluster = make_cluster(**kwargs)
    ca = CA(cluster.tmp)
    cert, key = ca.issue("proxy", "default", ["localhost"])
    pairs = [ca.issue(name, name, names) for name, names in (more or {}).items()]
    extra = ", ".join(f'{{ cert = "{c}", key = "{k}" }}' for c, k in pairs)
    text = cluster.config_path.read_text().replace(
        "[proxy]\n", f'[proxy]\ntls_cert = "{cert}"\ntls_key = "{key}"\n'
                     f"tls_certs = [{extra}]\n", 1)
    cluster.config_path.write_text(text)
    return cluster, ca


def https_url(cluster: Any) -> str:
    return f"https://127.0.0.1:{cluster.proxy_port}"


def served_cert(cluster: Any, ca: CA, server_name: str | None) -> tuple[x509.Certificate, Any]:
    """The certificate the proxy presents for `server_name` (None: no SNI), and the TLS
    details (version, ALPN) of that handshake."""
    ctx = ca.client()
    ctx.check_hostname = False  # (the names are what is being looked at)
    with socket.create_connection(("127.0.0.1", cluster.proxy_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der), (tls.version(),
                                                     tls.selected_alpn_protocol())


def cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- the end-to-end failover, over HTTPS --------------------------------------------------


@pytest.mark.parametrize(("cookies", "workers"), [(True, 1), (False, 1), (True, 2)],
                         ids=["cookie", "url-rewriting", "cookie-2-workers"])
def test_sessions_over_https_survive_kill_of_their_primary(make_cluster, cookies, workers):
    cluster, ca = tls_cluster(make_cluster, proxy={"workers": workers})
    cluster.start()
    base = https_url(cluster)

    clients: list[Client] = []
    while sum(c.route[1] == "s1" for c in clients) < 20:  # 20 sessions whose primary is s1
        c = Client(base, cookies=cookies, context=ca.client())
        status, body = c.get("/count")
        assert status == 200 and body["counter"] == 1
        clients.append(c)
        assert len(clients) < 200, "new sessions are not spread over the servers"
    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 2
    if not cookies:
        assert all(";jsessionid=" in c.next_path for c in clients)
    before = {id(c): c.route for c in clients}

    cluster.kill("s1")

    for c in clients:
        status, body = c.get()
        assert status == 200 and body["counter"] == 3, (before[id(c)], body)
        sid, primary, secondary = before[id(c)]
        assert c.route[0] == sid
        if primary == "s1":
            assert body["server"] == secondary == c.route[1]
    assert sum(cluster.health(s)["stats"]["promoted"] for s in ("s2", "s3")) == 20
    # the plain admin listener is unchanged
    assert cluster._up(f"http://127.0.0.1:{cluster.admin_port}/__tandem/metrics")


class _Recorder(http.server.BaseHTTPRequestHandler):
    seen: list[dict[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 - the standard library's name
        self.seen.append({k.lower(): v for k, v in self.headers.items()})
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("extra", [{}, {"Connection": "keep-alive"}],
                         ids=["verbatim-lane", "general-path"])
def test_backends_are_told_https(make_cluster, extra):
    cluster, ca = tls_cluster(make_cluster, n=1)
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", cluster.servers["s1"]["http"]),
                                              _Recorder)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    _Recorder.seen = []
    try:
        cluster.start_proxy()
        conn = http.client.HTTPSConnection("127.0.0.1", cluster.proxy_port,
                                           context=ca.client(), timeout=5)
        conn.request("GET", "/x", headers=extra)
        assert conn.getresponse().read() == b"ok"
        conn.close()
    finally:
        backend.shutdown()
        backend.server_close()
    (fields,) = _Recorder.seen
    assert fields["x-forwarded-proto"] == "https"
    assert fields["forwarded"].endswith(";proto=https")


# --- certificates by SNI, and their reload ------------------------------------------------


def test_sni_picks_the_certificate_and_the_default_answers_the_rest(make_cluster):
    cluster, ca = tls_cluster(make_cluster, n=1, more={"b": ["b.example.test"],
                                                       "wild": ["*.w.example.test"]})
    cluster.start_proxy()
    got = {name: served_cert(cluster, ca, name)
           for name in ("b.example.test", "B.Example.Test", "x.w.example.test",
                        "w.example.test", "other.test", None)}
    assert {n: cn(c) for n, (c, _) in got.items()} == {
        "b.example.test": "b", "B.Example.Test": "b", "x.w.example.test": "wild",
        "w.example.test": "default", "other.test": "default", None: "default"}
    # modern defaults: TLS 1.2 at least, ALPN http/1.1
    assert all(details == ("TLSv1.3", "http/1.1") for _, details in got.values())
    ctx12 = ca.client()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", cluster.proxy_port), timeout=5) as raw, \
            ctx12.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() == "TLSv1.2" and tls.cipher()[0].startswith("ECDHE-")


def test_sighup_new_certificate_for_new_connections_kept_alive_ones_go_on(make_cluster):
    cluster, ca = tls_cluster(make_cluster, n=1)
    cluster.start_server("s1")
    cluster.start_proxy()
    kept = http.client.HTTPSConnection("localhost", cluster.proxy_port, context=ca.client(),
                                       timeout=5)
    kept.request("GET", "/count")
    assert kept.getresponse().read()
    old_sock = kept.sock
    assert cn(served_cert(cluster, ca, "localhost")[0]) == "default"

    # a key that is not the certificate's: the old certificates stay, one error line
    other = ca.issue("other", "other", ["localhost"])
    (cluster.tmp / "proxy.key").write_bytes((cluster.tmp / other[1]).read_bytes())
    assert cluster.proxy_proc is not None
    cluster.proxy_proc.send_signal(signal.SIGHUP)
    (failed,) = cluster.wait_event("proxy", "proxy_tls_reload_failed")
    assert "is not the key of the certificate" in failed["error"]
    assert cn(served_cert(cluster, ca, "localhost")[0]) == "default"

    ca.issue("proxy", "renewed", ["localhost"])  # the new pair, in place
    cluster.proxy_proc.send_signal(signal.SIGHUP)
    assert cluster.wait_event("proxy", "proxy_tls_reloaded")
    assert cn(served_cert(cluster, ca, "localhost")[0]) == "renewed"
    # the connection made before goes on, on the same TLS session
    for _ in range(2):
        kept.request("GET", "/count")
        resp = kept.getresponse()
        assert resp.status == 200 and resp.read()
    assert kept.sock is old_sock
    assert cn(x509.load_der_x509_certificate(kept.sock.getpeercert(True))) == "default"
    kept.close()
    assert cluster.proxy_proc.poll() is None


# --- start-up errors ----------------------------------------------------------------------


def _start_fails(cluster: Any) -> str:
    proc = subprocess.run([sys.executable, "-m", "proxy.cli", "proxy", "--config",
                           str(cluster.config_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_bad_key_is_one_line_at_start(make_cluster):
    cluster, ca = tls_cluster(make_cluster, n=1)
    other = ca.issue("other", "other", ["localhost"])
    (cluster.tmp / "proxy.key").write_bytes((cluster.tmp / other[1]).read_bytes())
    line = _start_fails(cluster)
    assert "proxy.tls_key" in line and "is not the key of the certificate" in line
    assert "PRIVATE KEY" not in line
    (cluster.tmp / "proxy.key").unlink()
    line = _start_fails(cluster)
    assert "proxy.tls_key" in line and "cannot read it" in line
    (cluster.tmp / "proxy.key").write_bytes((cluster.tmp / other[1]).read_bytes())
    (cluster.tmp / "proxy.crt").write_text("not a certificate\n")
    line = _start_fails(cluster)
    assert "proxy.tls_cert" in line and "no PEM certificate" in line


_SERVERS = '\n[[servers]]\nid = "s1"\nhttp = "127.0.0.1:9001"\nreplication = "127.0.0.1:9101"\n'


@pytest.mark.parametrize(("proxy", "key", "says"), [
    ('tls_cert = "a.crt"', "proxy.tls_cert", "needs its key"),
    ('tls_key = "a.key"', "proxy.tls_key", "needs its key"),
    ('tls_certs = [{ cert = "b.crt", key = "b.key" }]', "proxy.tls_certs", "default"),
    ('tls_cert = "a.crt"\ntls_key = "a.key"\ntls_certs = [{ cert = "b.crt" }]',
     "proxy.tls_certs[0]", "expected a table"),
])
def test_config_errors(proxy, key, says):
    with pytest.raises(ConfigError) as err:
        loads(f'[cluster]\nsecrets = ["x"]\n[proxy]\n{proxy}\n{_SERVERS}', source="c.toml")
    assert err.value.key == key and says in str(err.value)


def test_sighup_to_the_parent_of_two_workers_reloads_both(make_cluster):
    cluster, ca = tls_cluster(make_cluster, n=1, proxy={"workers": 2})
    cluster.start_proxy()
    ca.issue("proxy", "renewed", ["localhost"])
    assert cluster.proxy_proc is not None
    cluster.proxy_proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while len(cluster.wait_event("proxy", "proxy_tls_reloaded")) < 2:
        assert time.monotonic() < deadline, cluster.log("proxy")
        time.sleep(0.05)
    # new connections, spread over both workers by the kernel, all see the new certificate
    assert {cn(served_cert(cluster, ca, "localhost")[0]) for _ in range(20)} == {"renewed"}
    assert cluster.proxy_proc.poll() is None


def test_plain_http_to_the_tls_port_is_refused_and_the_proxy_goes_on(make_cluster):
    cluster, ca = tls_cluster(make_cluster, n=1)
    cluster.start_server("s1")
    cluster.start_proxy()
    with socket.create_connection(("127.0.0.1", cluster.proxy_port), timeout=5) as raw:
        raw.sendall(b"GET /count HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := raw.recv(4096):
                data += chunk
    assert not data.startswith(b"HTTP/")  # no answer in clear text
    status, body = Client(https_url(cluster), context=ca.client()).get("/count")
    assert status == 200 and body["counter"] == 1
    assert not [e for e in cluster.events("proxy") if e.get("level") in ("error", "critical")]
