"""The classification protocols of ``polymae evaluate``: **linear probe** and **fine-tuning** on an ImageNet-style
folder (``{data}/train/<class>/<image>``, ``{data}/val/<class>/<image>``; or explicit ``train`` / ``val`` roots).

Both take any checkpoint (``pipeline/train/checkpoint.py`` ``load_encoder``: run folder, release, official
MultiMAE/MAE file), put a classifier on its RGB encoder and report top-1 / top-5 accuracy on ``val`` after every
epoch (``metrics``: the last epoch's ``top1``/``top5`` and the best epoch's ``top1_best``/``top5_best``).

**Linear probe** (MAE, He et al. 2022, App. A.2 "Linear probing"): the encoder is frozen (``requires_grad``
off, eval mode); the feature of an image is the class token after the encoder's final norm
(``pool="cls"``: ``feats[-1][:, 0]``; a MultiMAE encoder has no final norm: its last block's output) or the mean
of the final patch tokens (``pool="mean"``); the head is
``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, K)`` (weight trunc-normal std 0.01, bias 0), trained
with LARS (``timm.optim.Lars``, momentum 0.9, weight decay 0) at ``lr = blr * batch / 256`` with a per-step linear
warm-up then a half-cycle cosine (``timm.scheduler.CosineLRScheduler``), 90 epochs / 10 warm-up by default.
MAE's LARS (MoCo v3's) adapts the rate of every matrix by its trust ratio (``0.001 * |w| / |g|``) even without
weight decay and leaves 1-d tensors alone; timm's Lars only adapts when ``weight_decay != 0`` unless
``always_adapt``, so the weight gets ``always_adapt=True`` and the bias a plain momentum-SGD group. Since the
encoder is frozen, without augmentation (``augment=false``, the default: central square crop resized to
``img_size``) the features of both splits are computed ONCE (``[N, D]`` float32, held on ``ctx.device``) and the
epochs run on them (seconds); with
``augment=true`` each step encodes a fresh random-resized crop + flip of its images (MAE's recipe).

**Fine-tuning** (MAE App. A.3, Table 9): the whole model trains with AdamW through timm's factory
(``create_optimizer_v2(opt="adamw", weight_decay, layer_decay)``; layer-wise rate decay as timm computes it for
its ViT: patch embedding and global tokens are layer 0, block ``i`` layer ``i + 1``, the final norm joins the
last block, the head is the top layer with scale 1, so block ``i`` of ``depth`` gets ``layer_decay ** (depth - i)``),
stochastic depth (``drop_path``: the encoder's ``drop_path_rate``, linear over the blocks), random-resized crop
(scale ``[min_crop_scale, 1]``, bicubic) + flip, then timm's RandAugment (``auto_augment``, MAE:
``rand-m9-mstd0.5-inc1``) and, after normalisation, timm's ``RandomErasing`` (``re_prob`` 0.25, ``re_mode`` "pixel",
``re_count`` 1) — the stages after the crop of ``timm.data.create_transform(is_training=True)``, as MAE's
``build_transform`` (:class:`FinetuneAugment`) — timm's ``Mixup`` (mixup / cutmix with label smoothing) and
``SoftTargetCrossEntropy``, or ``LabelSmoothingCrossEntropy`` without mixing; per-step warm-up + cosine. The head
is ``LayerNorm + Linear`` on the mean of the final patch tokens (``pool="mean"``, MAE's global pooling) or
``Linear`` on the normed class token (``pool="cls"``), weight trunc-normal std 2e-5.

Details:

* classes are the sorted sub-folder names of ``train``; a ``val`` class that is not a ``train`` class is a
  :class:`~polymae.pipeline.config.ConfigError` naming the key, before any work;
* top-k is reported only for ``k <= K`` (two classes: top-1 only), since top-5 of fewer than five classes is 1;
* a batch larger than the training set is cut to it (the lr follows the batch actually used); steps per epoch
  are ``N // batch`` (the last partial batch is dropped, as MAE's loaders do); fine-tuning accumulates
  ``batch / micro_batch`` micro-batches per step, and under mixup/cutmix the micro-batch must be even (timm; a
  ``micro_batch: 0`` batch cut to an odd training-set size is made even by one image less);
* images that fail to decode are logged by ``datasets/class_folder.py``: left out of a single pass (the linear
  probe reports them per split as ``skipped``) and replaced by another image of the batch in training;
* ``ctx.device`` is honoured (CPU by default), ``ctx.batch_size`` images per forward pass when encoding, and
  ``ctx.max_samples`` keeps a seeded random subset of each split; the global torch seed is ``ctx.seed`` during the
  run (``patches.global_torch_seed``), and timm's Mixup, which draws from numpy's global generator, runs with that
  generator in a state seeded by ``ctx.seed`` that is put back after each call;
* a fine-tuning image's augmentation is a function of ``(seed, epoch, image)`` only, whatever the loader workers: the
  crop + flip come from ``datasets/class_folder.py``'s per-sample generator, and timm's RandAugment / RandomErasing,
  which draw from Python's ``random``, numpy's and torch's global CPU generators, run with all three seeded from
  ``(seed, epoch, image key)`` and put back afterwards (:class:`FinetuneAugment`). With random erasing on, the
  training batches leave the loader as float32 already normalised (``[B, 3, S, S]``), else as uint8.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from polymae.datasets.class_folder import ClassFolderStream
from polymae.patches import global_rngs_seed, numpy_global_state
from polymae.pipeline.config import ConfigError, field_

if TYPE_CHECKING:
    from polymae.pipeline.evaluate.results import EvalContext

log = logging.getLogger(__name__)

__all__ = ["LinearProbeConfig", "FinetuneConfig", "ClassSplits", "load_class_splits", "topk_metrics", "PooledHead",
           "ClassifierModel", "build_classifier", "extract_features", "make_probe_optimizer", "make_scheduler",
           "make_finetune_optimizer", "check_auto_augment", "FinetuneAugment", "AugmentedClassFolderStream",
           "run_linear_probe", "run_finetune"]

TOPK = (1, 5)


# ------------------------------------------------------------------------------------------------ configs
@dataclass
class _ClassificationConfig:
    """Settings both protocols share (module docstring); ``SECTION`` is the key the errors name."""

    SECTION: ClassVar[str] = "classification"

    data: str = field_("", help="ImageNet-style root with train/ and val/ class folders (or set `train` and `val`)")
    train: str = field_("", help="training class folder {train}/<class>/<image> (default {data}/train)")
    val: str = field_("", help="validation class folder (default {data}/val); its classes must be train classes")
    img_size: int = field_(224, help="input side in pixels (a multiple of the encoder's patch size)")
    epochs: int = field_(90, help="training epochs")
    warmup_epochs: int = field_(10, help="epochs of linear learning-rate warm-up (per step), then cosine")
    batch_size: int = field_(16384, help="images per optimiser step (cut to the training set's size)")
    blr: float = field_(0.1, help="base learning rate; lr = blr * batch_size / 256")
    min_lr: float = field_(0.0, help="learning rate at the end of the cosine")
    pool: Literal["cls", "mean"] = field_("cls", help="feature: class token after the final norm, or the mean of "
                                          "the final patch tokens")
    min_crop_scale: float = field_(0.08, help="smallest area fraction of a random-resized crop (when augmenting)")
    num_workers: int = field_(0, help="DataLoader worker processes decoding images")
    precision: Literal["fp32", "bf16"] = field_("fp32", help="bf16: autocast the encoder to bfloat16")

    def roots(self) -> tuple[str, str]:
        """``(train folder, val folder)``: the explicit ones, else ``{data}/train`` and ``{data}/val``."""
        base = self.data.rstrip("/")
        return self.train or f"{base}/train", self.val or f"{base}/val"

    def validate(self) -> None:
        """Pure value checks; raises :class:`ConfigError` naming ``<section>.<key>``. The defaults pass (the
        section sits in ``EvaluateConfig`` whatever the protocol): the folders are required by :meth:`require_data`,
        which the protocol calls before any work."""
        s = self.SECTION
        for key in ("img_size", "epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{s}.{key}", f"must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"{s}.warmup_epochs", f"must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if not self.blr > 0:
            raise ConfigError(f"{s}.blr", f"must be > 0, got {self.blr}")
        if not 0 <= self.min_lr <= self.blr * self.batch_size / 256:
            raise ConfigError(f"{s}.min_lr", f"must be in [0, lr], got {self.min_lr}")
        if not 0 < self.min_crop_scale <= 1:
            raise ConfigError(f"{s}.min_crop_scale", f"must be in (0, 1], got {self.min_crop_scale}")
        if self.num_workers < 0:
            raise ConfigError(f"{s}.num_workers", f"must be >= 0, got {self.num_workers}")

    def require_data(self) -> None:
        """Raises :class:`ConfigError` (``<section>.data``) unless ``data`` or both ``train`` and ``val`` are set."""
        if not self.data and not (self.train and self.val):
            raise ConfigError(f"{self.SECTION}.data", "set `data` (a folder with train/ and val/ class folders) or "
                              "both `train` and `val`")

    def preflight(self) -> None:
        """Local class folders that are set exist; raises :class:`ConfigError` naming the key."""
        if not self.data and not (self.train and self.val):
            return
        for key, root in zip(("train", "val"), self.roots()):
            if "://" not in root and not os.path.isdir(root):
                name = key if getattr(self, key) else "data"
                raise ConfigError(f"{self.SECTION}.{name}", f"class folder {root!r} does not exist")


@dataclass
class LinearProbeConfig(_ClassificationConfig):
    """``polymae evaluate protocol=linear_probe``: MAE's linear probe (App. A.2; module docstring)."""

    SECTION: ClassVar[str] = "linear_probe"

    augment: bool = field_(False, help="random-resized crop + flip per step (encodes every step); false: central "
                           "crop, features computed once")
    momentum: float = field_(0.9, help="LARS momentum")
    weight_decay: float = field_(0.0, help="LARS weight decay (MAE: 0)")

    def validate(self) -> None:
        """Shared checks, then momentum in [0, 1) and weight_decay >= 0."""
        super().validate()
        if not 0 <= self.momentum < 1:
            raise ConfigError("linear_probe.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError("linear_probe.weight_decay", f"must be >= 0, got {self.weight_decay}")


@dataclass
class FinetuneConfig(_ClassificationConfig):
    """``polymae evaluate protocol=finetune``: MAE's end-to-end fine-tuning (App. A.3; module docstring)."""

    SECTION: ClassVar[str] = "finetune"

    epochs: int = field_(100, help="training epochs")
    warmup_epochs: int = field_(5, help="epochs of linear learning-rate warm-up (per step), then cosine")
    batch_size: int = field_(1024, help="images per optimiser step (cut to the training set's size)")
    blr: float = field_(5e-4, help="base learning rate; lr = blr * batch_size / 256")
    min_lr: float = field_(1e-6, help="learning rate at the end of the cosine")
    pool: Literal["cls", "mean"] = field_("mean", help="head input: mean of the final patch tokens (+ LayerNorm), "
                                          "or the class token after the final norm")
    micro_batch: int = field_(0, help="images per forward/backward (gradient accumulation; 0 = batch_size)")
    layer_decay: float = field_(0.75, help="layer-wise lr decay (timm's param_groups_layer_decay); 1 = none")
    drop_path: float = field_(0.1, help="stochastic depth rate of the last encoder block (linear from 0)")
    mixup: float = field_(0.8, help="mixup alpha (0 = off)")
    cutmix: float = field_(1.0, help="cutmix alpha (0 = off)")
    label_smoothing: float = field_(0.1, help="label smoothing")
    weight_decay: float = field_(0.05, help="AdamW weight decay (not on 1-d tensors and global tokens)")
    auto_augment: str = field_("rand-m9-mstd0.5-inc1", help="timm auto-augment policy after the crop + flip "
                               "(MAE: RandAugment, 2 ops of magnitude 9 +- 0.5, increasing ops); '' = off")
    re_prob: float = field_(0.25, help="timm random erasing probability per image, after normalisation (0 = off)")
    re_mode: Literal["const", "rand", "pixel"] = field_("pixel", help="erased values: const (0), rand (normal per "
                                                        "channel) or pixel (normal per pixel), normalised units")
    re_count: int = field_(1, help="most erased rectangles per image (timm's max_count)")

    def validate(self) -> None:
        """Shared checks, then the fine-tuning ranges; ``auto_augment`` must be a policy timm builds
        (:func:`check_auto_augment`)."""
        super().validate()
        check_auto_augment(self.auto_augment, self.img_size)
        if not 0 <= self.re_prob <= 1:
            raise ConfigError("finetune.re_prob", f"must be in [0, 1], got {self.re_prob}")
        if self.re_mode not in ("const", "rand", "pixel"):
            raise ConfigError("finetune.re_mode", f"must be const, rand or pixel, got {self.re_mode!r}")
        if self.re_count < 1:
            raise ConfigError("finetune.re_count", f"must be >= 1, got {self.re_count}")
        if self.micro_batch < 0:
            raise ConfigError("finetune.micro_batch", f"must be >= 0, got {self.micro_batch}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("finetune.layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError("finetune.drop_path", f"must be in [0, 1), got {self.drop_path}")
        for key in ("mixup", "cutmix", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"finetune.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError("finetune.label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


# -------------------------------------------------------------------------------- fine-tuning augmentation
_AA_SECTION = re.compile(r"[a-z]+[0-9][0-9.]*")  # a <key><number> section of timm's policy strings (m9, mstd0.5)


def _posterize_any_bits(img, bits_to_keep: int, **_):
    """timm's ``posterize`` op, with ``bits_to_keep < 1`` giving a black image (what older Pillow's LUT gave, and so
    what MAE trained with): timm 1.0.31's ``PosterizeIncreasing`` (RandAugment ``inc1``) / ``Posterize`` keep
    ``4 - int(0.4 m)`` / ``int(0.4 m)`` bits, i.e. 0 at magnitude 10 (``m9-mstd0.5`` clips N(9, 0.5) draws to 10
    about 2% of the time), and Pillow 13 ``ImageOps.posterize`` raises ``ValueError`` for bits outside 1..8."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    return Image.new(img.mode, img.size) if bits_to_keep < 1 else posterize(img, bits_to_keep)


def _timm_stages(auto_augment: str, img_size: int, re_prob: float, re_mode: str, re_count: int):
    """``(secondary, final)``: the stages after the crop + flip of timm's ``create_transform(is_training=True,
    separate=True)`` with MAE's settings (bicubic, ImageNet mean/std, no colour jitter): the auto-augment policy
    (an empty ``Compose`` when off), then ``ToTensor + Normalize`` (+ ``RandomErasing`` when ``re_prob > 0``). The
    policy's posterize ops (these instances only) use :func:`_posterize_any_bits`."""
    from timm.data import create_transform

    from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD

    _, secondary, final = create_transform(img_size, is_training=True, auto_augment=auto_augment or None,
                                           color_jitter=None, interpolation="bicubic", mean=IMAGENET_MEAN,
                                           std=IMAGENET_STD, re_prob=re_prob, re_mode=re_mode, re_count=re_count,
                                           separate=True)
    for t in secondary.transforms:  # RandAugment / AugMix: .ops; AutoAugment: .policy (lists of ops)
        ops = list(getattr(t, "ops", [])) + [op for sub in getattr(t, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize_any_bits
    return secondary, final


def check_auto_augment(policy: str, img_size: int = 224) -> None:
    """Check a timm auto-augment policy string (``timm.data.auto_augment``: ``rand-...`` RandAugment, ``augmix-...``,
    ``original`` / ``v0`` / ... AutoAugment) by building it once (a fraction of a millisecond). ``""`` is off.

    Every ``-`` section after the policy name must be ``<key><number>`` (``m9``, ``mstd0.5``, ``inc1``; RandAugment
    also ``t<name>``), since timm silently ignores other sections (e.g. ``inc`` without its value).

    Raises:
        ConfigError: ``finetune.auto_augment``, naming the string and timm's complaint.
    """
    if not policy:
        return
    name, *sections = policy.split("-")
    bad = [c for c in sections if not (_AA_SECTION.fullmatch(c) or (name == "rand" and len(c) > 1 and c[0] == "t"))]
    if bad:
        raise ConfigError("finetune.auto_augment", f"{policy!r}: section(s) {bad} are not <key><number> (timm "
                          "would ignore them); MAE's policy is 'rand-m9-mstd0.5-inc1', '' = off")
    try:
        _timm_stages(policy, img_size, 0.0, "const", 1)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ConfigError("finetune.auto_augment", f"timm does not build {policy!r} ({type(e).__name__}: {e}); "
                          "MAE's policy is 'rand-m9-mstd0.5-inc1', '' = off") from None


def _augment_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed determined by ``(seed, epoch, key)`` only (not the crop's generator: another hash tag)."""
    h = hashlib.blake2b(f"polymae-finetune-augment/{seed}/{epoch}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


class FinetuneAugment:
    """MAE's fine-tuning augmentation after the random-resized crop + flip (He et al. 2022, App. A.3 / Table 9
    "RandAug (9, 0.5)"; the reference ``main_finetune.py``: ``--aa rand-m9-mstd0.5-inc1 --reprob 0.25 --remode pixel
    --recount 1``), through timm: the stages of ``timm.data.create_transform(is_training=True, separate=True)`` that
    follow its crop (RandAugment, then ``ToTensor + Normalize`` and ``RandomErasing``), bicubic, ImageNet mean/std.

    Args:
        img_size: side ``S`` of the images (already cropped, flipped and resized; RandAugment translates by up to
            ``0.45 S`` px at full magnitude, as timm); auto_augment, re_prob, re_mode, re_count: as
            :class:`FinetuneConfig` (``""`` / ``0``: off).
    Call: ``(rgb uint8 [3, S, S], seed int >= 0) -> [3, S, S]``: uint8 after the policy when ``re_prob == 0``,
        else float32 ImageNet-normalised (``(x / 255 - mean) / std``) with erased rectangles (random erasing works in
        normalised units). The output is a function of ``(rgb, seed)`` only: timm's draws come from Python's, numpy's
        and torch's global CPU generators, seeded from ``seed`` during the call and put back afterwards.
    Raises:
        ConfigError: a policy timm does not build (``finetune.auto_augment``, :func:`check_auto_augment`).
    """

    def __init__(self, img_size: int, auto_augment: str = "rand-m9-mstd0.5-inc1", re_prob: float = 0.25,
                 re_mode: str = "pixel", re_count: int = 1):
        check_auto_augment(auto_augment, img_size)
        self.secondary, self.final = _timm_stages(auto_augment, img_size, re_prob, re_mode, re_count)
        self.erasing = re_prob > 0

    @classmethod
    def from_config(cls, cfg: FinetuneConfig) -> FinetuneAugment | None:
        """The augmentation of ``cfg`` (``img_size``, ``auto_augment``, ``re_*``); None when both are off."""
        if not cfg.auto_augment and cfg.re_prob <= 0:
            return None
        return cls(cfg.img_size, cfg.auto_augment, cfg.re_prob, cfg.re_mode, cfg.re_count)

    def __call__(self, rgb: torch.Tensor, seed: int) -> torch.Tensor:
        """Augment one image (class docstring)."""
        from PIL import Image

        img = Image.fromarray(np.ascontiguousarray(rgb.permute(1, 2, 0).numpy()))
        with global_rngs_seed(seed):
            img = self.secondary(img)
            if self.erasing:
                return self.final(img).contiguous()
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


class AugmentedClassFolderStream(ClassFolderStream):
    """A training :class:`~polymae.datasets.class_folder.ClassFolderStream` (its order, crop + flip, skips) whose
    images then go through ``augment`` (a :class:`FinetuneAugment`) seeded by ``(seed, epoch, image key)``, so an
    image's tensor depends on those only (not on the worker, the batch or what ran before).

    Args: as ``ClassFolderStream``, plus ``augment``. Items: ``rgb`` ``[B, 3, S, S]`` (uint8, or float32 already
    ImageNet-normalised when ``augment`` erases), ``cls`` int64 ``[B]``, ``key``.
    Raises: as ``ClassFolderStream``.
    """

    def __init__(self, *args, augment: FinetuneAugment, **kwargs):
        super().__init__(*args, **kwargs)
        self.augment = augment

    def _load(self, pos: int) -> dict | None:
        out = super()._load(pos)
        if out is not None:
            _, epoch = self._index(pos)
            out["rgb"] = self.augment(out["rgb"], _augment_seed(self.seed, epoch, out["key"]))
        return out


# ------------------------------------------------------------------------------------------------- data
@dataclass
class ClassSplits:
    """The two splits of a classification folder.

    Attributes:
        classes: class names (``train``'s sub-folders, sorted; index = position).
        train, val: ``(image url, class index)`` pairs (val indices are ``train``'s).
        train_root, val_root: the folders; path: the dataset's name in results (``data`` or ``train,val``);
        fingerprint: ``results.fingerprint_files`` over the images used.
    """

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    train_root: str
    val_root: str
    path: str
    fingerprint: str


def _subset(samples: list[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int]]:
    """A seeded random subset of ``n`` samples (all when ``n`` is 0 or not smaller), in folder order."""
    if not n or len(samples) <= n:
        return samples
    keep = sorted(random.Random(f"polymae-classification/{seed}").sample(range(len(samples)), n))
    return [samples[i] for i in keep]


def _list(cfg: _ClassificationConfig, key: str, root: str) -> tuple[list[str], list[tuple[str, int]]]:
    from polymae.datasets.class_folder import list_class_folder

    try:
        return list_class_folder(root)
    except FileNotFoundError as e:
        raise ConfigError(f"{cfg.SECTION}.{key if getattr(cfg, key) else 'data'}", str(e)) from None


def load_class_splits(cfg: _ClassificationConfig, max_samples: int = 0, seed: int = 0) -> ClassSplits:
    """List the train and val folders of ``cfg`` (``datasets/class_folder.py``), map val classes to train's indices
    and keep at most ``max_samples`` images per split (seeded random subset; 0 = all).

    Raises:
        ConfigError: no folder set (``<section>.data``), a folder without class sub-folders of images
            (``<section>.train`` / ``.val`` / ``.data``),
            or a val class that is not a train class (``<section>.val`` or ``.data``, naming the classes).
    """
    from polymae.pipeline.evaluate.results import fingerprint_files

    cfg.require_data()
    train_root, val_root = cfg.roots()
    classes, train = _list(cfg, "train", train_root)
    val_classes, val = _list(cfg, "val", val_root)
    index = {c: i for i, c in enumerate(classes)}
    extra = [c for c in val_classes if c not in index]
    if extra:
        raise ConfigError(f"{cfg.SECTION}.{'val' if cfg.val else 'data'}",
                          f"val class(es) {extra} of {val_root!r} are not train classes {classes} of {train_root!r}")
    val = [(u, index[val_classes[i]]) for u, i in val]
    train, val = _subset(train, max_samples, seed), _subset(val, max_samples, seed + 1)
    if cfg.data:
        path = cfg.data.rstrip("/")
    else:
        path = os.path.commonpath([train_root, val_root]) if "://" not in train_root + val_root else ""
    fp = fingerprint_files(path or train_root, [u for u, _ in train + val])
    return ClassSplits(classes, train, val, train_root, val_root, path or f"{train_root},{val_root}", fp)


# ---------------------------------------------------------------------------------------------- metrics
def topk_metrics(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = TOPK) -> dict[str, float]:
    """Top-k accuracies of ``logits [B, K]`` against ``target [B]`` (int64 class indices) as fractions in [0, 1],
    for the ``k`` in ``ks`` with ``k <= K`` only (``{"top1": .., "top5": ..}``; two classes: top-1 only).
    Uses ``pipeline/evaluate/metrics.py`` ``topk_accuracy``.

    Raises:
        ValueError: no sample, or ``logits`` and ``target`` disagree on ``B``.
    """
    from polymae.pipeline.evaluate.metrics import topk_accuracy

    if logits.ndim != 2 or target.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"expected logits [B, K] and target [B] with B > 0, got {tuple(logits.shape)} and "
                         f"{tuple(target.shape)}")
    return topk_accuracy(logits.float(), target, tuple(k for k in ks if k <= logits.shape[1]))


# ----------------------------------------------------------------------------------------------- models
class PooledHead(nn.Module):
    """A classifier on the encoder's final tokens, in the head interface of ``models/heads.py``.

    Args:
        dim: encoder width ``D``; num_classes: ``K``; num_global: global tokens ``G`` first in the sequence.
        pool: ``"cls"`` (token 0, the class token, after the final norm) or ``"mean"`` (mean of the ``h*w`` patch
            tokens).
        style: ``"probe"``: ``BatchNorm1d(D, affine=False, eps=1e-6)`` + ``Linear`` (weight trunc-normal std 0.01;
            MAE App. A.2); ``"finetune"``: ``pool="mean"``: ``LayerNorm(eps=1e-6)`` + ``Linear``, ``pool="cls"``:
            ``Linear`` (weight trunc-normal std 2e-5; MAE App. A.3). Biases start at 0.
    Forward: ``feats`` (list of ``[B, G + h*w, D]``; the last is read) -> logits ``[B, K]``.
    Raises:
        ValueError: unknown ``pool`` or ``style``.
    """

    def __init__(self, dim: int, num_classes: int, num_global: int = 1, pool: str = "cls", style: str = "probe"):
        super().__init__()
        if pool not in ("cls", "mean") or style not in ("probe", "finetune"):
            raise ValueError(f"pool must be 'cls' or 'mean' and style 'probe' or 'finetune', got {pool!r}, {style!r}")
        self.pool, self.num_global = pool, num_global
        fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(fc.weight, std=0.01 if style == "probe" else 2e-5)
        nn.init.zeros_(fc.bias)
        if style == "probe":
            self.classifier = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), fc)
        elif pool == "mean":
            self.classifier = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), fc)
        else:
            self.classifier = nn.Sequential(fc)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, G + h*w, D]`` final tokens -> pooled feature ``[B, D]``."""
        return tokens[:, 0] if self.pool == "cls" else tokens[:, self.num_global:].mean(dim=1)

    def forward(self, feats: Sequence[torch.Tensor], grid: tuple[int, int] | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Logits ``[B, K]`` of the last block's tokens (``grid`` and ``out_size`` are ignored)."""
        return self.classifier(self.features(feats[-1]))


class ClassifierModel(nn.Module):
    """Encoder + one :class:`PooledHead`, with timm's layer-decay interface (``group_matcher``, ``no_weight_decay``).

    ``net`` is a :class:`~polymae.models.multitask.MultiTaskModel` with one task ``"cls"`` whose head is replaced by a
    :class:`PooledHead`, so the encoder parameters are named ``net.encoder.*`` and load with ``load_encoder_state``.

    Args:
        encoder_kwargs: the encoder's ``init_kwargs`` (``load_encoder``); num_classes: ``K``; pool, style: as
            :class:`PooledHead`; drop_path: the encoder's stochastic-depth rate (``drop_path_rate``).
    Forward: ``rgb [B, 3, H, W]`` ImageNet-normalised -> logits ``[B, K]``.
    """

    def __init__(self, encoder_kwargs: dict, num_classes: int, pool: str = "cls", style: str = "probe",
                 drop_path: float = 0.0):
        super().__init__()
        from polymae.models.multitask import MultiTaskModel

        kw = dict(encoder_kwargs, drop_path_rate=float(drop_path))
        # built with a stock head (MultiTaskModel needs one), then given the protocol's head
        stock = {"dim": int(kw.get("dim", 192)), "num_classes": num_classes, "num_global": 1}
        self.net = MultiTaskModel(kw, {"cls": {"kind": "linear_cls", "kwargs": stock}})
        enc = self.net.encoder
        self.net.heads["cls"] = PooledHead(enc.dim, num_classes, enc.num_global_tokens, pool, style)
        self.head: PooledHead = self.net.heads["cls"]
        self.depth = len(self.net.encoder.encoder)

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (``timm.models.group_parameters``) as for its ViT: global tokens and the input
        adapter are the stem (layer 0), block ``i`` is layer ``i + 1``, the final norm joins the last block, and the
        head, matched by nothing, is the top layer. ``coarse`` gives the same groups (as timm's ViT)."""
        return {"stem": r"^net\.encoder\.(?:global_tokens|input_adapters)",
                "blocks": [(r"^net\.encoder\.encoder\.(\d+)", None), (r"^net\.encoder\.encoder_norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        """Full names of the tensors without weight decay (the encoder's: global tokens, embeddings)."""
        return {f"net.encoder.{n}" for n in self.net.encoder.no_weight_decay()}

    def features(self, rgb: torch.Tensor) -> torch.Tensor:
        """``rgb [B, 3, H, W]`` -> the head's pooled feature ``[B, D]`` (class token or mean patch token, after the
        encoder's final norm)."""
        feats, _ = self.net.encode(rgb)
        return self.head.features(feats[-1])

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        """``rgb [B, 3, H, W]`` -> logits ``[B, K]``."""
        return self.net(rgb, "cls")[0]


def _check_img_size(cfg: _ClassificationConfig, model: ClassifierModel) -> None:
    """Raises :class:`ConfigError` (``<section>.img_size``) unless ``img_size`` is a multiple of the patch size."""
    p = model.net.encoder.patch_size
    if cfg.img_size % p:
        raise ConfigError(f"{cfg.SECTION}.img_size",
                          f"{cfg.img_size} is not a multiple of the encoder's patch size {p}")


def build_classifier(checkpoint: str, num_classes: int, pool: str = "cls", style: str = "probe",
                     drop_path: float = 0.0) -> ClassifierModel:
    """A :class:`ClassifierModel` with the RGB encoder of ``checkpoint`` (any kind ``load_encoder`` reads) and a new
    head.

    Raises:
        FileNotFoundError / ValueError: as ``load_encoder``; KeyError / ValueError: as ``load_encoder_state``.
    """
    from polymae.models.multitask import load_encoder_state
    from polymae.pipeline.train.checkpoint import load_encoder

    enc_kwargs, sd, _ = load_encoder(checkpoint)
    model = ClassifierModel(enc_kwargs, num_classes, pool, style, drop_path)
    load_encoder_state(model.net, sd)
    return model


# ------------------------------------------------------------------------------------------ data passes
def _autocast(device: str, precision: str):
    """bf16 autocast on ``device`` when ``precision == "bf16"``; a no-op context otherwise."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def _stream(samples, micro: int, img_size: int, root: str, num_workers: int, seed: int, scale=None,
            infinite: bool = False, augment: FinetuneAugment | None = None):
    """A DataLoader over a :class:`~polymae.datasets.class_folder.ClassFolderStream` (``scale=None``: central
    crop), or an :class:`AugmentedClassFolderStream` when ``augment`` is given."""
    from polymae.datasets.loader import make_loader

    kw = dict(root=root, scale=scale, seed=seed, infinite=infinite)
    stream = ClassFolderStream(samples, micro, img_size, **kw) if augment is None \
        else AugmentedClassFolderStream(samples, micro, img_size, augment=augment, **kw)
    return make_loader(stream, num_workers)


def _rgb_inputs(batch: dict, device: str) -> torch.Tensor:
    """The batch's ``rgb`` as the model's input, float32 ``[B, 3, S, S]`` ImageNet-normalised on ``device``: a float
    batch (:class:`FinetuneAugment` with random erasing) is already normalised and only moved; a uint8 one goes
    through ``datasets/transforms.py`` ``to_model_inputs``."""
    from polymae.datasets.transforms import to_model_inputs

    rgb = batch["rgb"]
    if rgb.is_floating_point():
        return rgb.to(device, torch.float32, non_blocking=True)
    return to_model_inputs(batch, device, ["rgb"])["rgb"]


@torch.no_grad()
def extract_features(model: ClassifierModel, samples: Sequence[tuple[str, int]], img_size: int, root: str = "",
                     device: str = "cpu", batch_size: int = 8, num_workers: int = 0, precision: str = "fp32",
                     desc: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of ``samples`` (central square crop resized to ``img_size``) in one pass, with the model in
    eval mode and without gradients.

    Returns:
        ``(features [N', D] float32 on device, labels [N'] int64 on device)``; ``N'`` = images that decoded.
    Raises:
        RuntimeError: no image decodes.
    """
    from tqdm import tqdm

    from polymae.datasets.transforms import to_model_inputs

    model.eval()
    xs, ys = [], []
    loader = _stream(samples, batch_size, img_size, root, num_workers, 0)
    for batch in tqdm(loader, total=math.ceil(len(samples) / batch_size), desc=desc, leave=False):
        with _autocast(device, precision):
            xs.append(model.features(to_model_inputs(batch, device, ["rgb"])["rgb"]).float())
        ys.append(batch["cls"].to(device))
    if not xs:
        raise RuntimeError(f"no image of {len(samples)} under {root or 'the folder'} decodes")
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------------------- optimisation
def make_probe_optimizer(head: PooledHead, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    """``timm.optim.Lars`` over the probe's linear layer as MAE's LARS: matrices adapt their rate by the trust ratio
    (``always_adapt=True``), 1-d tensors (the bias) get plain momentum SGD without weight decay.

    Returns:
        the optimizer (two parameter groups: matrices, then 1-d tensors).
    """
    from timm.optim import Lars

    params = [p for p in head.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim > 1], "always_adapt": True, "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "always_adapt": False, "weight_decay": 0.0}]
    return Lars([g for g in groups if g["params"]], lr=lr, momentum=momentum)


def make_scheduler(optimizer, cfg: _ClassificationConfig, steps_per_epoch: int):
    """Per-step ``timm.scheduler.CosineLRScheduler``: linear warm-up from 0 over ``warmup_epochs`` epochs, then a
    half cosine to ``min_lr`` over the rest (MAE's ``adjust_learning_rate``); timm applies each group's
    ``lr_scale``. Call ``step_update(step)`` before every optimiser step."""
    from timm.scheduler import CosineLRScheduler

    warm = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    return CosineLRScheduler(optimizer, t_initial=max(1, total - warm), lr_min=cfg.min_lr, warmup_t=warm,
                             warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)


def make_finetune_optimizer(model: ClassifierModel, cfg: FinetuneConfig, lr: float):
    """AdamW (betas 0.9, 0.999) from timm's factory with layer-wise lr decay and weight decay (not on 1-d tensors or
    :meth:`ClassifierModel.no_weight_decay`): ``create_optimizer_v2(model, "adamw", lr, weight_decay, layer_decay)``.
    Each group's ``lr_scale`` is ``layer_decay ** (layer_max - layer)`` (module docstring)."""
    from timm.optim import create_optimizer_v2

    return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay,
                               layer_decay=cfg.layer_decay if cfg.layer_decay < 1 else None, betas=(0.9, 0.999))


def _group_lr(optimizer) -> float:
    """The largest learning rate of the optimizer's groups (the head's)."""
    return max(float(g["lr"]) for g in optimizer.param_groups)


def _summary(history: list[dict], ks: Sequence[str]) -> dict[str, float]:
    """``metrics``: the last epoch's ``topk`` and the best-top-1 epoch's as ``topk_best``."""
    best = max(history, key=lambda r: r["top1"])
    out = {k: history[-1][k] for k in ks}
    out.update({f"{k}_best": best[k] for k in ks})
    return out


def _result(splits: ClassSplits, history: list[dict], extra: dict) -> dict:
    """The protocol's results dict (``pipeline/evaluate/results.py``)."""
    ks = [k for k in history[-1] if k.startswith("top")]
    best = max(history, key=lambda r: r["top1"])
    return {"metrics": _summary(history, ks),
            "dataset": {"path": splits.path, "fingerprint": splits.fingerprint,
                        "samples": {"train": len(splits.train), "val": len(splits.val)}},
            "classes": splits.classes, "best_epoch": best["epoch"], "history": history, **extra}


def _batch_plan(cfg: _ClassificationConfig, n_train: int) -> tuple[int, int, float]:
    """``(batch, steps per epoch, lr)``: the batch cut to the training set, ``N // batch`` steps, and
    ``blr * batch / 256``.

    Raises:
        ConfigError: fewer than 2 images per batch (BatchNorm / mixup need 2), naming ``<section>.data``.
    """
    b = min(cfg.batch_size, n_train)
    if b < 2:
        raise ConfigError(f"{cfg.SECTION}.data", f"{n_train} training image(s): a batch needs at least 2")
    return b, n_train // b, cfg.blr * b / 256


# ------------------------------------------------------------------------------------------ linear probe
def _probe_batches(model: ClassifierModel, cfg: LinearProbeConfig, splits: ClassSplits, ctx: EvalContext, feats,
                   batch: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features [batch, D], labels [batch])`` for every step of every epoch: a seeded shuffle of the precomputed
    ``feats`` (``augment=false``), or a fresh augmented batch through the frozen encoder."""
    gen = torch.Generator().manual_seed(ctx.seed)
    if not cfg.augment:
        x, y = feats
        for _ in range(cfg.epochs):
            perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
            for s in range(steps):
                idx = perm[s * batch:(s + 1) * batch]
                yield x[idx], y[idx]
        return
    from polymae.datasets.transforms import to_model_inputs

    it = iter(_stream(splits.train, min(batch, ctx.batch_size), cfg.img_size, splits.train_root, cfg.num_workers,
                      ctx.seed, scale=(cfg.min_crop_scale, 1.0), infinite=True))
    xs, ys, have = [], [], 0  # encoded images not yet used (a forward batch may straddle two steps)
    for _ in range(cfg.epochs * steps):
        while have < batch:
            b = next(it)
            with torch.no_grad(), _autocast(ctx.device, cfg.precision):
                xs.append(model.features(to_model_inputs(b, ctx.device, ["rgb"])["rgb"]).float())
            ys.append(b["cls"].to(ctx.device))
            have += len(ys[-1])
        x, y = torch.cat(xs), torch.cat(ys)
        xs, ys, have = [x[batch:]], [y[batch:]], have - batch
        yield x[:batch], y[:batch]


def _train_probe(model: ClassifierModel, cfg: LinearProbeConfig, splits: ClassSplits, ctx: EvalContext,
                 train_feats, val_feats) -> tuple[list[dict], dict]:
    """The probe's epochs (LARS, warm-up + cosine; top-k on the val features after each); returns
    ``(history, settings)``."""
    from tqdm import tqdm

    n = train_feats[0].shape[0] if train_feats is not None else len(splits.train)
    batch, steps, lr = _batch_plan(cfg, n)
    head = model.head.classifier
    opt = make_probe_optimizer(model.head, lr, cfg.momentum, cfg.weight_decay)
    sched = make_scheduler(opt, cfg, steps)
    batches = _probe_batches(model, cfg, splits, ctx, train_feats, batch, steps)
    log.info("linear probe: %d training images, batch %d, %d steps/epoch, lr %.4g", n, batch, steps, lr)
    history, step = [], 0
    bar = tqdm(range(cfg.epochs), desc="linear probe", unit="epoch")
    for epoch in bar:
        head.train()
        total = 0.0
        for _ in range(steps):
            x, y = next(batches)
            sched.step_update(step)
            loss = nn.functional.cross_entropy(head(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, step = total + loss.item(), step + 1
        head.eval()
        with torch.no_grad():
            acc = topk_metrics(head(val_feats[0]), val_feats[1])
        history.append({"epoch": epoch + 1, "loss": total / steps, "lr": _group_lr(opt), **acc})
        bar.set_postfix(loss=f"{total / steps:.3f}", top1=f"{acc['top1']:.3f}")
    return history, {"batch_size": batch, "steps_per_epoch": steps, "lr": lr}


def run_linear_probe(cfg: LinearProbeConfig, ctx: EvalContext, model: ClassifierModel | None = None) -> dict:
    """``polymae evaluate protocol=linear_probe``: MAE's linear probe of ``ctx.checkpoint`` (module docstring).

    Args:
        cfg: the protocol's settings; ctx: ``pipeline/evaluate/results.py`` ``EvalContext`` (checkpoint, device,
            seed, batch_size per forward pass, max_samples per split).
        model: an already built :class:`ClassifierModel` with a ``"probe"`` head (default: built from
            ``ctx.checkpoint``); its encoder is left exactly as it was.
    Returns:
        ``{"metrics": {"top1", "top5" (K >= 5), "top1_best", "top5_best"}, "dataset": {...}, "classes",
        "best_epoch", "history": [{"epoch", "loss", "lr", "top1", "top5"}], "settings", "skipped"}``.
    Raises:
        ConfigError: bad settings or folders, or an ``img_size`` that is not a multiple of the patch size (naming
            the key), before any training.
    """
    from polymae.patches import global_torch_seed

    splits = load_class_splits(cfg, ctx.max_samples, ctx.seed)
    with global_torch_seed(ctx.seed):
        if model is None:
            model = build_classifier(ctx.checkpoint, len(splits.classes), cfg.pool, "probe")
        _check_img_size(cfg, model)
        model.to(ctx.device).eval()
        for p in model.net.parameters():
            p.requires_grad_(False)
        for p in model.head.parameters():
            p.requires_grad_(True)
        enc = (ctx.device, ctx.batch_size, cfg.num_workers, cfg.precision)
        val = extract_features(model, splits.val, cfg.img_size, splits.val_root, *enc, desc="val features")
        train = None if cfg.augment else extract_features(model, splits.train, cfg.img_size, splits.train_root,
                                                          *enc, desc="train features")
        history, settings = _train_probe(model, cfg, splits, ctx, train, val)
    skipped = {"val": len(splits.val) - int(val[1].numel())}
    if train is not None:
        skipped["train"] = len(splits.train) - int(train[1].numel())
    return _result(splits, history, {"settings": dict(settings, pool=cfg.pool, augment=cfg.augment),
                                     "skipped": skipped})


# ------------------------------------------------------------------------------------------- fine-tuning
def _finetune_parts(cfg: FinetuneConfig, num_classes: int, micro: int):
    """``(mixup or None, criterion)``: timm's ``Mixup`` + ``SoftTargetCrossEntropy`` when mixup or cutmix is on,
    else ``LabelSmoothingCrossEntropy`` (or plain cross-entropy without smoothing).

    Raises:
        ConfigError: an odd micro-batch under mixup/cutmix (timm mixes a batch with its reverse), naming
            ``finetune.micro_batch``.
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        if micro % 2:
            raise ConfigError("finetune.micro_batch", f"mixup/cutmix need an even micro-batch, got {micro}")
        mix = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                    num_classes=num_classes)
        return mix, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing)
    return None, nn.CrossEntropyLoss()


@torch.no_grad()
def _evaluate_model(model: ClassifierModel, splits: ClassSplits, cfg: _ClassificationConfig,
                    ctx: EvalContext) -> dict:
    """Top-k of the model on the val split (central crop, eval mode)."""
    from polymae.datasets.transforms import to_model_inputs

    model.eval()
    logits, labels = [], []
    for batch in _stream(splits.val, ctx.batch_size, cfg.img_size, splits.val_root, cfg.num_workers, 0):
        with _autocast(ctx.device, cfg.precision):
            logits.append(model(to_model_inputs(batch, ctx.device, ["rgb"])["rgb"]).float())
        labels.append(batch["cls"].to(ctx.device))
    if not logits:
        raise RuntimeError(f"no val image of {splits.val_root} decodes")
    return topk_metrics(torch.cat(logits), torch.cat(labels))


def _finetune_step(model, batches, accum: int, mix, criterion, ctx: EvalContext, precision: str,
                   mix_rng: dict) -> float:
    """One optimiser step's forward/backward over ``accum`` micro-batches (mixed by ``mix`` under the numpy state
    ``mix_rng``); returns the mean loss."""
    total = 0.0
    for _ in range(accum):
        b = next(batches)
        x, y = _rgb_inputs(b, ctx.device), b["cls"].to(ctx.device)
        if mix is not None:
            with numpy_global_state(mix_rng):
                x, y = mix(x, y)
        with _autocast(ctx.device, precision):
            logits = model(x)
        loss = criterion(logits.float(), y) / accum
        loss.backward()
        total += loss.item()
    return total


def _micro_plan(cfg: FinetuneConfig, batch: int) -> tuple[int, int]:
    """``(micro-batch, accumulation steps)``: ``micro_batch`` (0 = the batch) cut to the batch, made even under
    mixup/cutmix when the batch itself was cut to an odd training-set size; ``accum = batch // micro``."""
    micro = min(cfg.micro_batch or batch, batch)
    if (cfg.mixup > 0 or cfg.cutmix > 0) and micro % 2 and not cfg.micro_batch and micro > 2:
        micro -= 1
    return micro, max(1, batch // micro)


def _train_finetune(model: ClassifierModel, cfg: FinetuneConfig, splits: ClassSplits,
                    ctx: EvalContext) -> tuple[list, dict]:
    """The fine-tuning epochs (module docstring); top-k on val after each. Returns ``(history, settings)``."""
    from tqdm import tqdm

    batch, steps, _ = _batch_plan(cfg, len(splits.train))
    micro, accum = _micro_plan(cfg, batch)
    lr = cfg.blr * micro * accum / 256
    mix, criterion = _finetune_parts(cfg, len(splits.classes), micro)
    opt = make_finetune_optimizer(model, cfg, lr)
    sched = make_scheduler(opt, cfg, steps)
    batches = iter(_stream(splits.train, micro, cfg.img_size, splits.train_root, cfg.num_workers, ctx.seed,
                           scale=(cfg.min_crop_scale, 1.0), infinite=True, augment=FinetuneAugment.from_config(cfg)))
    mix_rng = {"seed": ctx.seed}
    log.info("fine-tune: %d training images, batch %d (%d x %d), %d steps/epoch, lr %.4g", len(splits.train),
             micro * accum, accum, micro, steps, lr)
    history, step = [], 0
    bar = tqdm(range(cfg.epochs), desc="fine-tune", unit="epoch")
    for epoch in bar:
        model.train()
        total = 0.0
        for _ in range(steps):
            sched.step_update(step)
            opt.zero_grad(set_to_none=True)
            total += _finetune_step(model, batches, accum, mix, criterion, ctx, cfg.precision, mix_rng)
            opt.step()
            step += 1
        acc = _evaluate_model(model, splits, cfg, ctx)
        history.append({"epoch": epoch + 1, "loss": total / steps, "lr": _group_lr(opt), **acc})
        bar.set_postfix(loss=f"{total / steps:.3f}", top1=f"{acc['top1']:.3f}")
    return history, {"batch_size": micro * accum, "micro_batch": micro, "steps_per_epoch": steps, "lr": lr}


def run_finetune(cfg: FinetuneConfig, ctx: EvalContext, model: ClassifierModel | None = None) -> dict:
    """``polymae evaluate protocol=finetune``: MAE's end-to-end fine-tuning of ``ctx.checkpoint`` (module docstring).

    Args:
        cfg: the protocol's settings; ctx: ``EvalContext`` (device, seed, batch_size per forward pass when
            evaluating, max_samples per split).
        model: an already built :class:`ClassifierModel` with a ``"finetune"`` head (default: built from
            ``ctx.checkpoint`` with ``cfg.pool`` and ``cfg.drop_path``); it is trained in place.
    Returns:
        ``{"metrics": {"top1", "top5" (K >= 5), "top1_best", "top5_best"}, "dataset": {...}, "classes",
        "best_epoch", "history": [{"epoch", "loss", "lr", "top1", "top5"}], "settings"}``.
    Raises:
        ConfigError: bad settings or folders, or an ``img_size`` that is not a multiple of the patch size (naming
            the key), before any training.
    """
    from polymae.patches import global_torch_seed

    splits = load_class_splits(cfg, ctx.max_samples, ctx.seed)
    with global_torch_seed(ctx.seed):
        if model is None:
            model = build_classifier(ctx.checkpoint, len(splits.classes), cfg.pool, "finetune", cfg.drop_path)
        _check_img_size(cfg, model)
        model.to(ctx.device)
        history, settings = _train_finetune(model, cfg, splits, ctx)
    settings.update(pool=cfg.pool, layer_decay=cfg.layer_decay, drop_path=cfg.drop_path, mixup=cfg.mixup,
                    cutmix=cfg.cutmix, label_smoothing=cfg.label_smoothing, weight_decay=cfg.weight_decay,
                    auto_augment=cfg.auto_augment, re_prob=cfg.re_prob, re_mode=cfg.re_mode, re_count=cfg.re_count)
    return _result(splits, history, {"settings": settings})
