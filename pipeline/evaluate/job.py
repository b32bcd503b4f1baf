"""``polymae evaluate``: one protocol on one checkpoint → ``results.json``, pictures, a row set in the results table.

Protocols (``protocol=``; each a named config under ``jobs/configs/eval/``):

=============== ================================================================== ==============================
protocol        what                                                               module
=============== ================================================================== ==============================
``pretrain``    reconstruction loss, RGB→depth/semseg on held-out labelled shards  ``reconstruction.py``
                (a multitask checkpoint: each task head on its held-out data)
``linear_probe``frozen encoder, BN + linear, LARS (MAE); top-1/top-5              ``classification.py``
``finetune``    layer decay, drop path, mixup/cutmix, label smoothing; top-1/top-5 ``classification.py``
``semseg``      ConvNeXt head fine-tuned, ADE20K/NYUv2 layouts; mIoU, pixel acc    ``dense.py``
``depth``       DPT head + berHu on NYUv2; δ1-3, AbsRel, RMSE over every image     ``dense.py``
``coco``        box/mask/keypoint AP, BLEU-4/CIDEr of COCO results JSON            ``coco.py``
=============== ================================================================== ==============================

Any checkpoint goes in: a pretrain or multitask run folder, a release folder or URL (``s3://``), an official
MultiMAE/MAE file (``pipeline/train/checkpoint.py`` ``load_model``/``load_encoder``). Results go to ``output``
(default ``{checkpoint}/eval-{split}`` for ``pretrain``, ``{checkpoint}/eval-{protocol}`` otherwise; for a file or
URL checkpoint, under ``results_table``) and to the results table (``pipeline/evaluate/results.py``);
``polymae evaluate --compare [CKPT ...]`` prints checkpoints side by side.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Literal

from polymae.pipeline.config import ConfigError, field_
from polymae.pipeline.evaluate.classification import FinetuneConfig, LinearProbeConfig
from polymae.pipeline.evaluate.coco import CocoConfig
from polymae.pipeline.evaluate.dense import DepthConfig, SemsegConfig

log = logging.getLogger(__name__)

Protocol = Literal["pretrain", "linear_probe", "finetune", "semseg", "depth", "coco"]


@dataclass
class EvaluateConfig:
    """Everything ``polymae evaluate`` takes (the ``pretrain`` protocol's settings at the top level)."""

    checkpoint: str = field_("work/runs/pretrain", help="run folder, release folder or URL, or an official "
                             "MultiMAE/MAE .pth/.safetensors file")
    protocol: Protocol = field_("pretrain", help="pretrain | linear_probe | finetune | semseg | depth | coco "
                                "(configs: jobs/configs/eval/)")
    output: str = field_("", help="results folder (default: {checkpoint}/eval-{split} for pretrain, "
                         "{checkpoint}/eval-{protocol} otherwise; under results_table for a file/URL checkpoint)")
    results_table: str = field_("work/results", help="folder of the results table (results.parquet + results.md) "
                                "that every run appends to; empty = none")
    device: str = field_("cpu", help="cpu | cuda | cuda:N")
    seed: int = field_(0, help="seed of masks, head initialisation and data order")
    batch_size: int = field_(8, help="samples per forward pass")
    max_samples: int = field_(0, help="stop each split after this many samples (0 = all)")
    shards: str = field_("work/shards", help="pretrain protocol: root of labelled shards")
    split: str = field_("val", help="pretrain protocol: held-out split under `shards`")
    num_visible: int = field_(0, help="pretrain protocol: visible tokens of the reconstruction metric "
                              "(0 = the training value)")
    class_folder: str = field_("", help="pretrain protocol, multitask checkpoints: held-out ImageNet-style folder "
                               "for classification tasks (default: the shards' `cls` members)")
    pictures: int = field_(4, help="pretrain protocol: validation images drawn as MultiMAE-style reconstructions")
    linear_probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    semseg: SemsegConfig = field(default_factory=SemsegConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    coco: CocoConfig = field(default_factory=CocoConfig)

    def validate(self) -> None:
        """Pure value checks; raises :class:`ConfigError` naming the key."""
        if self.batch_size < 1:
            raise ConfigError("batch_size", "must be >= 1")
        for key in ("num_visible", "max_samples", "pictures"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError("device", f"expected cpu, cuda or cuda:N, got {self.device!r}")

    def preflight(self) -> None:
        """The checkpoint (and the pretrain protocol's shards) exist; raises :class:`ConfigError` naming the key."""
        from polymae.datasets import storage

        ckpt = self.checkpoint
        if not ckpt:
            if self.protocol == "coco" and self.coco.results:
                return  # scoring prediction files of any model: no checkpoint needed (coco's own preflight runs)
            raise ConfigError("checkpoint", "is empty (only protocol=coco with coco.results needs none)")
        if "://" not in ckpt and not ckpt.endswith((".pth", ".pt", ".safetensors")) \
                and not os.path.exists(os.path.join(ckpt, "model_config.json")):
            raise ConfigError("checkpoint", f"{ckpt!r} has no model_config.json (not a run or release folder)")
        if "://" not in ckpt and ckpt.endswith((".pth", ".pt", ".safetensors")) and not os.path.exists(ckpt):
            raise ConfigError("checkpoint", f"{ckpt!r} does not exist")
        if self.protocol == "pretrain" and "://" not in self.shards and not storage.exists(self.shards):
            raise ConfigError("shards", f"input folder {self.shards!r} does not exist")
        if self.protocol in ("semseg", "depth"):
            from polymae.pipeline.evaluate.dense import preflight_dense

            preflight_dense(getattr(self, self.protocol))
        if self.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("device", f"{self.device} requested but torch sees no CUDA device")


def output_folder(cfg: EvaluateConfig) -> str:
    """Where this run's ``results.json`` and pictures go (see ``output`` in :class:`EvaluateConfig`)."""
    if cfg.output:
        return cfg.output
    name = f"eval-{cfg.split}" if cfg.protocol == "pretrain" else f"eval-{cfg.protocol}"
    ckpt = (cfg.checkpoint or subject(cfg)).rstrip("/")
    if "://" not in ckpt and os.path.isdir(ckpt):
        return os.path.join(ckpt, name)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", ckpt.split("://")[-1]).strip("_")
    return os.path.join(cfg.results_table or "work/results", "runs", slug, name)


def subject(cfg: EvaluateConfig) -> str:
    """What the results are of: the checkpoint, or without one (``protocol=coco`` scoring files) the results
    files, comma-joined; the results table's ``checkpoint`` column."""
    return cfg.checkpoint or ",".join(cfg.coco.results)


def _predictions_digest(urls: list[str]) -> str:
    """sha256 over the sha256 of each prediction file, in order: the table's digest when there is no checkpoint."""
    import hashlib

    from polymae.datasets import storage

    return hashlib.sha256("".join(storage.sha256_of(u)[0] for u in urls).encode()).hexdigest()


def _run_protocol(cfg: EvaluateConfig, ctx) -> dict:
    """Dispatch to the protocol's module; returns its results dict (``metrics``, ``dataset``, ...)."""
    if cfg.protocol == "pretrain":
        from polymae.pipeline.evaluate.reconstruction import run_pretrain

        return run_pretrain(cfg, ctx)
    if cfg.protocol in ("linear_probe", "finetune"):
        from polymae.pipeline.evaluate.classification import run_finetune, run_linear_probe

        run = run_linear_probe if cfg.protocol == "linear_probe" else run_finetune
        return run(getattr(cfg, cfg.protocol), ctx)
    if cfg.protocol in ("semseg", "depth"):
        from polymae.pipeline.evaluate.dense import run_depth, run_semseg

        return (run_semseg if cfg.protocol == "semseg" else run_depth)(getattr(cfg, cfg.protocol), ctx)
    from polymae.pipeline.evaluate.coco import run_coco

    return run_coco(cfg.coco, ctx)


def evaluate(cfg: EvaluateConfig) -> dict:
    """Run ``cfg.protocol`` on ``cfg.checkpoint``; write ``results.json``, ``results.md``, ``config.yaml``, pictures
    and the results table rows; print the summary. Returns the results (``output`` = the results folder)."""
    from polymae.pipeline.evaluate.results import EvalContext, finish

    ctx = EvalContext(checkpoint=subject(cfg), output=output_folder(cfg), device=cfg.device, seed=cfg.seed,
                      batch_size=cfg.batch_size, max_samples=cfg.max_samples)
    res = _run_protocol(cfg, ctx)
    if not cfg.checkpoint:  # coco on prediction files of any model: identified by their bytes
        res["checkpoint_sha256"] = _predictions_digest(list(cfg.coco.results))
    results = finish(cfg.protocol, res, ctx, cfg, cfg.results_table)
    print_summary(results)
    results["output"] = ctx.output
    return results


def print_summary(results: dict) -> None:
    """Print a protocol's metrics as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    ds = results.get("dataset", {})
    n = ", ".join(f"{k} {v}" for k, v in ds.get("samples", {}).items())
    t = Table(title=f"evaluate {results['protocol']}: {results['checkpoint']} ({n or 'no'} samples)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k, v in results["metrics"].items():
        t.add_row(k, f"{float(v):.4f}")
    Console().print(t)
