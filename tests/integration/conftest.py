"""Fixtures for training tests (helpers in train_helpers.py)."""

import pytest

from train_helpers import write_synthetic_shards


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> str:
    """Root of small deterministic labelled shards: train (8 photos, 3 shards) and val (3 photos)."""
    root = str(tmp_path_factory.mktemp("synthetic_shards"))
    write_synthetic_shards(root, "train")
    write_synthetic_shards(root, "val", names=["coffee", "camera", "astronaut"])
    return root
