"""Evaluate a pre-trained MultiMAE/MAE checkpoint on held-out labelled shards.

Two measurements, both on a deterministic central crop:

1. **reconstruction** — the pre-training objective with masks drawn from a fixed seed: the mean loss per
   modality over the held-out samples (MultiMAE Sec. 3, losses on masked tokens only);
2. **cross-modal prediction** — RGB fully visible, depth and semseg fully masked (MultiMAE Sec. 4.4,
   "RGB → X"): δ1 / AbsRel / RMSE of the predicted depth (aligned by least squares, since the model
   predicts truncated-standardised depth) against the depth pseudo-labels, and mIoU of the predicted
   classes against the semseg pseudo-labels at stride 4.

A multitask checkpoint (encoder + task heads, ``polymae multitask``) is scored instead on each task's held-out data
(``pipeline/evaluate/multitask.py``). Writes ``results.json`` and ``results.md`` and prints the table.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from polymae.pipeline.config import ConfigError, field_, save_config

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """Everything ``polymae evaluate`` takes."""

    checkpoint: str = field_("work/runs/pretrain", help="training run folder or released (published) folder")
    shards: str = field_("work/shards", help="root of labelled shards")
    split: str = field_("val", help="held-out split under `shards`")
    output: str = field_("", help="results folder (default: {checkpoint}/eval-{split})")
    batch_size: int = field_(8, help="samples per forward pass")
    num_visible: int = field_(0, help="visible tokens for the reconstruction metric (0 = the training value)")
    seed: int = field_(0, help="seed of the reconstruction masks")
    max_samples: int = field_(0, help="stop after this many samples (0 = all)")
    class_folder: str = field_("", help="multitask checkpoints: held-out ImageNet-style folder for classification "
                               "tasks (default: the shards' `cls` members)")

    def validate(self) -> None:
        """Pure value checks; raises :class:`ConfigError` naming the key."""
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be >= 1")
        for key in ("num_visible", "max_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")

    def preflight(self) -> None:
        """Local inputs exist; raises :class:`ConfigError` naming the key."""
        from polymae.datasets import storage

        if "://" not in self.checkpoint and not os.path.exists(os.path.join(self.checkpoint, "model_config.json")):
            raise ConfigError("checkpoint", f"{self.checkpoint!r} has no model_config.json (not a run or release folder)")
        if "://" not in self.shards and not storage.exists(self.shards):
            raise ConfigError("shards", f"input folder {self.shards!r} does not exist")


def _full_masks(batch: dict, mods: list[str], patch_size: int, visible: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Masks ``[B, N]`` with the ``visible`` modalities fully visible and the others fully masked (True =
    masked). Every modality has the same ``H/p × W/p`` token grid (semseg: stride-4 map, kernel p/4)."""
    B, _, H, W = batch["rgb"].shape
    n = (H // patch_size) * (W // patch_size)
    return {m: torch.full((B, n), m not in visible, dtype=torch.bool) for m in mods}


@torch.no_grad()
def evaluate(cfg: EvaluateConfig) -> dict:
    """Run both measurements; returns the results dict (also written to ``results.json``)."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream
    from polymae.datasets.transforms import MultiModalAugment, to_model_inputs
    from polymae.pipeline.train.checkpoint import load_model
    from polymae.pipeline.evaluate.metrics import DepthMetrics, SegMetrics

    model, mc = load_model(cfg.checkpoint)
    if "heads" in mc:  # a multitask checkpoint (encoder + task heads): each head on its task's held-out data
        return _finish(cfg, _evaluate_multitask(cfg, model, mc))
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
    return _finish(cfg, results)


def _evaluate_multitask(cfg: EvaluateConfig, model, mc: dict) -> dict:
    """The results of a multitask checkpoint (``pipeline/evaluate/multitask.py``)."""
    from polymae.pipeline.evaluate.multitask import evaluate_multitask

    res = evaluate_multitask(model, mc, cfg.shards, cfg.split, cfg.class_folder, cfg.batch_size, cfg.max_samples,
                             cfg.output or os.path.join(cfg.checkpoint, f"eval-{cfg.split}"))
    samples = max([m.get("samples", 0) for m in res["tasks"].values()] or [0])
    return {"checkpoint": cfg.checkpoint, "model": mc.get("name"), "shards": cfg.shards, "split": cfg.split,
            "samples": samples, **res}


def _finish(cfg: EvaluateConfig, results: dict) -> dict:
    """Write ``results.json``, ``results.md`` and the config to the output folder, print the table."""
    out_dir = cfg.output or os.path.join(cfg.checkpoint, f"eval-{cfg.split}")
    from polymae.datasets import storage

    storage.makedirs(out_dir)
    storage.write_json_atomic(f"{out_dir}/results.json", results)
    storage.write_bytes_atomic(f"{out_dir}/results.md", results_markdown(results).encode())
    save_config(cfg, f"{out_dir}/config.yaml")
    print_results(results)
    results["output"] = out_dir
    return results


def _rows(results: dict) -> list[tuple[str, str]]:
    if "tasks" in results:
        from polymae.pipeline.evaluate.multitask import task_rows

        return task_rows(results)
    rows = [(f"reconstruction loss ({m})", f"{v:.4f}") for m, v in results["reconstruction_loss"].items()]
    if "rgb_to_depth" in results:
        d = results["rgb_to_depth"]
        rows += [("RGB→depth δ1 ↑", f"{d['delta1']:.4f}"), ("RGB→depth AbsRel ↓", f"{d['abs_rel']:.4f}"),
                 ("RGB→depth RMSE ↓", f"{d['rmse']:.4f}")]
    if "rgb_to_semseg" in results:
        s = results["rgb_to_semseg"]
        rows += [("RGB→semseg mIoU ↑", f"{s['miou']:.4f}"), ("RGB→semseg pixel acc ↑", f"{s['pixel_acc']:.4f}")]
    return rows


def results_markdown(results: dict) -> str:
    """The results as a markdown table (``results.md``)."""
    lines = [f"# Evaluation of {results['model']} on {results['split']} ({results['samples']} samples)", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in _rows(results)]
    return "\n".join(lines) + "\n"


def print_results(results: dict) -> None:
    """Print the results as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"evaluate: {results['model']} on {results['split']} ({results['samples']} samples)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in _rows(results):
        t.add_row(k, v)
    Console().print(t)
