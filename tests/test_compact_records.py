"""The compact in-memory form of the session records (backends/sessions/store.py): what a
session costs, and that a replica promoted in place is the primary it would have been."""

from __future__ import annotations

import gc
import json
import tracemalloc

from backends.sessions.committing import Committer
from backends.sessions.store import LocalStore, Primary, Replica

N = 20_000
VALUE = json.dumps("x" * 198)  # one string shared by every session: not counted below


def _bytes_per_session(make: object) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = make()  # type: ignore[operator]
        gc.collect()
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del kept
    return used / N


def test_a_replicated_primary_costs_under_700_bytes_besides_its_value() -> None:
    def make() -> LocalStore:
        store = LocalStore(max_inactive_s=1800.0)
        for i in range(N):
            record = store.create()
            store.assign_secondary(record, "s2")
            record.apply({"v": VALUE}, set(), rid=f"rid-{i:016d}")  # (a proxy's request id)
            Committer._replicate_msg(record)  # sent: nothing pending any more
            record.acked_version = record.version
        return store

    # (1,370 before: four empty sets and dicts per session, the undo as a dict)
    assert _bytes_per_session(make) < 700


def test_a_replica_costs_under_450_bytes_besides_its_value_and_id() -> None:
    sids = [f"{i:032d}" for i in range(N)]

    def make() -> LocalStore:
        store = LocalStore(max_inactive_s=1800.0)
        for sid in sids:
            data = json.loads(json.dumps({"v": VALUE}))  # as decoded from a message
            data["v"] = VALUE
            store.replicas[sid] = Replica(
                sid, data=store.interned(data), version=1, epoch=0,
                max_inactive_s=store.inactive(float("1800")), created=1.5e9, last_access=1.5e9,
                primary="s1", last_rid=None, undo={})
        return store

    assert _bytes_per_session(make) < 450


def test_a_replica_promoted_in_place_is_the_primary_it_would_have_been() -> None:
    store = LocalStore(max_inactive_s=1800.0)
    replica = Replica("sid-1", data={"n": "1", "gone": "2"}, version=7, epoch=3,
                      max_inactive_s=60.0, created=10.0, last_access=20.0, primary="s1",
                      last_rid="rid-7", undo={"n": "0", "gone": None})
    store.replicas["sid-1"] = replica
    record = store.promote(replica, epoch=2051)
    assert record is replica and type(record) is Primary  # no second object
    assert "sid-1" not in store.replicas and store.primaries["sid-1"] is record
    assert (record.version, record.epoch, record.data, record.max_inactive_s,
            record.created, record.last_access) == (7, 2051, {"n": "1", "gone": "2"}, 60.0,
                                                    10.0, 20.0)
    assert (record.secondary, record.sent_version, record.acked_version,
            record.superseded) == (None, -1, -1, False)
    assert not record.pending and not record.stale_holders and not record.site_pending
    assert record.state()["undo"] == {"n": "0", "gone": None}
    # the retried request's commit is undone, as on the old primary
    record.roll_back()
    assert record.data == {"n": "0"} and record.version == 8 and record.last_rid is None
    assert set(record.pending) == {"n", "gone"} and record.undo == {}


def test_what_was_taken_over_from_a_peer_costs_16_bytes_a_session() -> None:
    from backends.sessions.taken_over import TakenOver

    sids = [f"s{i:031d}" for i in range(20_000)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        taken = TakenOver()
        for i, sid in enumerate(sids):
            taken.add(sid, 1024 * 3 + 1 + (i % 2))
        per_session = (tracemalloc.get_traced_memory()[0] - before) / len(sids)
    finally:
        tracemalloc.stop()
    assert per_session < 20, per_session  # (a dict of sid -> epoch: ~40 and up)
    taken.update({sids[0]: 9 * 1024 + 1})  # taken again later: the later epoch counts
    told = taken.as_dict()
    assert len(told) == len(sids) and told[sids[0]] == 9 * 1024 + 1
    assert told[sids[1]] == 1024 * 3 + 2 and len(taken) == len(sids) + 1
