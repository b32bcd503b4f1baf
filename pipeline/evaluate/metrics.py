"""Downstream metrics: depth (δ1, AbsRel, RMSE), semantic segmentation (mIoU), classification (top-1).

Depth follows Eigen et al. 2014 as used by MultiMAE (Sec. 4): δ1 = fraction of valid pixels with
``max(p/t, t/p) < 1.25``; AbsRel = mean ``|p - t| / t``; RMSE = sqrt(mean ``(p - t)²``), in the target's
units. A relative (scale/shift-free) prediction is first aligned to the target by least squares
(MiDaS, Ranftl et al. 2020, Eq. 4). mIoU averages per-class IoU over classes present in prediction or
target, from a confusion matrix accumulated over the whole set (not per image).
"""

from __future__ import annotations

import torch


def align_scale_shift(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Least-squares ``s·pred + t`` per image, fitted on ``valid`` pixels (MiDaS Eq. 4).

    Args:
        pred, target: float ``[B, H, W]``; valid: bool ``[B, H, W]``.
    Returns:
        aligned prediction ``[B, H, W]``.
    """
    out = torch.empty_like(pred)
    for i in range(pred.shape[0]):
        p, t = pred[i][valid[i]].double(), target[i][valid[i]].double()
        if p.numel() < 2:
            out[i] = pred[i]
            continue
        A = torch.stack([p, torch.ones_like(p)], dim=1)
        sol = torch.linalg.lstsq(A, t[:, None]).solution[:, 0]
        out[i] = (pred[i].double() * sol[0] + sol[1]).to(pred.dtype)
    return out


class DepthMetrics:
    """Accumulates δ1 / AbsRel / RMSE over batches (pixel-weighted over the whole set).

    ``update(pred [B,H,W], target [B,H,W], align=True)``: pixels with a non-positive or non-finite target
    are invalid; aligned predictions are clamped to ``rel_eps × max(target)`` (so the metric is
    scale-invariant) before ratios.
    """

    def __init__(self, rel_eps: float = 1e-3):
        self.rel_eps = rel_eps
        self.n = 0
        self.d1 = 0.0
        self.abs_rel = 0.0
        self.sq = 0.0

    def update(self, pred: torch.Tensor, target: torch.Tensor, align: bool = True) -> None:
        pred, target = pred.float(), target.float()
        valid = (target > 0) & torch.isfinite(target)
        if not valid.any():
            return
        if align:
            pred = align_scale_shift(pred, target, valid)
        t = target[valid].double()
        p = pred[valid].double().clamp_min(self.rel_eps * t.max().item())
        ratio = torch.maximum(p / t, t / p)
        self.n += t.numel()
        self.d1 += (ratio < 1.25).sum().item()
        self.abs_rel += ((p - t).abs() / t).sum().item()
        self.sq += ((p - t) ** 2).sum().item()

    def compute(self) -> dict[str, float]:
        if self.n == 0:
            return {"delta1": float("nan"), "abs_rel": float("nan"), "rmse": float("nan")}
        return {"delta1": self.d1 / self.n, "abs_rel": self.abs_rel / self.n, "rmse": (self.sq / self.n) ** 0.5}


class SegMetrics:
    """Confusion-matrix mIoU and pixel accuracy.

    ``update(pred [B,H,W] int, target [B,H,W] int)``; target pixels equal to ``ignore_index`` (or outside
    ``[0, num_classes)``) are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.conf = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        t = target.reshape(-1).long()
        p = pred.reshape(-1).long()
        keep = (t != self.ignore_index) & (t >= 0) & (t < self.num_classes)
        idx = t[keep] * self.num_classes + p[keep].clamp(0, self.num_classes - 1)
        self.conf += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def compute(self) -> dict[str, float]:
        conf = self.conf.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        present = union > 0
        miou = (tp[present] / union[present]).mean().item() if present.any() else float("nan")
        acc = (tp.sum() / conf.sum()).item() if conf.sum() > 0 else float("nan")
        return {"miou": miou, "pixel_acc": acc, "classes_present": int(present.sum())}


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of ``logits [B, C]`` against ``target [B]`` (fractions in [0, 1])."""
    out = {}
    for k in ks:
        k = min(k, logits.shape[1])
        hit = (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()
        out[f"top{k}"] = hit
    return out
