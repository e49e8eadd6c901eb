"""TOML values into the cluster file's frozen dataclasses: unknown keys, types, ranges and
choices, each error naming the key, the value (never a secret's) and the file."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, get_type_hints

from .address import Address
from .errors import ConfigError

__all__ = ["build", "shown", "coerce"]


def build(cls: type, table: dict[str, Any], *, prefix: str, source: str) -> Any:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            raise ConfigError("unknown key", key=dotted, value=shown(dotted, value), file=source)
        values[key] = coerce(hints[key], value, fields[key].metadata, dotted, source)
    missing = [n for n, f in fields.items() if n not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("required key missing", key=f"{prefix}.{missing[0]}", value=None,
                          file=source)
    return cls(**values)


def shown(key: str, value: Any) -> Any:
    """What an error may print of a value: never anything under a secret-looking key."""
    if any(word in key.lower() for word in ("secret", "password")):
        return "***"
    if isinstance(value, dict):  # a misplaced table may hold secrets too
        return {k: shown(k, v) for k, v in value.items()}
    return value


def coerce(hint: Any, value: Any, meta: Mapping[str, Any], key: str, source: str) -> Any:
    def bad(msg: str) -> ConfigError:
        return ConfigError(msg, key=key, value=shown(key, value), file=source)

    if hint in (Address, Address | None):
        if value in ("", "off", "none") and hint is not Address and not meta.get("no_off"):
            return None
        if not isinstance(value, str):
            raise bad("expected a \"host:port\" string")
        try:
            return Address.parse(value, allow_port_0=bool(meta.get("port_0")))
        except ValueError as exc:
            raise bad(str(exc)) from None
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("expected true or false")
        return value
    if hint in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"expected a number ({hint.__name__})")
        if hint is int and not isinstance(value, int):
            raise bad("expected a whole number")
        if not math.isfinite(value):
            raise bad("must be a finite number")
        lo = meta.get("min")
        if lo is not None and (value < lo or (meta.get("exclusive") and value == lo)):
            raise bad(f"must be {'>' if meta.get('exclusive') else '>='} {lo}")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad("expected a string")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise bad(f"must be one of {', '.join(choices)}")
        return value
    if hint == tuple[str, ...]:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("expected a list of strings")
        return tuple(value)
    if hint == tuple[tuple[str, str], ...]:  # a list of { cert = "...", key = "..." } tables
        if not isinstance(value, list):
            raise bad('expected a list of { cert = "...", key = "..." } tables')
        pairs = []
        for i, item in enumerate(value):
            if (not isinstance(item, dict) or set(item) != {"cert", "key"}
                    or not all(isinstance(v, str) and v for v in item.values())):
                raise ConfigError('expected a table { cert = "...", key = "..." }',
                                  key=f"{key}[{i}]", value=shown(key, item), file=source)
            pairs.append((item["cert"], item["key"]))
        return tuple(pairs)
    raise AssertionError(f"unsupported config type {hint!r} for {key}")  # pragma: no cover
