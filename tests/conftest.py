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
def token_cache_of_the_session(tmp_path_factory: pytest.TempPathFactory):
    """Runs (in this process and the ones it starts) keep token ids in a folder of this test
    session, not in the user's cache (data/token_cache.py)."""
    import os

    from raft_dist.data.token_cache import ROOT_VARIABLE

    before = os.environ.get(ROOT_VARIABLE)
    os.environ[ROOT_VARIABLE] = str(tmp_path_factory.mktemp("token-cache"))
    yield
    if before is None:
        os.environ.pop(ROOT_VARIABLE, None)
    else:
        os.environ[ROOT_VARIABLE] = before
