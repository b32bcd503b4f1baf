"""Resuming on another number of ranks (a requeue that lands on fewer or more GPUs), on DeepSpeed CPU ranks.

A run saves step 2 on world A; a copy of its run folder resumes on world B (ZeRO 1-3 through DeepSpeed's universal
checkpoint, ZeRO-0 natively) and runs steps 3-4. The global micro-batches (``datasets/loader.py``) and their masks
(``recipe.mask_generator``) do not depend on the world size, so steps 3-4 see the same samples and masks as the
uninterrupted run on world A, and their losses match it up to the order of fp32 sums: a repeated or skipped sample,
or a lost optimizer moment, would move them far more.
"""

import os
import re
import shutil

import numpy as np
import pytest

from polymae.pipeline.train.checkpoint import LATEST_FILE, UNIVERSAL_DIR, read_marker, scan_tags, step_tag
from polymae.pipeline.train.metrics_log import read_metrics

from train_helpers import run_pretrain

pytestmark = pytest.mark.integration

COMMON = ["data.img_size=32", "model.num_visible=4", "data.num_workers=1", "data.shuffle_buffer=4",
          "train.steps=4", "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=2",
          "optim.base_lr=0.01", "train.save_interval=2", "train.keep_last=2"]


def _losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


@pytest.mark.parametrize("stage,before,after", [(2, 2, 1), (2, 1, 2), (3, 2, 1), (0, 1, 2)])
def test_resume_on_another_world_size_continues_the_run(synthetic_shards, tmp_path, stage, before, after):
    ref = str(tmp_path / "ref")
    run_pretrain(before, [f"data.shards={synthetic_shards}", f"output={ref}", f"train.zero_stage={stage}", *COMMON])
    reference = _losses(ref)
    assert sorted(reference) == [1, 2, 3, 4]
    marker = read_marker(ref, step_tag(2))
    assert (marker["world_size"], marker["zero_stage"]) == (before, stage)
    assert marker["data"] == {"readers": before, "micro_batch": 2, "global_batch": 8}

    run = str(tmp_path / "moved")  # the run as it was after step 2's save
    shutil.copytree(ref, run)
    shutil.rmtree(os.path.join(run, "checkpoints", step_tag(4)))
    with open(os.path.join(run, "checkpoints", LATEST_FILE), "w") as fh:
        fh.write(step_tag(2))
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        rows = fh.readlines()
    with open(os.path.join(run, "metrics.jsonl"), "w") as fh:
        fh.writelines(rows[:2])

    r = run_pretrain(after, ["--log-level", "INFO", f"data.shards={synthetic_shards}", f"output={run}",
                             f"train.zero_stage={stage}", "resume=true", *COMMON])
    assert re.search(r"resumed from \S+ at step 2", r.stderr), r.stderr[-3000:]
    assert ("universal checkpoint" in r.stderr) == (stage > 0), r.stderr[-3000:]
    resumed = _losses(run)
    assert sorted(resumed) == [1, 2, 3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [reference[3], reference[4]], rtol=2e-4)
    assert resumed[3] != reference[2]  # the run moved on
    complete, _ = scan_tags(os.path.join(run, "checkpoints"))
    assert complete == [step_tag(2), step_tag(4)]
    assert read_marker(run, step_tag(4))["world_size"] == after
    assert read_marker(run, step_tag(4))["data"]["readers"] == before  # the order of the run it continues
    assert not os.path.exists(os.path.join(run, "checkpoints", UNIVERSAL_DIR))  # pruned after its own save
