"""A server's TLS contexts for the replication channel, built from its files and tried
before use.

Both directions verify: the listener's context requires a client certificate chained to the
CA bundle, the dialler's verifies the listener's. Host names are not checked — a peer's
identity is the server id its certificate names (`tandem:server:<id>`), checked by the
channel after the handshake. TLS 1.2 at least (1.3 is what two tandem servers agree on).

Before a set of files is used (at start, at every reload) it is tried in a handshake with
itself, in memory: the key matches the certificate, the certificate chains to the CA bundle
and may serve as client and server, and names this server. A set that fails is one line
naming the file (ConfigError) — at start the process does not start, at a reload the old
contexts stay.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass
from typing import Any

from tandem.errors import ConfigError
from tandem.tls import TlsFile, TlsFiles, identity, ids_named

__all__ = ["TlsContexts", "load_contexts"]


@dataclass(frozen=True, slots=True)
class TlsContexts:
    """The contexts of one generation of files, and what their certificate says."""

    server: ssl.SSLContext  # the listener's: client certificate required
    client: ssl.SSLContext  # the dialler's: presents ours, verifies the listener's
    ids: frozenset[str]  # the server ids our certificate names
    not_after: float  # when our certificate expires (epoch seconds)
    loaded_at: float

    @property
    def days_left(self) -> float:
        return (self.not_after - time.time()) / 86400


def _no_password() -> bytes:
    # An encrypted key would make OpenSSL ask on the terminal; a server must not wait there.
    raise ConfigError("is encrypted: tandem needs an unencrypted key (mode 0600)",
                      key="<key>", value=None)


def _error(file: TlsFile, files: TlsFiles, message: str) -> ConfigError:
    return ConfigError(f"{file.path}: {message}", key=file.key, value=file.written,
                       file=files.source)


def _readable(files: TlsFiles) -> None:
    for file in files.all():
        try:
            with open(file.path, "rb") as f:
                if not f.read(1):
                    raise _error(file, files, "the file is empty")
        except OSError as exc:
            raise _error(file, files, f"cannot read it: {exc.strerror}") from exc


def _ssl_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return str(exc.verify_message)
    return str(exc.reason or exc).lower().replace("_", " ")


def _context(purpose: str, files: TlsFiles) -> ssl.SSLContext:
    if purpose == "server":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the identity is the server id, checked by the channel
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for ca in (files.ca, *files.extra_cas):
        try:
            ctx.load_verify_locations(cafile=str(ca.path))
        except (ssl.SSLError, ValueError) as exc:
            raise _error(ca, files, "no PEM CA certificate in it") from exc
    try:
        ctx.load_cert_chain(str(files.cert.path), str(files.key.path), password=_no_password)
    except ConfigError as exc:
        raise _error(files.key, files, str(exc).split(": ", 1)[1].split(" (got")[0]) from exc
    except ssl.SSLError as exc:
        reason = _ssl_reason(exc)
        if "key values mismatch" in reason:
            raise _error(files.key, files,
                         f"is not the key of the certificate {files.cert.path}") from exc
        # which of the two is not PEM: try the certificate alone
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            probe.load_verify_locations(cafile=str(files.cert.path))
        except (ssl.SSLError, ValueError):
            raise _error(files.cert, files, "no PEM certificate in it") from exc
        raise _error(files.key, files, f"not a usable PEM private key ({reason})") from exc
    return ctx


def _self_handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> Any:
    """A TLS handshake of the two contexts with each other, in memory: what a peer will
    see of us (our certificate) — or the ssl.SSLError a peer would get."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):  # a handshake is 2-3 flights; more would be a bug
        for side, obj, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
            peer_in.write(out.read())
        if all(done.values()):
            # TLS 1.3: the listener checks the client's certificate in its last step, and
            # the client learns of a refusal only at its next read
            try:
                c.read(1)
            except ssl.SSLWantReadError:
                pass
            cert = c.getpeercert()
            assert cert is not None
            return cert
    raise ssl.SSLError("handshake did not complete")  # pragma: no cover


def load_contexts(files: TlsFiles, server_id: str) -> TlsContexts:
    """Build and try the contexts of `files` for `server_id` (ConfigError naming the file)."""
    _readable(files)
    server = _context("server", files)
    client = _context("client", files)
    try:
        cert = _self_handshake(server, client)
    except ssl.SSLError as exc:
        raise _error(files.cert, files,
                     f"not accepted with the CA bundle {files.ca.path}: {_ssl_reason(exc)}"
                     ) from exc
    sans = cert.get("subjectAltName", ())
    ids = ids_named(sans)
    if server_id not in ids:
        named = ", ".join(sorted(ids)) or "no server"
        raise _error(files.cert, files,
                     f"does not name server {server_id} (a subject-alternative name URI "
                     f"{identity(server_id)}; it names {named}): `tandem certs` makes one")
    not_after = ssl.cert_time_to_seconds(str(cert["notAfter"]))
    return TlsContexts(server=server, client=client, ids=ids, not_after=not_after,
                       loaded_at=time.time())
