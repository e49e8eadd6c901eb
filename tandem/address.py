"""A listening or dialled address of the cluster file: `host:port`, `[v6]:port`."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = ["Address"]


@dataclass(frozen=True, slots=True)
class Address:
    """A `host:port` pair (`[v6]:port` for IPv6)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, allow_port_0: bool = False) -> Address:
        """`allow_port_0`: for a listening address (0: the system picks a free port)."""
        m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", text)
        if m is None:
            if text.count(":") > 1 and "[" not in text:
                raise ValueError("an IPv6 address goes in brackets: [::1]:9001")
            raise ValueError("expected host:port")
        host = m.group(1) or m.group(3)
        port = int(m.group(2) or m.group(4))
        if not (0 if allow_port_0 else 1) <= port < 65536:
            raise ValueError("port out of range")
        return cls(host, port)

    @property
    def wildcard(self) -> bool:
        """Every interface (0.0.0.0, ::): a listener may bind it, nobody can dial it."""
        try:
            return ipaddress.ip_address(self.host).is_unspecified
        except ValueError:  # a host name
            return False
