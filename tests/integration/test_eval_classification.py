"""The classification protocols of ``polymae evaluate`` (``pipeline/evaluate/classification.py``) on real images and a
tiny random-weight MultiMAE release (4 blocks, 32 wide, 32 px; ``multitask_helpers.write_tiny_encoder``):

* linear probe on scikit-image's ``lfw_subset`` (faces vs non-faces, 80/20 split per class): top-1 well above chance
  (0.5) on random features, no top-5 with two classes, and the encoder bit-identical afterwards (frozen);
* linear probe on scikit-learn's ``load_digits`` (10 classes): top-5 >= top-1, both well above chance;
* the augmented probe, with a corrupt val image counted as a skip; seeded subsets (``ctx.max_samples``);
* fine-tuning (with MAE's RandAugment + random erasing, the defaults) changes every encoder block, with drop path
  on the blocks and the batch / lr / augmentation settings used;
* a val class absent from train, and an odd micro-batch under mixup, are ConfigErrors naming the key."""

import os
import shutil

import pytest
import torch

from polymae.pipeline.config import ConfigError
from polymae.pipeline.evaluate.classification import (FinetuneConfig, LinearProbeConfig, build_classifier,
                                                      run_finetune, run_linear_probe)
from polymae.pipeline.evaluate.results import EvalContext, fingerprint_files

from polymae.datasets.samples import write_class_split, write_lfw_faces

from multitask_helpers import write_tiny_encoder

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread_module")]

IMG = 32


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    return write_tiny_encoder(str(tmp_path_factory.mktemp("tiny_encoder")), seed=0)


@pytest.fixture(scope="module")
def lfw(tmp_path_factory) -> str:
    """lfw_subset: 100 faces then 100 non-faces (25x25 gray) -> 160 train / 40 val images at 32 px."""
    return write_lfw_faces(str(tmp_path_factory.mktemp("lfw")), size=IMG)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> str:
    """load_digits: 1797 8x8 images of 10 classes (values 0-16) -> 80/20 per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return write_class_split(str(tmp_path_factory.mktemp("digits")), d.images / 16.0, d.target,
                             [str(k) for k in range(10)], size=IMG)


def _ctx(checkpoint: str, tmp_path, batch_size: int = 64) -> EvalContext:
    return EvalContext(checkpoint=checkpoint, output=str(tmp_path / "out"), device="cpu", seed=0,
                       batch_size=batch_size)


def _files(root: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_linear_probe_on_faces_leaves_the_encoder_frozen(encoder, lfw, tmp_path):
    from safetensors.torch import load_file

    model = build_classifier(encoder, num_classes=2, pool="cls", style="probe")
    saved = load_file(os.path.join(encoder, "model.safetensors"))
    before = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    assert all(torch.equal(v, saved[k]) for k, v in before.items())  # the checkpoint's weights were loaded
    head_before = model.head.classifier[1].weight.clone()
    # 30 epochs of 5 steps: MAE's LARS moves a matrix by lr * 0.001 * |w| per step, hence the large blr here
    cfg = LinearProbeConfig(data=lfw, img_size=IMG, epochs=30, warmup_epochs=3, batch_size=32, blr=100.0)
    res = run_linear_probe(cfg, _ctx(encoder, tmp_path), model=model)

    m = res["metrics"]
    assert set(m) == {"top1", "top1_best"}  # two classes: no top-5
    assert m["top1"] >= 0.75 and m["top1_best"] >= m["top1"]  # chance 0.5; random encoders get 0.875-0.975
    assert res["dataset"] == {"path": lfw, "fingerprint": fingerprint_files(lfw, _files(lfw)),
                              "samples": {"train": 160, "val": 40}}
    assert res["classes"] == ["faces", "nonfaces"] and res["skipped"] == {"train": 0, "val": 0}
    assert res["settings"] == {"batch_size": 32, "steps_per_epoch": 5, "lr": 12.5, "pool": "cls", "augment": False}
    hist = res["history"]
    assert [r["epoch"] for r in hist] == list(range(1, 31)) and hist[-1]["loss"] < hist[0]["loss"]
    assert hist[0]["lr"] == pytest.approx(12.5 * 4 / 15)  # last step of epoch 1: step 4 of a 15-step warm-up
    after = model.net.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.net.encoder.parameters()) and not model.net.encoder.training
    assert not torch.equal(head_before, model.head.classifier[1].weight)


def test_linear_probe_on_digits_reports_top5(encoder, digits, tmp_path):
    cfg = LinearProbeConfig(data=digits, img_size=IMG, epochs=30, warmup_epochs=3, batch_size=64, blr=30.0,
                            pool="mean")
    res = run_linear_probe(cfg, _ctx(encoder, tmp_path))  # the model built from the checkpoint
    m = res["metrics"]
    assert set(m) == {"top1", "top5", "top1_best", "top5_best"}
    # chance: 0.1 and 0.5; random encoders get top-1 0.57-0.71, top-5 0.91-0.96
    assert m["top1"] >= 0.35 and m["top5"] >= 0.75 and m["top5"] >= m["top1"]
    assert res["classes"] == [str(k) for k in range(10)]
    assert res["dataset"]["samples"] == {"train": 1438, "val": 359}


def test_augmented_probe_counts_a_corrupt_image_and_subsets_are_seeded(encoder, lfw, tmp_path):
    from polymae.pipeline.evaluate.classification import load_class_splits

    data = str(tmp_path / "lfw")
    shutil.copytree(lfw, data)
    with open(os.path.join(data, "val", "faces", "zzzz.png"), "wb") as fh:
        fh.write(b"not a png")
    cfg = LinearProbeConfig(data=data, img_size=IMG, epochs=2, warmup_epochs=1, batch_size=32, blr=100.0,
                            augment=True)
    res = run_linear_probe(cfg, _ctx(encoder, tmp_path, batch_size=20))  # forward batches straddle the steps
    assert res["dataset"]["samples"] == {"train": 160, "val": 41} and res["skipped"] == {"val": 1}
    assert res["settings"]["augment"] is True and res["settings"]["steps_per_epoch"] == 5
    assert len(res["history"]) == 2 and 0 <= res["metrics"]["top1"] <= 1
    # ctx.max_samples: a seeded subset of each split, in folder order, the same on every call
    full = load_class_splits(cfg)
    a, b = load_class_splits(cfg, 30, seed=0), load_class_splits(cfg, 30, seed=0)
    assert (len(a.train), len(a.val)) == (30, 30) and a.train == b.train and a.val == b.val
    assert set(a.train) <= set(full.train) and a.train == sorted(a.train) and {c for _, c in a.train} == {0, 1}
    assert a.fingerprint != full.fingerprint


def test_finetune_trains_every_block(encoder, lfw, tmp_path):
    model = build_classifier(encoder, num_classes=2, pool="mean", style="finetune", drop_path=0.1)
    blocks = model.net.encoder.encoder
    # stochastic depth linear over the blocks: none on the first, drop_path on the last
    assert isinstance(blocks[0].drop_path1, torch.nn.Identity)
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    before = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    cfg = FinetuneConfig(data=lfw, img_size=IMG, epochs=2, warmup_epochs=1, batch_size=32, micro_batch=16,
                         blr=1e-3, layer_decay=0.75, drop_path=0.1)
    res = run_finetune(cfg, _ctx(encoder, tmp_path), model=model)
    assert set(res["metrics"]) == {"top1", "top1_best"} and 0 <= res["metrics"]["top1"] <= 1
    s = res["settings"]
    assert (s["batch_size"], s["micro_batch"], s["steps_per_epoch"], s["lr"]) == (32, 16, 5, 1e-3 * 32 / 256)
    assert (s["auto_augment"], s["re_prob"], s["re_mode"], s["re_count"]) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert [r["epoch"] for r in res["history"]] == [1, 2]
    assert res["history"][0]["lr"] == pytest.approx(1e-3 * 32 / 256 * 4 / 5)  # head group, step 4 of 5 warm-up
    after = model.net.encoder.state_dict()
    for i in range(len(blocks)):
        assert not torch.equal(before[f"encoder.{i}.attn.qkv.weight"], after[f"encoder.{i}.attn.qkv.weight"])
    assert not torch.equal(before["input_adapters.rgb.proj.weight"], after["input_adapters.rgb.proj.weight"])


def test_augmented_finetune_is_the_same_with_loader_workers(encoder, lfw, tmp_path):
    # RandAugment / random erasing are seeded per (seed, epoch, image): two worker processes (each with its own
    # global generators) give the very same run as the main process alone, loss for loss and weight for weight
    cfg = dict(data=lfw, img_size=IMG, epochs=1, warmup_epochs=0, batch_size=32, micro_batch=16, blr=1e-3,
               re_prob=1.0)
    runs = []
    for workers in (0, 2):
        torch.manual_seed(0)  # the same head initialisation
        model = build_classifier(encoder, num_classes=2, pool="mean", style="finetune", drop_path=0.1)
        res = run_finetune(FinetuneConfig(num_workers=workers, **cfg), _ctx(encoder, tmp_path), model=model)
        runs.append((res["history"], model.state_dict()))
    (h0, w0), (h2, w2) = runs
    assert h0 == h2 and h0[0]["loss"] > 0
    assert all(torch.equal(w0[k], w2[k]) for k in w0)


def test_finetune_refuses_an_odd_micro_batch_under_mixup(encoder, lfw, tmp_path):
    model = build_classifier(encoder, num_classes=2, pool="cls", style="finetune")
    cfg = FinetuneConfig(data=lfw, img_size=IMG, epochs=2, warmup_epochs=1, batch_size=30, micro_batch=15)
    with pytest.raises(ConfigError) as e:
        run_finetune(cfg, _ctx(encoder, tmp_path), model=model)
    assert e.value.key == "finetune.micro_batch"


def test_a_val_class_missing_from_train_is_refused_before_loading(lfw, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(lfw, data)
    os.makedirs(os.path.join(data, "val", "cats"))
    shutil.copy(next(iter(_files(os.path.join(data, "val", "faces")))), os.path.join(data, "val", "cats", "c.png"))
    ctx = _ctx("/nonexistent/checkpoint", tmp_path)  # never read: the error comes first
    with pytest.raises(ConfigError) as e:
        run_linear_probe(LinearProbeConfig(data=data, img_size=IMG), ctx)
    assert e.value.key == "linear_probe.data" and "cats" in str(e.value)
    explicit = FinetuneConfig(train=os.path.join(data, "train"), val=os.path.join(data, "val"), img_size=IMG)
    with pytest.raises(ConfigError) as e:
        run_finetune(explicit, ctx)
    assert e.value.key == "finetune.val" and "cats" in str(e.value)
