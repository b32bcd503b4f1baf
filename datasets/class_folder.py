"""Image classification data in an ImageNet-style folder: ``{root}/{class}/{image}``, one sub-folder per class.

:func:`list_class_folder` lists it (classes sorted by name, index = position; images sorted; any fsspec URL).
:class:`ClassFolderStream` yields micro-batches of it with the contract of ``datasets/loader.py``'s
``ShardStream`` (deterministic, O(1)-resumable, independent of the world size):

* **Order.** Epoch ``e`` is a permutation of the ``N`` images seeded by ``(seed, e)``; epochs follow one another
  as one sequence of positions. Global micro-batch ``g`` is positions ``[g mb, (g + 1) mb)`` of that sequence;
  rank ``r`` of ``W`` takes its ``b``-th micro-batch as ``g = b W + r`` (``loader.global_batch_of``), and loader
  worker ``w`` of ``nw`` yields the rank's batches ``skip + w + t nw``. A resumed stream (``skip_batches``) starts
  at its batch by arithmetic alone.
* **Augmentation.** Random-resized crop (Inception-style, ``transforms.rrc_params``) and horizontal flip, from a
  generator seeded by ``(seed, key, epoch)``; bicubic resize to ``img_size``. ``scale=None``: the central square
  crop (evaluation).
* **Bad input.** An image that fails to decode is counted in ``skipped_corrupt`` and logged; in training it is
  replaced by the next good image of its batch (cyclically), and a batch without any raises ``RuntimeError``; in a
  single pass (``infinite=False``) it is left out.

Items: ``rgb`` uint8 ``[B, 3, S, S]``, ``cls`` int64 ``[B]``, ``key`` (relative paths ``class/image``).
"""

from __future__ import annotations

import io
import logging
import random
from typing import Sequence

import numpy as np
import torch

from polymae.datasets.position_stream import PositionStream, fill_failed

from polymae.datasets.transforms import center_params, rrc_params, sample_rng

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_class_folder(root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, samples)`` of an ImageNet-style folder: class names (sub-folder names, sorted) and
    ``(image url, class index)`` for every image file directly inside a class folder, sorted by url.

    Raises:
        FileNotFoundError: no class sub-folder with an image under ``root``.
    """
    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    path = path.rstrip("/")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    classes = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if fs.isdir(p)) \
        if fs.isdir(path) else []
    samples = []
    for idx, name in enumerate(classes):
        files = sorted(f for f in fs.ls(f"{path}/{name}", detail=False) if f.lower().endswith(IMAGE_SUFFIXES))
        samples += [(prefix + f, idx) for f in files]
    if not samples:
        raise FileNotFoundError(f"no images in class sub-folders of {root!r} (expected {root}/<class>/<image>)")
    return classes, samples


def _decode(url: str, box_rng: np.random.Generator | None, size: int, scale, ratio, hflip: float) -> torch.Tensor:
    """One image cropped, flipped and resized: uint8 ``[3, size, size]``."""
    import fsspec
    from PIL import Image

    with fsspec.open(url, "rb") as fh:
        img = Image.open(io.BytesIO(fh.read()))
        img = img.convert("RGB")
    W, H = img.size
    if box_rng is None:
        (top, left, h, w), flip = center_params(H, W), False
    else:
        top, left, h, w = rrc_params(H, W, tuple(scale), tuple(ratio), box_rng)
        flip = bool(box_rng.random() < hflip)
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.flip(-1) if flip else arr


class ClassFolderStream(PositionStream):
    """Micro-batches of an ImageNet-style folder (module docstring).

    Args:
        samples: ``(url, class index)`` pairs (:func:`list_class_folder`); root: the folder (for keys).
        micro_batch: images per yielded batch (per rank); img_size: output side in pixels.
        scale: crop area range (None: central crop); ratio: crop aspect range; hflip: flip probability.
        rank, world: data-parallel position; seed: order and augmentation seed.
        infinite: epochs one after another (training) or one pass in folder order (evaluation).
        skip_batches: micro-batches this rank already consumed (resume).
    Raises:
        ValueError: no samples or ``micro_batch < 1`` (constructor); RuntimeError: (training) a batch none of whose
        images decodes.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], micro_batch: int, img_size: int, root: str = "",
                 scale: Sequence[float] | None = (0.2, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, rank: int = 0, world: int = 1, seed: int = 0, infinite: bool = True,
                 skip_batches: int = 0):
        super().__init__()
        if not samples:
            raise ValueError("no samples")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.samples, self.micro_batch, self.img_size = list(samples), micro_batch, img_size
        self.root = root.rstrip("/")
        self.scale, self.ratio, self.hflip = scale, ratio, hflip
        self.rank, self.world, self.seed = rank, world, seed
        self.infinite, self.skip_batches = infinite, skip_batches
        self.skipped_corrupt = 0
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        """Images in the folder."""
        return len(self.samples)

    def _index(self, pos: int) -> tuple[int, int]:
        """``(sample index, epoch)`` at position ``pos`` of the (infinite) shuffled sequence."""
        epoch, i = divmod(pos, len(self.samples))
        if not self.infinite:
            return i, 0
        if epoch not in self._perms:
            perm = list(range(len(self.samples)))
            random.Random(f"polymae-classes/{self.seed}/{epoch}").shuffle(perm)
            self._perms = {epoch: perm}  # one epoch kept: positions only move forward
        return self._perms[epoch][i], epoch

    def _key(self, url: str) -> str:
        return url[len(self.root) + 1:] if self.root and url.startswith(self.root) else url

    def _load(self, pos: int) -> dict | None:
        idx, epoch = self._index(pos)
        url, cls = self.samples[idx]
        key = self._key(url)
        rng = sample_rng(self.seed, key, epoch) if self.scale is not None else None
        try:
            rgb = _decode(url, rng, self.img_size, self.scale, self.ratio, self.hflip)
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt or unsupported files
            self.skipped_corrupt += 1
            log.warning("corrupt image %s (%s: %s); %d so far", url, type(e).__name__, e, self.skipped_corrupt)
            return None
        return {"rgb": rgb, "cls": cls, "key": key}

    def batch(self, g: int) -> dict | None:
        """Global micro-batch ``g`` (positions ``[g mb, (g + 1) mb)``), collated; None in a single pass when it is
        empty or every image failed.

        Raises:
            RuntimeError: (training) no image of the batch decodes (its positions are named).
        """
        mb = self.micro_batch
        lo, hi = g * mb, (g + 1) * mb
        if not self.infinite:
            hi = min(hi, len(self.samples))
        outs = fill_failed([self._load(p) for p in range(lo, hi)], self.infinite, g, lo, hi)
        if outs is None:
            return None
        return {"rgb": torch.stack([o["rgb"] for o in outs]),
                "cls": torch.tensor([o["cls"] for o in outs], dtype=torch.int64), "key": [o["key"] for o in outs]}


__all__ = ["list_class_folder", "ClassFolderStream", "IMAGE_SUFFIXES"]
