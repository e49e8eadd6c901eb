"""A session assignment serializes ints and strs without the JSON encoder (a per-request
saving): the stored form must be exactly what the cluster codec gives, and what the codec
refuses must still be refused, as TypeError, with nothing kept."""

from __future__ import annotations

import sys

import pytest

from backends.sessions import codec
from backends.sessions.session import Session
from backends.sessions.store import LocalStore

VALUES = [0, 1, -1, 7, 2**63, -(10**40), "", "x", 'quote " and \\ backslash', "é ü 中文 😀",
          "\x00\x01\x1f\x7f control", "\n\r\t", "\u2028\u2029", "\ud800 lone surrogate",
          "</script>"]


@pytest.mark.parametrize("value", VALUES)
def test_assigned_int_or_str_is_stored_as_the_codec_serializes_it(value: object) -> None:
    store = LocalStore(max_inactive_s=60)
    s = Session(None, create=store.create)
    s["k"] = value
    assert s.collect_changes().set == {"k": codec.dumps("k", value)}
    assert s["k"] == value


def test_an_int_past_pythons_digit_limit_is_refused_as_the_codec_refuses_it() -> None:
    limit = sys.get_int_max_str_digits()
    if limit == 0:
        pytest.skip("no digit limit in this interpreter")
    huge = 10 ** (limit + 1)
    with pytest.raises(TypeError, match="'n'"):
        codec.dumps("n", huge)
    store = LocalStore(max_inactive_s=60)
    s = Session(None, create=store.create)
    s["n"] = 1
    with pytest.raises(TypeError, match="'n'"):
        s["n"] = huge
    assert s["n"] == 1 and s.collect_changes().set == {"n": "1"}


def test_an_int_or_str_subclass_still_goes_through_the_codec() -> None:
    class Flag(int):
        def __repr__(self) -> str:
            return "Flag!"

    store = LocalStore(max_inactive_s=60)
    s = Session(None, create=store.create)
    s["f"] = Flag(3)
    s["b"] = True
    assert s.collect_changes().set == {"f": codec.dumps("f", Flag(3)), "b": "true"}
