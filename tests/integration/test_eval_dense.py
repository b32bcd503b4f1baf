"""The dense protocols of ``polymae evaluate`` end to end (``pipeline/evaluate/dense.py``): a tiny MultiMAE with rgb and
depth input adapters fine-tuned on folders made from scikit-image's real images.

* depth / NYUv2 layout: crops of the Middlebury motorcycle (``skimage.data.stereo_motorcycle``), depth in millimetres
  from its ground-truth disparity, ``Z = f·B / (d + doffs)`` with f = 994.978 px, B = 193.001 mm, doffs = 31.086 px
  (Middlebury's formula; the offset ``doffs`` between the two principal points must be added to the disparity), 0
  where the disparity is unknown; a near/far semseg label from the same depth (255 where unknown);
* semseg / ADE20K layout: ``skimage.data.horse`` silhouette composited on the astronaut photograph, labels
  1 = horse, 2 = background, 0 = a 3-pixel ignored border (reduce_zero_label).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import pytest

from polymae.datasets.samples import write_horse_ade20k, write_motorcycle_nyuv2

pytestmark = pytest.mark.integration

IMG = 64  # protocol input side (4 x 4 patches of the 16-px tiny encoder)


def write_rgb_only_encoder(folder: str) -> str:
    """A release folder of a tiny MultiMAE with only an rgb input adapter."""
    import torch
    from safetensors.torch import save_file

    from polymae.models.multimae import create_model

    torch.manual_seed(0)
    model = create_model("multimae_tiny", img_size=32, dim=32, depth=4, num_heads=2, in_modalities=["rgb"],
                         out_modalities=["rgb"], decoder_dim=32, decoder_depth=1, decoder_heads=2)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "model_config.json"), "w") as fh:
        json.dump({"name": "multimae_tiny_rgb", "init_kwargs": model.init_kwargs}, fh)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The two dataset folders and the two tiny checkpoints (rgb+depth+semseg inputs; rgb only)."""
    from multitask_helpers import write_tiny_encoder

    base = tmp_path_factory.mktemp("dense")
    return {"nyu": write_motorcycle_nyuv2(str(base / "nyu")), "ade": write_horse_ade20k(str(base / "ade")),
            "ckpt": write_tiny_encoder(str(base / "ckpt")), "rgb_ckpt": write_rgb_only_encoder(str(base / "rgbckpt"))}


def _ctx(checkpoint: str, output: str, batch_size: int = 2):
    from polymae.pipeline.evaluate.results import EvalContext

    return EvalContext(checkpoint=checkpoint, output=output, device="cpu", seed=1, batch_size=batch_size)


def _tiny(cls, **kw):
    base = dict(img_size=IMG, batch_size=4, lr=2e-3, warmup_epochs=0.5, weight_decay=0.0, layer_decay=0.9,
                drop_path=0.0, head_width=16, num_workers=0, pictures=2, scale=[0.8, 1.25])
    return cls(**{**base, **kw})


def _check_pictures(output: str, names: list[str], n: int, label_hw: tuple[int, int]) -> None:
    from PIL import Image

    assert len(names) == n
    for name in names:
        with Image.open(os.path.join(output, "pictures", f"{name}.png")) as im:
            # input | prediction | target side by side, each at the label's resolution
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (3 * label_hw[1], label_hw[0])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(output, "tb")))


def test_semseg_ade20k_finetune_loss_falls_and_scores_every_image(data, tmp_path):
    from polymae.pipeline.evaluate.dense import SemsegConfig, run_semseg

    cfg = _tiny(SemsegConfig, root=data["ade"], layout="ade20k", num_classes=2, steps=20, head_depth=1)
    ctx = _ctx(data["ckpt"], str(tmp_path / "out"))
    res = run_semseg(cfg, ctx)
    ctx.close()
    loss = res["train_loss"]["rgb"]
    assert len(loss) == 20 and np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5]), loss
    m = res["metrics"]
    assert set(m) == {"miou@rgb", "pixel_acc@rgb"}
    assert 0.0 <= m["miou@rgb"] <= 1.0 and 0.0 <= m["pixel_acc@rgb"] <= 1.0
    # 2 classes, both present in the validation crops: the mean of the per-class IoUs reported beside it
    ious = res["details"]["rgb"]["per_class_iou"]
    assert len(ious) == 2 and m["miou@rgb"] == pytest.approx(np.mean(ious))
    assert res["dataset"]["samples"] == {"train": 6, "val": 3} and res["scored_images"]["rgb"] == 3
    assert len(res["dataset"]["fingerprint"]) == 64
    _check_pictures(ctx.output, res["pictures_of"]["rgb"], 2, (100, 120))


def test_depth_rgb_and_rgb_depth_score_every_valid_pixel_of_the_split(data, tmp_path):
    from PIL import Image

    from polymae.pipeline.evaluate.dense import DepthConfig, run_depth

    cfg = _tiny(DepthConfig, root=data["nyu"], inputs=["rgb", "rgb+depth"], steps=12)
    ctx = _ctx(data["ckpt"], str(tmp_path / "out"))
    res = run_depth(cfg, ctx)
    ctx.close()
    val_dir = os.path.join(data["nyu"], "val", "depth")
    valid = sum(int((np.asarray(Image.open(os.path.join(val_dir, f))) > 0).sum()) for f in os.listdir(val_dir))
    names = ("delta1", "delta2", "delta3", "abs_rel", "rmse")
    for inp in ("rgb", "rgb+depth"):
        assert res["scored_images"][inp] == res["dataset"]["samples"]["val"] == 3  # every image of the split
        assert res["details"][inp]["valid_pixels"] == valid  # every valid pixel, at the label's resolution
        for k in names:
            assert np.isfinite(res["metrics"][f"{k}@{inp}"]) and np.isfinite(res["metrics"][f"{k}_batch_mean@{inp}"])
        d = [res["metrics"][f"delta{i}@{inp}"] for i in (1, 2, 3)]
        assert 0.0 <= d[0] <= d[1] <= d[2] <= 1.0
        loss = res["train_loss"][inp]
        assert len(loss) == 12 and np.mean(loss[-3:]) < 0.6 * np.mean(loss[:3]), loss  # berHu, metres
        _check_pictures(ctx.output, res["pictures_of"][inp], 2, (120, 160))
    # the saved fine-tuned model loads (load_model: a multitask model) and, re-scored, gives the same metrics
    from safetensors.torch import load_file

    from polymae.pipeline.evaluate import dense as D
    from polymae.pipeline.train.checkpoint import load_model

    folder = os.path.join(ctx.output, res["models"]["rgb"])
    loaded, mc = load_model(folder)
    assert set(loaded.heads) == {"depth"} and mc["finetuned"]["inputs"] == "rgb"
    again = D.DenseModel(mc["init_kwargs"], mc["heads"])
    again.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    _, val_ds = D._datasets(cfg, D.preflight_dense(cfg), "rgb", 0)
    rescored = D._evaluate(again, cfg, val_ds, "rgb", 2, torch.device("cpu"))["metrics"]
    assert rescored["delta1"] == res["metrics"]["delta1@rgb"] and rescored["rmse"] == res["metrics"]["rmse@rgb"]
    # 3 val images in batches of 2 -> batches of 2 and 1 images: the per-batch mean weighs them differently
    assert res["metrics"]["rmse_batch_mean@rgb"] != pytest.approx(res["metrics"]["rmse@rgb"], rel=1e-9)


def test_semseg_nyuv2_with_rgb_and_rgb_depth_inputs(data, tmp_path):
    from polymae.pipeline.evaluate.dense import SemsegConfig, run_semseg

    cfg = _tiny(SemsegConfig, root=data["nyu"], layout="nyuv2", num_classes=2, steps=4, head_depth=1,
                inputs=["rgb", "rgb+depth"], pictures=1)
    ctx = _ctx(data["ckpt"], str(tmp_path / "out"), batch_size=3)
    res = run_semseg(cfg, ctx)
    ctx.close()
    assert cfg.reduce_zero() is False  # nyuv2 labels are 0/1 with 255 unknown: kept as they are
    for inp in ("rgb", "rgb+depth"):
        assert 0.0 <= res["metrics"][f"miou@{inp}"] <= 1.0 and 0.0 <= res["metrics"][f"pixel_acc@{inp}"] <= 1.0
        assert res["scored_images"][inp] == 3
    # the two settings are separate fine-tunings with different encoder inputs
    assert res["train_loss"]["rgb"] != res["train_loss"]["rgb+depth"]


def test_rgb_depth_without_depth_adapter_is_a_config_error_before_training(data, tmp_path):
    from polymae.pipeline.config import ConfigError
    from polymae.pipeline.evaluate.dense import DepthConfig, run_depth

    cfg = _tiny(DepthConfig, root=data["nyu"], inputs=["rgb", "rgb+depth"], steps=2)
    ctx = _ctx(data["rgb_ckpt"], str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="depth input adapter") as e:
        run_depth(cfg, ctx)
    assert e.value.key == "depth.inputs"
    assert not os.path.exists(ctx.output)  # nothing was fine-tuned or drawn
