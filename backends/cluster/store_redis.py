"""Store-backed membership in Redis (`cluster.membership = "redis"`; docs/consistency.md,
"Store-backed views"). The design is in `store_view`; here, the store calls:

- the view is one key, `tandem:{<cluster>}:view`, JSON `{"n", "m", "i"}` (`View.to_wire`);
- each process's lease is one key per server, `tandem:{<cluster>}:lease:<server>`, value
  `<incarnation>:<since>` (`since` in ms of the store's time), expiring a grant after each
  renewal (`PX`): an expired lease is a missing key.

The heartbeat's step is one Lua script, run atomically by Redis; it is the only writer of the
view, so every change is `n → n + 1` from the value it read.
"""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis
from redis import exceptions as rex

from .store_view import StoreView

__all__ = ["RedisView"]

# KEYS[1] view, KEYS[1 + k] the lease key of ARGV[5 + k]
# ARGV: me, incarnation, grant_ms, may_join (0/1), the view we know ('' = none), servers...
# Returns {view JSON or '', renewed 0/1}.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, inc, grant, may_join = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4] == '1'
local leases, mykey = {}, nil
for k = 6, #ARGV do
  leases[ARGV[k]] = redis.call('GET', KEYS[k - 4])
  if ARGV[k] == me then mykey = KEYS[k - 4] end
end
local function holder(v)
  if not v then return nil, nil end
  local h, s = string.match(v, '^(.*):(%d+)$')
  return h, tonumber(s)
end
local raw = redis.call('GET', KEYS[1])
local view
if raw then view = cjson.decode(raw)
elseif ARGV[5] ~= '' then view = cjson.decode(ARGV[5])
else view = {n = 1, m = {}, i = {}} end
local bound = {}
for k, m in ipairs(view.m) do bound[m] = view.i[k] end
local member = bound[me] == inc
local changed = (not raw) and member
local my_holder, my_since = holder(leases[me])
if member and my_holder == inc and now - my_since >= grant then
  for m, minc in pairs(bound) do
    if m ~= me and holder(leases[m]) ~= minc then
      bound[m] = nil
      changed = true
    end
  end
end
if not member and may_join and not leases[me] then
  bound[me] = inc
  member = true
  changed = true
end
if changed then
  local ms, is = {}, {}
  for m in pairs(bound) do table.insert(ms, m) end
  table.sort(ms)
  for k, m in ipairs(ms) do is[k] = bound[m] end
  raw = cjson.encode({n = view.n + 1, m = ms, i = is})
  redis.call('SET', KEYS[1], raw)
end
local renewed = 0
if member then
  local since = now
  if my_holder == inc then since = my_since end
  redis.call('SET', mykey, inc .. ':' .. since, 'PX', grant)
  renewed = 1
end
return {raw or '', renewed}
"""

# KEYS[1] our lease key; ARGV[1] our incarnation. Deletes it only if it is ours.
_RELEASE = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. ':' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisView(StoreView):
    """`cluster.membership = "redis"`: one Redis whose acknowledged writes are not lost."""

    kind = "redis"
    # a refusal such as NOAUTH is a RedisError too
    unavailable = (rex.RedisError, OSError, TimeoutError)

    def __init__(self, *, url: str, client: Any = None, **options: Any) -> None:
        super().__init__(**options)
        prefix = f"tandem:{{{self.cluster}}}:"
        self._keys = [prefix + "view", *(f"{prefix}lease:{s}" for s in self.servers)]
        # one command at a time, each bounded by a heartbeat
        self._client: Any = client or aioredis.Redis.from_url(
            url, socket_timeout=self.heartbeat_s, socket_connect_timeout=self.heartbeat_s)
        self._beat = self._client.register_script(_BEAT)
        self._release_script = self._client.register_script(_RELEASE)

    async def _exchange(self, *, known: dict[str, Any] | None, may_join: bool
                        ) -> tuple[str | bytes | None, bool]:
        raw, renewed = await self._beat(
            keys=self._keys,
            args=[self.me, self.incarnation, self.grant_ms, "1" if may_join else "0",
                  json.dumps(known) if known is not None else "", *self.servers])
        return raw, bool(renewed)

    async def _release(self) -> None:
        await self._release_script(keys=[self._keys[1 + self.servers.index(self.me)]],
                                   args=[self.incarnation])

    async def _close_client(self) -> None:
        await self._client.aclose()
