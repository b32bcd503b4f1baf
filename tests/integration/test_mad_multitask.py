"""The Masked AutoDecoder tasks (det, seg, kpt, cap) in the multitask job (issue 14, must-show 2): a tiny run on a
COCO-format dataset written by hand over three scikit-image photographs (``coco_helpers.py``), one shared
1-layer 32-wide decoder on a 4-block 32-wide encoder at 32 px, 32 steps of unmixed sampling with MT-AdamW.

* every task's loss falls (mean of its first two draws > mean of its last two);
* ``evaluate`` decodes det / seg / kpt in one parallel pass each and captions iteratively, writes COCO results
  JSON and reports box / mask / keypoint AP (numbers in [0, 1]) and BLEU-4 / CIDEr;
* resumed from its step-16 checkpoint, the run repeats steps 17-32 exactly (same tasks, losses and weights): the
  sequence tasks' streams and maskings continue where they were;
* the ``coco`` protocol of evaluate, with no results file, predicts with the run's sequence tasks and scores them as
  the multitask evaluation does;
* det + captions on 2 gloo ranks with ZeRO-2 give the per-step losses (and weights) of one process."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from polymae.pipeline.train.checkpoint import consolidate
from polymae.pipeline.train.metrics_log import read_metrics

from coco_helpers import sequence_task_args, write_coco_photos
from multitask_helpers import write_tiny_encoder
from train_helpers import train_env

pytestmark = pytest.mark.integration

STEPS = 32


def _job(args: list[str]) -> subprocess.CompletedProcess:
    env = {**train_env(), "POLYMAE_LOG_LEVEL": "INFO", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, "-m", "polymae.jobs.multitask", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    return r


@pytest.fixture(scope="module")
def mad_run(tmp_path_factory):
    """(coco files, encoder, run folder, args) of the reference run (checkpoints at steps 16 and 32)."""
    root = tmp_path_factory.mktemp("mad")
    coco = write_coco_photos(str(root / "coco"))
    encoder = write_tiny_encoder(str(root / "encoder"))
    run = str(root / "run")
    args = [*sequence_task_args(coco, run, encoder, STEPS), "train.save_interval=16"]
    _job(args)
    return coco, encoder, run, args


def test_each_sequence_task_loss_falls_and_evaluate_computes_ap(mad_run, tmp_path):
    from polymae.pipeline.config import load_config
    from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate

    coco, _, run, _ = mad_run
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    per_task: dict[str, list[float]] = {}
    for r in rows:
        per_task.setdefault(r["task"], []).append(r["losses"][r["task"]])
    assert set(per_task) == {"det", "seg", "kpt", "cap"} and all(len(v) >= 4 for v in per_task.values()), per_task
    for task, losses in per_task.items():
        assert sum(losses[-2:]) < sum(losses[:2]), (task, losses)
        print(task, "losses by draw:", [round(v, 3) for v in losses])
    mc = json.load(open(os.path.join(run, "model_config.json")))
    assert {h["kind"] for h in mc["heads"].values()} == {"mad"}
    assert [c["name"] for c in mc["multitask"]["tasks"]["det"]["categories"]] == ["person", "cup", "cat"]
    sd, _ = consolidate(run)
    assert any(k.startswith("sequence_decoder.layers.0.") for k in sd) and not any(k.startswith("heads.") for k in sd)

    out = str(tmp_path / "eval")
    res = evaluate(load_config(EvaluateConfig, overrides=[f"checkpoint={run}", f"shards={coco['images']}",
                                                          f"output={out}"]))["tasks"]
    for task in ("det", "seg", "kpt"):
        assert 0.0 <= res[task]["AP"] <= 1.0 and res[task]["samples"] == 3, res[task]
    assert res["det"]["predictions"] == 300  # 100 ranked slots per image
    assert 0.0 <= res["seg"]["gt_box_AP"] <= 1.0 and res["seg"]["prompt"] == "predicted boxes"
    assert 0.0 <= res["cap"]["bleu4"] <= 1.0 and res["cap"]["cider"] >= 0.0 and res["cap"]["samples"] == 3
    det = json.load(open(os.path.join(out, "det.results.json")))
    assert {d["image_id"] for d in det} == {1, 2, 3} and all(len(d["bbox"]) == 4 and 0 <= d["score"] <= 1 for d in det)
    caps = json.load(open(os.path.join(out, "cap.results.json")))
    assert sorted(c["image_id"] for c in caps) == [1, 2, 3]
    assert json.load(open(os.path.join(out, "results.json")))["tasks"].keys() == {"det", "seg", "kpt", "cap"}
    print({t: {k: m[k] for k in ("AP", "gt_box_AP", "bleu4", "cider") if k in m} for t, m in res.items()})


def test_resume_from_a_checkpoint_repeats_the_run(mad_run, tmp_path):
    _, _, run, args = mad_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(run, resumed)
    ckpt = os.path.join(resumed, "checkpoints")
    shutil.rmtree(os.path.join(ckpt, f"step-{STEPS:08d}"))
    with open(os.path.join(ckpt, "latest"), "w") as fh:
        fh.write(f"step-{STEPS // 2:08d}")
    with open(os.path.join(resumed, "metrics.jsonl")) as fh:
        head = [ln for ln in fh if json.loads(ln)["step"] <= STEPS // 2]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as fh:
        fh.writelines(head)
    r = _job([*[a for a in args if not a.startswith("output=")], f"output={resumed}", "resume=true"])
    assert f"at step {STEPS // 2}" in r.stderr
    want, got = read_metrics(run), read_metrics(resumed)
    assert [(w["task"], w["loss"], w["drawn"]) for w in want] == [(g["task"], g["loss"], g["drawn"]) for g in got]
    a, _ = consolidate(run)
    b, _ = consolidate(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_coco_protocol_predicts_with_the_checkpoint_and_scores_like_evaluate(mad_run, tmp_path):
    """``run_coco`` with no results file: the run's det and seg tasks predict on the instances annotations (kpt and
    cap do not fit them: skipped, named), and the files it writes hold exactly the predictions of the multitask
    evaluation (``sequence.py``) on the same annotations, with the same AP; scoring the written det file again gives
    the same number. (This 32-step model's AP is 0: the known-value cases are in ``test_eval_coco.py``.)"""
    from polymae.pipeline.evaluate.coco import CocoConfig, run_coco
    from polymae.pipeline.evaluate.results import EvalContext
    from polymae.pipeline.evaluate.sequence import evaluate_sequence_task
    from polymae.pipeline.train.checkpoint import load_model

    coco, _, run, _ = mad_run
    out, ref_out = str(tmp_path / "coco"), str(tmp_path / "ref")
    cfg = CocoConfig(annotations=coco["instances"], images=coco["images"])
    cfg.validate()
    res = run_coco(cfg, EvalContext(checkpoint=run, output=out, batch_size=3))
    m = res["metrics"]
    assert {"bbox_AP", "bbox_AP50", "segm_AP"} <= set(m) and not any(k.startswith("keypoints") for k in m)
    assert set(res["tasks"]) == {"det", "seg", "kpt", "cap"}
    assert "keypoints" in res["tasks"]["kpt"]["skipped"] and "captions" in res["tasks"]["cap"]["skipped"]
    assert res["predictions"]["bbox"] == 300 and res["dataset"]["samples"] == {"val": 3}
    model, mc = load_model(run)
    tasks = mc["multitask"]["tasks"]
    ref = {t: evaluate_sequence_task(model, t, tasks[t], 32, batch_size=3, output=ref_out) for t in ("det", "seg")}
    for t in ("det", "seg"):
        got = json.load(open(os.path.join(out, f"{t}.results.json")))
        want = json.load(open(os.path.join(ref_out, f"{t}.results.json")))
        assert got == want and len(got) == ref[t]["predictions"] > 0, t
    assert m["bbox_AP"] == ref["det"]["AP"] and m["segm_AP"] == ref["seg"]["AP"]
    assert res["tasks"]["seg"]["gt_box_AP"] == ref["seg"]["gt_box_AP"]
    again = run_coco(CocoConfig(annotations=coco["instances"], results=[os.path.join(out, "det.results.json")]),
                     EvalContext(checkpoint=run, output=str(tmp_path / "again")))
    assert again["metrics"]["bbox_AP"] == m["bbox_AP"] and "segm_AP" not in again["metrics"]


def _torchrun(args: list[str]) -> list[str]:
    from train_helpers import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
            f"--master_port={free_port()}", *args]


def test_det_and_captions_on_2_ranks_zero2_equal_one_process(mad_run, tmp_path):
    """det + cap on 2 gloo ranks with ZeRO-2 (micro-batch 1, global batch 2: one image per rank per step) against one
    process accumulating the same 2 micro-batches (ZeRO-0): the global micro-batch g holds the same image and the
    same masking (seeded by g) on whichever rank reads it, and the Hungarian matching is per image, so each step's
    loss (the mean of the 2 micro-batches either way) is equal. Step 1 starts from the same weights: equal to float
    rounding of the mean; later steps follow updates whose gradient sums differ in order (all-reduce vs
    accumulation): relative 1e-5. Weights after 4 steps: relative 1e-4."""
    coco, encoder, _, _ = mad_run
    common = [f"encoder={encoder}", "img_size=32", "train.steps=4", "train.num_workers=0", "train.seed=1",
              "train.log_interval=1", "optim.lr=0.005", "optim.warmup_steps=1", "optim.weight_decay=0.0"]
    for task, f in (("det", "instances"), ("cap", "captions")):
        common += [f"tasks.{task}.kind={task}", f"tasks.{task}.annotations={coco[f]}",
                   f"tasks.{task}.images={coco['images']}", f"tasks.{task}.micro_batch=1",
                   f"tasks.{task}.global_batch=2", f"tasks.{task}.head_width=32", f"tasks.{task}.decoder_depth=1",
                   f"tasks.{task}.decoder_heads=2"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    _job([*common, f"output={one}", "train.zero_stage=0"])
    env = {**train_env(), "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(_torchrun(["-m", "polymae.jobs.multitask", *common, f"output={two}", "train.zero_stage=2"]),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [x["task"] for x in a] == [x["task"] for x in b] and {x["task"] for x in a} == {"det", "cap"}
    for x, y in zip(a, b):
        assert all(torch.isfinite(torch.tensor(v)) for v in y["losses"].values()), y
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5), (x, y)
    assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-6)
    sa, _ = consolidate(one)
    sb, _ = consolidate(two)
    assert sa.keys() == sb.keys()
    assert _rel_without_key_bias(sb, sa) < 1e-4


def _rel_without_key_bias(a: dict, b: dict) -> float:
    """Largest relative difference (to ``b``'s largest value) over the tensors, leaving out the key part of every
    attention bias (encoder ``qkv.bias``, decoder ``in_proj_bias``): softmax attention does not depend on a bias
    added to all keys, so its exact gradient is 0 and its computed one rounding noise, which Adam's m / sqrt(v)
    turns into lr-sized steps whose sign depends on the summation order (as in ``test_multitask.py``)."""
    worst = 0.0
    for k in b:
        x, y = a[k].detach().double(), b[k].detach().double()
        if k.endswith(("attn.qkv.bias", "in_proj_bias")):
            d = x.shape[0] // 3
            x, y = torch.cat([x[:d], x[2 * d:]]), torch.cat([y[:d], y[2 * d:]])
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-12)))
    return worst
