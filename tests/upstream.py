"""Running a framework's own test file against tandem: where the file comes from, and a real
tandem backend in a thread of the test process for the apps those tests build.

The test files come from the installed version's source distribution, fetched from the
package index at test time (tests/sdists.py); an environment variable
(`TANDEM_UPSTREAM_FLASK`, `TANDEM_UPSTREAM_STARLETTE`: a checkout's root or the test file
itself) names another copy instead. Nothing of them is copied here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from backends.server import BackendServer
from tandem.config import loads
from tests.cluster import free_ports
from tests.sdists import sdist

__all__ = ["upstream_file", "load_module", "ThreadedBackend"]


def upstream_file(variable: str, relative: str, distribution: str) -> Path:
    """The upstream test file `relative` (to the source tree's root): from the checkout
    `$variable` names, else from `distribution`'s sdist; a module-level skip if neither."""
    where = os.environ.get(variable)
    if not where:
        try:
            where = str(sdist(distribution))
        except pytest.skip.Exception as skipped:
            pytest.skip(str(skipped), allow_module_level=True)
    path = Path(where)
    if path.is_dir():
        path = path / relative
    if not path.is_file():
        pytest.skip(f"${variable}: no {relative} at {where}", allow_module_level=True)
    return path


def load_module(path: Path, name: str) -> ModuleType:
    """Import the file at `path` as module `name` (registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class ThreadedBackend:
    """One real tandem backend (no peers) serving `app`, its event loop in a thread of its
    own, so that synchronous test clients can talk to it over loopback."""

    def __init__(self, app: Any, *, session: dict[str, Any] | None = None) -> None:
        http, repl = free_ports(2)
        lines = ["[cluster]", 'name = "upstream"', 'secrets = ["test-secret"]', "[session]",
                 'replication = "none"']
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else repr(v)}"
                  for k, v in (session or {}).items()]
        lines += ["[[servers]]", 'id = "s1"', f'http = "127.0.0.1:{http}"',
                  f'replication = "127.0.0.1:{repl}"']
        self.config = loads("\n".join(lines))
        self.app = app
        self.port = http
        self.url = f"http://127.0.0.1:{http}"
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="tandem-backend", daemon=True)

    def start(self) -> ThreadedBackend:
        self._thread.start()
        self._ready.wait(30)
        if self._failed is not None:
            raise self._failed
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(), or lost with the test's end
            self._failed = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with BackendServer(config=self.config, server_id="s1", app=self.app):
            self._ready.set()
            await self._stop.wait()
