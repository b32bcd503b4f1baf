"""Masked reconstruction losses of MultiMAE (arXiv 2204.01678, Sec. 3.3 / Appendix "loss functions") and
MAE (arXiv 2111.06377, Sec. 3 "Reconstruction target"), plus the patch layout helpers they need.

All losses are computed on **masked tokens only** (mask True = masked). Each sample is averaged over
its own masked positions, then the batch average is taken over the samples that have at least one
masked position (a sample with nothing masked for that modality contributes nothing; if no sample
has, the loss is an exact 0 that still carries a gradient path to ``pred``). With a fixed number of
masked tokens per sample this equals MAE's ``(loss * mask).sum() / mask.sum()``; it matches the
MultiMAE reference's per-sample mean followed by ``nanmean``.

Losses are evaluated in float32 whatever the dtype of ``pred``, with autocast disabled around them (an
enclosing ``torch.autocast`` cannot lower them to bf16/fp16), and with masked arithmetic only: no value is
read on the host and no tensor has a data-dependent size, so they never synchronise an accelerator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fp32_region", "patchify", "unpatchify", "standardize_depth", "norm_pix_target", "masked_mean",
           "masked_mse_loss", "masked_l1_loss", "masked_cross_entropy_loss", "berhu_loss"]


def fp32_region(t: torch.Tensor) -> torch.autocast:
    """A context manager that switches autocast off on ``t``'s device, so that float32 inputs stay float32
    inside it (mixed-precision training, e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``). On a
    device type autocast does not know (e.g. ``meta``) it switches off CPU autocast instead, a no-op there.

    Args:
        t: any tensor on the device the region computes on.

    Returns:
        ``torch.autocast(device_type=t.device.type, enabled=False)``.
    """
    try:
        return torch.autocast(device_type=t.device.type, enabled=False)
    except RuntimeError:
        return torch.autocast(device_type="cpu", enabled=False)


def patchify(x: torch.Tensor, patch: int, channel_last: bool = False) -> torch.Tensor:
    """Split an image into non-overlapping square patches, row-major over the patch grid.

    Args:
        x: ``[B, C, H, W]`` (or ``[B, H, W]``, treated as ``C = 1``).
        patch: patch side ``p`` in pixels of ``x``; ``H`` and ``W`` must be divisible by it.
        channel_last: per-token layout ``(p, p, C)`` as in MAE's ``patchify`` when True, ``(C, p, p)`` as
            in MultiMAE's output adapters when False.

    Returns:
        ``[B, (H/p)*(W/p), C*p*p]``.

    Raises:
        ValueError: if ``H`` or ``W`` is not divisible by ``p``.
    """
    if x.ndim == 3:
        x = x[:, None]
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by patch size {patch}")
    nh, nw = h // patch, w // patch
    x = x.reshape(b, c, nh, patch, nw, patch)
    x = x.permute(0, 2, 4, 3, 5, 1) if channel_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, nh * nw, c * patch * patch)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], patch: int, channels: int,
               channel_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`patchify`.

    Args:
        tokens: ``[B, nh*nw, C*p*p]``.
        grid: ``(nh, nw)`` patch grid.
        patch: ``p``.
        channels: ``C``.
        channel_last: token layout, see :func:`patchify`.

    Returns:
        ``[B, C, nh*p, nw*p]``.

    Raises:
        ValueError: if the token shape does not match ``grid``, ``patch`` and ``channels``.
    """
    b, n, d = tokens.shape
    nh, nw = grid
    if n != nh * nw or d != channels * patch * patch:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match grid {grid}, patch {patch}, C={channels}")
    if channel_last:
        x = tokens.reshape(b, nh, nw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    else:
        x = tokens.reshape(b, nh, nw, channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels, nh * patch, nw * patch)


def standardize_depth(depth: torch.Tensor, trunc: float = 0.1, eps: float = 1e-6) -> torch.Tensor:
    """Per-image truncated standardisation of depth (MultiMAE reference, ``--standardize_depth``).

    For each image the values are sorted, the bottom and top ``trunc`` fraction are dropped (indices
    ``[int(trunc*n), int((1-trunc)*n))``), and the *whole* map is standardised with the mean and
    ``sqrt(var + eps)`` of the kept values (``var`` is the unbiased sample variance, as ``torch.var`` in
    the reference). Computed in float32; output has the input's dtype.

    Args:
        depth: ``[B, 1, H, W]`` raw depth (any units; typically metres or relative inverse depth).
        trunc: fraction dropped at each end (0.1).
        eps: added to the variance (1e-6).

    Returns:
        ``[B, 1, H, W]`` standardised depth (dimensionless).

    Raises:
        ValueError: if ``depth`` is not ``[B, 1, H, W]`` or has fewer than 2 pixels per image.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"depth must be [B, 1, H, W], got {tuple(depth.shape)}")
    b = depth.shape[0]
    flat = depth.float().reshape(b, -1)
    n = flat.shape[1]
    if n < 2:
        raise ValueError("depth maps need at least 2 pixels to standardise")
    lo, hi = int(trunc * n), int((1.0 - trunc) * n)
    if hi - lo < 2:
        lo, hi = 0, n
    kept = flat.sort(dim=1).values[:, lo:hi]
    mean = kept.mean(dim=1)
    var = kept.var(dim=1)
    out = (flat - mean[:, None]) / torch.sqrt(var[:, None] + eps)
    return out.reshape(depth.shape).to(depth.dtype)


def norm_pix_target(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalised pixels (MAE Sec. 3 "normalized pixels"): ``(t - mean) / sqrt(var + eps)``
    over all ``C*p*p`` values of each patch (unbiased variance, as ``target.var()`` in both references).

    Args:
        patches: ``[B, N, C*p*p]``.
        eps: 1e-6.

    Returns:
        ``[B, N, C*p*p]`` float32.
    """
    t = patches.float()
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps)


def masked_mean(value_sum: torch.Tensor, count: torch.Tensor, mask: torch.Tensor,
                anchor: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample average over masked tokens, then average over samples that have any (MultiMAE Sec. 3.3:
    the reference's per-sample mean followed by ``nanmean``; MAE Sec. 3: mean over masked patches).

    Masked arithmetic only (no host read, no data-dependent shape): ``num_b = sum_n value * mask``,
    ``den_b = sum_n count * mask``; samples with ``den_b = 0`` get weight 0 and the result is
    ``sum_b [den_b > 0] num_b / den_b`` divided by ``max(1, #samples with den_b > 0)``. With no such
    sample it is an exact 0 that still depends on ``value_sum`` (so backward reaches the prediction).
    Unmasked tokens are selected out with ``torch.where``, so a non-finite value there cannot leak in.

    Args:
        value_sum: ``[B, N]`` summed loss of each token.
        count: ``[B, N]`` number of loss terms in each token (pixels; 0 for fully ignored tokens).
        mask: bool ``[B, N]``, True = masked (counted).
        anchor: unused; kept for callers written when an empty selection needed a tensor of the graph.

    Returns:
        scalar tensor of ``value_sum``'s dtype (float32 from the losses below).
    """
    zero = value_sum.new_zeros(())
    num = torch.where(mask, value_sum, zero).sum(dim=1)
    den = torch.where(mask, count.to(value_sum.dtype), zero).sum(dim=1)
    valid = den > 0
    per_sample = torch.where(valid, num / torch.where(valid, den, torch.ones_like(den)), zero)
    return per_sample.sum() / valid.sum().clamp_min(1).to(value_sum.dtype)


def _check(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    n = (pred.shape[-2] // patch) * (pred.shape[-1] // patch)
    if tuple(mask.shape) != (pred.shape[0], n):
        raise ValueError(f"mask must be [B, {n}], got {tuple(mask.shape)}")


def masked_mse_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int,
                    norm_pix: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """MSE on masked tokens (MultiMAE RGB loss; MAE loss with ``norm_pix=True``).

    Args:
        pred: ``[B, C, H, W]`` prediction (in the target space: normalised pixels when ``norm_pix``).
        target: ``[B, C, H, W]`` image (e.g. ImageNet mean/std-normalised RGB).
        mask: bool ``[B, (H/p)*(W/p)]``, True = masked.
        patch: token patch size ``p`` in pixels.
        norm_pix: normalise the target per patch (:func:`norm_pix_target`).
        eps: variance epsilon for ``norm_pix``.

    Returns:
        scalar float32: mean over masked tokens of the per-token mean squared error.

    Raises:
        ValueError: on shape mismatch.
    """
    _check(pred, target, mask, patch)
    with fp32_region(pred):
        p = patchify(pred.float(), patch)
        t = patchify(target.float(), patch)
        if norm_pix:
            t = norm_pix_target(t, eps)
        per_tok = ((p - t) ** 2).mean(dim=-1)
        return masked_mean(per_tok, torch.ones_like(per_tok), mask)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int) -> torch.Tensor:
    """L1 on masked tokens (MultiMAE depth loss; ``target`` is the standardised depth).

    Args:
        pred: ``[B, C, H, W]``.
        target: ``[B, C, H, W]``.
        mask: bool ``[B, (H/p)*(W/p)]``, True = masked.
        patch: token patch size ``p``.

    Returns:
        scalar float32: mean over masked tokens of the per-token mean absolute error.

    Raises:
        ValueError: on shape mismatch.
    """
    _check(pred, target, mask, patch)
    with fp32_region(pred):
        per_tok = (patchify(pred.float(), patch) - patchify(target.float(), patch)).abs().mean(dim=-1)
        return masked_mean(per_tok, torch.ones_like(per_tok), mask)


def masked_cross_entropy_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int,
                              ignore_index: int = 255) -> torch.Tensor:
    """Pixel-wise cross-entropy on masked tokens (MultiMAE semantic segmentation loss, at stride 4).

    Pixels whose label is ``ignore_index`` contribute neither loss nor count; each sample is averaged
    over the non-ignored pixels of its masked tokens, and samples with none are excluded.

    Args:
        logits: ``[B, K, h, w]`` class logits at stride 4.
        target: int64 ``[B, h, w]`` class ids in ``[0, K)`` or ``ignore_index``.
        mask: bool ``[B, (h/p4)*(w/p4)]``, True = masked.
        patch: token patch size at this stride, ``p4 = patch_size / 4``.
        ignore_index: label value to ignore (255).

    Returns:
        scalar float32 loss (nats).

    Raises:
        ValueError: on shape mismatch.
    """
    if logits.ndim != 4 or target.shape != (logits.shape[0],) + tuple(logits.shape[-2:]):
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    n = (logits.shape[-2] // patch) * (logits.shape[-1] // patch)
    if tuple(mask.shape) != (logits.shape[0], n):
        raise ValueError(f"mask must be [B, {n}], got {tuple(mask.shape)}")
    with fp32_region(logits):
        pix = F.cross_entropy(logits.float(), target.long(), ignore_index=ignore_index, reduction="none")
        valid = (target != ignore_index).float()  # pix: [B, h, w] nats, 0 on ignored pixels
        loss_sum = patchify(pix, patch).sum(dim=-1)
        count = patchify(valid, patch).sum(dim=-1)
        return masked_mean(loss_sum, count, mask)


def berhu_loss(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, c_fraction: float = 0.2,
               eps: float = 1e-6) -> torch.Tensor:
    """The reverse Huber ("berHu") loss of Laina et al. 2016 ("Deeper Depth Prediction with Fully Convolutional
    Residual Networks", Sec. 3.2, Eq. 1), averaged over the valid pixels of the batch:

    ``B(x) = |x|`` if ``|x| <= c``, else ``(x² + c²) / (2c)``, with residual ``x = pred - target`` and
    ``c = c_fraction · max |x|`` over the valid pixels of the whole batch (``c_fraction = 1/5`` in the paper),
    detached. L1 for small residuals, scaled L2 for large ones; continuous (value and slope) at ``|x| = c``.

    Units: those of ``target`` (the dense protocol uses metric depth in metres, MultiMAE's NYUv2 setting); the
    loss has the same unit. Computed in float32 with autocast off, with masked arithmetic only (no host read).

    Args:
        pred: ``[B, 1, H, W]`` (any shape) prediction.
        target: same shape, ground truth; values at invalid pixels are ignored (may be 0, NaN or inf).
        valid: bool, same shape: the pixels that count.
        c_fraction: ``c`` as a fraction of the batch's largest absolute residual (> 0).
        eps: lower bound of ``c`` (a perfect batch would otherwise divide by 0).
    Returns:
        scalar float32: mean of ``B`` over valid pixels (an exact 0 connected to ``pred`` when none is valid).
    Raises:
        ValueError: ``pred``, ``target`` and ``valid`` shapes differ, or ``c_fraction <= 0``.
    """
    if pred.shape != target.shape or valid.shape != pred.shape:
        raise ValueError(f"pred {tuple(pred.shape)}, target {tuple(target.shape)} and valid {tuple(valid.shape)} "
                         f"must have one shape")
    if c_fraction <= 0:
        raise ValueError(f"c_fraction must be > 0, got {c_fraction}")
    with fp32_region(pred):
        p = pred.float()
        t = torch.where(valid, target.float(), p.detach())  # invalid pixels: residual 0, no NaN leaks in
        r = (p - t).abs()
        c = (c_fraction * r.detach().amax()).clamp_min(eps)
        per_pixel = torch.where(r <= c, r, (r * r + c * c) / (2 * c))
        per_pixel = torch.where(valid, per_pixel, torch.zeros_like(per_pixel))
        return per_pixel.sum() / valid.sum().clamp_min(1).to(per_pixel.dtype)
