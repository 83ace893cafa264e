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
