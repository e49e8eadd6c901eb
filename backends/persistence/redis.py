"""Sessions offloaded to Redis (`persistence.url`) or a Redis Cluster (`persistence.urls`).

One hash per session, `tandem:session:<sid>` with fields v (version), e (epoch), b (body),
a (last access), m (max inactive, seconds), and a TTL equal to what is left of max_inactive, so
Redis itself expires sessions (the sweeper has nothing to do). Saves and touches are small
Lua scripts on one key, so they work the same on a cluster: a save never replaces a newer
copy (epoch, then version), a touch never creates a key. Batches travel as one pipeline.

A write is acknowledged once it is in Redis's memory; whether it survives a restart of Redis
depends on Redis's own persistence (`appendonly yes`, `appendfsync`).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.cluster import ClusterNode, RedisCluster

from .base import StoredSession, map_errors, mask
from .errors import StoreUnavailable

__all__ = ["RedisStore"]

_PREFIX = "tandem:session:"

# KEYS[1] session; ARGV: version, body, last_access, max_inactive_s, ttl_ms, epoch
_SAVE = """
local cur = redis.call('HMGET', KEYS[1], 'e', 'v', 'a')
if cur[2] then
  local e, v = tonumber(cur[1] or '0'), tonumber(cur[2])
  local ne, nv = tonumber(ARGV[6]), tonumber(ARGV[1])
  if e > ne or (e == ne and v > nv) then return 0 end
end
if cur[3] and tonumber(cur[3]) > tonumber(ARGV[3]) then ARGV[3] = cur[3] end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'b', ARGV[2], 'a', ARGV[3], 'm', ARGV[4],
           'e', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
"""

# KEYS[1] session; ARGV: last_access, ttl_ms
_TOUCH = """
local a = redis.call('HGET', KEYS[1], 'a')
if not a then return 0 end
if tonumber(a) < tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'a', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

_UNAVAILABLE = (rex.ConnectionError, rex.TimeoutError, rex.ClusterDownError,
                rex.ClusterError, rex.BusyLoadingError, OSError, TimeoutError)


def _ttl_ms(expires_at: float, now: float) -> int:
    return max(1, int((expires_at - now) * 1000))


class RedisStore:
    """`session.persistence = "redis"`."""

    kind = "redis"

    def __init__(self, *, url: str = "", urls: Sequence[str] = (),
                 timeout_s: float = 2.0) -> None:
        # configuration
        self.urls = tuple(urls)
        self.url = url
        self.where = ", ".join(mask(u) for u in self.urls) if self.urls else mask(url)
        self._timeout_s = timeout_s
        # resources
        self._client: Any = None   # redis.asyncio.Redis or RedisCluster

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        with map_errors(self.kind, self.where, unavailable=(*_UNAVAILABLE, ValueError),
                        other=(rex.RedisError,)):
            if self.urls:
                nodes: list[ClusterNode] = []
                auth: dict[str, Any] = {}
                for u in self.urls:
                    parts = urlsplit(u)
                    nodes.append(ClusterNode(parts.hostname or "127.0.0.1", parts.port or 6379))
                    if parts.password:
                        auth = {"username": unquote(parts.username or "") or None,
                                "password": unquote(parts.password)}
                client: Any = RedisCluster(
                    startup_nodes=nodes, socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s, **auth)
            else:
                client = aioredis.Redis.from_url(
                    self.url, socket_timeout=self._timeout_s,
                    socket_connect_timeout=self._timeout_s)
            try:
                if self.urls:
                    await client.initialize()
                await client.ping()
            except BaseException:
                await client.aclose()
                raise
        self._client = client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with map_errors(self.kind, self.where, unavailable=_UNAVAILABLE):
                await client.aclose()

    # --- operations ---------------------------------------------------------------------

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        with self._errors():
            v, b, a, m, e = await self._client.hmget(_PREFIX + sid, "v", "b", "a", "m", "e")
        if v is None or b is None:
            return None
        row = StoredSession(sid, int(v), b.decode(), float(a), float(m), int(e or 0))
        return None if row.expires_at < now else row

    async def save(self, rows: Sequence[StoredSession]) -> None:
        now = time.time()
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for r in rows:
                    if r.expires_at > now:
                        pipe.eval(_SAVE, 1, _PREFIX + r.sid, r.version, r.body,
                                  repr(r.last_access), repr(r.max_inactive_s),
                                  _ttl_ms(r.expires_at, now), r.epoch)
                await pipe.execute()

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        now = time.time()
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for sid, (last_access, max_inactive_s) in items.items():
                    pipe.eval(_TOUCH, 1, _PREFIX + sid, repr(last_access),
                              _ttl_ms(last_access + max_inactive_s, now))
                await pipe.execute()

    async def delete(self, sids: Collection[str]) -> None:
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for sid in sids:
                    pipe.delete(_PREFIX + sid)
                await pipe.execute()

    async def sweep(self, *, now: float) -> int:
        return 0  # every key carries its own TTL

    def _errors(self) -> Any:
        if self._client is None:
            raise StoreUnavailable("not open", store=self.kind, where=self.where)
        return map_errors(self.kind, self.where, unavailable=_UNAVAILABLE,
                          other=(rex.RedisError,))
