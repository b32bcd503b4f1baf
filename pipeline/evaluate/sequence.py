"""Score the Masked AutoDecoder tasks of a multitask model (det / seg / kpt / cap; ``models/mad.py``, issue 14) on
COCO-format held-out data (each task's ``val_annotations`` and ``val_images``, saved in ``model_config.json``):

* det: one parallel pass per image (the decoder on ``[DET]`` + ``[MASK]`` x 500, as ``decode_parallel``): each of
  the 100 slots is a detection of its most probable object class, scored by that probability (DETR's ranking;
  COCOeval keeps the 100 best per image) -> box AP;
* seg / kpt: one parallel pass per predicted box (the run's det task's detections on the same images; the
  ground-truth boxes when the model has no det task, reported as ``prompt: "ground-truth boxes"``), class and box
  given in the prompt -> mask AP (RLE, ``coco.mask_to_rle``) / keypoint AP (OKS), each scored by its box's score;
  ``gt_box_AP`` is the same with ground-truth boxes as prompts (the decoder alone);
* cap: iterative passes (mask ratios 1.0, 0.8, 0.6, 0.4; ``decode_iterative``) -> BLEU-4 and CIDEr.

Predictions are written as COCO results JSON (``{output}/{task}.results.json``) when ``output`` is given.
Geometry is decoded in normalised coordinates and scaled to each image's width and height.
:func:`predict_sequence_task` gives the predictions alone (the ``coco`` protocol of ``polymae evaluate``,
``coco.py``, scores them like any results file); :func:`evaluate_sequence_task` predicts and scores.
"""

from __future__ import annotations

import copy
import logging
import os

import torch

log = logging.getLogger(__name__)


def _images(info: dict, img_size: int, batch_size: int, max_samples: int):
    """``(coco index, records, batches)`` of a task's held-out annotations, one pass in image-id order."""
    from polymae.datasets.coco_stream import CocoStream, read_coco_records
    from polymae.pipeline.evaluate.coco import load_coco

    gt = load_coco(info["val_annotations"])
    records = read_coco_records(gt)
    if max_samples:
        records = records[:max_samples]
    stream = CocoStream(records, info.get("val_images") or info["images"], batch_size, img_size, infinite=False)
    return gt, records, stream


def _memory(model, batch: dict) -> torch.Tensor:
    """``[B, G + h*w, D]``: the encoder's last block (after the final norm) on the batch, on the model's device."""
    from polymae.datasets.transforms import to_model_inputs

    rgb = to_model_inputs(batch, next(model.parameters()).device, ["rgb"])["rgb"]
    return model.encode(rgb)[0][-1]


def _detect(model, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per image ``(boxes [100, 4] normalised xyxy, class indices [100], scores [100])`` of one parallel pass: every
    slot is a detection of its most probable object class (no-object left out), scored by that class's
    probability (as DETR ranks its slots), with the most probable coordinate tokens as its box."""
    from polymae.models.mad import DET_SLOTS, SEQ_LEN

    dec = model.sequence_decoder
    v = dec.vocab
    tokens = torch.full((memory.shape[0], SEQ_LEN["det"]), v.MASK, dtype=torch.long, device=memory.device)
    tokens[:, 0] = v.prompt("det")
    probs = dec(tokens, memory, "det").softmax(-1)[:, 1:].reshape(len(tokens), DET_SLOTS, 5, -1)
    scores, cls = probs[:, :, 4, v.class_base:v.no_object].max(-1)
    boxes = v.coord_value(probs[:, :, :4].argmax(-1)).clamp(0, 1)
    boxes = torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])],
                      dim=-1).cpu()
    cls, scores = cls.cpu(), scores.cpu()
    return [(boxes[i], cls[i], scores[i]) for i in range(len(tokens))]


def _pixels_xywh(box: torch.Tensor, rec: dict) -> list[float]:
    x0, y0, x1, y1 = box.tolist()
    w, h = rec["width"], rec["height"]
    return [x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h]


def _instances(model, memory: torch.Tensor, mad_task: str, prompts: list[tuple[int, torch.Tensor, int, float]],
               records: list[dict], cat_ids: list[int]) -> list[dict]:
    """COCO results of seg / kpt sequences decoded in one parallel pass for ``(image row, box, class, score)``."""
    from polymae.models.mad import decode_keypoints, decode_parallel, decode_segmentation
    from polymae.pipeline.evaluate.coco import mask_to_rle

    if not prompts:
        return []
    dec = model.sequence_decoder
    v = dec.vocab
    prompt = torch.stack([torch.cat([torch.tensor([v.prompt(mad_task)]), v.coord(b), torch.tensor([v.class_base + c])])
                          for _, b, c, _ in prompts])
    rows = torch.tensor([r for r, _, _, _ in prompts], device=memory.device)
    tokens, _ = decode_parallel(dec, memory[rows], mad_task, prompt.to(memory.device))
    tokens = tokens.cpu()
    out = []
    for (row, box, cls, score), tok in zip(prompts, tokens):
        rec = records[row]
        r = {"image_id": rec["image_id"], "category_id": cat_ids[cls], "score": float(score)}
        if mad_task == "seg":
            r["segmentation"] = mask_to_rle(decode_segmentation(v, tok, box, rec["height"], rec["width"]))
        else:
            kp = decode_keypoints(v, tok)
            kp[:, 0] *= rec["width"]
            kp[:, 1] *= rec["height"]
            r["keypoints"] = [float(x) for x in kp.reshape(-1)]
        out.append(r)
    return out


def _prompts(model, memory, batch: dict, info: dict, gt_boxes: bool, has_det: bool) -> list:
    """``(row, box, class, score)`` prompts of a batch: predicted boxes (classes with keypoints for kpt), or the
    ground-truth boxes (score 1) when ``gt_boxes`` or the model has no det task."""
    cats = info["categories"]
    keep = (lambda c: bool(cats[c].get("keypoints"))) if info["mad_task"] == "kpt" else (lambda c: True)
    index = {int(c["id"]): i for i, c in enumerate(cats)}
    out = []
    if gt_boxes or not has_det:
        for row, rec in enumerate(batch["records"]):
            out += [(row, torch.tensor(a["box"]), index[a["category_id"]], 1.0) for a in rec["anns"]
                    if keep(index[a["category_id"]])]
        return out
    for row, (boxes, classes, scores) in enumerate(_detect(model, memory)):
        out += [(row, b, int(c), float(s)) for b, c, s in zip(boxes, classes, scores) if keep(int(c))]
    return out


def _predict_instances(model, info: dict, img_size: int, batch_size: int, max_samples: int) -> tuple:
    """det / seg / kpt: ``(gt index, {"results", "gt_box_results", "image_ids", "prompt"})`` over the held-out
    images (module docstring); ``gt_box_results`` (seg / kpt) are decoded with the ground-truth boxes as prompts."""
    from tqdm import tqdm

    gt, records, stream = _images(info, img_size, batch_size, max_samples)
    cat_ids = [int(c["id"]) for c in info["categories"]]
    mad_task = info["mad_task"]
    has_det = "det" in model.sequence_tasks.values()
    results, with_gt, ids = [], [], []
    for batch in tqdm(stream, total=-(-len(records) // batch_size), desc=f"{mad_task} decode", unit="batch",
                      leave=False):
        memory = _memory(model, batch)
        recs = batch["records"]
        if mad_task == "det":
            for row, (boxes, classes, scores) in enumerate(_detect(model, memory)):
                results += [{"image_id": recs[row]["image_id"], "category_id": cat_ids[int(c)],
                             "bbox": _pixels_xywh(b, recs[row]), "score": float(s)}
                            for b, c, s in zip(boxes, classes, scores)]
        else:
            results += _instances(model, memory, mad_task, _prompts(model, memory, batch, info, False, has_det),
                                  recs, cat_ids)
            with_gt += _instances(model, memory, mad_task, _prompts(model, memory, batch, info, True, has_det),
                                  recs, cat_ids)
        ids += [r["image_id"] for r in recs]
    out = {"results": results, "image_ids": ids}
    if mad_task != "det":
        out.update(gt_box_results=with_gt, prompt="predicted boxes" if has_det else "ground-truth boxes")
    return gt, out


def _score_instances(model, info: dict, img_size: int, batch_size: int, max_samples: int, output: str,
                     task: str) -> dict:
    """det / seg / kpt: COCO results of the held-out images and their AP (module docstring)."""
    from polymae.pipeline.evaluate.coco import coco_ap, write_results

    gt, pred = _predict_instances(model, info, img_size, batch_size, max_samples)
    results, n = pred["results"], len(pred["image_ids"])
    if output:  # first: pycocotools' loadRes adds numpy fields to the dicts it is given
        write_results(results, os.path.join(output, f"{task}.results.json"))
    iou_type = IOU_TYPE[info["mad_task"]]
    out = dict(coco_ap(gt, copy.deepcopy(results), iou_type), samples=n, predictions=len(results))
    if "gt_box_results" in pred:
        out["gt_box_AP"] = coco_ap(gt, pred["gt_box_results"], iou_type)["AP"]
        out["prompt"] = pred["prompt"]
    return out


def _predict_captions(model, info: dict, img_size: int, batch_size: int, max_samples: int) -> tuple[dict, dict]:
    """cap: ``(image id -> predicted caption, image id -> reference captions)`` of the held-out images that have
    references, iteratively decoded (module docstring)."""
    from tokenizers import Tokenizer
    from tqdm import tqdm

    from polymae.models.mad import decode_caption, decode_iterative

    _, records, stream = _images(info, img_size, batch_size, max_samples)
    tok = Tokenizer.from_str(info["tokenizer"])
    dec = model.sequence_decoder
    preds, refs = {}, {}
    for batch in tqdm(stream, total=-(-len(records) // batch_size), desc="cap decode", unit="batch", leave=False):
        memory = _memory(model, batch)
        prompt = torch.full((memory.shape[0], 1), dec.vocab.prompt("cap"), dtype=torch.long, device=memory.device)
        tokens = decode_iterative(dec, memory, "cap", prompt).cpu()
        for rec, t in zip(batch["records"], tokens):
            if rec["captions"]:
                preds[rec["image_id"]] = decode_caption(dec.vocab, tok, t)
                refs[rec["image_id"]] = rec["captions"]
    return preds, refs


def _score_captions(model, info: dict, img_size: int, batch_size: int, max_samples: int, output: str,
                    task: str) -> dict:
    """cap: iteratively decoded captions of the held-out images, BLEU-4 and CIDEr against their references."""
    from polymae.pipeline.evaluate.coco import caption_scores, write_results

    preds, refs = _predict_captions(model, info, img_size, batch_size, max_samples)
    if not preds:
        return {"skipped": "no held-out captions"}
    if output:
        write_results([{"image_id": i, "caption": c} for i, c in preds.items()],
                      os.path.join(output, f"{task}.results.json"))
    return dict(caption_scores(refs, preds), samples=len(preds))


#: the COCO evaluation of each Masked AutoDecoder task's output (``cap``: captions, BLEU-4 / CIDEr)
IOU_TYPE = {"det": "bbox", "seg": "segm", "kpt": "keypoints", "cap": "captions"}


@torch.no_grad()
def predict_sequence_task(model, task: str, info: dict, img_size: int, batch_size: int = 8,
                          max_samples: int = 0) -> dict:
    """The predictions of one sequence task on the images of ``info["val_annotations"]`` (module docstring), in
    COCO results format, on the model's device.

    Args:
        model: the ``MultiTaskModel`` (eval mode); task: its name; info: its entry of
            ``model_config.json["multitask"]["tasks"]`` (``val_annotations`` / ``val_images`` may be replaced by
            the caller to predict on other COCO-format data); max_samples: first images by id (0 = all).
    Returns:
        ``{"results": [COCO result dicts], "image_ids": [decoded image ids]}``, plus for seg / kpt
        ``gt_box_results`` (decoded with ground-truth box prompts) and ``prompt``.
    Raises:
        FileNotFoundError: the annotations or an image are missing; ValueError: the annotations are not COCO JSON.
    """
    if info["mad_task"] == "cap":
        preds, _ = _predict_captions(model, info, img_size, batch_size, max_samples)
        return {"results": [{"image_id": i, "caption": c} for i, c in preds.items()], "image_ids": list(preds)}
    return _predict_instances(model, info, img_size, batch_size, max_samples)[1]


@torch.no_grad()
def evaluate_sequence_task(model, task: str, info: dict, img_size: int, batch_size: int = 8, max_samples: int = 0,
                           output: str = "") -> dict:
    """Metrics of one sequence task of a multitask model (module docstring).

    Args:
        model: the ``MultiTaskModel`` (eval mode); task: its name; info: its entry of
            ``model_config.json["multitask"]["tasks"]``; output: folder for ``{task}.results.json`` ("" = none).
    Returns:
        det / seg / kpt: COCO stats (``AP``, ``AP50``, ...), ``samples``, ``predictions`` (and for seg / kpt
        ``gt_box_AP``, ``prompt``); cap: ``bleu4``, ``cider``, ``samples``; or ``{"skipped": reason}`` when the
        task has no held-out annotations, or they were a local file that a release does not carry.
    Raises:
        FileNotFoundError: the held-out annotations or an image are missing.
    """
    if not info.get("val_annotations"):
        return {"skipped": f"no held-out annotations (set tasks.{task}.val_annotations)"}
    if str(info["val_annotations"]).startswith("<local>/"):  # a release: publish left out the local path
        return {"skipped": f"the release does not carry {info['val_annotations']}: score this task with "
                           f"protocol=coco coco.annotations=... coco.images=..."}
    score = _score_captions if info["mad_task"] == "cap" else _score_instances
    return score(model, info, img_size, batch_size, max_samples, output, task)


__all__ = ["evaluate_sequence_task", "predict_sequence_task", "IOU_TYPE"]
