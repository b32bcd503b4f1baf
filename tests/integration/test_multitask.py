"""The multitask job (``polymae multitask``) on tiny models: 3 tasks (depth, semseg on labelled shards; classification
on an ImageNet-style folder), a 4-block 32-wide encoder at 32 px, 6 steps.

* ZeRO-0 and ZeRO-2 on 2 CPU ranks give the same per-step losses as one process (relative 1e-5; weights 1e-4),
  and after every step the decoders of the tasks not drawn (parameters, MT-AdamW's partitions and moments) are bit-identical;
* a 2-rank ZeRO-2 run SIGKILLed in a save and resumed ends bit-identical to the uninterrupted one, step for step;
* the run folder holds per-task metrics and draw counts, and ``publish`` / ``evaluate`` accept it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from polymae.pipeline.train.checkpoint import consolidate, load_model, scan_tags
from polymae.pipeline.train.metrics_log import read_metrics

from multitask_helpers import multitask_args, write_class_folder, write_tiny_encoder
from train_helpers import free_port, run_job_killable, train_env

pytestmark = pytest.mark.integration

STEPS = 6
ZERO_SCRIPT = os.path.join(os.path.dirname(__file__), "multitask_zero.py")


def _torchrun(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", *args]


def _job(args: list[str], nproc: int, kill: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """The multitask job on ``nproc`` ranks (1: a plain process) in its own session; ``kill``: fault injection."""
    cmd = _torchrun(["-m", "polymae.jobs.multitask", *args], nproc) if nproc > 1 else \
        [sys.executable, "-m", "polymae.jobs.multitask", *args]
    return run_job_killable(cmd, kill, timeout)


@pytest.fixture(scope="module")
def mt_inputs(synthetic_shards, tmp_path_factory):
    """(shards, class folder, held-out class folder, tiny encoder release, run root)."""
    root = tmp_path_factory.mktemp("multitask")
    classes = write_class_folder(str(root / "classes"))
    held_out = write_class_folder(str(root / "classes_val"), names=("coffee", "camera", "chelsea"))
    encoder = write_tiny_encoder(str(root / "encoder"))
    return synthetic_shards, classes, held_out, encoder, root


@pytest.fixture(scope="module")
def single(mt_inputs):
    """The one-process ZeRO-0 reference run (checkpoints every 2 steps)."""
    shards, classes, _, encoder, root = mt_inputs
    run = str(root / "single")
    _job([*multitask_args(shards, classes, encoder, run, STEPS), "train.zero_stage=0", "train.save_interval=2"], 1)
    return run


def _without_key_bias(sd: dict) -> dict:
    """``sd`` with the key part of every ``qkv.bias`` left out: softmax attention does not depend on a bias added to
    all keys, so its exact gradient is 0 and its computed one is rounding noise (~1e-10), which Adam's
    ``m / sqrt(v)`` turns into updates of size lr whose sign depends on the summation order of the ranks."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            v = torch.cat([v[:d], v[2 * d:]])
        out[k] = v
    return out


def _rel(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    a, b = _without_key_bias(a), _without_key_bias(b)
    return max(float((a[k].detach().double() - b[k].detach().double()).abs().max() / b[k].detach().double().abs().max().clamp_min(1e-12))
               for k in a)


@pytest.mark.parametrize("stages", ["0,2", "1,3"])
def test_zero_stages_on_2_ranks_equal_one_process_and_leave_other_heads_untouched(mt_inputs, single, stages):
    shards, classes, _, encoder, root = mt_inputs
    args = multitask_args(shards, classes, encoder, str(root / "OUT"), STEPS)
    r = subprocess.run(_torchrun([ZERO_SCRIPT, json.dumps(args), stages]), capture_output=True, text=True,
                       env=train_env(), timeout=600, cwd=str(root))
    assert r.returncode == 0, r.stderr[-5000:]
    rows = {row["stage"]: row for row in map(json.loads, [ln for ln in r.stdout.splitlines() if ln.startswith("{")])}
    assert sorted(rows) == [int(s) for s in stages.split(",")], r.stdout[-2000:]
    assert all(set(row["drawn"]) == {"depth", "semseg", "cls"} for row in rows.values())
    ref, _ = consolidate(single)
    ref_losses = [r["loss"] for r in read_metrics(single)]
    for stage, row in rows.items():
        assert row["untouched"], row
        assert all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(row["losses"], ref_losses)), (stage, row, ref_losses)
        sd, _ = consolidate(str(root / f"z{stage}"))
        # weights after 6 Adam steps: Adam's m / sqrt(v) magnifies the rounding differences of near-zero gradients
        # (the attention biases start at 0), so the weights agree to 1e-4 relative where the losses agree to 1e-5
        assert _rel(sd, ref) < 1e-4, stage
    first = load_model(encoder)[0].state_dict()
    moved = [k for k in ref if k.startswith("encoder.encoder.") and not torch.equal(ref[k], first[k.removeprefix("encoder.")])]
    assert moved, "the encoder did not train"


def test_sigkill_in_a_save_then_resume_matches_uninterrupted(mt_inputs, tmp_path):
    shards, classes, _, encoder, root = mt_inputs
    common = ["train.zero_stage=2", "train.save_interval=2"]
    ref = str(tmp_path / "ref")
    _job([*multitask_args(shards, classes, encoder, ref, STEPS), *common], 2)
    run = str(tmp_path / "killed")
    args = [*multitask_args(shards, classes, encoder, run, STEPS), *common]
    _job(args, 2, kill="before_marker:4")
    complete, incomplete = scan_tags(os.path.join(run, "checkpoints"))
    assert complete == ["step-00000002"] and incomplete == ["step-00000004"]
    r = _job([*args, "resume=true"], 2)
    assert "at step 2" in r.stderr
    want, got = read_metrics(ref), read_metrics(run)
    assert [row["step"] for row in got] == list(range(1, STEPS + 1))
    assert [(w["task"], w["loss"], w["drawn"]) for w in want] == [(g["task"], g["loss"], g["drawn"]) for g in got]
    a, _ = consolidate(ref)
    b, _ = consolidate(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_metrics_publish_and_evaluate(mt_inputs, single, tmp_path):
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate
    from polymae.pipeline.publish import PublishConfig, publish, verify_release

    shards, _, held_out, _, _ = mt_inputs
    rows = read_metrics(single)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert set(r["losses"]) == {r["task"]} and r["loss"] > 0 and r["grad_norm"] > 0
    assert rows[-1]["drawn"] == {"depth": 3, "semseg": 2, "cls": 1}
    assert os.listdir(os.path.join(single, "tb"))
    mc = json.load(open(os.path.join(single, "model_config.json")))
    assert {t: h["kind"] for t, h in mc["heads"].items()} == {"depth": "dpt_depth", "semseg": "convnext_seg",
                                                             "cls": "linear_cls"}
    assert mc["multitask"]["tasks"]["cls"]["classes"] == ["animal", "object", "person", "texture"]

    dest = str(tmp_path / "release")
    publish(load_config(PublishConfig, overrides=[f"checkpoint={single}", f"dest={dest}"]))
    assert verify_release(dest) == []
    run_model, _ = load_model(single)
    rel_model, rel_mc = load_model(dest)
    a, b = run_model.state_dict(), rel_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "heads" in rel_mc and rel_mc["timm"]["embed_dim"] == 32

    res = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={dest}", f"shards={shards}", "split=val",
                                                          f"class_folder={held_out}", f"output={tmp_path / 'eval'}"]))
    tasks = res["tasks"]
    assert 0 <= tasks["depth"]["delta1"] <= 1 and tasks["depth"]["samples"] == 3
    assert 0 <= tasks["semseg"]["miou"] <= 1 and tasks["cls"]["samples"] == 3
    assert json.load(open(tmp_path / "eval" / "results.json"))["tasks"].keys() == {"depth", "semseg", "cls"}
