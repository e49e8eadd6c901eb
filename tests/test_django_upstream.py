"""Django's own session tests against tandem's engine (`SESSION_ENGINE = "backends.django"`).

Django's sdist of the installed version carries them (`tests/sessions_tests`); they are
fetched at test time (tests/sdists.py) and run, unchanged, by tests/django_upstream.py in a
process of its own, against a real three-server cluster. Here: every applicable test
passes, each that cannot apply says why, and the engine's writes went through the cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.django_upstream import DIFFERENCES, NOT_APPLICABLE, SUITES
from tests.sdists import sdist

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    upstream = sdist("Django") / "tests"
    if not (upstream / "sessions_tests").is_dir():
        pytest.skip(f"no tests/sessions_tests in the Django sdist at {upstream.parent}")
    work = tmp_path_factory.mktemp("django-upstream")
    out = work / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.django_upstream", str(upstream), str(out), str(work)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        raise AssertionError(f"the harness failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def _summary(tests: dict[str, dict[str, str]]) -> str:
    counts: dict[str, int] = {}
    for outcome in tests.values():
        counts[outcome["outcome"]] = counts.get(outcome["outcome"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


@pytest.mark.parametrize("suite", list(SUITES))
def test_every_applicable_upstream_test_passes(results: dict[str, Any], suite: str) -> None:
    tests: dict[str, dict[str, str]] = results[suite]["tests"]
    assert tests, f"{suite}: no test ran"
    skipped = {name: t["detail"] for name, t in tests.items() if t["outcome"] == "skip"}
    # only what this harness declares not applicable is skipped, each with its reason
    assert skipped == NOT_APPLICABLE.get(suite, {})
    known = DIFFERENCES.get(suite, {})
    failed = {name: t["detail"] for name, t in tests.items()
              if t["outcome"] in ("fail", "error")}
    unexpected = {name: detail for name, detail in failed.items() if name not in known}
    assert not unexpected, f"{suite} ({_summary(tests)}):\n\n" + "\n\n".join(
        f"--- {name}\n{detail}" for name, detail in unexpected.items())
    # a documented difference that starts passing: the documentation must change too
    assert set(failed) == set(known), f"now passing: {sorted(set(known) - set(failed))}"


def test_the_engine_wrote_through_the_cluster(results: dict[str, Any]) -> None:
    stats = results["s1_stats"]
    # sessions made, replicated to their secondaries (real processes), and ended
    assert stats["created"] > 20 and stats["replicated"] > 20 and stats["invalidated"] > 20
    assert stats["replication_failures"] == 0


def test_nothing_of_a_request_outlives_it(results: dict[str, Any]) -> None:
    assert results["request_views_left"] == 0
