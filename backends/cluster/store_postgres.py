"""Store-backed membership in PostgreSQL (`cluster.membership = "postgresql"`;
docs/consistency.md, "Store-backed views"). The design is in `store_view`; here, the store
calls. One table, created if missing, shared by any number of clusters:

- the view row (`server = ''`, never a server id): `number` and `view`, the JSON
  `{"n", "m", "i"}` of `View.to_wire` (a null view: no view yet);
- one lease row per server: the `incarnation` holding it, `since` (when its unbroken run of
  renewals began) and `expires_at`, both by the database's clock (`clock_timestamp()`): a
  row whose `expires_at` has passed is an ended lease, as a missing one is.

The heartbeat's step is one call of a plpgsql function — one statement, one round trip, its
own transaction: it locks the view row (`FOR UPDATE`), so the steps of a cluster's servers run
one after another, each reading every lease row its predecessor wrote; the view is written
with a compare-and-set on the number it read. No lock outlives the statement, so a server
that stalls mid-call holds up nobody. The database's clock must not be stepped (as Redis's).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from ..persistence.base import mask
from .store_view import StoreView

__all__ = ["PostgresView"]

_TABLE = "tandem_membership"
# Versioned: a cluster upgraded one server at a time runs old and new bodies side by side.
_BEAT_FN = "tandem_membership_beat_v1"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {_TABLE} (
    cluster     text NOT NULL,
    server      text NOT NULL,   -- '' : the view row; else that server's lease row
    number      bigint,          -- view row: the view's number (the compare-and-set)
    view        jsonb,           -- view row: {{"n", "m", "i"}}
    incarnation text,            -- lease row: the process holding it
    since       timestamptz,     -- lease row: when its unbroken run of renewals began
    expires_at  timestamptz,     -- lease row: by the database's clock
    PRIMARY KEY (cluster, server)
);
CREATE OR REPLACE FUNCTION {_BEAT_FN}(
    p_cluster text, p_me text, p_inc text, p_grant_ms bigint, p_may_join boolean,
    p_known jsonb)
RETURNS TABLE (beat_view jsonb, beat_renewed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    v_number bigint;
    v_view jsonb;
    v_fresh boolean;
    v_now timestamptz;
    v_grant interval := p_grant_ms * interval '1 millisecond';
    v_bound jsonb;
    v_member boolean;
    v_changed boolean;
    v_my_inc text;
    v_my_since timestamptz;
    v_gone text[];
BEGIN
    -- the view row always exists, so every step of the cluster locks the same row
    INSERT INTO {_TABLE} (cluster, server) VALUES (p_cluster, '') ON CONFLICT DO NOTHING;
    SELECT r.number, r.view INTO v_number, v_view FROM {_TABLE} r
     WHERE r.cluster = p_cluster AND r.server = '' FOR UPDATE;
    v_now := clock_timestamp();  -- after the lock: later than every renewal before ours
    v_fresh := v_view IS NULL;
    IF v_fresh THEN  -- no view yet, or the database lost it: the one we know, if any
        v_view := COALESCE(p_known, '{{"n": 1, "m": [], "i": []}}'::jsonb);
    END IF;
    SELECT COALESCE(jsonb_object_agg(m.x, i.y), '{{}}'::jsonb) INTO v_bound
      FROM jsonb_array_elements_text(v_view -> 'm') WITH ORDINALITY AS m(x, k)
      JOIN jsonb_array_elements_text(v_view -> 'i') WITH ORDINALITY AS i(y, k) USING (k);
    v_member := (v_bound ->> p_me) IS NOT DISTINCT FROM p_inc;
    v_changed := v_fresh AND v_member;
    SELECT l.incarnation, l.since INTO v_my_inc, v_my_since FROM {_TABLE} l
     WHERE l.cluster = p_cluster AND l.server = p_me AND l.expires_at > v_now;
    -- removals: only after our own renewals ran without a gap for a whole grant
    IF v_member AND v_my_inc = p_inc AND v_now - v_my_since >= v_grant THEN
        SELECT array_agg(b.key) INTO v_gone FROM jsonb_each_text(v_bound) b
         WHERE b.key <> p_me AND NOT EXISTS (
               SELECT 1 FROM {_TABLE} l
                WHERE l.cluster = p_cluster AND l.server = b.key
                  AND l.incarnation = b.value AND l.expires_at > v_now);
        IF v_gone IS NOT NULL THEN
            v_bound := v_bound - v_gone;
            v_changed := true;
        END IF;
    END IF;
    -- a join (or a restart's rebind) once no live lease of our server is left
    IF NOT v_member AND p_may_join AND v_my_inc IS NULL THEN
        v_bound := v_bound || jsonb_build_object(p_me, p_inc);
        v_member := true;
        v_changed := true;
    END IF;
    IF v_changed THEN
        SELECT jsonb_build_object(
                 'n', (v_view ->> 'n')::bigint + 1,
                 'm', COALESCE(jsonb_agg(b.key ORDER BY b.key COLLATE "C"), '[]'::jsonb),
                 'i', COALESCE(jsonb_agg(b.value ORDER BY b.key COLLATE "C"), '[]'::jsonb))
          INTO v_view FROM jsonb_each_text(v_bound) b;
        UPDATE {_TABLE} SET number = (v_view ->> 'n')::bigint, view = v_view
         WHERE cluster = p_cluster AND server = '' AND number IS NOT DISTINCT FROM v_number;
        IF NOT FOUND THEN  -- cannot happen under the row lock; never write over a change
            RAISE EXCEPTION 'tandem membership: view % changed under the lock', v_number;
        END IF;
    ELSIF v_fresh THEN
        v_view := NULL;  -- nothing stored, and not ours to create
    END IF;
    -- the renewal, only if the resulting view binds us
    IF v_member THEN
        INSERT INTO {_TABLE} AS l (cluster, server, incarnation, since, expires_at)
        VALUES (p_cluster, p_me, p_inc, v_now, v_now + v_grant)
        ON CONFLICT (cluster, server) DO UPDATE SET
            since = CASE WHEN l.incarnation = EXCLUDED.incarnation AND l.expires_at > v_now
                         THEN l.since ELSE EXCLUDED.since END,
            incarnation = EXCLUDED.incarnation,
            expires_at = EXCLUDED.expires_at;
    END IF;
    RETURN QUERY SELECT v_view, v_member;
END
$$;
"""

_EXISTS = (f"SELECT to_regprocedure('{_BEAT_FN}(text, text, text, bigint, boolean, jsonb)')"
           f" FROM to_regclass('{_TABLE}') t WHERE t IS NOT NULL")

_BEAT = f"SELECT beat_view, beat_renewed FROM {_BEAT_FN}($1, $2, $3, $4, $5, $6::jsonb)"

# Only if it names our incarnation: a later process of our server may hold it by now.
_RELEASE = f"DELETE FROM {_TABLE} WHERE cluster = $1 AND server = $2 AND incarnation = $3"

# Servers starting together must not race on CREATE OR REPLACE FUNCTION.
_SCHEMA_LOCK = 7410431203


class PostgresView(StoreView):
    """`cluster.membership = "postgresql"`: one database whose commits are not lost."""

    kind = "postgresql"
    # a refused login, a missing privilege, a dropped connection, a DSN the driver cannot
    # parse (a ValueError): no renewal
    unavailable = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError,
                   ValueError)

    def __init__(self, *, dsn: str, **options: Any) -> None:
        super().__init__(**options)
        self.dsn = dsn
        self.where = mask(dsn)
        # one connection, one call at a time; dropped after any failure (a call cut short by
        # the heartbeat's timeout leaves it in an unknown state) and dialled again next beat
        self._conn: asyncpg.Connection | None = None

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        conn = await asyncpg.connect(self.dsn, timeout=self.heartbeat_s)
        try:
            # created only if missing: a database prepared by its administrator needs no
            # CREATE privilege of ours, only the table's and the function's
            if await conn.fetchval(_EXISTS) is None:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
                    await conn.execute(_SCHEMA)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        return conn

    async def _call(self, query: str, *args: Any) -> Any:
        try:
            conn = await self._connection()
            return await conn.fetchrow(query, *args)
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # never waits on a database that does not answer

    async def _exchange(self, *, known: dict[str, Any] | None, may_join: bool
                        ) -> tuple[str | bytes | None, bool]:
        row = await self._call(_BEAT, self.cluster, self.me, self.incarnation, self.grant_ms,
                               may_join, json.dumps(known) if known is not None else None)
        return row["beat_view"], bool(row["beat_renewed"])

    async def _release(self) -> None:
        await self._call(_RELEASE, self.cluster, self.me, self.incarnation)

    async def _close_client(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=self.heartbeat_s)
            except self.unavailable:
                conn.terminate()
