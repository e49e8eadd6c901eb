"""TLS on the proxy's client listener: the certificates of `[proxy]`, chosen by SNI, read
again on SIGHUP without touching the connections already up.

The listener is created once with a *front* context that holds no certificate: its SNI
callback hands each new handshake to the current generation's context for the name the
client asked for (`tls_certs`, by their DNS names, `*.example.com` matching one label), or
to the default one (`tls_cert`; also for clients that send no SNI). A reload builds a whole
new generation and swaps it in: handshakes from then on use it; connections already up keep
the context they were made with.

Modern defaults: TLS 1.2 at least, for 1.2 only the ECDHE AEAD suites of Mozilla's
"intermediate" profile (1.3 suites are OpenSSL's), ALPN `http/1.1`, no compression, no
renegotiation. A set of files that does not load (unreadable, not PEM, a key that is not the
certificate's, an encrypted key) is one line naming the file and the key of the cluster
file: at start the proxy does not start, at a reload the old generation stays.
"""

from __future__ import annotations

import os
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import structlog
from cryptography import x509

from tandem.config import Config
from tandem.errors import ConfigError
from tandem.tls import TlsFile

__all__ = ["ListenerTls", "CIPHERS_TLS12", "ALPN"]

log = structlog.get_logger("tandem.proxy.tls")

# Mozilla "intermediate" (v5.7) for TLS 1.2, less the DHE suites (no DH parameters here).
CIPHERS_TLS12 = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305"))
ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class _Cert:
    """One certificate and key of the listener, loaded."""

    context: ssl.SSLContext
    names: frozenset[str]  # its DNS names, lower case ("*.example.com" as written)
    not_after: float  # epoch seconds
    path: Path


@dataclass(frozen=True, slots=True)
class _Generation:
    """The certificates of one reading of the files."""

    default: _Cert
    by_name: tuple[_Cert, ...]
    loaded_at: float

    def pick(self, server_name: str | None) -> _Cert:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        wildcard = "*." + name.split(".", 1)[1] if "." in name else None
        for cert in self.by_name:
            if name in cert.names:
                return cert
        for cert in self.by_name:
            if wildcard in cert.names:
                return cert
        return self.default


def _base_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    # (set on every context: OpenSSL answers ALPN with the context the SNI callback chose)
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _no_password() -> bytes:
    # An encrypted key would make OpenSSL ask on the terminal; a proxy must not wait there.
    raise _Encrypted


class _Encrypted(Exception):
    pass


def _load(cert: TlsFile, key: TlsFile, source: str) -> _Cert:
    def error(file: TlsFile, message: str) -> ConfigError:
        return ConfigError(f"{file.path}: {message}", key=file.key, value=file.written,
                           file=source)

    for file in (cert, key):
        try:
            with open(file.path, "rb") as f:
                if not f.read(1):
                    raise error(file, "the file is empty")
        except OSError as exc:
            raise error(file, f"cannot read it: {exc.strerror}") from exc
    try:
        parsed = x509.load_pem_x509_certificate(cert.path.read_bytes())
    except ValueError as exc:
        raise error(cert, "no PEM certificate in it") from exc
    ctx = _base_context()
    try:
        ctx.load_cert_chain(str(cert.path), str(key.path), password=_no_password)
    except _Encrypted as exc:
        raise error(key, "is encrypted: tandem needs an unencrypted key (mode 0600)") from exc
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc).lower().replace("_", " ")
        if "key values mismatch" in reason:
            raise error(key, f"is not the key of the certificate {cert.path}") from exc
        raise error(key, f"not a usable PEM private key ({reason})") from exc
    try:
        san = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = frozenset(n.lower() for n in san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    return _Cert(context=ctx, names=names, path=cert.path,
                 not_after=parsed.not_valid_after_utc.timestamp())


class ListenerTls:
    """The listener's TLS: `context` for `create_server(ssl=...)`, `reload()` on SIGHUP."""

    def __init__(self, config: Config) -> None:
        # configuration
        p = config.proxy
        base = (Path(config.source).resolve().parent if config.source != "<memory>"
                else Path.cwd())

        def file(written: str, key: str) -> TlsFile:
            path = Path(os.path.expanduser(written))
            return TlsFile(path if path.is_absolute() else base / path, key, written)

        self._source = config.source
        self._default = (file(p.tls_cert, "proxy.tls_cert"), file(p.tls_key, "proxy.tls_key"))
        self._more = tuple((file(c, f"proxy.tls_certs[{i}].cert"),
                            file(k, f"proxy.tls_certs[{i}].key"))
                           for i, (c, k) in enumerate(p.tls_certs))
        # the generation in use; at start a bad file is a ConfigError here
        self._gen = self._read()
        self.context = _base_context()
        self.context.sni_callback = self._on_hello

    @staticmethod
    def enabled(config: Config) -> bool:
        return bool(config.proxy.tls_cert)

    def _read(self) -> _Generation:
        return _Generation(default=_load(*self._default, self._source),
                           by_name=tuple(_load(c, k, self._source) for c, k in self._more),
                           loaded_at=time.time())

    def _on_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                  _front: ssl.SSLContext) -> None:
        conn.context = self._gen.pick(server_name).context
        return None

    def say_loaded(self, event: str = "proxy_tls_loaded") -> None:
        gen = self._gen
        log.info(event, certificates=[
            {"file": str(c.path), "names": sorted(c.names),
             "days_left": round((c.not_after - time.time()) / 86400, 1)}
            for c in (gen.default, *gen.by_name)])

    def reload(self) -> bool:
        """Read the files again (SIGHUP); False (logged) keeps the generation in use."""
        try:
            gen = self._read()
        except ConfigError as exc:
            log.error("proxy_tls_reload_failed", error=str(exc),
                      kept=f"the certificates loaded at {time.ctime(self._gen.loaded_at)}")
            return False
        self._gen = gen
        self.say_loaded("proxy_tls_reloaded")
        return True
