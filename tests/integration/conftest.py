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


@pytest.fixture(scope="session")
def slurm_cluster(request):
    """A single-node Slurm cluster (munged, slurmctld, slurmd; slurm_helpers.py) for the session, its state in a
    fresh temp folder; each service's start time is printed. Skipped when the Slurm binaries are missing
    (``scripts/test.sh`` installs them)."""
    import shutil

    from slurm_helpers import SlurmCluster, make_cluster_root, missing_binaries, report_line

    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found; scripts/test.sh installs it)")
    cluster = SlurmCluster(make_cluster_root())
    try:
        times = cluster.start()
        report_line(request.config, "slurm cluster started: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
