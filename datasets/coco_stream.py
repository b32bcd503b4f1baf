"""COCO-format data for the Masked AutoDecoder's sequence tasks (``models/mad.py``; issue 14): annotation JSON
(``instances``, ``person_keypoints`` or ``captions``) read with pycocotools from a local path or any fsspec URL,
images from a folder or fsspec URL (``{images}/{file_name}``).

* :func:`read_coco_records` turns an annotation file into one record per image with every geometry **normalised to
  [0, 1]** of the image's width and height: boxes as ``[x0, y0, x1, y1]``, polygons as flat ``[x, y, ...]`` lists,
  keypoints as ``[17, 3]`` (x, y, COCO visibility); crowd annotations (``iscrowd = 1``, RLE) are left out of
  training, as is usual for COCO detectors. The image is resized (stretched) to ``S x S``, under which normalised
  coordinates do not change.
* :class:`CocoStream` yields micro-batches of records with the contract of ``datasets/class_folder.py``'s
  ``ClassFolderStream``: epoch ``e`` is a permutation seeded by ``(seed, e)``, global micro-batch ``g`` holds positions
  ``[g mb, (g + 1) mb)``, rank ``r`` of ``W`` takes its ``b``-th micro-batch as ``g = b W + r``, and
  ``skip_batches`` resumes by arithmetic alone. No augmentation (a flip would have to swap left/right keypoints).
* Bad input: an image that fails to decode is counted in ``skipped_corrupt`` and logged; in training it is replaced
  by the next good image of its batch, and a batch without any raises ``RuntimeError``; a missing file is a system
  failure and raises.

Items of a batch: ``rgb`` uint8 ``[B, 3, S, S]``, ``key`` (file names), ``image_id`` (ints), ``records`` (the
per-image records, :func:`read_coco_records`), ``batch_index`` (``g``, which seeds the batch's masking).
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
from typing import Sequence

import numpy as np
import torch

from polymae.datasets.position_stream import PositionStream, fill_failed

log = logging.getLogger(__name__)


def coco_index(source: str | dict):
    """A ``pycocotools.coco.COCO`` index of an annotation file (local path or fsspec URL) or of a loaded dict.

    Raises:
        FileNotFoundError: no such file; ValueError: not COCO JSON (no ``images``).
    """
    from pycocotools.coco import COCO

    from polymae.datasets import storage

    data = source if isinstance(source, dict) else storage.read_json(source)
    if not isinstance(data, dict) or "images" not in data:
        raise ValueError(f"{source if isinstance(source, str) else 'the dict'} is not COCO JSON (no 'images')")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def read_coco_records(coco) -> list[dict]:
    """One record per image of a COCO index (sorted by image id), geometry normalised (module docstring):
    ``{"image_id", "file_name", "width", "height", "anns": [{"box" [4], "category_id", "polygons", "keypoints"
    [17, 3] | None}], "captions": [str]}``. A caption file gives images with ``captions`` and no ``anns``."""
    out = []
    for img_id in sorted(coco.imgs):
        img = coco.imgs[img_id]
        w, h = float(img["width"]), float(img["height"])
        anns, caps = [], []
        for a in coco.imgToAnns.get(img_id, []):
            if "caption" in a:
                caps.append(str(a["caption"]))
                continue
            if a.get("iscrowd", 0) or "bbox" not in a:
                continue
            x, y, bw, bh = (float(v) for v in a["bbox"])
            if bw <= 0 or bh <= 0:
                continue
            box = [x / w, y / h, (x + bw) / w, (y + bh) / h]
            polys = [[float(v) / (w if i % 2 == 0 else h) for i, v in enumerate(p)]
                     for p in a.get("segmentation") or [] if isinstance(p, list) and len(p) >= 6]
            kp = None
            if a.get("keypoints") and a.get("num_keypoints", 1) > 0:
                k = np.asarray(a["keypoints"], dtype=np.float32).reshape(-1, 3)
                kp = np.stack([k[:, 0] / w, k[:, 1] / h, k[:, 2]], axis=1).tolist()
            anns.append({"box": [min(max(v, 0.0), 1.0) for v in box], "category_id": int(a["category_id"]),
                         "polygons": polys, "keypoints": kp})
        out.append({"image_id": int(img_id), "file_name": img["file_name"], "width": int(w), "height": int(h),
                    "anns": anns, "captions": caps})
    return out


def polygons_to_mask(polygons: Sequence[Sequence[float]], size: int) -> np.ndarray:
    """``[size, size]`` bool mask of normalised polygons (flat ``[x, y, ...]`` in [0, 1]), rasterised by
    pycocotools at ``size`` pixels (the union of the polygons)."""
    from pycocotools import mask as mask_utils

    if not polygons:
        return np.zeros((size, size), dtype=bool)
    scaled = [[v * size for v in p] for p in polygons]
    rle = mask_utils.merge(mask_utils.frPyObjects(scaled, size, size))
    return mask_utils.decode(rle).astype(bool)


def _decode_image(url: str, size: int) -> torch.Tensor:
    """One image resized (bicubic, stretched) to uint8 ``[3, size, size]``."""
    import fsspec
    from PIL import Image

    with fsspec.open(url, "rb") as fh:
        img = Image.open(io.BytesIO(fh.read())).convert("RGB")
    img = img.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class CocoStream(PositionStream):
    """Micro-batches of COCO records with their images (module docstring).

    Args:
        records: per-image records (:func:`read_coco_records`, filtered by the task); images: folder or fsspec URL
            holding ``file_name``; micro_batch: images per batch per rank; img_size: side ``S`` in pixels.
        rank, world: data-parallel position; seed: order seed; infinite: shuffled epochs (training) or one pass
            in record order (evaluation); skip_batches: micro-batches this rank already consumed (resume).
    Raises:
        ValueError: no records or ``micro_batch < 1`` (constructor); RuntimeError: (training) a batch none of whose
        images decodes; FileNotFoundError: a missing image file.
    """

    def __init__(self, records: Sequence[dict], images: str, micro_batch: int, img_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, infinite: bool = True, skip_batches: int = 0):
        super().__init__()
        if not records:
            raise ValueError("no COCO records")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.records, self.images = list(records), images.rstrip("/")
        self.micro_batch, self.img_size = micro_batch, img_size
        self.rank, self.world, self.seed = rank, world, seed
        self.infinite, self.skip_batches = infinite, skip_batches
        self.skipped_corrupt = 0
        self._perm: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Images (records)."""
        return len(self.records)

    def _index(self, pos: int) -> int:
        epoch, i = divmod(pos, len(self.records))
        if not self.infinite:
            return i
        if self._perm is None or self._perm[0] != epoch:
            perm = list(range(len(self.records)))
            random.Random(f"polymae-coco/{self.seed}/{epoch}").shuffle(perm)
            self._perm = (epoch, perm)
        return self._perm[1][i]

    def _load(self, pos: int) -> dict | None:
        rec = self.records[self._index(pos)]
        url = f"{self.images}/{rec['file_name']}"
        try:
            rgb = _decode_image(url, self.img_size)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for corrupt or unsupported files
            self.skipped_corrupt += 1
            log.warning("corrupt image %s (%s: %s); %d so far", url, type(e).__name__, e, self.skipped_corrupt)
            return None
        return {"rgb": rgb, "record": rec}

    def batch(self, g: int) -> dict | None:
        """Global micro-batch ``g``, collated; None in a single pass when it is empty or every image failed.

        Raises:
            RuntimeError: (training) no image of the batch decodes.
        """
        lo, hi = g * self.micro_batch, (g + 1) * self.micro_batch
        if not self.infinite:
            hi = min(hi, len(self.records))
        outs = fill_failed([self._load(p) for p in range(lo, hi)], self.infinite, g, lo, hi)
        if outs is None:
            return None
        recs = [o["record"] for o in outs]
        return {"rgb": torch.stack([o["rgb"] for o in outs]), "key": [r["file_name"] for r in recs],
                "image_id": [r["image_id"] for r in recs], "records": recs, "batch_index": g}


__all__ = ["coco_index", "read_coco_records", "polygons_to_mask", "CocoStream"]
