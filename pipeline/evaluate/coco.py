"""COCO-format data and metrics for the sparse tasks (issue 14; Masked AutoDecoder, ``models/mad.py``).

* Annotations (``instances``, ``person_keypoints``, ``captions`` JSON) are read with pycocotools from a local path
  or any fsspec URL (:func:`load_coco`); predictions are written as COCO results JSON (:func:`write_results`).
* Box, mask and keypoint AP come from pycocotools' ``COCOeval`` (:func:`coco_ap`): the standard 101-point
  interpolated AP averaged over IoU (or OKS) thresholds 0.50:0.05:0.95, at most 100 detections per image.
* Captions are scored with BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015) from
  ``pycocoevalcap`` (:func:`caption_scores`). Its PTB tokenizer needs Java, so captions are tokenised here by
  lower-casing and splitting off punctuation, which matches it on plain English captions.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any

#: ``COCOeval.stats`` entries, in order, for boxes and masks (``bbox``/``segm``) and for keypoints
STAT_NAMES = {"bbox": ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"],
              "keypoints": ["AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"]}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]


def load_coco(source: str | dict):
    """A ``pycocotools.coco.COCO`` index of an annotation file (local path or fsspec URL) or of a loaded dict
    (``datasets.coco_stream.coco_index``).

    Raises:
        FileNotFoundError: the file does not exist; ValueError: it is not COCO JSON (no ``images``).
    """
    from polymae.datasets.coco_stream import coco_index

    return coco_index(source)


def write_results(results: list[dict], url: str) -> None:
    """Write predictions as COCO results JSON (a list of ``{"image_id", "category_id", "bbox" | "segmentation" |
    "keypoints", "score"}``, or ``{"image_id", "caption"}``) to a local path or fsspec URL, atomically."""
    from polymae.datasets import storage

    storage.write_json_atomic(url, results)


def coco_ap(gt, results: list[dict], iou_type: str = "bbox") -> dict[str, float]:
    """COCO AP of ``results`` against the ``gt`` index (:func:`load_coco`).

    Args:
        iou_type: ``bbox`` (boxes ``[x, y, w, h]`` in pixels), ``segm`` (masks as RLE: :func:`mask_to_rle`) or
            ``keypoints`` (``[x1, y1, v1, ...]`` in pixels; OKS with COCO's 17 person sigmas, over the categories
            that declare keypoints).
    Returns:
        the named ``COCOeval.stats`` (:data:`STAT_NAMES`); every value 0.0 when there are no results.
    Raises:
        ValueError: an unknown ``iou_type``.
    """
    from pycocotools.cocoeval import COCOeval

    if iou_type not in STAT_NAMES:
        raise ValueError(f"iou_type must be one of {sorted(STAT_NAMES)}, got {iou_type!r}")
    names = STAT_NAMES[iou_type]
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if iou_type == "keypoints":  # as a person_keypoints file: only the categories that have keypoints
            ev.params.catIds = [c["id"] for c in gt.dataset["categories"] if c.get("keypoints")]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: float(v) for n, v in zip(names, ev.stats)}


def mask_to_rle(mask) -> dict:
    """COCO RLE (``{"size": [H, W], "counts": str}``, JSON-ready) of a ``[H, W]`` bool mask."""
    import numpy as np
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


_PUNCT = re.compile(r"([^\w\s])")


def tokenize_caption(text: str) -> str:
    """Lower-cased words and punctuation separated by single spaces (PTB-like for plain English)."""
    return " ".join(_PUNCT.sub(r" \1 ", text.lower()).split())


def caption_scores(references: dict[Any, list[str]], predictions: dict[Any, str]) -> dict[str, float]:
    """Corpus BLEU-4 and CIDEr-D of one predicted caption per image against its references.

    Args:
        references: image id -> reference captions; predictions: image id -> the predicted caption (every id
            of ``predictions`` must have references).
    Raises:
        KeyError: a predicted image without references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    ids = sorted(predictions, key=str)
    gts = {i: [tokenize_caption(c) for c in references[i]] for i in ids}
    res = {i: [tokenize_caption(predictions[i])] for i in ids}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its counts
        bleu, _ = Bleu(4).compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


__all__ = ["load_coco", "write_results", "coco_ap", "mask_to_rle", "caption_scores", "tokenize_caption", "STAT_NAMES"]
