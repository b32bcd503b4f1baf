"""Exact resume with two data-loader workers per rank: the resumed run's losses equal the uninterrupted run's."""

import json
import os
import shutil

import pytest

from polymae.pipeline.train.metrics_log import read_metrics

from train_helpers import run_pretrain

pytestmark = pytest.mark.integration

STEPS = 10
# 2 ranks x 2 workers = 4 readers over the 8 synthetic samples (2 each, one micro-batch of 2 per epoch);
# global batch 4 = one micro-batch per rank per step, so a step-7 resume skips an odd number of batches
ARGS = ["data.img_size=32", "model.num_visible=4", "data.num_workers=2", "data.shuffle_buffer=4",
        f"train.steps={STEPS}", "train.global_batch=4", "train.micro_batch=2", "optim.warmup_steps=2",
        "optim.base_lr=0.01", "train.save_interval=7", "train.keep_last=2"]


def _losses(run: str) -> list[float]:
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def test_resume_with_two_loader_workers_matches_uninterrupted(synthetic_shards, tmp_path):
    """The run resumed from its step-7 checkpoint (7 micro-batches consumed per rank: an odd count, so the
    resumed DataLoader's workers take each other's readers) logs the uninterrupted run's losses for steps 8-10."""
    ref = str(tmp_path / "ref")
    run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={ref}", *ARGS])
    ref_losses = _losses(ref)
    run = str(tmp_path / "resumed")
    shutil.copytree(ref, run)
    shutil.rmtree(os.path.join(run, "checkpoints", f"step-{STEPS:08d}"))  # the newest complete tag is now step 7
    with open(os.path.join(run, "checkpoints", "latest"), "w") as fh:
        fh.write("step-00000007")
    path = os.path.join(run, "metrics.jsonl")
    with open(path) as fh:
        kept = [line for line in fh if line.strip() and json.loads(line)["step"] <= 7]
    with open(path, "w") as fh:
        fh.writelines(kept)
    run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={run}", "resume=true", *ARGS])
    with open(path) as fh:
        logged = [json.loads(line)["step"] for line in fh if line.strip()]
    assert logged == list(range(1, STEPS + 1))  # the resumed process logged steps 8-10 only: it did resume
    assert _losses(run) == ref_losses
