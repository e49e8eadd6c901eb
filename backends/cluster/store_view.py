"""Store-backed membership: the view and the leases kept in Redis (`cluster.membership =
"redis"`; docs/consistency.md, "Views" and "Leases").

The same surface `Membership` uses from `Quorum` (view, standing, voter, lease.lease_until,
take_events, tick/receive/heard/refused), with Redis as the agreement and the clock:

- the view is one key, `tandem:{<cluster>}:view`, JSON `{"n", "m", "i"}` (`View.to_wire`);
- each process's lease is one key per server, `tandem:{<cluster>}:lease:<server>`, value
  `<incarnation>:<since>` (`since`: the store's time, ms, at which this process's unbroken
  run of renewals began), expiring `L·(1+ρ)/(1−ρ)` after each renewal by the store's clock.

Every heartbeat one Lua script (atomic: a compare-and-set on the view and more) renews this
process's lease if the view binds it, removes the members whose lease key is gone or names
another process, and binds this process when it may. The script is the only writer of the
view, so every change is `n → n + 1` from the value it read.

Why a removal is safe: this process holds its lease until `sent + L` (its own clock, `sent`
taken before the renewal left) only if the store acknowledged the renewal; the key lasts
`L·(1+ρ)/(1−ρ)` on the store's clock from a moment after `sent`, so when another member finds
it gone, the lease has ended whatever the two clock rates (within ρ). The remover must itself
have renewed without a gap for a whole grant: after an outage of the store (or of the
remover's own link to it) every server gets a grant's time to renew before anyone is removed.

A process binds itself (joins, or replaces its server's earlier process) only when no lease
key of its server exists — an earlier process's lease has ended — and only once it has
adopted a view that does not bind it (a process removed while stalled first sees its removal,
fences itself and drops its sessions, and joins in a later beat).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis import exceptions as rex

from ..errors import ProtocolViolation
from .lease import grant_factor, lease_duration
from .quorum import Standing
from .view import RHO, Out, View, ViewChanged

__all__ = ["StoreView"]

log = structlog.get_logger("tandem.quorum")

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

# Any failure of a call (unreachable, a timeout, a refusal such as NOAUTH): no renewal.
_UNAVAILABLE = (rex.RedisError, OSError, TimeoutError)


class _Held:
    """What `Membership` reads of the lease: until when (monotonic) it is held."""

    __slots__ = ("lease_until",)

    def __init__(self) -> None:
        self.lease_until = float("-inf")


class StoreView:
    """One server process's view and lease, kept in Redis."""

    def __init__(self, *, me: str, servers: Sequence[str], incarnation: str, cluster: str,
                 url: str, heartbeat_interval_s: float, missed_heartbeats: int,
                 rho: float = RHO, client: Any = None) -> None:
        # configuration
        self.me = me
        self.incarnation = incarnation
        self.servers = tuple(servers)
        self.heartbeat_s = heartbeat_interval_s
        self.duration_s = lease_duration(heartbeat_interval_s, missed_heartbeats)
        self.grant_ms = math.ceil(self.duration_s * grant_factor(rho) * 1000)
        prefix = f"tandem:{{{cluster}}}:"
        self._keys = [prefix + "view", *(f"{prefix}lease:{s}" for s in self.servers)]
        # resources: one command at a time, each bounded by a heartbeat
        self._client: Any = client or aioredis.Redis.from_url(
            url, socket_timeout=heartbeat_interval_s,
            socket_connect_timeout=heartbeat_interval_s)
        self._beat = self._client.register_script(_BEAT)
        self._release = self._client.register_script(_RELEASE)
        # state
        # View 1 binds nobody (as in the embedded consensus): a placeholder until the store's
        # view is read; the first view the store holds is 2.
        self.view = View(1, (), ())
        self.learned = False
        self.lease = _Held()
        self._events: list[ViewChanged] = []
        self._next_beat = float("-inf")
        self._reachable = True

    # --- what the host reads (as from Quorum) ------------------------------------------------

    @property
    def voter(self) -> bool:
        return self.learned and self.view.binds(self.me, self.incarnation)

    @property
    def standing(self) -> Standing:
        if self.voter:
            return Standing.MEMBER
        if not self.learned or self.me in self.view.members:
            return Standing.STARTING
        return Standing.FENCED

    def holds_lease(self, now: float) -> bool:
        return self.voter and now < self.lease.lease_until

    def take_events(self) -> list[ViewChanged]:
        events, self._events = self._events, []
        return events

    # --- inputs (as to Quorum): peers' frames do not decide anything here -------------------

    def heard(self, peer: str, incarnation: str, now: float) -> list[Out]:
        return []

    def refused(self, peer: str, now: float) -> list[Out]:
        return []  # only the store's expiry proves a lease ended

    def receive(self, src: str, msg: dict[str, Any], now: float) -> list[Out]:
        return []  # no peer runs the embedded consensus in a store-backed cluster

    def tick(self, now: float) -> list[Out]:
        return []  # the store is asked in `beat`, awaited by the host

    # --- the store -------------------------------------------------------------------------

    async def beat(self, now: float) -> None:
        """Once per heartbeat: renew, remove the ended, bind ourselves; adopt the result."""
        if now < self._next_beat:
            return
        self._next_beat = now + self.heartbeat_s
        sent = now  # before the renewal leaves: the lease counts from here
        known = json.dumps(self.view.to_wire()) if self.learned else ""
        may_join = "0" if self.voter else "1"
        try:
            raw, renewed = await asyncio.wait_for(
                self._beat(keys=self._keys,
                           args=[self.me, self.incarnation, self.grant_ms, may_join, known,
                                 *self.servers]),
                timeout=self.heartbeat_s)
        except _UNAVAILABLE as exc:
            if self._reachable:
                log.warning("membership_store_unreachable", error=type(exc).__name__,
                            detail=str(exc)[:200])
            self._reachable = False
            return
        if not self._reachable:
            log.info("membership_store_reachable")
        self._reachable = True
        if isinstance(raw, bytes):
            raw = raw.decode()
        if not raw:
            return  # no view yet and we may not create it (we are bound in one we know)
        try:
            view = View.from_wire(json.loads(raw), peer="store")
        except (ValueError, ProtocolViolation):
            log.error("membership_store_malformed_view", view=raw[:200])
            return  # no lease on a view we cannot read
        if self.learned and view.number < self.view.number:
            # The store lost acknowledged writes (a flushed or failed-over Redis): no lease
            # on a view older than one we adopted.
            log.error("membership_store_behind", store=view.number, ours=self.view.number)
            return
        self._adopt(view)
        if renewed and view.binds(self.me, self.incarnation):
            self.lease.lease_until = max(self.lease.lease_until, sent + self.duration_s)

    def _adopt(self, view: View) -> None:
        if self.learned and view.number <= self.view.number:
            return
        old, self.view, self.learned = self.view, view, True
        if not view.binds(self.me, self.incarnation):
            self.lease.lease_until = float("-inf")
        self._events.append(ViewChanged(old, view))
        log.info("view_adopted", n=view.number, members=view.members, me=self.me)

    async def close(self) -> None:
        """We stopped acknowledging (the host's `start_leaving`): end our lease in the store
        at once, so the others remove us without waiting for its expiry."""
        try:
            if self.voter:
                await asyncio.wait_for(
                    self._release(keys=[self._keys[1 + self.servers.index(self.me)]],
                                  args=[self.incarnation]), timeout=self.heartbeat_s)
        except _UNAVAILABLE:
            pass  # it expires by itself
        finally:
            await self._client.aclose()
