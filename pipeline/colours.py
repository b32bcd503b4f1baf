"""Colour maps for the pictures every job draws (the label job's ``preview.png``, evaluate's reconstructions and
predictions): one depth ramp and one class palette, so a class or a depth looks the same in every picture.

A shared module of ``pipeline/`` (docs/ARCHITECTURE.md, "Import rules"): numpy only, no job imported.
"""

from __future__ import annotations

import numpy as np

#: viridis-like anchors, evenly spaced from 0 to 1 and interpolated linearly per channel
DEPTH_COLORS = np.array([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
                         (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37)], dtype=np.float64)


def colour_ramp(t: np.ndarray) -> np.ndarray:
    """``t`` (any shape, values clipped to [0, 1]) through :data:`DEPTH_COLORS`: uint8 ``[*t.shape, 3]``."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    xs = np.linspace(0.0, 1.0, len(DEPTH_COLORS))
    return np.rint(np.stack([np.interp(t, xs, DEPTH_COLORS[:, c]) for c in range(3)], axis=-1)).astype(np.uint8)


def semseg_palette(num: int) -> np.ndarray:
    """A fixed palette of ``num`` distinct colours, uint8 ``[num, 3]``: colour ``i`` spreads the bits of ``i + 1``
    over the high bits of r, g, b (bit 0 -> r, bit 1 -> g, bit 2 -> b, then the next lower bit), so neighbouring
    class ids get very different colours and no class is black."""
    ids = np.arange(1, num + 1, dtype=np.int64)
    pal = np.zeros((num, 3), dtype=np.int64)
    for bit in range(8):
        for c in range(3):
            pal[:, c] |= ((ids >> (3 * bit + c)) & 1) << (7 - bit)
    return pal.astype(np.uint8)


__all__ = ["DEPTH_COLORS", "colour_ramp", "semseg_palette"]
