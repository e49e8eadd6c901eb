"""Reading /proc for the benchmarks: every process's stat fields, and process trees."""

from __future__ import annotations

import os

__all__ = ["proc_stats", "descendants"]


def proc_stats() -> dict[int, list[str]]:
    """pid -> the fields of /proc/PID/stat after the command name (field 3 onwards: the
    state is [0], the ppid [1], utime [11], stime [12], cutime [13], cstime [14])."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stats[int(entry)] = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return stats


def descendants(stats: dict[int, list[str]], root: int) -> list[int]:
    """`root` and every process below it, as `stats` (from proc_stats) saw them."""
    children: dict[int, list[int]] = {}
    for pid, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(pid)
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out
