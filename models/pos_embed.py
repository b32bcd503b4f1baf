"""Fixed 2D sine-cosine positional embeddings (MAE, arXiv 2111.06377, Sec. 3 "Encoder"/"Decoder" and
MultiMAE, arXiv 2204.01678, Sec. 3.1 "positional embeddings"; both follow MoCo v3 / Vaswani et al. 2017).

An embedding is stored as a grid ``[1, D, h, w]`` (the MultiMAE layout) for the patch grid of the
model's configured ``img_size``. For another resolution the stored grid is **interpolated**, not
recomputed, exactly like both reference implementations do (MultiMAE: bicubic in the RGB/depth input
adapters, bilinear in the semseg input adapter and in the output adapters; MAE: bicubic when
fine-tuning at another resolution). Interpolation keeps working when the stored grid came from a
checkpoint.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["build_2d_sincos_pos_embed", "resize_pos_embed", "pos_embed_tokens"]

Order = Literal["row_first", "col_first"]


def build_2d_sincos_pos_embed(h: int, w: int, dim: int, order: Order = "row_first",
                              temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sin-cos positional embedding for an ``h x w`` patch grid.

    Each of the two coordinates (row ``i``, column ``j``, in patch units starting at 0) uses ``dim / 2``
    channels: ``[sin(p * w_k), cos(p * w_k)]`` for ``k = 0 .. dim/4 - 1`` with
    ``w_k = temperature ** (-k / (dim / 4))`` (Vaswani et al. Eq. for PE, applied per axis as in MoCo v3).

    Args:
        h, w: grid height and width in patches (>= 1).
        dim: embedding width ``D``; must be divisible by 4.
        order: which coordinate fills the first ``D/2`` channels. ``"row_first"`` reproduces MultiMAE's
            ``build_2d_sincos_posemb`` (on its square grids the first half encodes the row index),
            ``"col_first"`` reproduces MAE's ``get_2d_sincos_pos_embed`` (first half encodes the column).
        temperature: frequency base (10000 in both papers).

    Returns:
        float32 tensor ``[1, D, h, w]``.

    Raises:
        ValueError: if ``dim % 4 != 0``, ``h < 1``, ``w < 1`` or ``order`` is unknown.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos positional embedding needs dim divisible by 4, got {dim}")
    if h < 1 or w < 1:
        raise ValueError(f"grid must be at least 1x1, got {h}x{w}")
    if order not in ("row_first", "col_first"):
        raise ValueError(f"order must be 'row_first' or 'col_first', got {order!r}")
    quarter = dim // 4
    freqs = 1.0 / (temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # [D/4]
    rows = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w).reshape(-1)  # [h*w]
    cols = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w).reshape(-1)

    def _axis(p: torch.Tensor) -> torch.Tensor:
        ang = p[:, None] * freqs[None, :]  # [h*w, D/4]
        return torch.cat([ang.sin(), ang.cos()], dim=1)  # [h*w, D/2]

    first, second = (rows, cols) if order == "row_first" else (cols, rows)
    emb = torch.cat([_axis(first), _axis(second)], dim=1)  # [h*w, D]
    return emb.to(torch.float32).T.reshape(1, dim, h, w).contiguous()


def resize_pos_embed(grid: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a stored positional-embedding grid to another patch grid.

    Args:
        grid: ``[1, D, h, w]`` stored embedding.
        size: target ``(h', w')`` in patches.
        mode: ``"bicubic"`` or ``"bilinear"`` (``align_corners=False``), as in the references.

    Returns:
        ``[1, D, h', w']``; the input itself (no arithmetic) when the size already matches.

    Raises:
        ValueError: if ``grid`` is not 4-D with batch 1.
    """
    if grid.ndim != 4 or grid.shape[0] != 1:
        raise ValueError(f"expected a [1, D, h, w] grid, got {tuple(grid.shape)}")
    size = (int(size[0]), int(size[1]))
    if tuple(grid.shape[-2:]) == size:
        return grid
    return F.interpolate(grid.float(), size=size, mode=mode, align_corners=False).to(grid.dtype)


def pos_embed_tokens(grid: torch.Tensor, size: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Positional embedding as a token sequence for an ``(h', w')`` grid, row-major (token ``i*w' + j``).

    Args:
        grid: ``[1, D, h, w]`` stored embedding.
        size: target ``(h', w')`` in patches.
        mode: interpolation mode used when the size differs (see :func:`resize_pos_embed`).

    Returns:
        ``[1, h'*w', D]``.
    """
    g = resize_pos_embed(grid, size, mode)
    return g.flatten(2).transpose(1, 2)
