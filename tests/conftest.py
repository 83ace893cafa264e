"""Fixtures shared by the tests; helper functions are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_dataset


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_dataset(root, [6, 5], eval_sizes=(3,))
    return root


@pytest.fixture(autouse=True, scope="session")
def caches_of_the_session(tmp_path_factory: pytest.TempPathFactory):
    """Runs (in this process and the ones it starts) keep token ids (data/token_cache.py) and
    Accelerate's answers (accelerate_facts.py) in folders of this test session, not in the
    user's cache."""
    import os

    from raft_dist import accelerate_facts
    from raft_dist.data import token_cache

    names = (token_cache.ROOT_VARIABLE, accelerate_facts.ROOT_VARIABLE)
    before = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
