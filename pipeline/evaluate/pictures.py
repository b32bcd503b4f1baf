"""Reconstruction pictures of a MultiMAE / MAE checkpoint, as the MultiMAE demo shows them (MultiMAE, Bachmann et al.
2022, Fig. 1 and Sec. 3; MAE, He et al. 2021, Fig. 2).

For one image, a grid with one column per reconstructed modality (rgb, depth, semseg, in the model's output order)
and three rows:

1. **masked input** — the modality's input with every masked patch grey (:data:`GREY`); a modality that is not
   encoded is entirely grey;
2. **prediction** — the model's prediction pasted into the masked patches, the visible patches showing the input
   (the model is scored on the masked ones only);
3. **target** — the whole input.

RGB is de-normalised (ImageNet mean/std, ``datasets/transforms.py``); a per-patch-normalised RGB prediction
(``norm_pix_loss``, MAE's default) is mapped back to pixels with each target patch's mean and standard deviation,
as MAE's visualisation does. Depth is shown standardised (the model's target space, ``models/losses.py``
``standardize_depth``) and colour-mapped (:func:`colorize_depth`) with the range of the target's 2nd..98th
percentile, the same range for all three rows. Semseg class ids go through a fixed palette (:func:`semseg_palette`;
the ignore index black), upsampled x4 (nearest) to the image size. Panels are :data:`GAP` px apart on white.

The evaluation calls :func:`save_reconstruction_pictures` with a batch of held-out images; pictures land in
``{output}/pictures/{name}_{i}.png`` and TensorBoard through ``EvalContext.save_picture`` (``results.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from polymae.pipeline.colours import colour_ramp, semseg_palette
import torch

from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from polymae.models.losses import patchify, standardize_depth, unpatchify

#: grey of a masked patch (uint8 per channel)
GREY = 128
#: pixels between panels (and around them), white
GAP = 2
#: modalities a picture can show, in this order when the model has them
PICTURE_MODALITIES = ("rgb", "depth", "semseg")
#: viridis-like anchors (evenly spaced from 0 to 1), interpolated linearly per channel
SEMSEG_STRIDE = 4


def denormalize_rgb(x: torch.Tensor) -> np.ndarray:
    """ImageNet-normalised RGB ``[B, 3, H, W]`` (float) as uint8 ``[B, H, W, 3]`` (clipped to 0..255)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
    img = (x.detach().float().cpu() * std + mean).clamp(0, 1) * 255.0
    return img.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def colorize_depth(d: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A depth map ``[..., H, W]`` (any real values) colour-mapped between ``lo`` and ``hi`` (clipped) through
    ``pipeline/colours.py`` ``DEPTH_COLORS``: uint8 ``[..., H, W, 3]``."""
    t = (np.asarray(d, dtype=np.float64) - lo) / (hi - lo) if hi > lo else np.zeros(np.shape(d))
    return colour_ramp(t)


def colorize_semseg(ids: np.ndarray, num_classes: int, ignore: int | None = None) -> np.ndarray:
    """Class ids ``[..., h, w]`` as uint8 ``[..., h, w, 3]`` through :func:`semseg_palette`; ``ignore`` and ids
    outside ``0..num_classes-1`` black."""
    ids = np.asarray(ids, dtype=np.int64)
    pal = np.concatenate([semseg_palette(num_classes), np.zeros((1, 3), dtype=np.uint8)])
    bad = (ids < 0) | (ids >= num_classes) | ((ids == ignore) if ignore is not None else False)
    return pal[np.where(bad, num_classes, ids)]


def mask_pixels(mask: torch.Tensor, grid: tuple[int, int], cell: int) -> torch.Tensor:
    """Token masks ``[B, gh*gw]`` (True = masked, row-major) as pixel masks ``[B, gh*cell, gw*cell]``."""
    b = mask.shape[0]
    m = mask.detach().cpu().bool().view(b, grid[0], grid[1])
    return m.repeat_interleave(cell, 1).repeat_interleave(cell, 2)


def _grey(img: np.ndarray, masked: torch.Tensor) -> np.ndarray:
    out = img.copy()
    out[masked.numpy()] = GREY
    return out


def _rgb_rows(model: Any, target: torch.Tensor, pred: torch.Tensor, pix: torch.Tensor, grid) -> tuple:
    """(masked input, prediction, target) uint8 ``[B, H, W, 3]`` of rgb."""
    p = model.patch_size
    if getattr(model, "norm_pix_loss", False):  # prediction in per-patch-normalised space: the target's statistics
        t = patchify(target, p)
        std = torch.sqrt(t.var(dim=-1, keepdim=True) + 1e-6)
        pred = unpatchify(patchify(pred, p) * std + t.mean(dim=-1, keepdim=True), grid, p, 3)
    both = torch.where(pix[:, None], pred, target)
    tgt = denormalize_rgb(target)
    return _grey(tgt, pix), denormalize_rgb(both), tgt


def _depth_rows(model: Any, target: torch.Tensor, pred: torch.Tensor, pix: torch.Tensor) -> tuple:
    """(masked input, prediction, target) uint8 ``[B, H, W, 3]`` of depth, in standardised-depth space."""
    if getattr(model, "do_standardize_depth", True):
        target = standardize_depth(target.float())
    both = torch.where(pix[:, None], pred, target)[:, 0].numpy()
    tgt = target[:, 0].numpy()
    rows = [[], [], []]
    for i in range(tgt.shape[0]):
        lo, hi = np.percentile(tgt[i], [2.0, 98.0])
        img = colorize_depth(tgt[i], lo, hi)
        rows[0].append(_grey(img, pix[i]))
        rows[1].append(colorize_depth(both[i], lo, hi))
        rows[2].append(img)
    return tuple(np.stack(r) for r in rows)


def _semseg_rows(model: Any, target: torch.Tensor, logits: torch.Tensor, pix: torch.Tensor) -> tuple:
    """(masked input, prediction, target) uint8 ``[B, H, W, 3]`` of semseg (stride-4 maps upsampled x4)."""
    n = int(model.config.semseg_num_classes)
    ignore = getattr(model, "semseg_ignore_index", None)
    ids = torch.where(pix, logits.argmax(1), target).numpy()
    up = SEMSEG_STRIDE

    def big(a: np.ndarray) -> np.ndarray:
        return a.repeat(up, axis=1).repeat(up, axis=2)

    tgt = colorize_semseg(target.numpy(), n, ignore)
    return big(_grey(tgt, pix)), big(colorize_semseg(ids, n, ignore)), big(tgt)


@torch.no_grad()
def reconstruction_panels(model: Any, batch: Mapping[str, torch.Tensor],
                          masks: Mapping[str, torch.Tensor] | None = None, num_visible: int | None = None,
                          generator: torch.Generator | None = None) -> dict[str, tuple[np.ndarray, ...]]:
    """The three rows of every shown modality for a batch.

    Args:
        model: a :class:`~polymae.models.multimae.MultiMAE` or MAE (eval mode).
        batch: model inputs: ``rgb`` float ``[B, 3, H, W]`` ImageNet-normalised, ``depth`` float ``[B, 1, H, W]``
            raw, ``semseg`` int64 ``[B, H/4, W/4]`` (those the model has; others ignored).
        masks: ``{modality: bool [B, (H/p)*(W/p)]}`` (True = masked) for the encoded modalities; None = drawn by the
            model (``num_visible``, ``generator``; MAE: its mask ratio).
    Returns:
        ``{modality: (masked input, prediction, target)}``, each uint8 ``[B, H, W, 3]``, for the modalities of
        :data:`PICTURE_MODALITIES` that the model outputs and ``batch`` holds, in the model's output order.
    Raises:
        ValueError: the batch holds none of them, or invalid inputs/masks (from the model).
    """
    wanted = set(model.in_modalities) | set(model.out_modalities)
    inputs = {m: batch[m] for m in PICTURE_MODALITIES if m in batch and m in wanted}
    shown = [m for m in model.out_modalities if m in PICTURE_MODALITIES and m in inputs]
    if not shown:
        raise ValueError(f"the batch holds none of the model's outputs {list(model.out_modalities)}")
    if masks is not None:
        out = model(inputs, masks=masks)
    elif getattr(model, "mask_ratio", None) is not None:
        out = model(inputs, generator=generator)
    else:
        out = model(inputs, num_visible=num_visible, generator=generator)
    p = model.patch_size
    b = next(iter(inputs.values())).shape[0]
    if "rgb" in inputs or "depth" in inputs:
        h, w = inputs["rgb" if "rgb" in inputs else "depth"].shape[-2:]
    else:
        h, w = (s * SEMSEG_STRIDE for s in inputs["semseg"].shape[-2:])
    grid = (h // p, w // p)
    panels = {}
    for m in shown:
        mk = out.masks.get(m)
        mk = torch.ones(b, grid[0] * grid[1], dtype=torch.bool) if mk is None else mk.cpu()
        pred, target = out.preds[m].detach().float().cpu(), inputs[m].detach().cpu()
        if m == "rgb":
            panels[m] = _rgb_rows(model, target.float(), pred, mask_pixels(mk, grid, p), grid)
        elif m == "depth":
            panels[m] = _depth_rows(model, target.float(), pred, mask_pixels(mk, grid, p))
        else:
            panels[m] = _semseg_rows(model, target.long(), pred, mask_pixels(mk, grid, p // SEMSEG_STRIDE))
    return panels


def compose_picture(panels: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], index: int = 0,
                    gap: int = GAP) -> np.ndarray:
    """Image ``index`` of :func:`reconstruction_panels` as one picture: a column per modality, rows masked input /
    prediction / target, ``gap`` white px between and around panels: uint8 ``[3H + 4 gap, M W + (M + 1) gap, 3]``."""
    cols = list(panels.values())
    h, w = cols[0][0].shape[1:3]
    out = np.full((3 * h + 4 * gap, len(cols) * w + (len(cols) + 1) * gap, 3), 255, dtype=np.uint8)
    for c, rows in enumerate(cols):
        for r, img in enumerate(rows):
            y, x = gap + r * (h + gap), gap + c * (w + gap)
            out[y:y + h, x:x + w] = img[index]
    return out


def reconstruction_picture(model: Any, batch: Mapping[str, torch.Tensor],
                           masks: Mapping[str, torch.Tensor] | None = None, index: int = 0,
                           num_visible: int | None = None, generator: torch.Generator | None = None) -> np.ndarray:
    """The MultiMAE-demo picture of image ``index`` of ``batch`` (module docstring): uint8 ``[3H + 4 GAP,
    M W + (M + 1) GAP, 3]`` for M shown modalities. Arguments as :func:`reconstruction_panels`.

    Raises:
        ValueError: as :func:`reconstruction_panels`; IndexError: ``index`` outside the batch.
    """
    panels = reconstruction_panels(model, batch, masks, num_visible, generator)
    if not 0 <= index < next(iter(panels.values()))[0].shape[0]:
        raise IndexError(f"index {index} outside the batch")
    return compose_picture(panels, index)


def save_reconstruction_pictures(ctx: Any, model: Any, batch: Mapping[str, torch.Tensor],
                                 masks: Mapping[str, torch.Tensor] | None = None, num_visible: int | None = None,
                                 generator: torch.Generator | None = None, name: str = "reconstruction",
                                 max_images: int = 4) -> list[str]:
    """Save the pictures of the first ``max_images`` images of ``batch`` through ``ctx.save_picture``
    (``results.py`` ``EvalContext``: ``{output}/pictures/{name}_{i}.png`` + TensorBoard). Returns their URLs.

    Raises:
        ValueError: as :func:`reconstruction_panels`, or ``max_images < 1``.
    """
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    n = min(max_images, next(iter(batch.values())).shape[0])
    sub = {k: v[:n] for k, v in batch.items() if torch.is_tensor(v)}
    sub_masks = {k: v[:n] for k, v in masks.items()} if masks is not None else None
    panels = reconstruction_panels(model, sub, sub_masks, num_visible, generator)
    return [ctx.save_picture(f"{name}_{i}", compose_picture(panels, i)) for i in range(n)]


__all__ = ["reconstruction_panels", "reconstruction_picture", "compose_picture", "save_reconstruction_pictures",
           "denormalize_rgb", "colorize_depth", "colorize_semseg", "semseg_palette", "mask_pixels", "GREY", "GAP"]
