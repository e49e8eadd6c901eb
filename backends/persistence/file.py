"""Sessions as files in a directory shared by the servers (`persistence.path`).

One file per session at `<path>/<h[:2]>/<h>.json` with `h = sha256(sid)`: names never come
from client-supplied text. Writes go to a temp file in the same directory, are fsynced, then
`os.replace`d over the old file and the directory is fsynced, so a reader sees the old or the
new file, never a partial one. The file's mtime is the session's expiry time: a touch is an
`os.utime` (no rewrite) and the sweeper only needs `stat`.
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

_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 600.0   # a temp file this old was left by a crashed writer


class FileStore:
    """`session.persistence = "file"`."""

    kind = "file"

    def __init__(self, *, path: str, threads: int = 16) -> None:
        # configuration
        self.root = Path(path)
        self.where = str(self.root)
        self._threads = threads
        # resources: blocking file calls run here
        self._pool: ThreadPoolExecutor | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=self._threads,
                                        thread_name_prefix="tandem-file")
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
        # Files are written in parallel: fsyncs issued together are committed by the
        # filesystem's journal as one transaction, so a group costs about one fsync.
        loop = asyncio.get_running_loop()
        dirs = await asyncio.gather(*(loop.run_in_executor(self._executor(), self._write, r)
                                      for r in rows))
        await asyncio.gather(*(loop.run_in_executor(self._executor(), self._sync_dir, d)
                               for d in {d for d in dirs if d is not None}))

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

    def _write(self, row: StoredSession) -> Path | None:
        """Write one session file; the directory whose entry changed (None: skipped)."""
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            path = self._file(row.sid)
            with contextlib.suppress(StoreCorrupt):  # a corrupt file is replaced
                old = self._read(path, row.sid)
                if old is not None and old[0].age > row.age:
                    return None  # never go back to an older version
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
                                 f"{_TMP_SUFFIX}")
            text = json.dumps({"sid": row.sid, "v": row.version, "e": row.epoch,
                               "body": row.body, "last_access": row.last_access,
                               "max_inactive_s": row.max_inactive_s})
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, text.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            os.utime(tmp, (time.time(), row.expires_at))
            os.replace(tmp, path)
            return path.parent

    def _sync_dir(self, path: Path) -> None:
        """The rename itself must survive a crash."""
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

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

