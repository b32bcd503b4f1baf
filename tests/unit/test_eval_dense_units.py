"""Pieces of the dense protocols (``pipeline/evaluate/dense.py``) against hand-computed values: depth metrics (pixel-
weighted and per-batch), mIoU with an absent class and the ignore index, the berHu loss, the dense folder layouts
(pairing, units, label shift, augmentation), the configs and the multi-modal encoding."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.unit

NAN, INF = float("nan"), float("inf")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_depth_metrics_hand_values_with_invalid_pixels_and_batch_mean():
    from polymae.pipeline.evaluate.metrics import DepthMetrics

    m = DepthMetrics()
    # batch 1, a 2x3 image: 0 and NaN targets are invalid; valid ratios max(p/t, t/p) = 1.2, 1.5, 1.8, 2.5
    t1 = torch.tensor([[[1.0, 2.0, 0.0], [4.0, NAN, 10.0]]])
    p1 = torch.tensor([[[1.2, 3.0, 5.0], [7.2, 1.0, 4.0]]])
    m.update(p1, t1, align=False)
    r = m.compute()
    assert r["delta1"] == pytest.approx(1 / 4) and r["delta2"] == pytest.approx(2 / 4)
    assert r["delta3"] == pytest.approx(3 / 4)
    assert r["abs_rel"] == pytest.approx((0.2 / 1 + 1.0 / 2 + 3.2 / 4 + 6.0 / 10) / 4)  # 0.525
    assert r["rmse"] == pytest.approx(math.sqrt((0.04 + 1.0 + 10.24 + 36.0) / 4))
    # batch 2: +inf and negative targets invalid, one exact pixel; batch 3: nothing valid (counted, adds nothing)
    m.update(torch.tensor([[[2.0, 3.0, 3.0]]]), torch.tensor([[[2.0, INF, -1.0]]]), align=False)
    m.update(torch.tensor([[[1.0]]]), torch.tensor([[[0.0]]]), align=False)
    r, b = m.compute(), m.compute_batch_mean()
    assert m.n == 5 and m.images == 3 and m.batches == 2 and m.empty_batches == 1
    # pixel-weighted over the set: 5 valid pixels
    assert (r["delta1"], r["delta2"], r["delta3"]) == pytest.approx((2 / 5, 3 / 5, 4 / 5))
    assert r["abs_rel"] == pytest.approx(2.1 / 5) and r["rmse"] == pytest.approx(math.sqrt(47.28 / 5))
    # MultiMAE's mean over batches of each batch's value
    assert b["delta1_batch_mean"] == pytest.approx((1 / 4 + 1) / 2) and b["delta3_batch_mean"] == pytest.approx(0.875)
    assert b["abs_rel_batch_mean"] == pytest.approx(0.525 / 2)
    assert b["rmse_batch_mean"] == pytest.approx(math.sqrt(11.82) / 2)


def test_depth_metrics_take_images_of_different_sizes_in_one_batch():
    from polymae.pipeline.evaluate.metrics import DepthMetrics

    a, b = DepthMetrics(), DepthMetrics()
    t1, p1 = torch.tensor([[1.0, 2.0, 0.0], [4.0, NAN, 10.0]]), torch.tensor([[1.2, 3.0, 5.0], [7.2, 1.0, 4.0]])
    t2, p2 = torch.tensor([[2.0, 8.0]]), torch.tensor([[2.0, 6.0]])
    a.update([p1, p2], [t1, t2], align=False)
    b.update(torch.cat([p1.flatten(), p2.flatten()])[None, None], torch.cat([t1.flatten(), t2.flatten()])[None, None],
             align=False)  # the same pixels as one [1, 1, 8] image
    assert a.compute() == pytest.approx(b.compute()) and a.images == 2 and a.n == 6


def test_miou_leaves_out_an_absent_class_and_ignored_pixels():
    from polymae.pipeline.evaluate.metrics import SegMetrics

    m = SegMetrics(num_classes=4, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 255], [1, 3, 3, 3]])
    pred = torch.tensor([[0, 1, 1, 2], [1, 3, 3, 0]])  # class 2 only predicted on the ignored pixel
    m.update(pred, target)
    r = m.compute()
    # class 0: tp 1, fp 1, fn 1 -> 1/3; class 1: tp 2, fp 1 -> 2/3; class 3: tp 2, fn 1 -> 2/3; class 2: absent
    assert r["miou"] == pytest.approx((1 / 3 + 2 / 3 + 2 / 3) / 3)  # 5/9, not 5/12 (absent class as IoU 0)
    assert r["pixel_acc"] == pytest.approx(5 / 7) and r["classes_present"] == 3
    ious = m.per_class_iou()
    assert ious[0] == pytest.approx(1 / 3) and math.isnan(ious[2]) and ious[3] == pytest.approx(2 / 3)


def test_berhu_loss_hand_values_and_gradient():
    from polymae.models.losses import berhu_loss

    pred = torch.tensor([0.1, 0.5, 1.0, 7.0], requires_grad=True)
    target = torch.tensor([0.0, 0.0, 0.0, NAN])
    valid = torch.tensor([True, True, True, False])
    loss = berhu_loss(pred, target, valid, c_fraction=0.2)
    # c = 0.2 * max|r| = 0.2: |0.1| -> 0.1; 0.5 -> (0.25 + 0.04) / 0.4 = 0.725; 1.0 -> (1 + 0.04) / 0.4 = 2.6
    assert float(loss.detach()) == pytest.approx((0.1 + 0.725 + 2.6) / 3)
    loss.backward()
    # slope 1 in the L1 part, r / c in the L2 part (c held fixed), 0 on the invalid pixel
    assert pred.grad.tolist() == pytest.approx([1 / 3, 2.5 / 3, 5.0 / 3, 0.0])
    with pytest.raises(ValueError, match="c_fraction"):
        berhu_loss(pred, target, valid, c_fraction=0.0)


def _png(path: str, arr: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path)


def _nyu(root: str, splits=("train", "test"), n: int = 2, hw=(12, 16)) -> str:
    """A tiny NYUv2-layout folder (``test`` standing in for ``val``) of real pixels from scikit-image's astronaut."""
    import skimage.data

    photo = skimage.data.astronaut()
    for s in splits:
        for k in range(n):
            _png(f"{root}/{s}/rgb/im{k}.png", np.ascontiguousarray(photo[k * 50:k * 50 + hw[0], :hw[1]]))
            _png(f"{root}/{s}/semseg/im{k}.png", np.full(hw, k, np.uint8))
            _png(f"{root}/{s}/depth/im{k}.png", np.full(hw, 1500 * (k + 1), np.uint16))
    return root


def test_dense_folder_pairs_by_stem_and_names_a_missing_partner(tmp_path):
    from polymae.datasets.dense_folder import list_dense_samples, modality_dir
    from polymae.pipeline.config import ConfigError
    from polymae.pipeline.evaluate.dense import SemsegConfig, preflight_dense

    root = _nyu(str(tmp_path / "nyu"))
    assert modality_dir(root, "nyuv2", "val", "rgb").endswith("/test/rgb")  # no val/: test/
    s = list_dense_samples(root, "nyuv2", "val", ["rgb", "semseg", "depth"])
    assert [x.stem for x in s] == ["im0", "im1"] and s[1].files["depth"].endswith("test/depth/im1.png")
    os.remove(f"{root}/train/semseg/im1.png")
    with pytest.raises(FileNotFoundError, match=r"train/rgb/im1\.png has no semseg partner"):
        list_dense_samples(root, "nyuv2", "train", ["rgb", "semseg"])
    with pytest.raises(ConfigError, match=r"im1\.png has no semseg partner") as e:
        preflight_dense(SemsegConfig(root=root, layout="nyuv2", num_classes=2))
    assert e.value.key == "semseg.root"
    _png(f"{root}/test/depth/stray.png", np.zeros((4, 4), np.uint16))
    with pytest.raises(FileNotFoundError, match=r"depth/stray\.png has no image"):
        list_dense_samples(root, "nyuv2", "val", ["rgb", "depth"])
    with pytest.raises(ConfigError, match="is required") as e:
        preflight_dense(SemsegConfig(root=""))
    assert e.value.key == "semseg.root"


def test_ade20k_layout_and_label_units(tmp_path):
    from polymae.datasets.dense_folder import list_dense_samples, read_depth, read_semseg

    root = str(tmp_path / "ade")
    _png(f"{root}/images/validation/a.jpg", np.zeros((4, 4, 3), np.uint8))
    _png(f"{root}/annotations/validation/a.png", np.array([[0, 1, 2, 150]], np.uint8))
    s = list_dense_samples(root, "ade20k", "val", ["rgb", "semseg"])
    assert s[0].files["semseg"].endswith("annotations/validation/a.png")
    ids = read_semseg(s[0].files["semseg"], reduce_zero_label=True, ignore_index=255)
    assert ids.tolist() == [[255, 0, 1, 149]] and ids.dtype == np.int64  # 0 "other" ignored, 1..150 -> 0..149
    assert read_semseg(s[0].files["semseg"]).tolist() == [[0, 1, 2, 150]]
    _png(f"{root}/d.png", np.array([[0, 1500, 12000]], np.uint16))  # millimetres
    assert read_depth(f"{root}/d.png", 1000.0, max_depth=10.0).tolist() == [[0.0, 1.5, 0.0]]  # 12 m > cap: invalid
    with pytest.raises(ValueError, match="no 'depth' files"):
        list_dense_samples(root, "ade20k", "val", ["rgb", "depth"])


def test_dense_folder_items_are_deterministic_and_keep_label_resolution(tmp_path):
    from polymae.datasets.dense_folder import DenseFolder, collate_dense, list_dense_samples

    root = _nyu(str(tmp_path / "nyu"), splits=("train",), hw=(24, 40))
    s = list_dense_samples(root, "nyuv2", "train", ["rgb", "semseg", "depth"])
    tr = DenseFolder(s, ["semseg", "depth"], 16, train=True, seed=3, max_depth=10.0)
    a, b = tr[1], tr[1]
    assert a["rgb"].shape == (3, 16, 16) and a["semseg"].shape == (16, 16) and a["depth"].shape == (1, 16, 16)
    assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["depth"], b["depth"])  # (seed, epoch, index)
    assert set(a["semseg"].unique().tolist()) <= {1, 255} and set(a["depth"].unique().tolist()) <= {0.0, 3.0}
    ev = DenseFolder(s, ["semseg", "depth"], 16, train=False)
    x = ev[0]
    assert x["semseg"].shape == (24, 40) and x["depth"].shape == (24, 40) and x["depth_in"].shape == (1, 16, 16)
    assert float(x["depth"][0, 0]) == 1.5
    batch = collate_dense([ev[0], ev[1]])
    assert batch["rgb"].shape == (2, 3, 16, 16) and batch["index"].tolist() == [0, 1]


def test_config_validation_names_the_key_and_yamls_load():
    import yaml

    from polymae.pipeline.config import ConfigError, load_config
    from polymae.pipeline.evaluate.dense import DepthConfig, SemsegConfig

    cases = [(SemsegConfig(layout="ade20k", inputs=["rgb+depth"]), "inputs"),
             (SemsegConfig(inputs=["rgb", "rgb"]), "inputs"),
             (SemsegConfig(num_classes=40, ignore_index=3), "ignore_index"),
             (DepthConfig(berhu_c=0.0), "berhu_c"), (DepthConfig(layers=[1, 2]), "layers"),
             (DepthConfig(epochs=0, steps=0), "epochs"), (DepthConfig(scale=[2.0, 1.0]), "scale")]
    for cfg, key in cases:
        with pytest.raises(ConfigError) as e:
            cfg.validate()
        assert e.value.key == key
    assert SemsegConfig(layout="ade20k").reduce_zero() and not SemsegConfig(layout="nyuv2").reduce_zero()
    cfgs = {}
    for name, cls in (("semseg_ade20k", SemsegConfig), ("semseg_nyuv2", SemsegConfig), ("depth_nyuv2", DepthConfig)):
        with open(os.path.join(REPO, "jobs", "configs", "eval", f"{name}.yaml")) as fh:
            doc = yaml.safe_load(fh)
        assert set(doc) == {"protocol", cls.KEY} and doc["protocol"] == cls.KEY
        cfgs[name] = load_config(cls, base=doc[cls.KEY], preflight=False)
        assert cfgs[name].lr == 1e-4 and cfgs[name].layer_decay == 0.75
    assert (cfgs["semseg_ade20k"].img_size, cfgs["semseg_ade20k"].num_classes) == (512, 150)
    assert cfgs["semseg_nyuv2"].inputs == ["rgb", "rgb+depth"] and cfgs["semseg_nyuv2"].num_classes == 40
    assert (cfgs["depth_nyuv2"].img_size, cfgs["depth_nyuv2"].max_depth) == (256, 10.0)


@pytest.fixture(scope="module")
def tiny_model():
    from polymae.models.multimae import create_model
    from polymae.models.multitask import encoder_init_kwargs
    from polymae.pipeline.evaluate.dense import DenseModel

    torch.manual_seed(0)
    pre = create_model("multimae_tiny", img_size=32, dim=32, depth=3, num_heads=2, semseg_num_classes=4,
                       decoder_dim=32, decoder_depth=1, decoder_heads=2)
    kw = dict(encoder_init_kwargs(pre.init_kwargs), in_modalities=["rgb", "depth"])
    heads = {"semseg": {"kind": "convnext_seg", "kwargs": {"dim": 32, "num_classes": 3, "width": 16, "depth": 1}}}
    model = DenseModel(kw, heads)
    model.encoder.load_state_dict({k: v for k, v in pre.state_dict().items() if k in model.encoder.state_dict()})
    return model.eval()


def test_multimodal_encoding_keeps_rgb_positions_and_uses_depth(tiny_model):
    import skimage.data

    rgb = torch.from_numpy(skimage.data.astronaut()[::16, ::16][:32, :32].astype(np.float32) / 255).permute(2, 0, 1)
    rgb = ((rgb - 0.45) / 0.225)[None]
    depth = torch.linspace(1.0, 4.0, 32 * 32).reshape(1, 1, 32, 32)
    with torch.no_grad():
        ref, grid = tiny_model.encode(rgb)  # MultiTaskModel's RGB-only encoding
        rgb_only, g1 = tiny_model.encode_inputs(rgb)
        both, g2 = tiny_model.encode_inputs(rgb, depth)
        out = tiny_model.predict(rgb, depth, out_size=(8, 8))
    assert g1 == g2 == grid == (2, 2)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(ref, rgb_only))
    assert [f.shape for f in both] == [(1, 1 + 4, 32)] * 3  # global + the 4 rgb-position tokens of each block
    assert not torch.allclose(both[-1], rgb_only[-1], atol=1e-4)  # the depth tokens were attended to
    assert out.shape == (1, 3, 8, 8)


def test_layer_decay_groups(tiny_model):
    from polymae.pipeline.evaluate.dense import SemsegConfig, _optimizer

    opt = _optimizer(tiny_model, SemsegConfig(layer_decay=0.5, weight_decay=0.05))
    scale_of = {id(p): (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    named = dict(tiny_model.named_parameters())
    # MultiMAE has no final norm: stem 0, blocks 1..3, head 4 -> scales 0.5^4 .. 0.5^0
    assert scale_of[id(named["heads.semseg.classifier.weight"])] == (1.0, 0.05)
    assert scale_of[id(named["encoder.encoder.2.mlp.fc1.weight"])] == (0.5, 0.05)
    assert scale_of[id(named["encoder.encoder.0.mlp.fc1.weight"])] == (0.125, 0.05)
    assert scale_of[id(named["encoder.input_adapters.depth.proj.weight"])] == (0.0625, 0.05)
    assert scale_of[id(named["encoder.global_tokens"])] == (0.0625, 0.0)  # no weight decay on tokens


def test_eigen_crop_keeps_exactly_the_crop_of_a_480x640_frame():
    from polymae.pipeline.evaluate.dense import eigen_crop

    t = torch.ones(480, 640)
    c = eigen_crop(t)
    assert int(c.sum()) == (471 - 45) * (601 - 41)  # 426 x 560 pixels scored
    assert c[45, 41] == 1 and c[44, 41] == 0 and c[470, 600] == 1 and c[471, 600] == 0 and c[45, 601] == 0
    half = eigen_crop(torch.ones(240, 320))  # a half-size label: the crop scales with it
    assert int(half.sum()) == (236 - 22) * (300 - 20)
