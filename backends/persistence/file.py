"""Sessions as files in a directory shared by the servers (`persistence.path`).

One file per session at `<path>/<h[:2]>/<h>.json` with `h = sha256(sid)`: names never come
from client-supplied text. Writes go to a temp file in the same directory, are fsynced, then
`os.replace`d over the old file and the directory is fsynced, so a reader sees the old or the
new file, never a partial one. In `batched` mode nothing is fsynced: a written file
survives a process crash, a power loss may take the last flushes. The file's mtime is the
session's expiry time: a touch is an `os.utime` (no rewrite) and the sweeper only needs
`stat`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import StoredSession, map_errors
from .errors import StoreCorrupt, StoreUnavailable

__all__ = ["FileStore"]

T = TypeVar("T")

_BATCH = 256            # files written per thread call (and open descriptors at most)
_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 600.0   # a temp file this old was left by a crashed writer


class FileStore:
    """`session.persistence = "file"`."""

    kind = "file"

    def __init__(self, *, path: str, durable: bool = True) -> None:
        # configuration
        self.root = Path(path)
        self.where = str(self.root)
        self._durable = durable   # fsync every write (sync mode)
        # resources: one thread makes the blocking calls (in order, no GIL contention)
        self._pool: ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tandem-file")
        try:
            await self._run(self._open)
        except BaseException:
            await self.close()
            raise

    def _open(self) -> None:
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
            probe.write_bytes(b"")  # writable by this server?
            probe.unlink()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, pool.shutdown)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            raise StoreUnavailable("not open", store=self.kind, where=self.where)
        return self._pool

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor(), fn, *args)

    # --- operations ---------------------------------------------------------------------

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        return await self._run(self._load, sid, now)

    async def save(self, rows: Sequence[StoredSession]) -> None:
        for i in range(0, len(rows), _BATCH):
            await self._run(self._save, rows[i:i + _BATCH])

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        await self._run(self._touch, dict(items))

    async def delete(self, sids: Collection[str]) -> None:
        await self._run(self._delete, list(sids))

    async def sweep(self, *, now: float) -> int:
        return await self._run(self._sweep, now)

    # --- in the worker thread -----------------------------------------------------------

    def _file(self, sid: str) -> Path:
        h = hashlib.sha256(sid.encode()).hexdigest()
        return self.root / h[:2] / f"{h}.json"

    def _read(self, path: Path, sid: str) -> tuple[StoredSession, float] | None:
        try:
            with open(path, "rb") as f:
                expires_at = os.fstat(f.fileno()).st_mtime
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(raw)
            row = StoredSession(d["sid"], int(d["v"]), d["body"], float(d["last_access"]),
                                float(d["max_inactive_s"]), int(d.get("e", 0)))
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreCorrupt(f"{path.name}: {exc}", store=self.kind, where=self.where) from exc
        if row.sid != sid:  # a sha256 collision, or a file copied by hand
            return None
        return row, expires_at

    def _load(self, sid: str, now: float) -> StoredSession | None:
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            found = self._read(self._file(sid), sid)
        if found is None:
            return None
        row, expires_at = found
        if expires_at < now:
            return None
        # touches moved the mtime only: last access is the expiry minus the timeout
        return row._replace(last_access=max(row.last_access, expires_at - row.max_inactive_s))

    def _save(self, rows: Sequence[StoredSession]) -> None:
        """Write a batch in phases: every temp file, then the fsyncs, then the renames, then
        the directories' fsyncs. The first fsync of a phase commits the filesystem journal
        for the whole batch, so the others find little left to do."""
        staged: list[tuple[int, Path, Path, float]] = []   # fd, temp file, target, expiry
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            try:
                for row in rows:
                    item = self._stage(row)
                    if item is not None:
                        staged.append(item)
                if self._durable:
                    for fd, *_ in staged:
                        os.fsync(fd)
                dirs: set[Path] = set()
                for fd, tmp, path, expires_at in staged:
                    os.close(fd)
                    os.utime(tmp, (time.time(), expires_at))
                    os.replace(tmp, path)
                    dirs.add(path.parent)
                staged = []
                if self._durable:  # the renames themselves must survive a crash
                    for d in dirs:
                        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
            finally:
                for fd, tmp, _, _ in staged:  # failed half-way: no temp file left behind
                    with contextlib.suppress(OSError):
                        os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)

    def _stage(self, row: StoredSession) -> tuple[int, Path, Path, float] | None:
        """Write a session's new file under a temp name (None: the stored copy is newer)."""
        path = self._file(row.sid)
        with contextlib.suppress(StoreCorrupt):  # a corrupt file is replaced
            old = self._read(path, row.sid)
            if old is not None and old[0].age > row.age:
                return None  # never go back to an older version
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}")
        text = json.dumps({"sid": row.sid, "v": row.version, "e": row.epoch, "body": row.body,
                           "last_access": row.last_access,
                           "max_inactive_s": row.max_inactive_s})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, text.encode())
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        return fd, tmp, path, row.expires_at

    def _touch(self, items: dict[str, tuple[float, float]]) -> None:
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            for sid, (last_access, max_inactive_s) in items.items():
                path = self._file(sid)
                expires_at = last_access + max_inactive_s
                try:
                    if os.stat(path).st_mtime < expires_at:
                        os.utime(path, (time.time(), expires_at))
                except FileNotFoundError:
                    continue

    def _delete(self, sids: list[str]) -> None:
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            for sid in sids:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._file(sid))

    def _sweep(self, now: float) -> int:
        removed = 0
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            for sub in os.scandir(self.root):
                if not sub.is_dir(follow_symlinks=False) or len(sub.name) != 2:
                    continue
                for entry in os.scandir(sub.path):
                    try:
                        mtime = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:
                        continue
                    stale_tmp = (entry.name.endswith(_TMP_SUFFIX)
                                 and time.time() - mtime > _STALE_TMP_S)
                    if (entry.name.endswith(".json") and mtime < now) or stale_tmp:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.path)
                            removed += not stale_tmp
        return removed

