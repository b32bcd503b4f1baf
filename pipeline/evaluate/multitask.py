"""Evaluate a multitask checkpoint (``polymae multitask``: encoder + task heads, ``models/multitask.py``) on held-out
data of each of its tasks, on a deterministic central crop at the run's resolution:

* depth: delta1 / AbsRel / RMSE of the DPT head's prediction against the depth pseudo-labels, after a per-image
  least-squares scale and shift (the head predicts standardised depth; MiDaS Eq. 4), ``metrics.py``;
* semseg: mIoU and pixel accuracy of the ConvNeXt head's classes against the semseg pseudo-labels at stride 4;
* cls: top-1 (and top-5 when there are more than 5 classes) on an ImageNet-style folder (``class_folder``) or on the
  held-out shards' ``cls`` members;
* det / seg / kpt / cap (the shared Masked AutoDecoder): box / mask / keypoint AP and BLEU-4 / CIDEr on each task's
  held-out COCO annotations (``pipeline/evaluate/sequence.py``), predictions written as COCO results JSON.

A task without held-out data (no ``class_folder`` and no ``cls`` in the shards) is reported as skipped with the
reason, never silently.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _shard_batches(shards_root: str, split: str, img_size: int, batch_size: int, max_samples: int):
    """Held-out shard batches: a single pass, central crop, no shuffle (compact dicts, ``datasets/loader.py``)."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream
    from polymae.datasets.transforms import MultiModalAugment

    stream = ShardStream(shards.trusted_shard_urls(shards_root, split), batch_size,
                         MultiModalAugment(img_size=img_size, scale=None), shuffle_buffer=0, infinite=False,
                         drop_last=False)
    n = 0
    for batch in stream:
        yield batch
        n += len(batch["key"])
        if max_samples and n >= max_samples:
            return


def _class_batches(folder: str, classes: list[str] | None, img_size: int, batch_size: int, max_samples: int):
    """Held-out batches of an ImageNet-style folder, class indices mapped to the training classes by name.

    Raises:
        ValueError: a held-out class the model was not trained on.
    """
    from polymae.datasets.class_folder import ClassFolderStream, list_class_folder

    names, samples = list_class_folder(folder)
    if classes is not None:
        unknown = [c for c in names if c not in classes]
        if unknown:
            raise ValueError(f"held-out classes {unknown} of {folder} are not among the trained ones {classes}")
        samples = [(url, classes.index(names[i])) for url, i in samples]
    if max_samples:
        samples = samples[:max_samples]
    yield from ClassFolderStream(samples, batch_size, img_size, root=folder, scale=None, infinite=False)


def _score(model, task: str, info: dict, batches, device: str = "cpu") -> dict:
    """Run one head over ``batches`` and compute its metrics (module docstring)."""
    from polymae.datasets.transforms import to_model_inputs
    from polymae.pipeline.evaluate.metrics import DepthMetrics, SegMetrics, topk_accuracy

    kind, n = info["kind"], 0
    depth_m = DepthMetrics() if kind == "depth" else None
    seg_m = SegMetrics(int(info["num_classes"]), int(info["ignore_index"])) if kind == "semseg" else None
    logits, labels = [], []
    for batch in batches:
        if kind == "cls" and "cls" not in batch:
            return {"skipped": "the held-out shards have no `cls` member (set class_folder)"}
        x = to_model_inputs(batch, device, ["rgb"] + ([kind] if kind in ("depth", "semseg") else []))
        size = tuple(x["semseg"].shape[-2:]) if kind == "semseg" else None
        pred, _ = model(x["rgb"], task, size)
        if kind == "depth":
            depth_m.update(pred[:, 0], x["depth"][:, 0], align=True)
        elif kind == "semseg":
            seg_m.update(pred.argmax(1), x["semseg"])
        else:
            logits.append(pred.float())
            labels.append(batch["cls"])
        n += int(x["rgb"].shape[0])
    if n == 0:
        return {"skipped": "no held-out samples"}
    if kind == "depth":
        return dict(depth_m.compute(), samples=n)
    if kind == "semseg":
        return dict(seg_m.compute(), samples=n)
    ks = (1, 5) if int(info["num_classes"]) > 5 else (1,)
    return dict(topk_accuracy(torch.cat(logits), torch.cat(labels), ks), samples=n)


@torch.no_grad()
def evaluate_multitask(model, mc: dict, shards_root: str, split: str, class_folder: str = "", batch_size: int = 8,
                       max_samples: int = 0, output: str = "") -> dict:
    """Score every head of a multitask model (eval mode, CPU) on held-out data (module docstring).

    Args:
        model: the :class:`~polymae.models.multitask.MultiTaskModel`; mc: its ``model_config.json`` dict.
        shards_root, split: held-out labelled shards (depth, semseg, and cls when they carry it).
        class_folder: held-out ImageNet-style folder for cls tasks trained on a folder ("" = use the shards).
        output: folder for the sequence tasks' COCO results JSON ("" = not written).
    Returns:
        ``{"tasks": {task: {metric: value, "samples": n} | {"skipped": reason}}, "img_size": ...}``.
    Raises:
        FileNotFoundError: no held-out shards for a dense task.
    """
    mt = mc.get("multitask", {})
    img_size = int(mt.get("img_size") or mc.get("pretrain", {}).get("img_size") or 224)
    out: dict = {}
    for task, info in mt.get("tasks", {}).items():
        if info.get("mad_task"):
            from polymae.pipeline.evaluate.sequence import evaluate_sequence_task

            out[task] = evaluate_sequence_task(model, task, info, img_size, batch_size, max_samples, output)
            log.info("%s (%s): %s", task, info["kind"], out[task])
            continue
        if info["kind"] == "cls" and class_folder:
            batches = _class_batches(class_folder, info.get("classes"), img_size, batch_size, max_samples)
        else:
            batches = _shard_batches(shards_root, split, img_size, batch_size, max_samples)
        out[task] = _score(model, task, info, batches)
        log.info("%s (%s): %s", task, info["kind"], out[task])
    return {"tasks": out, "img_size": img_size}


__all__ = ["evaluate_multitask"]
