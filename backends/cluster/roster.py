"""The servers this server knows: the cluster file's, and those that joined while it ran.

A server that is not in the cluster file joins a running cluster by dialling the servers of
its own file: its handshake carries its addresses (`announcement`), signed with the cluster
secrets like the rest of the handshake, so only a holder of the secrets can announce one.
The server it dialled admits it (`Roster.admit`), tells the others (`v_roster`), and the
view consensus binds it like any server that asks to join (docs/deployment.md, "Joining
and leaving a running cluster"). The view, not the roster, says who is a member: the roster
only says where a server is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from tandem.config import Config, ServerConfig, parse_server
from tandem.errors import ConfigError

__all__ = ["Roster", "announcement"]

# what a server announces of itself: where to reach it, and what the ranking needs
_ANNOUNCED = ("id", "http", "replication", "machine", "group", "preferred_secondary_group",
              "witness")


def announcement(server: ServerConfig) -> dict[str, Any]:
    """A server's addresses and placement, as its handshake carries them (JSON)."""
    out: dict[str, Any] = {}
    for key in _ANNOUNCED:
        value = getattr(server, key)
        if key in ("http", "replication"):
            value = str(value)
        if value not in ("", False) or key in ("id", "http", "replication"):
            out[key] = value
    return out


class Roster:
    """Server id → its configuration, for every server this one knows."""

    def __init__(self, config: Config) -> None:
        self._servers: dict[str, ServerConfig] = {s.id: s for s in config.servers}
        self.from_file = frozenset(self._servers)

    def __contains__(self, server_id: object) -> bool:
        return server_id in self._servers

    def __iter__(self) -> Iterator[ServerConfig]:
        return iter(self._servers.values())

    def __len__(self) -> int:
        return len(self._servers)

    def get(self, server_id: str) -> ServerConfig | None:
        return self._servers.get(server_id)

    def __getitem__(self, server_id: str) -> ServerConfig:
        return self._servers[server_id]

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._servers)

    def parse(self, spec: object, *, peer: str) -> ServerConfig:
        """A server's announcement, checked as a `[[servers]]` table is (ConfigError)."""
        server = parse_server(spec, where=f"announced by {peer}", source="<join>")
        if server.id != peer:
            raise ConfigError("announces another server than the one that dialled",
                              key="id", value=server.id, file="<join>")
        for known in self._servers.values():
            if known.id != server.id and {str(known.http), str(known.replication)} & {
                    str(server.http), str(server.replication)}:
                raise ConfigError(f"address already used by {known.id}", key="addresses",
                                  value=[str(server.http), str(server.replication)],
                                  file="<join>")
        return server

    def admit(self, server: ServerConfig) -> bool:
        """Add a server not known yet; False if it was known (nothing changes)."""
        if server.id in self._servers:
            return False
        self._servers[server.id] = server
        return True

    def forget(self, server_id: str) -> None:
        """A joined server that left for good (never one of the cluster file's)."""
        if server_id not in self.from_file:
            self._servers.pop(server_id, None)
