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
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from .base import StoredSession, map_errors
from .errors import StoreCorrupt

__all__ = ["FileStore"]

_TMP_SUFFIX = ".tmp"
_STALE_TMP_S = 600.0   # a temp file this old was left by a crashed writer


class FileStore:
    """`session.persistence = "file"`."""

    kind = "file"

    def __init__(self, *, path: str) -> None:
        self.root = Path(path)
        self.where = str(self.root)

    # --- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
            probe.write_bytes(b"")  # writable by this server?
            probe.unlink()

    async def close(self) -> None:
        return None

    # --- operations ---------------------------------------------------------------------

    async def load(self, sid: str, *, now: float) -> StoredSession | None:
        return await asyncio.to_thread(self._load, sid, now)

    async def save(self, rows: Sequence[StoredSession]) -> None:
        await asyncio.to_thread(self._save, rows)

    async def touch(self, items: Mapping[str, tuple[float, float]]) -> None:
        await asyncio.to_thread(self._touch, dict(items))

    async def delete(self, sids: Collection[str]) -> None:
        await asyncio.to_thread(self._delete, list(sids))

    async def sweep(self, *, now: float) -> int:
        return await asyncio.to_thread(self._sweep, now)

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
        with map_errors(self.kind, self.where, unavailable=(OSError,)):
            dirs: set[Path] = set()
            for row in rows:
                path = self._file(row.sid)
                with contextlib.suppress(StoreCorrupt):  # a corrupt file is replaced
                    old = self._read(path, row.sid)
                    if old is not None and old[0].age > row.age:
                        continue  # never go back to an older version
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}"
                                     f"{_TMP_SUFFIX}")
                text = json.dumps({"sid": row.sid, "v": row.version, "e": row.epoch,
                                   "body": row.body,
                                   "last_access": row.last_access,
                                   "max_inactive_s": row.max_inactive_s})
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.write(fd, text.encode())
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.utime(tmp, (time.time(), row.expires_at))
                os.replace(tmp, path)
                dirs.add(path.parent)
            for d in dirs:  # the rename itself must survive a crash
                _fsync_dir(d)

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
