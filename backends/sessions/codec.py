"""The cluster codec for session values: JSON, one serialized string per key.

Values are kept serialized in the store, so a replica stores what it receives without
decoding it, and in-place mutation is detected by comparing serialized forms.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["dumps", "loads"]

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                            check_circular=True)


def dumps(key: str, value: Any) -> str:
    """Serialize one session value; TypeError names the key and the offending type."""
    if not isinstance(key, str):
        raise TypeError(f"session keys must be str, not {type(key).__name__}")
    try:
        return _encoder.encode(value)
    except TypeError as exc:
        # json's message names the innermost offending type: keep it, add the key.
        raise TypeError(
            f"session[{key!r}]: value of type {type(value).__name__} cannot be replicated "
            f"({exc}); use JSON types: dict, list, str, int, float, bool, None"
        ) from None
    except ValueError as exc:  # NaN/Infinity, circular references
        raise TypeError(f"session[{key!r}]: value cannot be replicated ({exc})") from None


loads = json.loads
