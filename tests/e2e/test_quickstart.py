"""End to end: `polymae quickstart` on the scikit-image photographs, then every artefact is checked."""

import json
import os
import subprocess
import sys
import tarfile

import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("qs")
    exe = os.path.join(os.path.dirname(sys.executable), "polymae")
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    r = subprocess.run([exe, "quickstart", f"work={work}", "steps=30"], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return work, r.stdout


def test_shards_hold_every_source_image(quickstart):
    work, _ = quickstart
    from polymae.datasets import shards

    for split in ("train", "val"):
        sources = sorted(os.listdir(work / "images" / split))
        assert len(sources) >= 3
        urls = shards.trusted_shard_urls(str(work / "shards"), split)
        per_shard = 4
        assert len(urls) == -(-len(sources) // per_shard)
        keys = []
        for url in urls:
            with tarfile.open(url) as tf:  # plain tar, readable without webdataset
                names = tf.getnames()
            assert all(n.split(".", 1)[1] in ("rgb.jpg", "depth.png", "semseg.png", "json") for n in names)
            keys += [raw["__key__"] for raw in shards.iter_raw_samples([url])]
        assert sorted(keys) == sorted(os.path.splitext(s)[0] for s in sources)
        man = json.loads((work / "shards" / split / "manifest.json").read_text())
        assert sum(s["samples"] for s in man["shards"]) == len(sources)


def test_loss_falls(quickstart):
    work, _ = quickstart
    from polymae.pipeline.train.metrics_log import read_metrics

    rows = read_metrics(str(work / "runs" / "multimae-quickstart"))
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 30
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert set(rows[-1]["losses"]) == {"rgb", "depth", "semseg"}


def test_checkpoint_and_release_load_the_same_weights(quickstart):
    work, _ = quickstart
    import torch

    from polymae.pipeline.train.checkpoint import load_model

    run_model, _ = load_model(str(work / "runs" / "multimae-quickstart"))
    rel_model, mc = load_model(str(work / "store" / "multimae-quickstart"))
    a, b = run_model.state_dict(), rel_model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert mc["init_kwargs"]["in_modalities"] == ["rgb", "depth", "semseg"]


def test_release_manifest_matches_files(quickstart):
    work, _ = quickstart
    import hashlib

    from polymae.pipeline.publish import verify_release

    dest = work / "store" / "multimae-quickstart"
    man = json.loads((dest / "manifest.json").read_text())
    names = {f["path"] for f in man["files"]}
    assert {"model.safetensors", "encoder.safetensors", "model_config.json", "config.yaml", "metrics.json"} <= names
    for f in man["files"]:
        data = (dest / f["path"]).read_bytes()
        assert len(data) == f["size"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    assert verify_release(str(dest)) == []
    (dest / "metrics.json").write_text("{}")  # tampering is detected
    assert verify_release(str(dest)) == ["metrics.json: sha256/size mismatch"]


def test_encoder_loads_into_timm(quickstart):
    work, _ = quickstart
    import timm
    import torch

    dest = work / "store" / "multimae-quickstart"
    mc = json.loads((dest / "model_config.json").read_text())
    kwargs = dict(mc["timm"])
    name = kwargs.pop("model_name")
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(dest / "encoder.safetensors")),
                              **kwargs)
    x = torch.randn(1, 3, mc["pretrain"]["img_size"], mc["pretrain"]["img_size"])
    assert model.forward_features(x).shape[-1] == 192


def test_evaluation_results(quickstart):
    work, out = quickstart
    res = json.loads((work / "runs" / "multimae-quickstart" / "eval-val" / "results.json").read_text())
    assert res["samples"] == len(os.listdir(work / "images" / "val"))
    assert 0.0 <= res["rgb_to_depth"]["delta1"] <= 1.0
    assert 0.0 <= res["rgb_to_semseg"]["miou"] <= 1.0
    for line in ("label", "pretrain", "evaluate", "publish", "total"):
        assert line in out


def test_multitask_stage_losses_fall_and_heads_evaluate(quickstart):
    work, out = quickstart
    from polymae.pipeline.train.metrics_log import read_metrics

    rows = read_metrics(str(work / "runs" / "multitask-quickstart"))
    per_task: dict = {}
    for r in rows:
        for task, v in r["losses"].items():
            per_task.setdefault(task, []).append(v)
    assert set(per_task) == {"depth", "semseg", "cls"}
    for task, losses in per_task.items():  # each task's last two losses below its first
        assert len(losses) >= 3 and sum(losses[-2:]) / 2 < losses[0], (task, losses)
    res = json.loads((work / "runs" / "multitask-quickstart" / "eval-val" / "results.json").read_text())
    assert set(res["tasks"]) == {"depth", "semseg", "cls"}
    assert 0.0 <= res["tasks"]["depth"]["delta1"] <= 1.0 and 0.0 <= res["tasks"]["cls"]["top1"] <= 1.0
    assert "multitask" in out


def test_downstream_protocols_fill_the_results_table_and_compare(quickstart):
    """Both quickstart checkpoints went through the linear probe (lfw), depth (Middlebury motorcycle) and semseg
    (horse) protocols: rows in the results table for each, pictures beside the results, and --compare of the two."""
    from polymae.jobs.evaluate import main as evaluate_main
    from polymae.pipeline.evaluate.results import read_table

    work, out = quickstart
    runs = [str(work / "runs" / "multimae-quickstart"), str(work / "runs" / "multitask-quickstart")]
    rows = read_table(str(work / "results"))
    got = {(r["checkpoint"], r["protocol"]) for r in rows}
    for run in runs:
        assert {(run, p) for p in ("linear_probe", "depth", "semseg")} <= got
        probe = json.loads(open(os.path.join(run, "eval-linear_probe", "results.json")).read())
        assert probe["dataset"]["samples"] == {"train": 160, "val": 40} and 0.0 <= probe["metrics"]["top1"] <= 1.0
        assert len(probe["checkpoint_sha256"]) == 64 and len(probe["dataset"]["fingerprint"]) == 64
        depth = json.loads(open(os.path.join(run, "eval-depth", "results.json")).read())
        assert depth["dataset"]["samples"]["val"] == depth["scored_images"]["rgb"] == 3
        assert 0.0 <= depth["metrics"]["delta1@rgb"] <= 1.0 and depth["metrics"]["rmse@rgb"] > 0
        for proto in ("depth", "semseg"):
            pics = json.loads(open(os.path.join(run, f"eval-{proto}", "results.json")).read())["pictures"]
            assert pics and all(os.path.getsize(os.path.join(run, f"eval-{proto}", p)) > 0 for p in pics)
    pre = json.loads((work / "runs" / "multimae-quickstart" / "eval-val" / "results.json").read_text())
    assert any(p.startswith("pictures/reconstruction_") for p in pre["pictures"])  # MultiMAE-style pictures
    md = (work / "results" / "results.md").read_text()
    assert "| linear_probe | top1 |" in md and "| depth | delta1@rgb |" in md
    assert "downstream" in out
    assert evaluate_main(["--compare", *runs, f"results_table={work / 'results'}"]) == 0
