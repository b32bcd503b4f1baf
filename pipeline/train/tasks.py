"""The tasks of ``polymae multitask``: one class per task kind, each implementing :class:`Task` (its decoder, its
data stream, its loss, its metric), so that a new task is one new class registered in :data:`TASKS`.

* :class:`DepthTask`: DPT head (``models/heads.py``) on four encoder blocks; target = the depth pseudo-label
  standardised per image (MultiMAE's truncated standardisation, ``models/losses.py``), L1 loss over pixels with a
  positive depth; metric: delta1 / AbsRel / RMSE after a least-squares scale and shift (``evaluate/metrics.py``
  conventions, computed there).
* :class:`SemsegTask`: ConvNeXt head on the last block; logits at the label map's stride 4; cross-entropy ignoring
  the shards' ignore value; metric: mIoU.
* :class:`ClassificationTask`: mean-pooled tokens, LayerNorm, linear; cross-entropy on an ImageNet-style folder
  (``datasets/class_folder.py``) or on shards with a ``cls`` member; metric: top-1.

A task's data stream is deterministic and resumable: ``build_stream(..., skip_batches=b)`` continues after the
``b`` micro-batches this rank already took (``pipeline/train/multitask.py`` derives ``b`` from the sampler).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from polymae.pipeline.train.multitask_config import TaskConfig

log = logging.getLogger(__name__)


class Task:
    """One task of a multitask run (module docstring). Subclasses set :attr:`kind` and :attr:`head_kind` and
    implement :meth:`prepare`, :meth:`head_kwargs`, :meth:`build_stream`, :meth:`inputs` and :meth:`loss`.

    Args:
        name: the task's name (its key in ``tasks``); cfg: its :class:`TaskConfig`.
    Attributes:
        size: samples in its training data (after :meth:`prepare`); info: what evaluation needs to know
            (classes, ignore value), saved in ``model_config.json["multitask"]["tasks"][name]``.
    """

    kind = ""
    head_kind = ""

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        self.size = 0
        self.info: dict[str, Any] = {"kind": self.kind}

    def prepare(self) -> None:
        """Read the data's size and label set (file listings and manifests only).

        Raises:
            FileNotFoundError: no data; ConfigError: labels missing from the data (names the key).
        """
        raise NotImplementedError

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        """The head's constructor arguments for an encoder of ``encoder_kwargs`` (``init_kwargs``)."""
        raise NotImplementedError

    def head_spec(self, encoder_kwargs: dict) -> dict:
        """``{"kind": head kind, "kwargs": ...}`` for ``models/multitask.py``."""
        return {"kind": self.head_kind, "kwargs": self.head_kwargs(encoder_kwargs)}

    def build_stream(self, img_size: int, rank: int, world: int, seed: int, skip_batches: int, readers: int,
                     num_workers: int, shuffle_buffer: int):
        """``(stream, loader)``: this rank's infinite micro-batches of the task (``micro_batch`` samples each),
        after ``skip_batches`` already taken; ``readers`` canonical readers for shard data."""
        raise NotImplementedError

    def inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """``(rgb [B, 3, S, S] normalised, target, out_size)`` of a compact batch, on ``device``."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's float32 scalar loss of a prediction against :meth:`inputs`' target."""
        raise NotImplementedError


def _shard_stream(cfg: TaskConfig, img_size: int, rank: int, world: int, seed: int, skip_batches: int,
                  readers: int, num_workers: int, shuffle_buffer: int):
    """A ShardStream + DataLoader over a task's labelled shards (shared crop + flip of every member)."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream, make_loader
    from polymae.datasets.transforms import MultiModalAugment

    aug = MultiModalAugment(img_size=img_size, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    counts = shards.trusted_shard_counts(cfg.shards, cfg.split)
    stream = ShardStream(counts, cfg.micro_batch, aug, rank=rank, world=world, seed=seed,
                         shuffle_buffer=shuffle_buffer, skip_batches=skip_batches, num_workers=num_workers,
                         readers=readers)
    return stream, make_loader(stream, num_workers)


def _shard_size(cfg: TaskConfig) -> int:
    from polymae.datasets import shards

    return sum(n for _, n in shards.trusted_shard_counts(cfg.shards, cfg.split))


def _rgb(batch: dict, device: torch.device) -> torch.Tensor:
    from polymae.datasets.transforms import to_model_inputs

    return to_model_inputs(batch, device, ["rgb"])["rgb"]


class DepthTask(Task):
    """Monocular depth from RGB with a DPT head (module docstring)."""

    kind, head_kind = "depth", "dpt_depth"

    def prepare(self) -> None:
        self.size = _shard_size(self.cfg)

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        depth = int(encoder_kwargs.get("depth", 12))
        layers = list(self.cfg.layers) or [depth * (i + 1) // 4 - 1 for i in range(4)]
        if any(not 0 <= i < depth for i in layers):
            from polymae.pipeline.config import ConfigError

            raise ConfigError(f"tasks.{self.name}.layers", f"{layers} outside the encoder's {depth} blocks")
        dim, width = int(encoder_kwargs.get("dim", 192)), self.cfg.head_width or 256
        return {"dim": dim, "patch_size": int(encoder_kwargs.get("patch_size", 16)), "layers": layers,
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1)), "features": width,
                "reassemble": [max(8, width // 8 * m) for m in (1, 2, 4, 8)]}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                             shuffle_buffer)

    def inputs(self, batch, device):
        from polymae.datasets.transforms import to_model_inputs

        x = to_model_inputs(batch, device, ["rgb", "depth"])
        return x["rgb"], x["depth"], None

    def loss(self, pred, target):
        from polymae.models.losses import standardize_depth

        valid = (target > 0).float()
        diff = (pred.float() - standardize_depth(target.float())).abs() * valid
        return diff.sum() / valid.sum().clamp_min(1.0)


class SemsegTask(Task):
    """Semantic segmentation from RGB with the ConvNeXt head (module docstring)."""

    kind, head_kind = "semseg", "convnext_seg"

    def prepare(self) -> None:
        from polymae.datasets import shards
        from polymae.pipeline.config import ConfigError
        from polymae.pipeline.train.data import shard_label_info

        self.size = _shard_size(self.cfg)
        n, ignore = shard_label_info(self.cfg.shards, self.cfg.split)
        if self.cfg.num_classes:
            n = self.cfg.num_classes
            ignore = shards.semseg_ignore_value(n) if ignore is None else ignore
        if n is None:
            raise ConfigError(f"tasks.{self.name}.shards", f"{self.cfg.shards} has no semseg pseudo-labels")
        self.info.update(num_classes=int(n), ignore_index=int(ignore))

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        return {"dim": int(encoder_kwargs.get("dim", 192)), "num_classes": self.info["num_classes"],
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1)),
                "width": self.cfg.head_width or 256, "depth": self.cfg.head_depth}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                             shuffle_buffer)

    def inputs(self, batch, device):
        from polymae.datasets.transforms import to_model_inputs

        x = to_model_inputs(batch, device, ["rgb", "semseg"])
        return x["rgb"], x["semseg"], tuple(x["semseg"].shape[-2:])

    def loss(self, pred, target):
        return F.cross_entropy(pred.float(), target, ignore_index=self.info["ignore_index"])


class ClassificationTask(Task):
    """Image classification with the mean-pool + LayerNorm + linear head (module docstring)."""

    kind, head_kind = "cls", "linear_cls"

    def prepare(self) -> None:
        if self.cfg.folder:
            from polymae.datasets.class_folder import list_class_folder

            classes, self.samples = list_class_folder(self.cfg.folder)
            self.size = len(self.samples)
            self.info.update(num_classes=len(classes), classes=classes)
        else:
            self.size = _shard_size(self.cfg)
            self.info.update(num_classes=self.cfg.num_classes)

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        return {"dim": int(encoder_kwargs.get("dim", 192)), "num_classes": self.info["num_classes"],
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1))}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        if not self.cfg.folder:
            return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                                 shuffle_buffer)
        from polymae.datasets.class_folder import ClassFolderStream
        from polymae.datasets.loader import make_loader

        stream = ClassFolderStream(self.samples, self.cfg.micro_batch, img_size, root=self.cfg.folder,
                                   scale=tuple(self.cfg.crop_scale), hflip=self.cfg.hflip, rank=rank, world=world,
                                   seed=seed, skip_batches=skip_batches)
        return stream, make_loader(stream, num_workers)

    def inputs(self, batch, device):
        if "cls" not in batch:
            raise KeyError(f"task {self.name}: a batch without `cls` labels ({batch.get('key', [])[:3]} ...)")
        return _rgb(batch, device), batch["cls"].to(device), None

    def loss(self, pred, target):
        return F.cross_entropy(pred.float(), target)


#: task classes by kind (``TaskConfig.kind``)
TASKS: dict[str, type[Task]] = {"depth": DepthTask, "semseg": SemsegTask, "cls": ClassificationTask}


def build_task(name: str, cfg: TaskConfig) -> Task:
    """The :class:`Task` of ``cfg.kind`` named ``name`` (not yet prepared).

    Raises:
        ValueError: an unknown kind.
    """
    if cfg.kind not in TASKS:
        raise ValueError(f"unknown task kind {cfg.kind!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.kind](name, cfg)


__all__ = ["Task", "DepthTask", "SemsegTask", "ClassificationTask", "TASKS", "build_task"]
