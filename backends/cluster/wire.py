"""The replication channel's wire format: length-prefixed JSON frames and the handshake.

Frame: 4-byte big-endian length, then a UTF-8 JSON object. The handshake is a mutual
challenge-response over the cluster secrets (HMAC-SHA256): the listener sends a nonce, the
dialler proves it knows a secret and names itself, the listener proves it back. The
dialler's hello also announces where it is (`spec`, under the same MAC): a server the
listener does not know yet may be admitted by it (a join, backends.cluster.roster). With
TLS (`tls.py`) it runs inside the TLS connection, and the dialler may name itself only as
a server its certificate names.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import struct
from collections.abc import Callable, Collection, Container, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tandem.errors import ConfigError

from ..errors import HandshakeFailed, PeerUnavailable, ProtocolViolation

__all__ = ["MAX_FRAME", "write_frame", "encode_frame", "read_frame", "FrameReader",
           "dial_handshake", "accept_handshake", "Dialler"]

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")
# Frames are encoded and decoded by orjson: a re-protection frame of 500 sessions costs
# 0.16 µs a session to encode where the standard library's C encoder takes 2.9 (its float
# repr alone, three timestamps a session, is 1.7), and a third of its time to decode. What
# orjson refuses (an int past 64 bits, NaN from a peer) goes the standard library's way.
_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS
_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
_raw_decode = json.JSONDecoder().raw_decode


def _encode(msg: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(msg, option=_ORJSON_OPTS)
    except TypeError:  # (orjson.JSONEncodeError is one)
        return _encoder.encode(msg).encode()


def encode_frame(msg: dict[str, Any]) -> bytes:
    body = _encode(msg)
    return _LEN.pack(len(body)) + body


def write_frame(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(encode_frame(msg))


async def read_frame(reader: asyncio.StreamReader, *, peer: str) -> dict[str, Any]:
    try:
        head = await reader.readexactly(4)
        (size,) = _LEN.unpack(head)
        if size > MAX_FRAME:
            raise ProtocolViolation(f"frame of {size} bytes exceeds {MAX_FRAME}", peer=peer)
        body = await reader.readexactly(size)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise PeerUnavailable("connection closed", peer=peer) from exc
    return _parse(body, peer)


def _parse(body: bytes | bytearray, peer: str) -> dict[str, Any]:
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        msg = _parse_strictly(body, peer)  # (what orjson refuses: NaN, say; or not JSON)
    if not isinstance(msg, dict):
        raise ProtocolViolation("frame is not a JSON object", peer=peer)
    return msg


def _parse_strictly(body: bytes | bytearray, peer: str) -> Any:
    try:
        text = body.decode()
        msg, end = _raw_decode(text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise ProtocolViolation("frame is not JSON", peer=peer) from exc
    if end != len(text):
        raise ProtocolViolation("frame has data after its JSON value", peer=peer)
    return msg


class FrameReader:
    """The frames of one connection, for its long-lived read loop.

    One read takes in whatever has arrived, and frames already received are handed out
    without reading again: a burst of replication messages costs one read, not two per
    frame.
    """

    __slots__ = ("_reader", "_peer", "_buf", "_pos")

    def __init__(self, reader: asyncio.StreamReader, *, peer: str) -> None:
        self._reader = reader
        self._peer = peer
        self._buf = bytearray()
        self._pos = 0  # start of the first frame not handed out yet

    async def read(self) -> dict[str, Any]:
        buf = self._buf
        while True:
            pos = self._pos
            if len(buf) - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > MAX_FRAME:
                    raise ProtocolViolation(f"frame of {size} bytes exceeds {MAX_FRAME}",
                                            peer=self._peer)
                end = pos + 4 + size
                if end <= len(buf):
                    body = buf[pos + 4:end]
                    if end == len(buf):
                        buf.clear()
                        self._pos = 0
                    else:
                        self._pos = end
                    return _parse(body, self._peer)
            if pos:
                del buf[:pos]
                self._pos = 0
            try:
                data = await self._reader.read(256 * 1024)
            except ConnectionError as exc:
                raise PeerUnavailable("connection closed", peer=self._peer) from exc
            if not data:
                raise PeerUnavailable("connection closed", peer=self._peer)
            buf += data


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), "|".join(parts).encode(), hashlib.sha256).hexdigest()


def _canon(spec: object) -> str:
    """The announcement as the MAC covers it (stable key order)."""
    return "" if spec is None else json.dumps(spec, sort_keys=True, separators=(",", ":"))


def _verify(secrets_: Sequence[str], mac: object, *parts: str) -> bool:
    if not isinstance(mac, str):
        return False
    return any(hmac.compare_digest(_mac(s, *parts), mac) for s in secrets_)


async def dial_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                         me: str, peer: str, cluster: str, secrets_: Sequence[str],
                         incarnation: str = "", spec: dict[str, Any] | None = None) -> str:
    """Authenticate an outgoing connection to `peer` (raises HandshakeFailed); returns the
    peer's incarnation (its process's id, new at every start), authenticated like the rest.
    `spec`: our own addresses, for a listener that does not know us yet."""
    challenge = await read_frame(reader, peer=peer)
    if challenge.get("op") != "challenge" or not isinstance(challenge.get("nonce"), str):
        raise HandshakeFailed("expected a challenge", peer=peer)
    if challenge.get("server") != peer:
        raise HandshakeFailed(f"answered as {challenge.get('server')!r}", peer=peer)
    server_nonce: str = challenge["nonce"]
    their_inc = challenge.get("inc", "")
    if not isinstance(their_inc, str):
        raise HandshakeFailed("bad incarnation", peer=peer)
    my_nonce = secrets.token_hex(16)
    write_frame(writer, {"op": "hello", "id": me, "nonce": my_nonce, "inc": incarnation,
                         "spec": spec,
                         "mac": _mac(secrets_[0], "dial", cluster, server_nonce, my_nonce, me,
                                     incarnation, _canon(spec))})
    reply = await read_frame(reader, peer=peer)
    if reply.get("op") != "welcome":
        raise HandshakeFailed(f"refused: {reply.get('reason', 'no reason given')}", peer=peer)
    if not _verify(secrets_, reply.get("mac"), "accept", cluster, my_nonce, server_nonce, peer,
                   their_inc):
        raise HandshakeFailed("peer does not know the cluster secret", peer=peer)
    return their_inc


@dataclass(frozen=True, slots=True)
class Dialler:
    """Who an accepted connection comes from: a server id and its process's incarnation."""

    id: str
    incarnation: str


async def accept_handshake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                           me: str, cluster: str, secrets_: Sequence[str],
                           known: Container[str], incarnation: str = "",
                           admit: Callable[[str, object], None] | None = None,
                           certified: Collection[str] | None = None) -> Dialler:
    """Authenticate an incoming connection; returns who dialled. A dialler not `known` is
    refused unless `admit` takes its announcement (after the MAC is checked: only a holder
    of the secrets can announce a server); `admit` raises ConfigError to refuse it.
    `certified`: the server ids the dialler's TLS certificate names (None: plaintext) — it
    may claim only those."""
    nonce = secrets.token_hex(16)
    write_frame(writer, {"op": "challenge", "server": me, "nonce": nonce, "inc": incarnation})
    hello = await read_frame(reader, peer="?")
    peer = hello.get("id")
    their_nonce = hello.get("nonce")
    their_inc = hello.get("inc", "")
    if hello.get("op") != "hello" or not isinstance(peer, str) or not isinstance(
            their_nonce, str) or not isinstance(their_inc, str):
        raise HandshakeFailed("expected hello", peer=str(peer))
    spec = hello.get("spec")
    joining = peer not in known
    if peer == me or (joining and (admit is None or spec is None)):
        write_frame(writer, {"op": "refused", "reason": "unknown server id"})
        raise HandshakeFailed("not a member of this cluster", peer=peer)
    if certified is not None and peer not in certified:
        write_frame(writer, {"op": "refused", "reason": "certificate names another server"})
        raise HandshakeFailed("its certificate names "
                              f"{', '.join(sorted(certified)) or 'no server'}, not {peer}",
                              peer=peer)
    if not _verify(secrets_, hello.get("mac"), "dial", cluster, nonce, their_nonce, peer,
                   their_inc, _canon(spec)):
        write_frame(writer, {"op": "refused", "reason": "bad credentials"})
        raise HandshakeFailed("wrong cluster secret", peer=peer)
    if joining:
        assert admit is not None
        try:
            admit(peer, spec)
        except ConfigError as exc:
            write_frame(writer, {"op": "refused", "reason": f"join refused: {exc}"})
            raise HandshakeFailed(f"join refused: {exc}", peer=peer) from None
    write_frame(writer, {"op": "welcome", "mac": _mac(secrets_[0], "accept", cluster,
                                                      their_nonce, nonce, me, incarnation)})
    return Dialler(peer, their_inc)
