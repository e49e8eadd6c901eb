"""The session object: change tracking, serialization errors, lifecycle (no network)."""

from __future__ import annotations

import math

import pytest

from backends.errors import SessionInvalidated
from backends.sessions.session import Session
from backends.sessions.store import LocalStore, Primary


def make(store: LocalStore, record: Primary | None = None) -> Session:
    return Session(record, create=store.create)


@pytest.fixture
def store() -> LocalStore:
    return LocalStore(max_inactive_s=60)


def committed(store: LocalStore, **values: object) -> Primary:
    s = make(store)
    for k, v in values.items():
        s[k] = v
    ch = s.collect_changes()
    assert s.record is not None
    s.record.apply(ch.set, ch.deleted)
    return s.record


def test_no_session_is_created_by_reading(store):
    s = make(store)
    assert s.get("x") is None and "x" not in s and len(s) == 0
    assert s.record is None and not store.primaries
    assert not s.collect_changes()


@pytest.mark.parametrize("value", [object(), {1, 2}, b"bytes", [1, object()],
                                   {"nested": {"deep": object()}}, math.nan, math.inf])
def test_unserializable_value_raises_at_assignment_naming_the_key(store, value):
    record = committed(store, counter=1)
    s = make(store, record)
    with pytest.raises(TypeError, match="'cart'"):
        s["cart"] = value
    assert "cart" not in s and dict(s) == {"counter": 1}
    assert not s.collect_changes()


def test_non_string_key_is_refused(store):
    s = make(store)
    with pytest.raises(TypeError):
        s[1] = "x"  # type: ignore[index]


def test_in_place_mutation_is_detected(store):
    record = committed(store, cart=["a"], user={"name": "x"})
    s = make(store, record)
    s["cart"].append("b")
    s["user"]  # read, not changed
    ch = s.collect_changes()
    assert ch.set == {"cart": '["a","b"]'} and not ch.deleted


def test_a_value_only_read_never_overwrites_a_concurrent_commit(store):
    record = committed(store, a=1, b=1)
    reader = make(store, record)
    assert reader["b"] == 1                  # request 1 reads b ...
    writer = make(store, record)
    writer["b"] = 2                          # ... request 2 commits b=2 meanwhile ...
    ch = writer.collect_changes()
    record.apply(ch.set, ch.deleted)
    reader["a"] = 5                          # ... request 1 commits only what it changed
    ch = reader.collect_changes()
    assert ch.set == {"a": "5"}
    record.apply(ch.set, ch.deleted)
    assert record.data == {"a": "5", "b": "2"}


def test_in_place_mutation_into_unserializable_keeps_the_last_good_value(store):
    record = committed(store, cart=[])
    s = make(store, record)
    s["cart"].append(object())
    ch = s.collect_changes()
    assert "cart" not in ch.set and ch.errors and "'cart'" in ch.errors[0]


def test_delete_and_reassign(store):
    record = committed(store, a=1, b=2)
    s = make(store, record)
    del s["a"]
    with pytest.raises(KeyError):
        del s["zzz"]
    s["b"] = 3
    assert sorted(s) == ["b"]
    ch = s.collect_changes()
    assert ch.set == {"b": "3"} and ch.deleted == {"a"}


def test_invalidated_session_refuses_use(store):
    s = make(store, committed(store, a=1))
    s.invalidate()
    assert s.invalidated
    with pytest.raises(SessionInvalidated):
        s["a"]
    with pytest.raises(SessionInvalidated):
        s["a"] = 2


def test_max_inactive_is_validated_and_tracked(store):
    s = make(store, committed(store, a=1))
    for bad in (0, -1, True, "10"):
        with pytest.raises(ValueError):
            s.max_inactive_s = bad  # type: ignore[assignment]
    s.max_inactive_s = 5
    assert s.max_inactive_s == 5.0 and s.collect_changes().max_inactive_s == 5.0


def test_repr_never_shows_the_whole_id(store):
    s = make(store, committed(store, a=1))
    assert s.id not in repr(s)
