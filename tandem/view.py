"""The cluster view as the backends hand it out: `X-Tandem-Cluster: <number>; s1=host:port,
s2=host:port` (the live members' http addresses), on a response to a caller whose
`X-Tandem-View` request header names an older view. The proxy and the replica-aware client
(`tandem.client`) both read it."""

from __future__ import annotations

import re

from .address import Address

__all__ = ["CLUSTER_HEADER", "VIEW_HEADER", "parse_cluster_header", "is_newer"]

CLUSTER_HEADER = "X-Tandem-Cluster"  # response: the view, when the caller's is older
VIEW_HEADER = "X-Tandem-View"  # request: the view the caller knows ("-": none yet)

_HASH_RE = re.compile(r"[A-Za-z0-9._~+/=-]{1,128}")
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_cluster_header(value: str) -> tuple[str, dict[str, Address]]:
    """Parse `X-Tandem-Cluster: <hash>; s1=host:port, s2=host:port` (live members).

    Raises ValueError naming what is wrong.
    """
    view_hash, sep, rest = value.partition(";")
    view_hash = view_hash.strip()
    if not sep or not _HASH_RE.fullmatch(view_hash) or view_hash == "-":
        raise ValueError(f"bad view hash in cluster header: {view_hash[:40]!r}")
    members: dict[str, Address] = {}
    for item in rest.split(","):
        item = item.strip()
        if not item:
            continue
        member_id, eq, address = item.partition("=")
        member_id = member_id.strip()
        if not eq or not _ID_RE.fullmatch(member_id) or member_id == "NONE":
            raise ValueError(f"bad member in cluster header: {item[:80]!r}")
        if member_id in members:
            raise ValueError(f"member {member_id!r} listed twice in cluster header")
        try:
            members[member_id] = Address.parse(address.strip())
        except ValueError as exc:
            raise ValueError(f"bad address for {member_id!r} in cluster header: {exc}") from None
    if not members:
        raise ValueError("cluster header lists no member")
    return view_hash, members


def is_newer(view: str, *, number: int, known: str) -> bool:
    """Is `view` newer than the one adopted (`number`, -1 for none; `known`, its text)?

    A view agreed by a majority has a higher number than every view before it; a server cut
    off from the majority knows only older ones, so the last view to arrive is not trusted.
    """
    try:
        return int(view) > number
    except ValueError:  # not a number: a server of an older release (its hash)
        return view != known
