"""Multi-modal transforms: one random-resized crop and flip shared by RGB, depth and semseg.

MultiMAE (arXiv 2204.01678, Sec. 3.3 / App. A.1) pre-trains with a random-resized crop (scale
0.2–1.0) and a horizontal flip applied identically to every modality; semantic maps are resized with
nearest neighbour and fed at stride 4. Geometry uses torchvision's ``RandomResizedCrop.get_params`` so
the crop box is the standard one; the randomness comes from an explicit ``numpy`` generator so a
sample's augmentation is a pure function of ``(seed, key, epoch)`` — needed for exact resume.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SEMSEG_STRIDE = 4


def sample_rng(seed: int, key: str, epoch: int) -> np.random.Generator:
    """A generator determined by ``(seed, key, epoch)`` only."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(h, "little"))


def rrc_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Random-resized-crop box ``(top, left, h, w)`` in pixels (Inception-style, as torchvision)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: central crop with the ratio clamped
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_params(height: int, width: int) -> tuple[int, int, int, int]:
    """Largest central square ``(top, left, h, w)``: the deterministic evaluation crop."""
    s = min(height, width)
    return (height - s) // 2, (width - s) // 2, s, s


@dataclass
class MultiModalAugment:
    """Shared crop + flip + resize for one decoded sample.

    Args:
        img_size: output side in pixels (square); semseg comes out at ``img_size / 4``.
        scale: crop area fraction range; ``None`` means the deterministic central crop (evaluation).
        ratio: crop aspect ratio range.
        hflip: flip probability.
    Output of ``__call__``: ``rgb`` float ``[3, S, S]`` ImageNet-normalised; ``depth`` float
    ``[1, S, S]`` (teacher units); ``semseg`` int64 ``[S/4, S/4]`` with ignore kept as stored.
    Raises:
        ValueError: ``img_size`` not a multiple of 16 (patch grid) — checked in the config.
    """

    img_size: int = 224
    scale: tuple[float, float] | None = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5

    def __call__(self, sample: dict, rng: np.random.Generator) -> dict:
        rgb = sample["rgb"]
        H, W = rgb.shape[:2]
        if self.scale is None:
            top, left, h, w = center_params(H, W)
            flip = False
        else:
            top, left, h, w = rrc_params(H, W, tuple(self.scale), tuple(self.ratio), rng)
            flip = bool(rng.random() < self.hflip)
        S = self.img_size
        out: dict = {"key": sample["key"]}
        x = torch.from_numpy(np.ascontiguousarray(rgb[top:top + h, left:left + w])).permute(2, 0, 1).float() / 255.0
        x = F.interpolate(x[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = (x - mean) / std
        out["rgb"] = x.flip(-1) if flip else x
        if "depth" in sample:
            d = torch.from_numpy(np.ascontiguousarray(sample["depth"][top:top + h, left:left + w]))[None, None]
            d = F.interpolate(d, size=(S, S), mode="bilinear", align_corners=False)[0]
            out["depth"] = d.flip(-1) if flip else d
        if "semseg" in sample:
            s = torch.from_numpy(np.ascontiguousarray(sample["semseg"][top:top + h, left:left + w]))[None, None].float()
            s = F.interpolate(s, size=(S // SEMSEG_STRIDE, S // SEMSEG_STRIDE), mode="nearest")[0, 0].long()
            out["semseg"] = s.flip(-1) if flip else s
        if sample.get("cls") is not None:
            out["cls"] = torch.tensor(sample["cls"])
        return out


def collate(samples: list[dict]) -> dict:
    """Stack a list of augmented samples into a batch: ``rgb [B,3,S,S]``, ``depth [B,1,S,S]``,
    ``semseg [B,S/4,S/4]``, ``key`` list[str]."""
    batch: dict = {"key": [s["key"] for s in samples]}
    for m in ("rgb", "depth", "semseg"):
        if all(m in s for s in samples):
            batch[m] = torch.stack([s[m] for s in samples])
    return batch
