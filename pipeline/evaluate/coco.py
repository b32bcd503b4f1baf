"""COCO-format data and metrics for the sparse tasks (issue 14; Masked AutoDecoder, ``models/mad.py``).

* Annotations (``instances``, ``person_keypoints``, ``captions`` JSON) are read with pycocotools from a local path
  or any fsspec URL (:func:`load_coco`); predictions are written as COCO results JSON (:func:`write_results`).
* Box, mask and keypoint AP come from pycocotools' ``COCOeval`` (:func:`coco_ap`): the standard 101-point
  interpolated AP averaged over IoU (or OKS) thresholds 0.50:0.05:0.95, at most 100 detections per image.
* Captions are scored with BLEU-4 (Papineni et al. 2002) and CIDEr-D (Vedantam et al. 2015) from
  ``pycocoevalcap`` (:func:`caption_scores`). Its PTB tokenizer needs Java, so captions are tokenised here by
  lower-casing and splitting off punctuation, which matches it on plain English captions.

**The ``coco`` protocol** of ``polymae evaluate`` (:class:`CocoConfig`, :func:`run_coco`) scores COCO results JSON
files against an annotation file: box / mask / keypoint AP (``bbox_AP``, ``bbox_AP50``, ..., ``segm_AP``, ...,
``keypoints_AP``, ...) for ``instances`` / ``person_keypoints`` annotations, ``BLEU-4`` and ``CIDEr`` for
``captions``. The files are typically the multitask stage's ``{task}.results.json`` (``sequence.py``); with no
file given, the checkpoint's own sequence tasks (det / seg / kpt / cap) predict on the annotations' images first
and their files are written to the output folder. Every prediction is checked before scoring
(:func:`check_results`): an image id or category not in the annotations, or a malformed box / mask / keypoint list,
is a :class:`~polymae.pipeline.config.ConfigError` on ``coco.results`` naming the file, the entry and the value
(pycocotools would assert obscurely or silently ignore it). An empty results list scores 0 with a warning.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

from polymae.pipeline.config import ConfigError, field_

log = logging.getLogger(__name__)

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


def coco_ap(gt, results: list[dict], iou_type: str = "bbox", image_ids: list[int] | None = None
            ) -> dict[str, float]:
    """COCO AP of ``results`` against the ``gt`` index (:func:`load_coco`).

    Args:
        iou_type: ``bbox`` (boxes ``[x, y, w, h]`` in pixels), ``segm`` (masks as RLE: :func:`mask_to_rle`) or
            ``keypoints`` (``[x1, y1, v1, ...]`` in pixels; OKS with COCO's 17 person sigmas, over the categories
            that declare keypoints).
        image_ids: evaluate these images only (default: every image of ``gt``, COCO's rule).
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
        if image_ids is not None:
            ev.params.imgIds = sorted(image_ids)
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


# ------------------------------------------------------------------------------------------- the coco protocol
#: the instance evaluations (``COCOeval`` iou types); captions are the fourth kind of result
IOU_TYPES = ("bbox", "segm", "keypoints")
_KEY = "coco"


@dataclass
class CocoConfig:
    """The ``coco`` protocol of ``polymae evaluate`` (module docstring): COCO results JSON scored against COCO
    annotations. The section sits in ``EvaluateConfig`` whatever the protocol, so the defaults pass
    :meth:`validate`; :func:`run_coco` requires ``annotations`` before any work."""

    annotations: str = field_("", help="COCO annotation JSON (instances, person_keypoints or captions; local path "
                              "or fsspec URL)")
    results: list[str] = field_([], help="COCO results JSON file(s) to score (local paths or fsspec URLs; "
                                "a=x,y for several, e.g. det.results.json,seg.results.json); empty = run the "
                                "checkpoint's sequence tasks on the annotations' images first")
    images: str = field_("", help="folder or URL of the annotations' images (file_name); required when `results` "
                         "is empty")
    iou_types: list[str] = field_([], help="bbox | segm | keypoints to score (instances only; empty = every one "
                                  "the results and the annotations both have)")
    kind: Literal["auto", "instances", "captions"] = field_("auto", help="instances (boxes, masks, keypoints) | "
                                                             "captions | auto (from the annotations)")
    tasks: list[str] = field_([], help="`results` empty: the checkpoint's sequence tasks to run (empty = every one "
                              "whose output the annotations score)")

    def validate(self) -> None:
        """Pure value checks; raises :class:`ConfigError` naming ``coco.<key>``."""
        bad = [t for t in self.iou_types if t not in IOU_TYPES]
        if bad:
            raise ConfigError(f"{_KEY}.iou_types", f"{bad[0]!r} is not one of {list(IOU_TYPES)}")
        if len(set(self.iou_types)) != len(self.iou_types):
            raise ConfigError(f"{_KEY}.iou_types", f"lists a type twice: {list(self.iou_types)}")
        if self.kind == "captions" and self.iou_types:
            raise ConfigError(f"{_KEY}.iou_types", f"{list(self.iou_types)} with kind=captions: captions are scored "
                              "with BLEU-4 / CIDEr, not AP")
        if any(not r for r in self.results):
            raise ConfigError(f"{_KEY}.results", f"an empty entry in {list(self.results)}")
        if self.annotations and not self.results and not self.images:
            raise ConfigError(f"{_KEY}.images", "is required when coco.results is empty: the checkpoint's sequence "
                              "tasks predict on the annotations' images")

    def preflight(self) -> None:
        """Local files that are set exist; raises :class:`ConfigError` naming the key."""
        import os

        for key, paths in (("annotations", [self.annotations]), ("results", self.results)):
            for p in paths:
                if p and "://" not in p and not os.path.isfile(p):
                    raise ConfigError(f"{_KEY}.{key}", f"{p!r} does not exist")
        if self.images and not self.results and "://" not in self.images and not os.path.isdir(self.images):
            raise ConfigError(f"{_KEY}.images", f"folder {self.images!r} does not exist")


def _read_annotations(url: str) -> tuple[dict, Any, str]:
    """``(JSON dict, COCO index, sha256 of the file's bytes)``; raises :class:`ConfigError` on ``coco.annotations``
    for a missing file or one that is not COCO JSON."""
    import hashlib
    import json

    from polymae.datasets import storage

    key = f"{_KEY}.annotations"
    if not url:
        raise ConfigError(key, "is required: the COCO annotation JSON the predictions are scored against")
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise ConfigError(key, f"{url!r} does not exist") from None
    try:
        data = json.loads(raw)
        gt = load_coco(data)
    except ValueError as e:
        raise ConfigError(key, f"{url}: not COCO annotation JSON ({e})") from None
    return data, gt, hashlib.sha256(raw).hexdigest()


def _annotation_kind(cfg: CocoConfig, data: dict) -> str:
    """``instances`` or ``captions``: ``cfg.kind``, or (auto) captions when the annotations carry ``caption``."""
    anns = data.get("annotations") or []
    found = "captions" if anns and all("caption" in a for a in anns) else "instances"
    if cfg.kind != "auto" and cfg.kind != found:
        raise ConfigError(f"{_KEY}.kind", f"{cfg.kind}, but {cfg.annotations} holds {found} annotations")
    return found


def _annotated_types(data: dict) -> set[str]:
    """The iou types an instances file can score: bbox (boxes), segm (polygons / RLE), keypoints (categories
    declaring keypoints and annotations with labelled keypoints)."""
    anns = data.get("annotations") or []
    out = {"bbox"} if any("bbox" in a for a in anns) else set()
    if any(a.get("segmentation") for a in anns):
        out.add("segm")
    kp_cats = {c["id"] for c in data.get("categories", []) if c.get("keypoints")}
    if any(a.get("num_keypoints", 0) > 0 and a.get("category_id") in kp_cats for a in anns):
        out.add("keypoints")
    return out


def _result_types(results: list[dict]) -> set[str]:
    """What a results list holds: ``bbox`` / ``segm`` / ``keypoints`` (keys of its first entry) or ``captions``."""
    if not results or not isinstance(results[0], dict):
        return set()
    first = results[0]
    if "caption" in first:
        return {"captions"}
    names = {"bbox": "bbox", "segmentation": "segm", "keypoints": "keypoints"}
    return {t for k, t in names.items() if k in first}


def _fail(source: str, i: int, entry: Any, why: str) -> NoReturn:
    """Raise the :class:`ConfigError` of results entry ``i`` of ``source`` (its value shortened)."""
    text = repr(entry)
    raise ConfigError(f"{_KEY}.results", f"{source}: entry {i} ({text[:160]}{'...' if len(text) > 160 else ''}) "
                      f"{why}")


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_geometry(gt, r: dict, iou_type: str, source: str, i: int) -> None:
    """One instance entry's box / mask / keypoints against its image and category (see :func:`check_results`)."""
    img = gt.imgs[r["image_id"]]
    if iou_type == "bbox":
        b = r.get("bbox")
        if not (isinstance(b, list) and len(b) == 4 and all(_finite(v) for v in b) and b[2] >= 0 and b[3] >= 0):
            _fail(source, i, r, "needs 'bbox': [x, y, width, height] in pixels, width and height >= 0")
    elif iou_type == "segm":
        m = r.get("segmentation")
        if not (isinstance(m, dict) and "counts" in m and list(m.get("size", [])) == [img["height"], img["width"]]):
            _fail(source, i, r, f"needs 'segmentation' as RLE {{'size': [{img['height']}, {img['width']}] (image "
                  f"{r['image_id']}'s height, width), 'counts': ...}}")
    else:
        names = gt.cats[r["category_id"]].get("keypoints") or []
        if not names:
            _fail(source, i, r, f"has keypoints for category {r['category_id']}, which declares none")
        k = r.get("keypoints")
        if not (isinstance(k, list) and len(k) == 3 * len(names) and all(_finite(v) for v in k)):
            _fail(source, i, r, f"needs 'keypoints': {3 * len(names)} numbers (x, y, v for the category's "
                  f"{len(names)} keypoints)")


def check_results(gt, results: Any, iou_type: str, source: str) -> None:
    """Check a COCO results list against the annotation index ``gt`` before scoring: a list of dicts, each with an
    ``image_id`` of the annotations and, for ``bbox`` / ``segm`` / ``keypoints``, a ``category_id`` of the
    annotations, a finite ``score`` and well-formed geometry (``[x, y, w, h]``; RLE of the image's size; 3 numbers
    per keypoint of its category); for ``captions`` a string ``caption``, one per image, on an image that has
    reference captions.

    Raises:
        ConfigError: on ``coco.results``, naming ``source``, the first offending entry (index and value) and why.
    """
    if not isinstance(results, list):
        raise ConfigError(f"{_KEY}.results", f"{source}: a COCO results file is a JSON list, got "
                          f"{type(results).__name__}")
    seen: set = set()
    for i, r in enumerate(results):
        if not isinstance(r, dict) or "image_id" not in r:
            _fail(source, i, r, "is not a result object with an 'image_id'")
        if not isinstance(r["image_id"], (int, str)) or r["image_id"] not in gt.imgs:
            _fail(source, i, r, f"refers to image_id {r['image_id']!r}, which is not in the annotations "
                  f"({len(gt.imgs)} images)")
        if iou_type == "captions":
            if not isinstance(r.get("caption"), str):
                _fail(source, i, r, "needs a string 'caption'")
            if r["image_id"] in seen:
                _fail(source, i, r, f"is a second caption for image {r['image_id']} (one per image)")
            if not any("caption" in a for a in gt.imgToAnns.get(r["image_id"], [])):
                _fail(source, i, r, f"captions image {r['image_id']}, which has no reference captions")
            seen.add(r["image_id"])
            continue
        if not isinstance(r.get("category_id"), (int, str)) or r["category_id"] not in gt.cats:
            _fail(source, i, r, f"has category_id {r.get('category_id')!r}, which is not in the annotations "
                  f"(categories {sorted(gt.cats)})")
        if not _finite(r.get("score")):
            _fail(source, i, r, "needs a finite number 'score'")
        _check_geometry(gt, r, iou_type, source, i)


def _route(cfg: CocoConfig, kind: str, annotated: set[str], files: dict[str, list]) -> dict[str, str]:
    """``{iou type or "captions": source name}``: which results list each scored type comes from.

    Raises:
        ConfigError: on ``coco.iou_types`` (a requested type without results or ground truth) or ``coco.results``
        (results of the wrong kind, two sources of one type, nothing to score).
    """
    wanted = ["captions"] if kind == "captions" else list(cfg.iou_types) or [t for t in IOU_TYPES if t in annotated]
    for t in cfg.iou_types:
        if t not in annotated:
            raise ConfigError(f"{_KEY}.iou_types", f"{t}: {cfg.annotations} has no {t} ground truth "
                              f"(it has {sorted(annotated)})")
    out: dict[str, str] = {}
    for name, res in sorted(files.items(), key=lambda kv: not kv[1]):  # non-empty lists first
        have = _result_types(res) if res else set(wanted)  # an empty list: whatever is still unscored, AP 0
        if res and ("captions" in have) != (kind == "captions"):
            raise ConfigError(f"{_KEY}.results", f"{name} holds {'captions' if 'captions' in have else 'instances'}"
                              f" but {cfg.annotations} holds {kind} annotations")
        for t in sorted(have & set(wanted)):
            if t in out:
                if not res:
                    continue
                raise ConfigError(f"{_KEY}.results", f"both {out[t]} and {name} give {t} predictions: score them "
                                  "in separate runs, or choose with coco.iou_types")
            out[t] = name
    missing = [t for t in cfg.iou_types if t not in out]
    if missing:
        raise ConfigError(f"{_KEY}.iou_types", f"{missing[0]} requested but none of {list(files)} has {missing[0]} "
                          "predictions")
    if not out:
        raise ConfigError(f"{_KEY}.results", f"nothing to score: {list(files)} give "
                          f"{sorted(set().union(*map(_result_types, files.values())))}, {cfg.annotations} scores "
                          f"{sorted(annotated) if kind == 'instances' else ['captions']}")
    return out


def _score_instances(gt, results: list[dict], iou_type: str, ids: list[int], source: str) -> dict[str, float]:
    """The named COCOeval stats of one results list on the images ``ids`` (0 and a warning when it is empty)."""
    keep = set(ids)
    res = [dict(r) for r in results if r["image_id"] in keep]
    if iou_type == "segm":  # loadRes would take a result's box area for its mask area
        for r in res:
            r.pop("bbox", None)
    if not res:
        log.warning("coco: %s has no %s predictions on the %d scored images: %s AP is 0", source, iou_type,
                    len(ids), iou_type)
    return coco_ap(gt, res, iou_type, image_ids=list(ids))


def _score_captions(gt, results: list[dict], ids: list[int], source: str) -> tuple[dict[str, float], int]:
    """``({"BLEU-4", "CIDEr"}, images scored)`` of the captions of the images ``ids`` (COCO caption evaluation
    scores the captioned images); images with references but no caption are counted and logged."""
    keep = set(ids)
    preds = {r["image_id"]: r["caption"] for r in results if r["image_id"] in keep}
    refs = {i: [a["caption"] for a in gt.imgToAnns[i] if "caption" in a] for i in preds}
    missing = [i for i in ids if i not in preds and any("caption" in a for a in gt.imgToAnns.get(i, []))]
    if missing:
        log.warning("coco: %s has no caption for %d of the %d captioned images (first: %s); they are not scored",
                    source, len(missing), len(missing) + len(preds), missing[0])
    if not preds:
        log.warning("coco: %s has no captions on the scored images: BLEU-4 and CIDEr are 0", source)
        return {"BLEU-4": 0.0, "CIDEr": 0.0}, 0
    s = caption_scores(refs, preds)
    return {"BLEU-4": s["bleu4"], "CIDEr": s["cider"]}, len(preds)


def _category_mismatch(info: dict, cats: dict) -> str:
    """Why a task's categories do not fit the annotations' (a missing id or another name), or ""."""
    for c in info.get("categories", []):
        have = cats.get(int(c["id"]))
        if have is None or have.get("name") != c.get("name"):
            where = "is missing from" if have is None else f"is named {have.get('name')!r} in"
            return f"its category {c['id']} ({c.get('name')!r}) {where} the annotations"
    return ""


def _checkpoint_tasks(cfg: CocoConfig, mc: dict, checkpoint: str, kind: str, annotated: set[str],
                      cats: dict) -> tuple[dict[str, str], dict[str, str]]:
    """``({task: its type}, {task: why skipped})``: the checkpoint's sequence tasks to run on the annotations
    (``cfg.tasks``, or every one whose output they score and whose categories they have, by id and name; the
    others are logged and listed as skipped).

    Raises:
        ConfigError: no such task or a chosen one that does not fit (``coco.tasks``), no sequence task at all
        (``coco.results``), two of one type (``coco.tasks``), none that fits (``coco.annotations``).
    """
    from polymae.pipeline.evaluate.sequence import IOU_TYPE

    tasks = {t: i for t, i in mc.get("multitask", {}).get("tasks", {}).items() if i.get("mad_task")}
    if not tasks:
        raise ConfigError(f"{_KEY}.results", f"is empty, so the checkpoint's sequence tasks would predict, but "
                          f"{checkpoint} has none (det / seg / kpt / cap): give a COCO results JSON")
    unknown = [t for t in cfg.tasks if t not in tasks]
    if unknown:
        raise ConfigError(f"{_KEY}.tasks", f"{unknown[0]!r} is not a sequence task of {checkpoint} ({sorted(tasks)})")
    scorable = {"captions"} if kind == "captions" else (set(cfg.iou_types) or annotated)
    chosen: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for t in cfg.tasks or sorted(tasks):
        typ = IOU_TYPE[tasks[t]["mad_task"]]
        why = f"it gives {typ}, which the annotations do not score" if typ not in scorable else \
            _category_mismatch(tasks[t], cats) if typ != "captions" else ""
        if why and cfg.tasks:
            raise ConfigError(f"{_KEY}.tasks", f"{t}: {why} ({cfg.annotations})")
        if why:
            skipped[t] = why
            log.warning("coco: task %s skipped: %s (%s)", t, why, cfg.annotations)
            continue
        if typ in chosen.values():
            raise ConfigError(f"{_KEY}.tasks", f"{t} and {[k for k, v in chosen.items() if v == typ][0]} both give "
                              f"{typ}: choose one with coco.tasks")
        chosen[t] = typ
    if not chosen:
        raise ConfigError(f"{_KEY}.annotations", f"none of {checkpoint}'s sequence tasks fits {cfg.annotations}: "
                          + "; ".join(f"{t}: {w}" for t, w in skipped.items()))
    return chosen, skipped


def _predict(cfg: CocoConfig, ctx, kind: str, annotated: set[str], gt) -> tuple[dict[str, list], dict]:
    """Run the checkpoint's sequence tasks on the annotations' images (``sequence.py``); write each task's
    predictions to ``{ctx.output}/{task}.results.json``. Returns ``({results URL: results}, {task: extras})``
    (extras: the task's type and, for seg / kpt, the AP with ground-truth box prompts)."""
    from polymae.datasets import storage
    from polymae.pipeline.evaluate.sequence import predict_sequence_task
    from polymae.pipeline.train.checkpoint import load_model, read_model_config

    try:  # an official MultiMAE/MAE file has no sequence tasks
        mc = {} if ctx.checkpoint.endswith((".pth", ".pt", ".safetensors")) else read_model_config(ctx.checkpoint)
    except FileNotFoundError:
        raise ConfigError("checkpoint", f"{ctx.checkpoint!r} has no model_config.json (coco.results is empty, so "
                          "a multitask checkpoint's sequence tasks would predict)") from None
    chosen, skipped = _checkpoint_tasks(cfg, mc, ctx.checkpoint, kind, annotated, gt.cats)
    model, mc = load_model(ctx.checkpoint)
    model = model.to(ctx.device).eval()
    mt = mc.get("multitask", {})
    img_size = int(mt.get("img_size") or mc.get("pretrain", {}).get("img_size") or 224)
    storage.makedirs(ctx.output)
    files, extras = {}, {t: {"skipped": why} for t, why in skipped.items()}
    for task, typ in chosen.items():
        info = dict(mt["tasks"][task], val_annotations=cfg.annotations, val_images=cfg.images)
        pred = predict_sequence_task(model, task, info, img_size, ctx.batch_size, ctx.max_samples)
        url = storage.join(ctx.output, f"{task}.results.json")
        write_results(pred["results"], url)
        files[url] = pred["results"]
        extras[task] = {"type": typ, "results": url, "predictions": len(pred["results"])}
        if "gt_box_results" in pred:
            extras[task]["gt_box_AP"] = coco_ap(gt, pred["gt_box_results"], typ, pred["image_ids"])["AP"]
            extras[task]["prompt"] = pred["prompt"]
        log.info("coco: %s (%s) predicted %d results on %d images -> %s", task, typ, len(pred["results"]),
                 len(pred["image_ids"]), url)
    return files, extras


def run_coco(cfg: CocoConfig, ctx) -> dict:
    """The ``coco`` protocol (module docstring): score COCO results JSON (``cfg.results``, or the checkpoint's
    sequence-task predictions) against ``cfg.annotations``.

    Args:
        cfg: the ``coco`` section; ctx: ``pipeline/evaluate/results.py`` ``EvalContext`` (``max_samples``: score the
            first images by id only; ``output``: where predicted results files go).
    Returns:
        ``{"metrics": {"bbox_AP", "bbox_AP50", ..., "segm_AP", ..., "keypoints_AP", ... | "BLEU-4", "CIDEr"} (what
        applies; COCOeval's -1 = no ground truth in that size range), "dataset": {"path": annotations, "fingerprint":
        sha256 of the annotation file's bytes, "samples": {"val": images scored}}, "kind", "sources": {type: results
        file}, "predictions": {type: n}, "stats": {type: {stat: value}}, "tasks": {task: extras} (checkpoint mode)}``.
    Raises:
        ConfigError: a missing or non-COCO annotation file, unusable settings or results (:func:`check_results`,
            named key and first offender), all before any scoring.
    """
    data, gt, sha = _read_annotations(cfg.annotations)
    kind = _annotation_kind(cfg, data)
    annotated = _annotated_types(data) if kind == "instances" else set()
    extras: dict = {}
    if cfg.results:
        from polymae.datasets import storage

        files = {}
        for url in cfg.results:
            try:
                files[url] = storage.read_json(url)
            except FileNotFoundError:
                raise ConfigError(f"{_KEY}.results", f"{url!r} does not exist") from None
            except ValueError as e:
                raise ConfigError(f"{_KEY}.results", f"{url}: not JSON ({e})") from None
    else:
        files, extras = _predict(cfg, ctx, kind, annotated, gt)
    routes = _route(cfg, kind, annotated, files)
    for typ, name in routes.items():
        check_results(gt, files[name], typ, name)
    ids = sorted(gt.imgs)[: ctx.max_samples or None]
    metrics, stats, n = {}, {}, len(ids)
    for typ, name in routes.items():
        if typ == "captions":
            metrics, n = _score_captions(gt, files[name], ids, name)
            stats[typ] = dict(metrics)
            continue
        stats[typ] = _score_instances(gt, files[name], typ, ids, name)
        metrics.update({f"{typ}_{k}": v for k, v in stats[typ].items()})
    keep = set(ids)
    out = {"metrics": metrics, "dataset": {"path": cfg.annotations, "fingerprint": sha, "samples": {"val": n}},
           "kind": kind, "sources": dict(routes), "stats": stats,
           "predictions": {t: sum(r["image_id"] in keep for r in files[f]) for t, f in routes.items()}}
    if extras:
        out["tasks"] = extras
    return out


__all__ = ["load_coco", "write_results", "coco_ap", "mask_to_rle", "caption_scores", "tokenize_caption", "STAT_NAMES",
           "IOU_TYPES", "CocoConfig", "check_results", "run_coco"]
