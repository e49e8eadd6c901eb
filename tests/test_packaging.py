"""What `pip install .` installs: every package of the three tiers (a subpackage missing from
pyproject.toml works in an editable install and in the tests, and fails at import in a real
one)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_directory_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("tandem", "proxy", "backends") for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), "packages pip install . would leave out"
    assert listed - found == set(), "packages listed that do not exist"
