"""structlog set-up shared by every tier: JSON when stderr is not a terminal, console otherwise.

Secrets and whole tokens never reach a log: events carry `sid=short(sid)` (a prefix).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

__all__ = ["configure", "short", "get_logger"]

get_logger = structlog.get_logger


def short(sid: str | None) -> str | None:
    """The loggable prefix of a session id (never the whole id or token)."""
    return None if sid is None else sid[:8]


def configure(*, component: str, server: str | None = None, json: bool | None = None,
              level: str | None = None) -> None:
    """Configure structlog once per process."""
    if json is None:
        json = not sys.stderr.isatty()
    lvl = getattr(logging, (level or os.environ.get("TANDEM_LOG_LEVEL", "INFO")).upper(),
                  logging.INFO)
    processors: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    processors.append(structlog.processors.JSONRenderer() if json
                      else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        # (one write per line: processes sharing a stderr — the proxy's workers, `tandem
        # up`'s children — never interleave within a line; print() writes the newline apart)
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(component=component,
                                           **({"server": server} if server else {}))
