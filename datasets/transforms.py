"""Multi-modal transforms: one random-resized crop and flip shared by RGB, depth and semseg, from the raw
shard members to compact tensors; normalisation happens on the training device.

MultiMAE (arXiv 2204.01678, Sec. 3.3 / App. A.1) pre-trains with a random-resized crop (scale 0.2–1.0)
and a horizontal flip applied identically to every modality; semantic maps are fed at stride 4. The crop
box is the standard Inception-style one (as torchvision's ``RandomResizedCrop.get_params``); the
randomness comes from an explicit ``numpy`` generator so a sample's augmentation is a pure function of
``(seed, key, epoch)`` — needed for exact resume.

Cost model (the loader must feed a GPU): every member is decoded as integers and cropped before anything
is converted or resized, and the batch leaves the loader compact — RGB uint8, depth as its 16-bit codes
plus a per-sample range, semseg as uint8/int16 ids — so host-to-device traffic is ~1/4 of float32;
:func:`to_model_inputs` converts and ImageNet-normalises on the device. JPEGs are decoded by
libjpeg-turbo (``torchvision.io.decode_jpeg``), or by PIL in JPEG *draft* mode (the decoder's own DCT
down-scaling by 2, 4 or 8) when the crop is at least twice the output size. Interpolation (pixel-exact,
all modalities sampling the same box): RGB bicubic with antialias (as the MultiMAE/MAE reference
pipelines), depth bilinear with antialias, semseg ``nearest-exact`` (each output pixel takes the label
under its centre).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable

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


DEPTH_MAX_CODE = 65535  # as datasets/shards.py: value = code / 65535 * depth_range


def _jpeg_draft_factor(crop_h: int, crop_w: int, size: int) -> int:
    """The largest JPEG DCT scale (1, 2, 4 or 8) that keeps the crop at least ``size`` px on both sides."""
    k = 1
    while k < 8 and min(crop_h, crop_w) >= 2 * k * size:
        k *= 2
    return k


_TV_IO_PATCH = None


def _quiet_torchvision_io() -> None:
    global _TV_IO_PATCH
    if _TV_IO_PATCH is None:  # once per process: torchvision warns on every decode call otherwise
        from polymae.patches import silence_torchvision_io_deprecation

        _TV_IO_PATCH = silence_torchvision_io_deprecation()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    _quiet_torchvision_io()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb_crop(data: bytes, box: tuple[int, int, int, int], size: int, draft: bool = True,
                    full_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode a JPEG (or any image PIL reads), crop ``box = (top, left, h, w)`` (pixels of the full image) and
    resize it to ``size x size`` with antialiased bicubic interpolation, staying in uint8. ``full_hw``: the
    image's ``(height, width)`` when already known (else read from the header).

    Returns:
        uint8 ``[3, size, size]``.
    Raises:
        RuntimeError / OSError / ValueError: undecodable bytes (the loader counts the sample as corrupt).
    """
    top, left, h, w = box
    k = _jpeg_draft_factor(h, w, size) if draft else 1
    if k > 1 or data[:2] != b"\xff\xd8":  # draft-mode JPEG, or not a JPEG: PIL
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        H, W = full_hw or (img.height, img.width)
        if k > 1:
            img.draft("RGB", (math.ceil(W / k), math.ceil(H / k)))
        sx, sy = img.size[0] / W, img.size[1] / H
        img = img.convert("RGB")
        out = img.resize((size, size), Image.BICUBIC,
                         box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
        return torch.from_numpy(np.array(out)).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_jpeg

    full = decode_jpeg(_bytes_tensor(data), mode=ImageReadMode.RGB)
    crop = full[:, top:top + h, left:left + w]
    return F.interpolate(crop[None], size=(size, size), mode="bicubic", align_corners=False, antialias=True)[0]


def image_size(data: bytes) -> tuple[int, int]:
    """``(height, width)`` in pixels of an encoded image, from its header only (nothing is decoded).

    Raises:
        PIL.UnidentifiedImageError / OSError: not an image.
    """
    from PIL import Image

    w, h = Image.open(io.BytesIO(data)).size
    return h, w


def decode_png_array(data: bytes) -> torch.Tensor:
    """A 1-channel 8- or 16-bit PNG as a ``[H, W]`` uint8 or uint16 tensor (libpng via torchvision)."""
    from torchvision.io import ImageReadMode, decode_png

    return decode_png(_bytes_tensor(data), mode=ImageReadMode.UNCHANGED)[0]


def resize_depth_codes(codes: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop 16-bit depth codes ``[H, W]`` to ``box`` and resize to ``size`` (bilinear, antialiased), rounding
    back to codes (error <= half a code, as the storage quantisation). Only the crop is converted to float.

    Returns:
        uint16 ``[1, size, size]``.
    """
    top, left, h, w = box
    crop = codes[top:top + h, left:left + w].to(torch.float32)
    out = F.interpolate(crop[None, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0].round_().clamp_(0, DEPTH_MAX_CODE).to(torch.uint16)


def crop_semseg_nearest(ids: torch.Tensor, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """Crop a label map ``[H, W]`` to ``box`` and sample it at ``size x size`` with ``nearest-exact``: output
    pixel ``(i, j)`` takes the label under its centre, source row ``top + floor((i + 0.5) * h / size)``.

    Returns:
        ``[size, size]`` of the input dtype (no label is ever interpolated).
    """
    top, left, h, w = box
    rows = top + ((torch.arange(size, dtype=torch.float64) + 0.5) * (h / size)).floor().long().clamp_(max=h - 1)
    cols = left + ((torch.arange(size, dtype=torch.float64) + 0.5) * (w / size)).floor().long().clamp_(max=w - 1)
    return ids[rows[:, None], cols[None, :]]


@dataclass
class MultiModalAugment:
    """Shared crop + flip + resize of one raw shard sample (member name -> bytes, see datasets/shards.py).

    Args:
        img_size: output side in pixels (square); semseg comes out at ``img_size / 4``.
        scale: crop area fraction range; ``None`` means the deterministic central crop (evaluation).
        ratio: crop aspect ratio range.
        hflip: flip probability.
        jpeg_draft: let the JPEG decoder down-scale by 2/4/8 when the crop is at least twice ``img_size``.
        rgb_decode: ``"cpu"`` decodes the JPEG here (in the loader worker); ``"device"`` leaves it to
            :func:`to_model_inputs`, which decodes the batch on the training device (nvJPEG on a GPU,
            ``torchvision.io.decode_jpeg(device="cuda")``) and crops/resizes it there: the sample then carries
            ``rgb_jpeg`` (uint8 ``[n_bytes]``), ``rgb_box`` (int64 ``[4]``: top, left, h, w) and ``rgb_flip``.
    Output of ``__call__``: ``key``; ``rgb`` uint8 ``[3, S, S]``; ``depth`` uint16 ``[1, S, S]`` codes and
    ``depth_range`` (float, teacher units per 65535 codes); ``semseg`` ``[S/4, S/4]`` ids (uint8, or int32
    for label sets over 255 classes, ignore kept as stored); ``cls`` when the sample has one.
    Raises:
        KeyError: a sample without ``rgb.jpg`` or ``json``; decoder errors for corrupt members (the loader
        counts the sample as corrupt and goes on).
    """

    img_size: int = 224
    scale: tuple[float, float] | None = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jpeg_draft: bool = True
    rgb_decode: str = "cpu"

    def box(self, height: int, width: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
        """``((top, left, h, w), flip)`` for an image of ``height x width`` pixels."""
        if self.scale is None:
            return center_params(height, width), False
        box = rrc_params(height, width, tuple(self.scale), tuple(self.ratio), rng)
        return box, bool(rng.random() < self.hflip)

    def __call__(self, raw: dict[str, Any], rng: np.random.Generator) -> dict:
        from polymae.datasets import shards

        S = self.img_size
        meta = json.loads(raw[shards.META])
        rgb_bytes = raw[shards.RGB]
        H, W = image_size(rgb_bytes)
        box, flip = self.box(H, W, rng)
        out: dict = {"key": raw["__key__"]}
        if self.rgb_decode == "device":
            out.update(rgb_jpeg=_bytes_tensor(rgb_bytes), rgb_box=torch.tensor(box), rgb_flip=flip, rgb_size=S)
        else:
            out["rgb"] = decode_rgb_crop(rgb_bytes, box, S, self.jpeg_draft, (H, W))
        if shards.DEPTH in raw:
            codes = decode_png_array(raw[shards.DEPTH])
            _check_size("depth", codes, H, W)
            out["depth"] = resize_depth_codes(codes, box, S)
            out["depth_range"] = float(meta["depth"]["depth_range"])
        if shards.SEMSEG in raw:
            ids = decode_png_array(raw[shards.SEMSEG])
            _check_size("semseg", ids, H, W)
            if ids.dtype != torch.uint8:  # label sets over 255 classes: 16-bit ids
                ids = ids.to(torch.int32)
            out["semseg"] = crop_semseg_nearest(ids, box, S // SEMSEG_STRIDE)
        if flip:
            for m in ("rgb", "depth", "semseg"):
                if m in out:
                    out[m] = out[m].flip(-1)
        if shards.CLS in raw:
            out["cls"] = int(raw[shards.CLS])
        return out


def _check_size(member: str, arr: torch.Tensor, height: int, width: int) -> None:
    if tuple(arr.shape) != (height, width):
        raise ValueError(f"{member} is {tuple(arr.shape)}, the rgb is {(height, width)}")


def collate(samples: list[dict]) -> dict:
    """Stack augmented samples into a compact batch: ``rgb`` uint8 ``[B, 3, S, S]``, ``depth`` uint16
    ``[B, 1, S, S]`` with ``depth_range`` float32 ``[B]``, ``semseg`` ``[B, S/4, S/4]``, ``cls`` int64 ``[B]``
    (when every sample has one), ``key`` list[str]."""
    batch: dict = {"key": [s["key"] for s in samples]}
    for m in ("rgb", "depth", "semseg"):
        if all(m in s for s in samples):
            batch[m] = torch.stack([s[m] for s in samples])
    if "depth" in batch:
        batch["depth_range"] = torch.tensor([s["depth_range"] for s in samples], dtype=torch.float32)
    if all("rgb_jpeg" in s for s in samples):  # rgb_decode="device": bytes and boxes, decoded by to_model_inputs
        batch["rgb_jpeg"] = [s["rgb_jpeg"] for s in samples]
        batch["rgb_box"] = torch.stack([s["rgb_box"] for s in samples])
        batch["rgb_flip"] = torch.tensor([s["rgb_flip"] for s in samples], dtype=torch.bool)
        batch["rgb_size"] = samples[0]["rgb_size"]
    if all("cls" in s for s in samples):
        batch["cls"] = torch.tensor([s["cls"] for s in samples], dtype=torch.int64)
    return batch


def to_model_inputs(batch: dict, device: torch.device | str = "cpu", modalities: Iterable[str] | None = None,
                    dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Move a compact batch to ``device`` and convert it there (no host-side float work, asynchronous copies
    from pinned memory):

    * ``rgb``: ``[B, 3, S, S]`` ``dtype``, ``(x / 255 - mean) / std`` with the ImageNet mean/std;
    * ``depth``: ``[B, 1, S, S]`` ``dtype`` in teacher units, ``code / 65535 * depth_range``;
    * ``semseg``: ``[B, S/4, S/4]`` int64 class ids (ignore as stored).

    ``modalities``: which of them to return (default: all present). A batch built with ``rgb_decode="device"``
    carries JPEG bytes instead of ``rgb``: they are decoded here, on ``device`` (nvJPEG on a GPU), cropped and
    resized exactly as the loader would (:func:`decode_rgb_batch_on_device`).
    """
    device = torch.device(device)
    has_rgb = "rgb" in batch or "rgb_jpeg" in batch
    mods = [m for m in ("rgb", "depth", "semseg") if m in batch or (m == "rgb" and has_rgb)] \
        if modalities is None else list(modalities)
    out: dict[str, torch.Tensor] = {}
    for m in mods:
        x = decode_rgb_batch_on_device(batch, device) if m == "rgb" and "rgb" not in batch \
            else batch[m].to(device, non_blocking=True)
        if m == "rgb":
            mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
            out[m] = (x.to(dtype) / 255.0 - mean) / std
        elif m == "depth":
            rng = batch["depth_range"].to(device, non_blocking=True).to(dtype).view(-1, 1, 1, 1)
            out[m] = x.to(torch.int32).to(dtype) * (rng / DEPTH_MAX_CODE)
        else:
            out[m] = x.to(torch.int64)
    return out


def decode_rgb_batch_on_device(batch: dict, device: torch.device | str, size: int | None = None) -> torch.Tensor:
    """Decode a batch's ``rgb_jpeg`` on ``device`` (``torchvision.io.decode_jpeg(list, device=...)``: nvJPEG on a
    GPU, libjpeg-turbo on the CPU), crop each to its ``rgb_box``, resize to ``size`` (default: the batch's
    ``rgb_size``) with antialiased bicubic interpolation and apply ``rgb_flip`` — the same operations, in the same
    order, as :func:`decode_rgb_crop` without draft mode, so both paths give identical pixels on the CPU.

    Returns:
        uint8 ``[B, 3, size, size]`` on ``device``.
    Raises:
        ValueError: no size known (``size`` not given and the batch has no ``rgb_size``).
        RuntimeError: undecodable bytes (a decoding error on the device fails the step: it is not a per-sample skip).
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    size = size or batch.get("rgb_size")
    if not size:
        raise ValueError("decode_rgb_batch_on_device needs the output size (size=...)")
    _quiet_torchvision_io()
    images = decode_jpeg(list(batch["rgb_jpeg"]), mode=ImageReadMode.RGB, device=torch.device(device))
    out = []
    for img, box, flip in zip(images, batch["rgb_box"].tolist(), batch["rgb_flip"].tolist()):
        top, left, h, w = box
        x = F.interpolate(img[None, :, top:top + h, left:left + w], size=(size, size), mode="bicubic",
                          align_corners=False, antialias=True)[0]
        out.append(x.flip(-1) if flip else x)
    return torch.stack(out)
