"""Metric arithmetic against hand-computed values."""

import pytest
import torch

from polymae.pipeline.evaluate.metrics import DepthMetrics, SegMetrics, align_scale_shift, topk_accuracy

pytestmark = pytest.mark.unit


def test_depth_metrics_exact_values():
    t = torch.tensor([[[1.0, 2.0], [4.0, 0.0]]])  # the 0 pixel is invalid
    p = torch.tensor([[[1.0, 3.0], [4.0, 9.0]]])
    m = DepthMetrics()
    m.update(p, t, align=False)
    r = m.compute()
    # ratios 1, 1.5, 1 -> δ1 = 2/3; AbsRel = (0 + 0.5 + 0) / 3; RMSE = sqrt(1/3)
    assert r["delta1"] == pytest.approx(2 / 3)
    assert r["abs_rel"] == pytest.approx(0.5 / 3)
    assert r["rmse"] == pytest.approx((1 / 3) ** 0.5)


def test_scale_shift_alignment_recovers_affine_prediction():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 8, 8, generator=g) + 0.5
    p = (t - 0.3) / 2.5  # an affine transform of the truth, e.g. standardised depth
    aligned = align_scale_shift(p, t, torch.ones_like(t, dtype=torch.bool))
    assert torch.allclose(aligned, t, atol=1e-5)
    m = DepthMetrics()
    m.update(p, t, align=True)
    assert m.compute()["delta1"] == 1.0 and m.compute()["abs_rel"] < 1e-5


def test_miou_from_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 1, 0]])
    m = SegMetrics(num_classes=3, ignore_index=255)
    m.update(pred, target)
    r = m.compute()
    # class 0: tp 1, union 2 -> 0.5 ; class 1: tp 2, union 3 -> 2/3 ; class 2 absent
    assert r["miou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert r["pixel_acc"] == pytest.approx(3 / 4)
    assert r["classes_present"] == 2


def test_topk():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]])
    r = topk_accuracy(logits, torch.tensor([1, 2]), ks=(1, 2))
    assert r["top1"] == 0.5 and r["top2"] == 0.5
