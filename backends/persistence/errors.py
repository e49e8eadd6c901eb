"""Errors of the session stores, translated once at each store's boundary."""

from __future__ import annotations

from ..errors import ClusterError

__all__ = ["StoreError", "StoreUnavailable", "StoreTimeout", "StoreCorrupt"]


class StoreError(ClusterError):
    """A persistent session store operation failed."""

    def __init__(self, message: str, *, store: str, where: str) -> None:
        super().__init__(f"{store} store at {where}: {message}")
        self.store = store   # "file", "sqlite", "postgresql" or "redis"
        self.where = where   # path, DSN or URL, password masked


class StoreUnavailable(StoreError, ConnectionError):
    """The store cannot be reached or opened (every DSN of a list, for PostgreSQL)."""


class StoreTimeout(StoreError, TimeoutError):
    """The store did not answer within `persistence.timeout_s`."""


class StoreCorrupt(StoreError, ValueError):
    """A stored session could not be decoded; it is treated as absent."""
