"""Fail when code, tests, benches or examples import a distribution pyproject.toml does not
declare (in its dependencies or any extra). Run inside the environment the project was
installed into: module names are mapped to distributions by what is installed there."""

from __future__ import annotations

import ast
import importlib.metadata as md
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIRS = ("proxy", "backends", "tandem", "tests", "bench", "examples")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(meta.get("dependencies", []))
    for extra in meta.get("optional-dependencies", {}).values():
        specs += extra
    return {normalize(re.split(r"[<>=!~\[; ]", s, maxsplit=1)[0]) for s in specs}


def local_names() -> set[str]:
    names = {p.name for p in ROOT.iterdir() if p.is_dir()} | {p.stem for p in ROOT.glob("*.py")}
    for d in DIRS:
        base = ROOT / d
        if base.is_dir():
            names |= {p.stem for p in base.rglob("*.py")}
            names |= {p.name for p in base.rglob("*") if p.is_dir()}
    return names


def main() -> int:
    have = declared()
    local = local_names()
    dists = md.packages_distributions()
    missing: dict[str, str] = {}
    for d in DIRS:
        for f in (ROOT / d).rglob("*.py") if (ROOT / d).is_dir() else ():
            tree = ast.parse(f.read_text(), filename=str(f))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    top = mod.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top.startswith("_"):
                        continue
                    owners = {normalize(x) for x in dists.get(top, [top])}
                    if not owners & have:
                        missing.setdefault(mod, str(f.relative_to(ROOT)))
    for mod, where in sorted(missing.items()):
        print(f"undeclared import: {mod} (in {where}): add its distribution to pyproject.toml")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
