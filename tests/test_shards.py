"""The store's sharded maps (backends/sessions/shards.py) and the sliced walks over them
(backends/sessions/slices.py)."""

from __future__ import annotations

import asyncio
import gc

from hypothesis import given, settings
from hypothesis import strategies as st

from backends.sessions.shards import SHARDS, Shards
from backends.sessions.slices import CHUNK, chunks
from backends.sessions.taken_over import TakenOver

_keys = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
_ops = st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "pop_default", "get"]),
                          _keys, st.integers()), max_size=200)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_shards_behave_as_a_dict(ops: list[tuple[str, str, int]]) -> None:
    d: dict[str, int] = {}
    s: Shards[int] = Shards()
    for op, key, value in ops:
        if op == "set":
            d[key] = value
            s[key] = value
        elif op == "del":
            if key in d:
                del d[key]
                del s[key]
            else:
                try:
                    del s[key]
                except KeyError:
                    pass
                else:
                    raise AssertionError("deleted a missing key")
        elif op == "pop":
            expected = d.pop(key, None)
            try:
                got = s.pop(key)
            except KeyError:
                got = None
            assert got == expected
        elif op == "pop_default":
            assert s.pop(key, -1) == d.pop(key, -1)
        else:
            assert s.get(key) == d.get(key) and (key in s) == (key in d)
        assert len(s) == len(d) and bool(s) == bool(d)
    assert sorted(s) == sorted(d) and dict(s.items()) == d
    assert sorted(s.values()) == sorted(d.values()) and len(s.values()) == len(d)
    assert sorted(s.walk()) == sorted(d) and sorted(s.walk_values()) == sorted(d.values())
    s.clear()
    assert len(s) == 0 and not s and list(s) == []


def test_entries_spread_over_every_shard_and_none_grows_alone() -> None:
    s: Shards[int] = Shards({f"sid-{i}": i for i in range(64_000)})
    sizes = [len(shard) for shard in s.shards]
    assert len(sizes) == SHARDS and min(sizes) > 700 and max(sizes) < 1300, sizes


async def test_a_walk_in_slices_lets_the_loop_run_and_survives_changes() -> None:
    """A walk of 300,000 entries yields the loop between slices (a ticker runs meanwhile);
    entries removed and added while it runs do not break it."""
    s: Shards[int] = Shards({f"sid-{i}": i for i in range(300_000)})
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            for i in range(50):  # the loop's other work: changes to the map
                s.pop(f"sid-{ticks * 50 + i}", None)
                s[f"new-{ticks}-{i}"] = -1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    seen = 0
    try:
        async for chunk in chunks(s.walk_values(), slice_s=0.002):
            assert 0 < len(chunk) <= CHUNK
            seen += len(chunk)
            sum(range(2000))  # (work per chunk)
    finally:
        task.cancel()
    assert ticks > 10, ticks           # the loop ran other work during the walk
    assert seen >= 300_000 - ticks * 50  # nothing still there was skipped


def test_what_was_taken_over_goes_in_parts_the_later_epoch_last() -> None:
    taken = TakenOver()
    for i in range(12_000):
        taken.add(f"s{i}", 100 + i)
    taken.add("s5", 9_999)  # taken again, later
    parts = list(taken.parts(5_000))
    assert [len(p) for p in parts] == [5_000, 5_000, 2_001]
    merged: dict[str, int] = {}
    for part in parts:  # applied in order, as the peer does
        merged.update(part)
    assert merged == taken.as_dict() and merged["s5"] == 9_999 and len(merged) == 12_000


def test_an_empty_shard_stays_tracked_so_it_is_old_before_it_fills() -> None:
    """A plain dict with nothing tracked in it is untracked by a full collection, and its
    next insert tracks it as young: each young run of the collector would then walk every
    record a promotion puts in it. The shards are tracked from the start, and stay so."""
    s: Shards[object] = Shards()
    gc.collect()
    assert all(gc.is_tracked(shard) for shard in s.shards)
    plain: dict[str, object] = {}
    gc.collect()
    assert not gc.is_tracked(plain)  # (what a plain dict would do)


async def test_for_each_works_every_item_once_a_few_at_a_time() -> None:
    """A drain's hand-overs and re-protection's one-by-one fallback: `at_once` workers over
    one iterator, never a task per item."""
    from backends.tasks import for_each

    done: list[int] = []
    running = peak = 0

    async def work(item: int) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        done.append(item)
        running -= 1

    before = len(asyncio.all_tasks())
    await for_each(range(1000), work, at_once=8)
    assert sorted(done) == list(range(1000)) and peak == 8
    assert len(asyncio.all_tasks()) == before
