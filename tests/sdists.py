"""The frameworks' own test suites, fetched at test time (never copied into this repository).

`sdist("Django")` downloads the source distribution of the *installed* version of a
distribution from the package index once, unpacks it under a cache directory
(`$TANDEM_SDIST_CACHE`, default `~/.cache/tandem-sdists`) and returns the unpacked tree.
A test that needs one and cannot get it (no index reachable) is skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

__all__ = ["sdist"]


def _cache() -> Path:
    root = os.environ.get("TANDEM_SDIST_CACHE") or str(Path.home() / ".cache" / "tandem-sdists")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sdist(distribution: str) -> Path:
    """The unpacked source tree of the installed `distribution`'s sdist."""
    ver = version(distribution)
    target = _cache() / f"{distribution.lower()}-{ver}"
    if (target / ".complete").exists():
        return _root(target)
    with tempfile.TemporaryDirectory() as tmp:
        # pip, so the index settings of the machine apply (mirrors, certificates)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "-q", "-d", tmp, f"{distribution}=={ver}"],
            capture_output=True, text=True, timeout=600)
        archives = [p for p in Path(tmp).iterdir() if p.name.endswith((".tar.gz", ".tgz"))]
        if proc.returncode != 0 or not archives:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
            pytest.skip(f"cannot fetch the {distribution} {ver} sdist: {last}")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archives[0]) as tar:
            tar.extractall(target, filter="data")
    (target / ".complete").touch()
    return _root(target)


def _root(target: Path) -> Path:
    dirs = [p for p in target.iterdir() if p.is_dir()]
    return dirs[0] if len(dirs) == 1 else target
