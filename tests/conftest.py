from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[type[Cluster]]:
    """Factory for real-process clusters; everything it started is killed at teardown."""
    made: list[Cluster] = []

    def factory(**kwargs: object) -> Cluster:
        where = tmp_path / f"c{len(made)}"
        where.mkdir()
        cluster = Cluster(where, **kwargs)  # type: ignore[arg-type]
        made.append(cluster)
        return cluster

    yield factory  # type: ignore[misc]
    for cluster in made:
        cluster.close()
