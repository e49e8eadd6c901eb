"""The TLS keys of the cluster file (cluster.tls_*, servers' tls_cert/tls_key), `tandem
certs`, and the files at start: errors naming key, value and file; paths; what the helper
writes; the expiry warning."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tandem.config import load
from tandem.tls import files_for
from tests.test_config import SOURCE, assert_names, config_error, load_text, section, server
from tests.test_tls import TLS_KEYS, certs

TLS = {"tls_ca": "certs/ca.crt", "tls_cert": "certs/{id}.crt", "tls_key": "certs/{id}.key"}
TWO = server("s1") + server("s2", "127.0.0.1:9002", "127.0.0.1:9102")
ROOT = Path(__file__).resolve().parent.parent


def test_tls_is_off_by_default() -> None:
    cfg = load_text()
    assert (cfg.cluster.tls_ca, cfg.cluster.tls_cert, cfg.cluster.tls_key) == ("", "", "")
    assert cfg.cluster.tls_reload_interval_s == 5.0
    assert files_for(cfg, "s1") is None


@pytest.mark.parametrize("key", ["tls_cert", "tls_key"])
def test_a_cluster_certificate_without_a_ca_is_an_error(key: str) -> None:
    err = config_error(section("cluster", **{key: "certs/x.pem"}))
    assert_names(err, f"cluster.{key}", "certs/x.pem")
    assert "without cluster.tls_ca" in str(err)


def test_a_server_with_tls_in_a_cluster_without_it_is_an_error() -> None:
    err = config_error(server("s1") + server("s2", "127.0.0.1:9002", "127.0.0.1:9102",
                                             tls_cert="s2.crt", tls_key="s2.key"))
    assert_names(err, "servers[1].tls_cert", "s2.crt")
    assert "TLS is on for every server or for none" in str(err)


def test_with_a_ca_every_server_needs_a_certificate() -> None:
    err = config_error(section("cluster", tls_ca="ca.crt"),
                       server("s1", tls_cert="s1.crt", tls_key="s1.key")
                       + server("s2", "127.0.0.1:9002", "127.0.0.1:9102", tls_key="s2.key"))
    assert_names(err, "servers[1].tls_cert", None)
    assert "cluster.tls_ca turns TLS on for every server" in str(err)


def test_a_ca_alone_is_not_enough() -> None:
    err = config_error(section("cluster", tls_ca="ca.crt"))
    assert_names(err, "servers[0].tls_cert", None)


def test_per_server_ca_is_an_unknown_key() -> None:
    err = config_error(section("cluster", **TLS), server(tls_ca="other.crt"))
    assert_names(err, "servers[0].tls_ca", "other.crt")
    assert "unknown key" in str(err)


@pytest.mark.parametrize("value", [-1, "5", True])
def test_bad_reload_interval_is_rejected(value: object) -> None:
    err = config_error(section("cluster", tls_reload_interval_s=value))
    assert_names(err, "cluster.tls_reload_interval_s", value)


def test_paths_are_relative_to_the_cluster_file_and_id_is_the_servers(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "cluster.toml"
    path.parent.mkdir()
    path.write_text(section("cluster", **TLS) + server("s1") + server(
        "s2", "127.0.0.1:9002", "127.0.0.1:9102", tls_cert="/abs/s2.pem",
        tls_key="~/s2.key"))
    cfg = load(path, environ={})
    s1 = files_for(cfg, "s1")
    assert s1 is not None
    assert (s1.ca.path, s1.cert.path, s1.key.path) == (
        tmp_path / "etc/certs/ca.crt", tmp_path / "etc/certs/s1.crt",
        tmp_path / "etc/certs/s1.key")
    assert (s1.cert.key, s1.cert.written) == ("cluster.tls_cert", "certs/{id}.crt")
    s2 = files_for(cfg, "s2")
    assert s2 is not None
    assert s2.cert.path == Path("/abs/s2.pem") and s2.cert.key == "servers[1].tls_cert"
    assert s2.key.path == Path.home() / "s2.key"
    assert s2.ca.path == tmp_path / "etc/certs/ca.crt"


def test_a_witness_needs_its_certificate_too() -> None:
    cfg = load_text(section("cluster", **TLS), TWO + server(
        "w", "127.0.0.1:9003", "127.0.0.1:9103", witness=True))
    assert cfg.source == SOURCE
    w = files_for(cfg, "w")
    assert w is not None and w.cert.path.name == "w.crt"


# --- tandem certs -------------------------------------------------------------------------


def _certs(config: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "certs", "--config", str(config), "--out",
         str(out), *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=60)


def test_certs_writes_a_ca_and_one_pair_per_server_and_says_what_to_paste(
        tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(TWO + server("w", "127.0.0.2:9003", "127.0.0.2:9103", witness=True))
    done = _certs(config, tmp_path / "pki")
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith('tls_ca = "pki/ca.crt"\ntls_cert = "pki/{id}.crt"\n'
                                'tls_key = "pki/{id}.key"\n')
    for name in ("ca", "s1", "s2", "w"):
        assert stat.S_IMODE((tmp_path / "pki" / f"{name}.key").stat().st_mode) == 0o600
    w = x509.load_pem_x509_certificate((tmp_path / "pki" / "w.crt").read_bytes())
    sans = w.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["tandem:server:w"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    # pasted into the file, the next run says nothing more to paste and keeps the CA
    ca = (tmp_path / "pki" / "ca.crt").read_bytes()
    config.write_text(section("cluster", **{k: v.replace("certs", "pki")
                                            for k, v in TLS.items()}) + config.read_text())
    again = _certs(config, tmp_path / "pki", "--server", "s2")
    assert again.returncode == 0 and "tls_ca" not in again.stdout
    assert "using the CA" in again.stdout and "s1:" not in again.stdout
    assert (tmp_path / "pki" / "ca.crt").read_bytes() == ca


def test_certs_rotation_steps_and_errors(tmp_path: Path) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(TWO)
    assert _certs(config, tmp_path / "c").returncode == 0
    bundle = tmp_path / "c" / "ca.crt"
    assert _certs(config, tmp_path / "c", "--new-ca").returncode == 0
    assert len(x509.load_pem_x509_certificates(bundle.read_bytes())) == 2
    assert _certs(config, tmp_path / "c", "--drop-old-cas").returncode == 0
    assert len(x509.load_pem_x509_certificates(bundle.read_bytes())) == 1
    unknown = _certs(config, tmp_path / "c", "--server", "s9")
    assert unknown.returncode == 2 and "no server 's9'" in unknown.stderr
    (tmp_path / "c" / "ca.key").write_text("junk")
    broken = _certs(config, tmp_path / "c")
    assert broken.returncode == 2 and "not a usable CA" in broken.stderr
    assert broken.stderr.count("\n") == 1


def test_plaintext_replication_off_loopback_is_warned_about() -> None:
    three = TWO + server("s3", "127.0.0.3:9003", "127.0.0.3:9103")
    assert load_text(three).warnings == ()
    far = load_text(server("s1") + server("s2", "10.0.0.2:9002", "10.0.0.2:9102") + server(
        "s3", "127.0.0.3:9003", "127.0.0.3:9103", replication_bind="0.0.0.0:9103"))
    (line,) = far.warnings
    assert line.startswith("the replication channel is plaintext and s2 10.0.0.2:9102, "
                           "s3 0.0.0.0:9103 are not loopback")
    assert line.endswith(f"({SOURCE})")
    with_tls = load_text(section("cluster", **TLS), server("s1") + server(
        "s2", "10.0.0.2:9002", "10.0.0.2:9102") + server("s3", "10.0.0.3:9003", "10.0.0.3:9103"))
    assert with_tls.warnings == ()


# --- start-up: one line naming the file ------------------------------------------------------


def _encrypt(path: Path) -> None:
    """Encrypt a key with a passphrase (a server must not wait for one on a terminal)."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))


@pytest.mark.parametrize(("change", "expected"), [
    (lambda c: (c / "s1.key").unlink(), "cluster.tls_key: {c}/s1.key: cannot read it: No such "
                                        "file or directory"),
    (lambda c: shutil.copy(c / "s2.key", c / "s1.key"),
     "cluster.tls_key: {c}/s1.key: is not the key of the certificate {c}/s1.crt"),
    (lambda c: (shutil.copy(c / "s2.crt", c / "s1.crt"), shutil.copy(c / "s2.key", c / "s1.key")),
     "cluster.tls_cert: {c}/s1.crt: does not name server s1"),
    (lambda c: (c / "ca.crt").write_text("junk\n"), "cluster.tls_ca: {c}/ca.crt: no PEM CA"),
    (lambda c: _encrypt(c / "s1.key"),
     "cluster.tls_key: {c}/s1.key: is encrypted: tandem needs an unencrypted key"),
], ids=["missing-key", "mismatched-key", "another-servers-cert", "bad-ca", "encrypted-key"])
def test_a_tls_file_that_cannot_be_used_stops_the_start_with_one_line(tmp_path, change,
                                                                      expected):
    config = tmp_path / "cluster.toml"
    config.write_text("[cluster]\n" + "".join(f'{k} = "{v}"\n' for k, v in TLS_KEYS.items())
                      + "".join(f'[[servers]]\nid = "s{i}"\nhttp = "127.0.0.1:{19300 + i}"\n'
                                f'replication = "127.0.0.1:{19400 + i}"\n' for i in (1, 2, 3)))
    c = tmp_path / "certs"
    certs(config, c)
    change(c)
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "backend", "--config", str(config), "--server",
         "s1", "--app", "tests.apps:asgi_counter"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT), TANDEM_LOG_LEVEL="WARNING"), timeout=30)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tandem: configuration error: " + expected.format(c=c))
    assert lines[0].endswith(f"in {config}")


def test_a_certificate_of_another_ca_stops_the_start(tmp_path):
    config = tmp_path / "cluster.toml"
    config.write_text("[cluster]\n" + "".join(f'{k} = "{v}"\n' for k, v in TLS_KEYS.items())
                      + '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:19501"\n'
                        'replication = "127.0.0.1:19502"\n')
    certs(config, tmp_path / "certs")
    certs(config, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "s1.crt", tmp_path / "certs" / "s1.crt")
    shutil.copy(tmp_path / "other" / "s1.key", tmp_path / "certs" / "s1.key")
    from backends.cluster.tls import Channel
    from tandem.config import load
    from tandem.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        Channel(config=load(config), me="s1")
    assert info.value.key == "cluster.tls_cert"
    assert "not accepted with the CA bundle" in str(info.value)
    assert "unable to get local issuer certificate" in str(info.value)


async def test_a_certificate_near_its_end_is_warned_about(tmp_path):
    from structlog.testing import capture_logs

    from backends.cluster.tls import Channel
    from tandem.config import load

    config = tmp_path / "cluster.toml"
    config.write_text("[cluster]\n" + "".join(f'{k} = "{v}"\n' for k, v in TLS_KEYS.items())
                      + '[[servers]]\nid = "s1"\nhttp = "127.0.0.1:19601"\n'
                        'replication = "127.0.0.1:19602"\n')
    certs(config, tmp_path / "certs", "--days", "7")
    (tmp_path / "certs" / "s1.key").chmod(0o640)
    channel = Channel(config=load(config), me="s1")
    with capture_logs() as logs:
        channel.start()
        await channel.close()
    (loaded,) = [e for e in logs if e["event"] == "tls_loaded"]
    (warned,) = [e for e in logs if e["event"] == "tls_cert_expiring"]
    assert warned["log_level"] == "warning" and 6.9 < warned["days_left"] <= 7.0
    assert warned["not_after"] == loaded["not_after"] == channel.status()["not_after"]
    (exposed,) = [e for e in logs if e["event"] == "tls_key_readable_by_others"]
    assert exposed["mode"] == "0640" and exposed["key"] == str(tmp_path / "certs" / "s1.key")
