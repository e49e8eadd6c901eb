"""`tandem certs`: a CA and a certificate and key per server of a cluster file, for the TLS
of the replication channel (tandem/tls.py).

Into the output directory: `ca.crt` (the CA bundle the servers trust), `ca.key` (the CA's
key, needed to issue more), and `<id>.crt` / `<id>.key` for every server, witnesses
included. A CA already there is used again, so running it once more renews the servers'
certificates (or makes one for a server added to the file) without a new trust. Keys are
ECDSA P-256, written mode 0600, every file replaced atomically (a server reloading at that
moment reads the old file or the new one, never half of one).

Rotating the CA, in three runs: `--new-ca` adds a new CA to the bundle (every server then
trusts both) and signs with it from then on; a plain run issues the servers' certificates
from it; `--drop-old-cas` leaves the new CA alone in the bundle.

The standard library cannot make certificates; this uses the `cryptography` package.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .config import Config
from .tls import identity

__all__ = ["make_certs", "run"]

CA_DAYS = 3650
_SKEW = datetime.timedelta(minutes=5)  # clocks of the hosts may differ that much


def _write(path: Path, data: bytes, *, private: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _spki(public_key: CertificatePublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                         decipher_only=False)


def _new_ca(cluster: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tandem"),
                      # unique: the CAs of a bundle are told apart by their names
                      x509.NameAttribute(NameOID.COMMON_NAME, f"tandem CA {cluster} "
                                         f"{now:%Y-%m-%d} {secrets.token_hex(4)}")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + datetime.timedelta(CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, server_id: str,
                 host: str, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity(server_id))]
    try:  # the replication host too, for tools that check host names
        names.append(x509.IPAddress(ipaddress.ip_address(host)))
    except ValueError:
        names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_id)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _SKEW).not_valid_after(now + datetime.timedelta(days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            # a server both listens and dials: its certificate serves both ends
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


class CertsError(Exception):
    """The output directory holds something `tandem certs` cannot use."""


def _existing_ca(out: Path) -> tuple[ec.EllipticCurvePrivateKey, list[x509.Certificate]] | None:
    key_path, bundle_path = out / "ca.key", out / "ca.crt"
    if not key_path.exists() and not bundle_path.exists():
        return None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        bundle = x509.load_pem_x509_certificates(bundle_path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise CertsError(f"{out}: ca.crt and ca.key are not a usable CA ({exc}); move them "
                         "away to make a new one") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{key_path}: not an ECDSA key made by tandem certs")
    mine = _spki(key.public_key())
    bundle.sort(key=lambda c: _spki(c.public_key()) != mine)  # the signing CA first
    if _spki(bundle[0].public_key()) != mine:
        raise CertsError(f"{key_path}: not the key of any CA in {bundle_path}")
    return key, bundle


def make_certs(config: Config, out: Path, *, servers: Sequence[str] = (), days: int = 365,
               new_ca: bool = False, drop_old_cas: bool = False) -> list[str]:
    """Write the files; returns what was done, one line each."""
    out.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    existing = _existing_ca(out)
    if existing is None or new_ca:
        ca_key, ca = _new_ca(config.cluster.name)
        old = existing[1] if existing else []
        bundle = [ca, *old]
        _write(out / "ca.key", _pem_key(ca_key), private=True)
        _write(out / "ca.crt", b"".join(_pem(c) for c in bundle), private=False)
        done.append(f"made a new CA: {out / 'ca.crt'}"
                    + (f" (the bundle trusts it and {len(old)} older)" if old else ""))
        if old:  # rotation, step 1: nothing is signed by it until every server trusts it
            return done
    else:
        ca_key, bundle = existing
        ca = bundle[0]
        if drop_old_cas:
            _write(out / "ca.crt", _pem(ca), private=False)
            done.append(f"{out / 'ca.crt'} now trusts only {ca.subject.rfc4514_string()}")
            return done
        done.append(f"using the CA in {out / 'ca.crt'}")
    for srv in config.servers:
        if servers and srv.id not in servers:
            continue
        key, cert = _server_cert(ca_key, ca, srv.id, srv.replication.host, days)
        _write(out / f"{srv.id}.key", _pem_key(key), private=True)
        _write(out / f"{srv.id}.crt", _pem(cert), private=False)
        done.append(f"{srv.id}: {out / (srv.id + '.crt')} ({identity(srv.id)}, "
                    f"valid until {cert.not_valid_after_utc:%Y-%m-%d})")
    return done


def _as_written(out: Path, config: Config) -> str:
    """`out` as the cluster file should name it: relative to the file's directory."""
    base = Path(config.source).resolve().parent
    try:
        return str(out.resolve().relative_to(base))
    except ValueError:
        return str(out.resolve())


def run(config: Config, out: str, *, servers: Sequence[str] = (), days: int = 365,
        new_ca: bool = False, drop_old_cas: bool = False) -> int:
    """`tandem certs`: the exit status (2: an unknown server id or an unusable CA)."""
    for sid in servers:
        if sid not in config.server_ids:
            print(f"tandem: no server {sid!r} in {config.source} "
                  f"(known: {', '.join(config.server_ids)})", file=sys.stderr)
            return 2
    if new_ca and drop_old_cas:
        print("tandem: --new-ca and --drop-old-cas are two steps of a rotation: one at a "
              "time", file=sys.stderr)
        return 2
    try:
        done = make_certs(config, Path(out), servers=servers, days=days, new_ca=new_ca,
                          drop_old_cas=drop_old_cas)
    except (CertsError, OSError) as exc:
        print(f"tandem: {exc}", file=sys.stderr)
        return 2
    print("\n".join(done))
    where = _as_written(Path(out), config)
    lines = [f'tls_ca = "{where}/ca.crt"', f'tls_cert = "{where}/{{id}}.crt"',
             f'tls_key = "{where}/{{id}}.key"']
    c = config.cluster
    if (c.tls_ca, c.tls_cert, c.tls_key) != tuple(v.split(" = ", 1)[1].strip('"')
                                                 for v in lines):
        print(f"\nin the [cluster] section of {config.source}:\n" + "\n".join(lines))
    return 0
