"""The rule by which a framework's cookie settings are layered over the cluster file's.

For each attribute of the token cookie a framework has a setting for (`Path`, `SameSite`,
`Domain`, `HttpOnly`, `Partitioned`, `Max-Age` / `Expires`):

1. the app's own setting, if the app sets it (a value other than the framework's default);
2. else the cluster file's, if the file sets it (a value other than tandem's default: the
   file has `cookie_path` and `cookie_samesite`);
3. else the framework's default, so the cookie looks as it did without tandem.

An attribute the framework has no setting for is the cluster file's. The cluster file's
`cookie_secure = true` keeps `Secure` whatever the app says, and its `cookie_name` names the
cookie (the proxy routes by it). docs/frameworks.md states it with each framework's table.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from tandem.config import SessionSection

__all__ = ["cluster_sets", "layered"]

_DEFAULTS = {f.name: f.default for f in fields(SessionSection)}


def cluster_sets(settings: SessionSection | None, key: str) -> Any:
    """The cluster file's `key` when it is not tandem's default (None: it is, or there is no
    cluster file: the app runs outside tandem)."""
    if settings is None:
        return None
    value = getattr(settings, key)
    return None if value == _DEFAULTS[key] else value


def layered(app_value: Any, *, app_sets: bool, cluster_value: Any) -> Any:
    """One attribute by the rule: the app's if it sets it, else the cluster file's if that
    sets it, else the app's (its framework's default)."""
    return app_value if app_sets or cluster_value is None else cluster_value
