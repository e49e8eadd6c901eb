"""The TLS keys of the cluster file (cluster.tls_*, servers' tls_cert/tls_key) and
`tandem certs`: errors naming key, value and file; paths; what the helper writes."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from tandem.config import load
from tandem.tls import files_for
from tests.test_config import SOURCE, assert_names, config_error, load_text, section, server

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
