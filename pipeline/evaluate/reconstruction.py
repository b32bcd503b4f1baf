"""Evaluate a pre-trained MultiMAE/MAE checkpoint on held-out labelled shards.

Two measurements, both on a deterministic central crop:

1. **reconstruction** — the pre-training objective with masks drawn from a fixed seed: the mean loss per
   modality over the held-out samples (MultiMAE Sec. 3, losses on masked tokens only);
2. **cross-modal prediction** — RGB fully visible, depth and semseg fully masked (MultiMAE Sec. 4.4,
   "RGB → X"): δ1 / AbsRel / RMSE of the predicted depth (aligned by least squares, since the model
   predicts truncated-standardised depth) against the depth pseudo-labels, and mIoU of the predicted
   classes against the semseg pseudo-labels at stride 4.

A multitask checkpoint (encoder + task heads, ``polymae multitask``) is scored instead on each task's held-out data
(``pipeline/evaluate/multitask.py``). This is the ``pretrain`` protocol of ``polymae evaluate``
(``pipeline/evaluate/job.py``), which writes the results.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _full_masks(batch: dict, mods: list[str], patch_size: int, visible: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Masks ``[B, N]`` with the ``visible`` modalities fully visible and the others fully masked (True =
    masked). Every modality has the same ``H/p × W/p`` token grid (semseg: stride-4 map, kernel p/4)."""
    B, _, H, W = batch["rgb"].shape
    n = (H // patch_size) * (W // patch_size)
    return {m: torch.full((B, n), m not in visible, dtype=torch.bool) for m in mods}


@torch.no_grad()
def run_pretrain(cfg, ctx) -> dict:
    """The ``pretrain`` protocol: both measurements (module docstring) on ``cfg.shards``/``cfg.split``.

    Args:
        cfg: ``pipeline/evaluate/job.py`` ``EvaluateConfig``; ctx: ``pipeline/evaluate/results.py`` ``EvalContext``.
    Returns:
        ``{"metrics": flat {name: value}, "dataset": {...}, "reconstruction_loss": {modality: loss},
        "rgb_to_depth": {...}, "rgb_to_semseg": {...}, ...}`` (a multitask checkpoint: ``"tasks"`` instead).
    Raises:
        RuntimeError: no held-out samples; FileNotFoundError: no checkpoint / shards.
    """
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream
    from polymae.datasets.transforms import MultiModalAugment, to_model_inputs
    from polymae.pipeline.train.checkpoint import load_model
    from polymae.pipeline.evaluate.metrics import DepthMetrics, SegMetrics

    model, mc = load_model(cfg.checkpoint)
    if "heads" in mc:  # a multitask checkpoint (encoder + task heads): each head on its task's held-out data
        return _evaluate_multitask(cfg, ctx, model, mc)
    pre = mc.get("pretrain", {})
    ik = mc["init_kwargs"]
    img_size = int(pre.get("img_size") or ik.get("img_size", 224))
    arch = ik.get("arch", pre.get("arch", "multimae"))
    mods = list(ik.get("in_modalities", ["rgb"])) if arch == "multimae" else ["rgb"]
    urls = shards.trusted_shard_urls(cfg.shards, cfg.split)
    stream = ShardStream(urls, cfg.batch_size, MultiModalAugment(img_size=img_size, scale=None), seed=cfg.seed,
                         shuffle_buffer=0, infinite=False, drop_last=False)
    num_visible = cfg.num_visible or int(pre.get("num_visible", 0)) or None
    gen = torch.Generator().manual_seed(cfg.seed)
    rec_sum = {m: 0.0 for m in mods}
    n = 0
    depth_m = DepthMetrics()
    seg_m = None
    if "semseg" in mods:
        seg_m = SegMetrics(int(ik["semseg_num_classes"]), int(ik.get("semseg_ignore_index", 255)))
    for batch in stream:
        batch = dict(batch, **to_model_inputs(batch, "cpu", mods))
        inputs = {m: batch[m] for m in mods}
        B = batch["rgb"].shape[0]
        if n == 0 and cfg.pictures:  # MultiMAE-demo-style pictures of the first images, with their own masks
            from polymae.pipeline.evaluate.pictures import save_reconstruction_pictures

            save_reconstruction_pictures(ctx, model, inputs, num_visible=num_visible, max_images=cfg.pictures,
                                         generator=torch.Generator().manual_seed(cfg.seed))
        if arch == "mae":
            out = model(inputs, generator=gen)
        else:
            out = model(inputs, num_visible=num_visible, alphas=float(pre.get("alpha", 1.0)), generator=gen)
        for m in mods:
            if m in out.losses:
                rec_sum[m] += float(out.losses[m]) * B
        if arch == "multimae" and len(mods) > 1 and "rgb" in mods:
            x = model(inputs, masks=_full_masks(batch, mods, int(ik.get("patch_size", 16)), ("rgb",)))
            if "depth" in mods:
                depth_m.update(x.preds["depth"][:, 0], batch["depth"][:, 0], align=True)
            if seg_m is not None:
                seg_m.update(x.preds["semseg"].argmax(1), batch["semseg"])
        n += B
        if cfg.max_samples and n >= cfg.max_samples:
            break
    if n == 0:
        raise RuntimeError(f"no samples in {cfg.shards}/{cfg.split}")
    results: dict = {
        "checkpoint": cfg.checkpoint, "model": mc.get("name"), "shards": cfg.shards, "split": cfg.split,
        "samples": n, "img_size": img_size,
        "reconstruction_loss": {m: v / n for m, v in rec_sum.items()},
    }
    if arch == "multimae" and "depth" in mods and "rgb" in mods:
        results["rgb_to_depth"] = depth_m.compute()
    if seg_m is not None and "rgb" in mods:
        results["rgb_to_semseg"] = seg_m.compute()
    results["metrics"] = flat_metrics(results)
    results["dataset"] = _dataset(cfg, urls, n)
    return results


def _dataset(cfg, urls: list[str], n: int) -> dict:
    """The ``dataset`` entry of the results: the split's folder, a fingerprint of its shards, the sample count."""
    from polymae.pipeline.evaluate.results import fingerprint_files

    root = f"{cfg.shards.rstrip('/')}/{cfg.split}"
    return {"path": root, "fingerprint": fingerprint_files(root, urls), "samples": {cfg.split: n}}


def _evaluate_multitask(cfg, ctx, model, mc: dict) -> dict:
    """The results of a multitask checkpoint (``pipeline/evaluate/multitask.py``)."""
    from polymae.datasets import shards
    from polymae.pipeline.evaluate.multitask import evaluate_multitask

    res = evaluate_multitask(model, mc, cfg.shards, cfg.split, cfg.class_folder, cfg.batch_size, cfg.max_samples,
                             ctx.output)
    samples = max([m.get("samples", 0) for m in res["tasks"].values()] or [0])
    try:
        urls = shards.trusted_shard_urls(cfg.shards, cfg.split)
    except FileNotFoundError:  # sequence/class-folder tasks only
        urls = []
    results = {"model": mc.get("name"), "shards": cfg.shards, "split": cfg.split, "samples": samples, **res}
    results["metrics"] = flat_metrics(results)
    results["dataset"] = _dataset(cfg, urls, samples)
    return results


def flat_metrics(results: dict) -> dict[str, float]:
    """``{"reconstruction_loss/rgb": .., "rgb_to_depth/delta1": .., "<task>/<metric>": ..}``: the numbers of a
    ``pretrain``-protocol result, flat, for the results table."""
    out: dict[str, float] = {}
    for group in ("reconstruction_loss", "rgb_to_depth", "rgb_to_semseg"):
        for k, v in results.get(group, {}).items():
            if isinstance(v, (int, float)) and k != "samples":
                out[f"{group}/{k}"] = float(v)
    for task, m in results.get("tasks", {}).items():
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("samples", "classes_present"):
                out[f"{task}/{k}"] = float(v)
    return out
