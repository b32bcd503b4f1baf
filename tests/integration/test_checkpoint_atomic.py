"""Atomic checkpoints on 2 DeepSpeed CPU ranks: a run SIGKILLed at each moment of a save (the test-only hook
``POLYMAE_TEST_KILL_AT``) resumes from the newest complete tag and matches the uninterrupted run step for step.

One run folder goes through the three kills in turn (each resumed run is killed at the next moment), so the
cases cost one start-up each: with a save every step,

1. killed at step 2's save before any file of ``step-2``       -> complete {1}, latest 1
2. resumed from 1, killed at step 3's save after every rank's files, before the marker
                                                                -> complete {1, 2}, incomplete {3}, latest 2
3. resumed from 2 (skipping the incomplete 3, whose folder the re-save replaces), killed at step 4's save after
   the marker, before ``latest`` is replaced                    -> complete {2, 3, 4}, latest 3
4. resumed from 4 (not from ``latest``), runs to the end        -> complete {4, 5}, latest 5
"""

import json
import os
import re
import subprocess
import sys

import pytest

from polymae.pipeline.train.checkpoint import LATEST_FILE, MARKER_FILE, scan_tags, step_tag
from polymae.pipeline.train.metrics_log import read_metrics

from train_helpers import free_port, run_job_killable, torchrun_cmd, train_env

pytestmark = pytest.mark.integration

STEPS = 5
# the tiny settings of test_pretrain_zero.py, a checkpoint every step
COMMON = ["data.img_size=32", "model.num_visible=4", "data.num_workers=1", "data.shuffle_buffer=4",
          f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=2",
          "optim.base_lr=0.01", "train.save_interval=1"]


def _run(args: list[str], kill: str | None = None) -> subprocess.CompletedProcess:
    """A 2-rank torchrun of the pretrain job (INFO logs on stderr); ``kill`` = the fault-injection value."""
    return run_job_killable(torchrun_cmd(2, args), kill)


def _state(run: str) -> tuple[list[int], list[int], str]:
    complete, incomplete = scan_tags(os.path.join(run, "checkpoints"))
    with open(os.path.join(run, "checkpoints", LATEST_FILE)) as fh:
        latest = fh.read().strip()
    return [int(t[5:]) for t in complete], [int(t[5:]) for t in incomplete], latest


def _losses(run: str) -> list[float]:
    return [r["loss"] for r in read_metrics(run)]


def _resumed_from(err: str) -> int:
    found = re.findall(r"resumed from \S*/(step-\d+)/\S* at step (\d+)\n", err)
    assert len(found) == 2 and len(set(found)) == 1, err[-3000:]  # both ranks, the same tag
    assert found[0][0] == step_tag(int(found[0][1]))
    return int(found[0][1])


@pytest.fixture(scope="module")
def reference(synthetic_shards, tmp_path_factory) -> list[float]:
    """Losses of the uninterrupted run (``STEPS`` values); its checkpoints are complete and marked."""
    run = str(tmp_path_factory.mktemp("atomic") / "ref")
    _run([f"data.shards={synthetic_shards}", f"output={run}", *COMMON])
    assert _state(run) == ([4, 5], [], step_tag(5))
    marker = json.load(open(os.path.join(run, "checkpoints", step_tag(5), MARKER_FILE)))
    assert (marker["tag"], marker["step"], marker["world_size"], marker["zero_stage"]) == (step_tag(5), 5, 2, 2)
    losses = _losses(run)
    assert len(losses) == STEPS
    return losses


def test_kill_at_each_moment_of_a_save_then_resume_matches(reference, synthetic_shards, tmp_path):
    run = str(tmp_path / "killed")
    args = [f"data.shards={synthetic_shards}", f"output={run}", *COMMON]

    _run(args, kill="before_save:2")
    assert _state(run) == ([1], [], step_tag(1))
    assert _losses(run) == reference[:2]

    r = _run([*args, "resume=true"], kill="before_marker:3")
    assert _resumed_from(r.stderr) == 1
    assert _state(run) == ([1, 2], [3], step_tag(2))
    assert _losses(run) == reference[:3]

    r = _run([*args, "resume=true"], kill="before_latest:4")
    assert _resumed_from(r.stderr) == 2
    assert re.search(rf"skipping incomplete checkpoint\(s\) \['{step_tag(3)}'\]", r.stderr), r.stderr[-3000:]
    assert _state(run) == ([2, 3, 4], [], step_tag(3))
    assert _losses(run) == reference[:4]

    r = _run([*args, "resume=true"])
    assert _resumed_from(r.stderr) == 4
    assert _state(run) == ([4, 5], [], step_tag(5))
    assert [row["step"] for row in read_metrics(run)] == list(range(1, STEPS + 1))
    assert _losses(run) == reference


# Trainer._agree_resumed_step on 2 gloo ranks, without a model: equal steps pass, unequal ones raise on every rank.
AGREE_SNIPPET = """
import json, os, sys, torch.distributed as dist
from polymae.pipeline.train.trainer import Trainer
dist.init_process_group("gloo")
t = Trainer.__new__(Trainer)
t._flag_group, t.world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
out = {"same": t._agree_resumed_step(4)}
try:
    t._agree_resumed_step(4 + 2 * rank)
except RuntimeError as e:
    out["error"] = str(e)
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # not stdout: two ranks' lines can interleave there
    json.dump(out, f)
dist.barrier()
# leave without C++ teardown: tearing a gloo group down at interpreter exit aborts now and then under load
# ("terminate called without an active exception", exit -6), after the results are written
os._exit(0)
"""


def test_ranks_resumed_from_different_steps_raise_on_every_rank(tmp_path):
    script = tmp_path / "agree.py"
    script.write_text(AGREE_SNIPPET)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(script), str(tmp_path)], capture_output=True, text=True, env=train_env(),
                       timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    outs = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for out in outs:
        assert out["same"] == 4
        assert "step 4 on rank(s) 0; step 6 on rank(s) 1" in out["error"], out
