"""DeepSpeed training on 2 CPU ranks: ZeRO stages agree, and a SIGKILLed run resumes exactly."""

import json
import os
import signal
import subprocess

import pytest

from polymae.pipeline.train.metrics_log import read_metrics

from train_helpers import run_pretrain, torchrun_cmd, train_env, wait_for

pytestmark = pytest.mark.integration

STEPS = 10
# 32 px, 2x2 patches per modality, 4 of 12 tokens visible: tiny enough for 10 steps x 4 stages on 2 cores.
COMMON = ["data.img_size=32", "model.num_visible=4", "data.num_workers=1", "data.shuffle_buffer=4",
          f"train.steps={STEPS}", "train.global_batch=8", "train.micro_batch=2", "optim.warmup_steps=2",
          "optim.base_lr=0.01"]


def _losses(run: str) -> list[float]:
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


def test_zero_stages_match_zero0(synthetic_shards, tmp_path):
    losses = {}
    for stage in (0, 1, 2, 3):
        run = str(tmp_path / f"z{stage}")
        run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={run}", f"train.zero_stage={stage}",
                         "train.save_interval=100", *COMMON])
        losses[stage] = _losses(run)
    print(json.dumps(losses, indent=1))
    assert losses[0][-1] < losses[0][0]  # it trains
    for stage in (1, 2, 3):
        for a, b in zip(losses[0], losses[stage]):
            assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (stage, losses[0], losses[stage])


def test_sigkill_then_resume_matches_uninterrupted(synthetic_shards, tmp_path):
    ref = str(tmp_path / "ref")
    run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={ref}", "train.save_interval=3", *COMMON])
    ref_losses = _losses(ref)

    run = str(tmp_path / "killed")
    os.makedirs(run)
    proc = subprocess.Popen(torchrun_cmd(2, [f"data.shards={synthetic_shards}", f"output={run}",
                                             "train.save_interval=3", *COMMON]),
                            env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    # kill once step 4 is logged: the step-3 checkpoint exists and step 4+ work is lost
    ok = wait_for(lambda: any(r["step"] >= 4 for r in read_metrics(run)), timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ok, "training never reached step 4"
    done = max(r["step"] for r in read_metrics(run))
    assert done < STEPS, "the run finished before it was killed"
    with open(os.path.join(run, "checkpoints", "latest")) as fh:
        resumed_from = int(fh.read().strip().split("-")[1])
    assert 3 <= resumed_from < STEPS

    run_pretrain(2, [f"data.shards={synthetic_shards}", f"output={run}", "train.save_interval=3", "resume=true",
                     *COMMON])
    # metrics after the resume point come from the resumed process; every step must equal the reference
    assert _losses(run) == ref_losses


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_a_checkpoint_and_stops(synthetic_shards, tmp_path, sig):
    """Slurm preemption: train.preempt_signal → finish the step, save, exit 75 (requeue me); resume=true then
    finishes the run and exits 0 (checked once, for SIGTERM)."""
    import sys

    from polymae.pipeline.train.trainer import PREEMPTED_EXIT_CODE

    run = str(tmp_path / "preempted")
    args = [sys.executable, "-m", "polymae.jobs.pretrain", f"data.shards={synthetic_shards}", f"output={run}",
            "train.save_interval=1000", "data.num_workers=0", f"train.preempt_signal={sig}",
            *[a for a in COMMON if not a.startswith(("data.num_workers", "train.global_batch"))],
            "train.global_batch=2", "train.steps=200"]
    proc = subprocess.Popen(args, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ok = wait_for(lambda: any(r["step"] >= 2 for r in read_metrics(run)), timeout=300)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert ok and proc.returncode == PREEMPTED_EXIT_CODE, (proc.returncode, err[-3000:])
    last = max(r["step"] for r in read_metrics(run))
    assert last < 200
    with open(os.path.join(run, "checkpoints", "latest")) as fh:
        assert fh.read().strip() == f"step-{last:08d}"  # saved at the step it stopped, not at save_interval
    assert os.path.exists(os.path.join(run, "checkpoints", f"step-{last:08d}", "complete.json"))
    if sig != "SIGTERM":
        return
    r = subprocess.run([*args[:-1], f"train.steps={last + 2}", "resume=true"], env=train_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]  # finished: exit 0, not the preempted status
    assert max(r["step"] for r in read_metrics(run)) == last + 2
