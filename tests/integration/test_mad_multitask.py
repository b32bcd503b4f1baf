"""The Masked AutoDecoder tasks (det, seg, kpt, cap) in the multitask job (issue 14, must-show 2): a tiny run on a
COCO-format dataset written by hand over three scikit-image photographs (``coco_helpers.py``), one shared
1-layer 32-wide decoder on a 4-block 32-wide encoder at 32 px, 32 steps of unmixed sampling with MT-AdamW.

* every task's loss falls (mean of its first two draws > mean of its last two);
* ``evaluate`` decodes det / seg / kpt in one parallel pass each and captions iteratively, writes COCO results
  JSON and reports box / mask / keypoint AP (numbers in [0, 1]) and BLEU-4 / CIDEr;
* resumed from its step-16 checkpoint, the run repeats steps 17-32 exactly (same tasks, losses and weights): the
  sequence tasks' streams and maskings continue where they were."""

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
