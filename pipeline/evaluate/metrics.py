"""Downstream metrics: depth (δ1-δ3, AbsRel, RMSE), semantic segmentation (mIoU), classification (top-1).

Depth follows Eigen et al. 2014 as used by MultiMAE (Sec. 4): δ1 = fraction of valid pixels with
``max(p/t, t/p) < 1.25`` (δ2, δ3: thresholds 1.25², 1.25³); AbsRel = mean ``|p - t| / t``; RMSE =
sqrt(mean ``(p - t)²``), in the target's units; each pixel-weighted over the whole set, with the mean over
batches beside it (``DepthMetrics.compute_batch_mean``, MultiMAE's logging). A relative (scale/shift-free)
prediction is first aligned to the target by least squares (MiDaS, Ranftl et al. 2020, Eq. 4). mIoU averages
per-class IoU over classes present in prediction or target, from a confusion matrix accumulated over the whole
set (not per image).
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


DEPTH_KEYS = ("delta1", "delta2", "delta3", "abs_rel", "rmse")


def _depth_sums(p: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Sums over valid pixels (1-D float64 ``p``, ``t``): threshold hits for 1.25, 1.25², 1.25³, ``|p-t|/t``,
    ``(p-t)²``, and the pixel count ``n``."""
    ratio = torch.maximum(p / t, t / p)
    return {"n": float(t.numel()), "delta1": (ratio < 1.25).sum().item(), "delta2": (ratio < 1.25 ** 2).sum().item(),
            "delta3": (ratio < 1.25 ** 3).sum().item(), "abs_rel": ((p - t).abs() / t).sum().item(),
            "sq": ((p - t) ** 2).sum().item()}


def _from_sums(s: dict[str, float]) -> dict[str, float]:
    n = s["n"]
    return {"delta1": s["delta1"] / n, "delta2": s["delta2"] / n, "delta3": s["delta3"] / n,
            "abs_rel": s["abs_rel"] / n, "rmse": (s["sq"] / n) ** 0.5}


class DepthMetrics:
    """Accumulates δ1, δ2, δ3, AbsRel and RMSE (Eigen et al. 2014) over batches.

    Two averages are kept side by side:

    * :meth:`compute` — **pixel-weighted over the whole set**: every valid pixel of every image weighs the same
      (``delta1`` ... ``rmse``; RMSE = sqrt of the set's mean squared error). This is the number to report.
    * :meth:`compute_batch_mean` — **the mean over batches of each batch's metric** (each batch pixel-weighted
      inside itself; ``delta1_batch_mean`` ...), as MultiMAE's fine-tuning scripts log it. It depends on the batch
      size and on how images fall into batches; kept for comparison with published numbers.

    ``update(pred, target, align=True)`` takes one batch: ``[B, H, W]`` tensors, or sequences of ``[H_i, W_i]``
    tensors (images of different sizes, e.g. each at its label's own resolution). Pixels whose target is ``<= 0``,
    NaN or ±inf are invalid and never counted; a batch without a valid pixel adds nothing (``empty_batches``).
    With ``align`` a relative prediction is first aligned per image by least squares (MiDaS Eq. 4); a metric-depth
    prediction is scored as is (``align=False``). Predictions are clamped to ``rel_eps × max(batch target)`` before
    the ratios (a prediction of 0 or below would divide by 0). Units of RMSE: the target's (metres for NYUv2).

    Attributes:
        images: images passed to :meth:`update`; batches: batches with at least one valid pixel; empty_batches.
    """

    def __init__(self, rel_eps: float = 1e-3):
        self.rel_eps = rel_eps
        self.sums = {"n": 0.0, "delta1": 0.0, "delta2": 0.0, "delta3": 0.0, "abs_rel": 0.0, "sq": 0.0}
        self.batch_sums = {k: 0.0 for k in DEPTH_KEYS}
        self.images = 0
        self.batches = 0
        self.empty_batches = 0

    @property
    def n(self) -> int:
        """Valid pixels counted so far."""
        return int(self.sums["n"])

    def update(self, pred, target, align: bool = True) -> None:
        """Add one batch (see the class docstring); ``pred``, ``target``: ``[B, H, W]`` or lists of ``[H, W]``.

        Raises:
            ValueError: a prediction and its target differ in shape, or the two lists in length.
        """
        preds, targets = list(pred), list(target)
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        self.images += len(preds)
        ps, ts = [], []
        for p_i, t_i in zip(preds, targets):
            if p_i.shape != t_i.shape:
                raise ValueError(f"prediction {tuple(p_i.shape)} and target {tuple(t_i.shape)} differ")
            p_i, t_i = p_i.float(), t_i.float()
            valid = (t_i > 0) & torch.isfinite(t_i)
            if align and valid.any():
                p_i = align_scale_shift(p_i[None], t_i[None], valid[None])[0]
            ps.append(p_i[valid].double())
            ts.append(t_i[valid].double())
        t = torch.cat(ts) if ts else torch.zeros(0, dtype=torch.float64)
        if t.numel() == 0:
            self.empty_batches += 1
            return
        p = torch.cat(ps).clamp_min(self.rel_eps * t.max().item())
        s = _depth_sums(p, t)
        for k, v in s.items():
            self.sums[k] += v
        for k, v in _from_sums(s).items():
            self.batch_sums[k] += v
        self.batches += 1

    def compute(self) -> dict[str, float]:
        """Pixel-weighted metrics over everything seen: ``{"delta1", "delta2", "delta3", "abs_rel", "rmse"}``
        (fractions in [0, 1]; AbsRel unitless; RMSE in target units); NaN when no valid pixel was seen."""
        if self.sums["n"] == 0:
            return {k: float("nan") for k in DEPTH_KEYS}
        return _from_sums(self.sums)

    def compute_batch_mean(self) -> dict[str, float]:
        """MultiMAE-style per-batch average: ``{"<metric>_batch_mean"}``, the mean over batches (with a valid
        pixel) of each batch's pixel-weighted metric; NaN when there was none."""
        if self.batches == 0:
            return {f"{k}_batch_mean": float("nan") for k in DEPTH_KEYS}
        return {f"{k}_batch_mean": v / self.batches for k, v in self.batch_sums.items()}


class SegMetrics:
    """Confusion-matrix mIoU and pixel accuracy.

    ``update(pred [B,H,W] int, target [B,H,W] int)``; target pixels equal to ``ignore_index`` (or outside
    ``[0, num_classes)``) are not counted, whatever is predicted there. ``compute()``: dataset-level ``miou`` =
    mean over the classes present (in the target or the prediction of a counted pixel) of ``tp / (tp + fp + fn)``
    from the confusion matrix of the whole set (a class in neither is left out, not counted as IoU 0);
    ``pixel_acc`` = correct / counted pixels; ``classes_present``.
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

    def per_class_iou(self) -> list[float]:
        """IoU of each class ``[K]`` (``tp / (tp + fp + fn)`` over the set); NaN for a class that is in neither
        prediction nor target (left out of :meth:`compute`'s mIoU, never counted as 0)."""
        conf = self.conf.double()
        tp = conf.diag()
        union = conf.sum(0) + conf.sum(1) - tp
        return [float(a / b) if b > 0 else float("nan") for a, b in zip(tp.tolist(), union.tolist())]


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of ``logits [B, C]`` against ``target [B]`` (fractions in [0, 1])."""
    out = {}
    for k in ks:
        k = min(k, logits.shape[1])
        hit = (logits.topk(k, dim=1).indices == target[:, None]).any(dim=1).float().mean().item()
        out[f"top{k}"] = hit
    return out
