"""Dense-prediction folders: images with label PNGs of the same stem, for the ``semseg`` and ``depth`` protocols
of ``polymae evaluate`` (``pipeline/evaluate/dense.py``).

Layouts (local paths or any fsspec URL; ``split`` is ``"train"`` or ``"val"``):

**ADE20K** (``layout="ade20k"``, the ADEChallengeData2016 release)::

    {root}/images/training/{stem}.jpg          {root}/annotations/training/{stem}.png
    {root}/images/validation/{stem}.jpg        {root}/annotations/validation/{stem}.png

``train`` reads ``training``, ``val`` reads ``validation``. Annotations are 8-bit class ids: 0 = "other" (not
a class), 1..150 the classes. With ``reduce_zero_label`` (the ADE20K protocol, the default for this layout) ids
are shifted by -1 and 0 becomes ``ignore_index`` (255), so the model predicts classes 0..149.

**NYUv2** (``layout="nyuv2"``, the "task folder" layout MultiMAE fine-tunes on)::

    {root}/{train,val|test}/rgb/{stem}.png       RGB image (.png/.jpg/.jpeg)
    {root}/{train,val|test}/semseg/{stem}.png    class ids (8- or 16-bit); ignore_index (255) = unlabelled
    {root}/{train,val|test}/depth/{stem}.png     16-bit depth in millimetres: metres = value / 1000; 0 = no
                                                 measurement (invalid)

``val`` reads ``{root}/val``, or ``{root}/test`` when there is no ``val`` folder. The unit (``units_per_metre``,
1000) and the cap (``max_depth``, 10 m for NYU) are arguments: values beyond the cap are invalid too. With
``reduce_zero_label`` (MultiMAE's 40-class NYUv2 setting: 0 = unlabelled, 1..40) ids shift as for ADE20K.

**Pairing** is by file stem. Every image must have a partner for every modality read, and every label file an
image: a missing partner is a :class:`FileNotFoundError` naming the file, raised when the split is listed (before
any training), because a broken dataset is the user's to fix, not a per-image problem to skip over. A label
whose size differs from its image raises :class:`ValueError` naming it when it is read.

**Samples** (:class:`DenseFolder`): ``rgb`` float ``[3, S, S]`` ImageNet-normalised; ``semseg`` int64 class ids;
``depth`` float32 metres (0 = invalid). Training samples (``semseg`` ``[S, S]``, ``depth`` ``[1, S, S]``) are
augmented (scale jitter: the short side resized to ``S × s``, ``s ~ U(scale)``, zero/ignore padding to at least
``S``, a random ``S × S`` crop, a horizontal flip; no colour jitter), with every random choice a function of
``(seed, epoch, index)``. Evaluation samples are the whole image resized to ``S × S`` (bilinear, antialiased)
for the model, with the targets at the label's own resolution (``semseg`` ``[H, W]``, ``depth`` ``[H, W]``), so
that a prediction resized back to the label scores every labelled pixel of every image; ``depth_in``
``[1, S, S]`` (nearest) is the depth given as an input.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


__all__ = ["LAYOUTS", "DenseSample", "modality_dir", "list_dense_samples", "read_rgb", "read_semseg",
           "read_depth", "DenseFolder", "collate_dense", "IMAGE_EXTS"]

#: the supported folder layouts
LAYOUTS = ("ade20k", "nyuv2")
#: image file suffixes, in order of preference when a stem has several
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_ADE_SPLITS = {"train": "training", "val": "validation"}
_ADE_DIRS = {"rgb": "images", "semseg": "annotations"}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DenseSample:
    """One image and its label files: ``stem`` and ``files`` ``{modality: path or URL}`` (``rgb``, ``semseg``,
    ``depth``)."""

    stem: str
    files: dict[str, str] = field(default_factory=dict)


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def modality_dir(root: str, layout: str, split: str, modality: str) -> str:
    """The folder of ``modality`` (``rgb``, ``semseg``, ``depth``) of ``split`` (``train``/``val``) in ``layout``
    (module docstring).

    Raises:
        ValueError: unknown layout, split or modality (ADE20K has no depth);
        FileNotFoundError: NYUv2 ``val`` with neither a ``val`` nor a ``test`` folder.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if layout == "ade20k":
        if modality not in _ADE_DIRS:
            raise ValueError(f"the ade20k layout has no {modality!r} files (only {sorted(_ADE_DIRS)})")
        return _join(root, _ADE_DIRS[modality], _ADE_SPLITS[split])
    if layout != "nyuv2":
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if modality not in ("rgb", "semseg", "depth"):
        raise ValueError(f"unknown modality {modality!r}")
    from polymae.datasets import storage

    name = split
    if split == "val":
        name = "val" if storage.exists(_join(root, "val")) else "test"
        if not storage.exists(_join(root, name)):
            raise FileNotFoundError(f"{root}: no val/ or test/ folder (NYUv2 layout)")
    return _join(root, name, modality)


def _list_files(folder: str, exts: Sequence[str]) -> dict[str, str]:
    """``{stem: path}`` of the files in ``folder`` with one of ``exts`` (the first of ``exts`` wins for a stem)."""
    from polymae.datasets import storage

    if not storage.exists(folder):
        raise FileNotFoundError(f"folder {folder} does not exist")
    out: dict[str, str] = {}
    for p in storage.list_files(folder, tuple(exts), recursive=False):
        stem, ext = os.path.splitext(p.rsplit("/", 1)[-1])
        prev = out.get(stem)
        if prev is None or exts.index(ext.lower()) < exts.index(os.path.splitext(prev)[1].lower()):
            out[stem] = p
    return out


def list_dense_samples(root: str, layout: str, split: str, modalities: Sequence[str]) -> list[DenseSample]:
    """The samples of ``split``, sorted by stem, with a file for each of ``modalities`` (``rgb`` first).

    Raises:
        FileNotFoundError: a missing folder, an empty split, or a missing partner (names the file that has none);
        ValueError: as :func:`modality_dir`.
    """
    found = {m: _list_files(modality_dir(root, layout, split, m), IMAGE_EXTS if m == "rgb" else (".png",))
             for m in modalities}
    images = found["rgb"]
    for m in modalities:
        if m == "rgb":
            continue
        for stem, path in images.items():
            if stem not in found[m]:
                raise FileNotFoundError(f"{path} has no {m} partner {modality_dir(root, layout, split, m)}/{stem}.png")
        for stem, path in found[m].items():
            if stem not in images:
                raise FileNotFoundError(f"{path} has no image {modality_dir(root, layout, split, 'rgb')}/{stem}"
                                        f"{{{','.join(IMAGE_EXTS)}}}")
    if not images:
        raise FileNotFoundError(f"no images in {modality_dir(root, layout, split, 'rgb')}")
    return [DenseSample(stem, {m: found[m][stem] for m in modalities}) for stem in sorted(images)]


def _open_image(path: str):
    from PIL import Image

    from polymae.datasets import storage

    return Image.open(io.BytesIO(storage.read_bytes(path)))


def read_rgb(path: str) -> np.ndarray:
    """An image file as uint8 ``[H, W, 3]`` RGB."""
    return np.asarray(_open_image(path).convert("RGB"))


def read_semseg(path: str, reduce_zero_label: bool = False, ignore_index: int = 255) -> np.ndarray:
    """A label PNG as int64 ``[H, W]`` class ids; with ``reduce_zero_label`` 0 becomes ``ignore_index`` and every
    other id ``id - 1`` (an id equal to ``ignore_index`` stays ignored).

    Raises:
        ValueError: a colour (RGB) label image.
    """
    img = _open_image(path)
    if img.mode not in ("L", "P", "I", "I;16", "I;16B", "1"):
        raise ValueError(f"{path}: label PNG mode {img.mode!r} is not a single-channel class-id image")
    ids = np.asarray(img).astype(np.int64)
    if reduce_zero_label:
        ignored = (ids == 0) | (ids == ignore_index)
        ids = np.where(ignored, ignore_index, ids - 1)
    return ids


def read_depth(path: str, units_per_metre: float = 1000.0, max_depth: float = 0.0) -> np.ndarray:
    """A 16-bit depth PNG as float32 ``[H, W]`` metres (``value / units_per_metre``); 0 = invalid, and values
    beyond ``max_depth`` (when > 0) are set to 0 (invalid) too.

    Raises:
        ValueError: a colour (RGB) depth image.
    """
    img = _open_image(path)
    if img.mode not in ("L", "I", "I;16", "I;16B", "F"):
        raise ValueError(f"{path}: depth PNG mode {img.mode!r} is not single-channel 16-bit")
    d = np.asarray(img).astype(np.float32) / float(units_per_metre)
    d[~np.isfinite(d)] = 0.0
    if max_depth > 0:
        d[d > max_depth] = 0.0
    return d


def _resize(x: torch.Tensor, size: tuple[int, int], nearest: bool) -> torch.Tensor:
    """``[C, H, W]`` -> ``[C, h, w]``; bilinear antialiased for images, nearest for labels and depth."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if nearest:
        return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(x.dtype)
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]


class DenseFolder(torch.utils.data.Dataset):
    """Samples of a dense layout (module docstring, "Samples").

    Args:
        samples: from :func:`list_dense_samples`; modalities: the ones to read (``rgb`` and any of ``semseg``,
            ``depth``); img_size: ``S`` (pixels); train: augment (else the evaluation form); seed: of the augmentation;
        scale: ``(min, max)`` scale jitter of the short side relative to ``S``; flip: random horizontal flip;
        reduce_zero_label, ignore_index: :func:`read_semseg`; units_per_metre, max_depth: :func:`read_depth`.
    Items: ``{"index": int, "rgb": [3, S, S], "semseg": [S, S] | [H, W], "depth": [1, S, S] | [H, W],
    "depth_in": [1, S, S] (evaluation, with depth)}``.
    Raises (on access):
        ValueError: a label whose size differs from its image (names the file).
    """

    def __init__(self, samples: Sequence[DenseSample], modalities: Sequence[str], img_size: int, train: bool,
                 seed: int = 0, scale: tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 reduce_zero_label: bool = False, ignore_index: int = 255, units_per_metre: float = 1000.0,
                 max_depth: float = 0.0):
        self.samples, self.modalities = list(samples), list(modalities)
        self.img_size, self.train, self.seed = int(img_size), bool(train), int(seed)
        self.scale, self.flip = (float(scale[0]), float(scale[1])), bool(flip)
        self.reduce_zero_label, self.ignore_index = bool(reduce_zero_label), int(ignore_index)
        self.units_per_metre, self.max_depth = float(units_per_metre), float(max_depth)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the augmentation draws (call before iterating a new epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        s = self.samples[i]
        rgb = torch.from_numpy(read_rgb(s.files["rgb"]).copy()).permute(2, 0, 1)
        out = {"rgb": rgb}
        for m in self.modalities:
            if m == "semseg":
                out[m] = torch.from_numpy(read_semseg(s.files[m], self.reduce_zero_label, self.ignore_index))[None]
            elif m == "depth":
                out[m] = torch.from_numpy(read_depth(s.files[m], self.units_per_metre, self.max_depth))[None]
            else:
                continue
            if tuple(out[m].shape[-2:]) != tuple(rgb.shape[-2:]):
                raise ValueError(f"{s.files[m]}: size {tuple(out[m].shape[-2:])} differs from its image "
                                 f"{s.files['rgb']} {tuple(rgb.shape[-2:])}")
        return out

    @staticmethod
    def _normalise(rgb_u8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(_IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(_IMAGENET_STD).view(3, 1, 1)
        return (rgb_u8.float() / 255.0 - mean) / std

    def _augment(self, x: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        S = self.img_size
        h, w = x["rgb"].shape[-2:]
        f = S * rng.uniform(*self.scale) / min(h, w)
        size = (max(1, round(h * f)), max(1, round(w * f)))
        out = {"rgb": _resize(self._normalise(x["rgb"]), size, nearest=False)}
        for m in ("semseg", "depth"):
            if m in x:
                out[m] = _resize(x[m], size, nearest=True)
        ph, pw = max(0, S - size[0]), max(0, S - size[1])
        fill = {"rgb": 0.0, "semseg": self.ignore_index, "depth": 0.0}  # rgb 0 = the ImageNet mean after normalising
        if ph or pw:
            out = {m: F.pad(v, (0, pw, 0, ph), value=fill[m]) for m, v in out.items()}
        H, W = out["rgb"].shape[-2:]
        top, left = int(rng.integers(0, H - S + 1)), int(rng.integers(0, W - S + 1))
        flip = self.flip and rng.random() < 0.5
        for m, v in out.items():
            v = v[..., top:top + S, left:left + S]
            out[m] = v.flip(-1) if flip else v
        if "semseg" in out:
            out["semseg"] = out["semseg"][0]
        return out

    def __getitem__(self, i: int) -> dict:
        x = self._read(i)
        if self.train:
            out = self._augment(x, i)
        else:
            S = (self.img_size, self.img_size)
            out = {"rgb": _resize(self._normalise(x["rgb"]), S, nearest=False)}
            if "semseg" in x:
                out["semseg"] = x["semseg"][0]
            if "depth" in x:
                out["depth"] = x["depth"][0]
                out["depth_in"] = _resize(x["depth"], S, nearest=True)
        out["index"] = i
        return out


def collate_dense(items: list[dict]) -> dict:
    """Batch :class:`DenseFolder` items: tensors of one shape are stacked (``[B, ...]``), others (evaluation
    targets at each image's own size) kept as lists; ``index`` becomes an int64 ``[B]`` tensor."""
    out: dict = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        if k == "index":
            out[k] = torch.tensor(vals, dtype=torch.int64)
        elif all(v.shape == vals[0].shape for v in vals):
            out[k] = torch.stack(vals)
        else:
            out[k] = vals
    return out
