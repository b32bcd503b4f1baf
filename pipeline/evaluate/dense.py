"""The dense protocols of ``polymae evaluate``: semantic segmentation (``semseg``) and depth (``depth``) fine-tuning.

Both put a fresh task head on the checkpoint's encoder (``pipeline/train/checkpoint.py`` ``load_encoder``; any
pre-train/multitask run, release or official MultiMAE/MAE file), fine-tune encoder + head end to end on the
training split and score **every image** of the validation split at its label's own resolution (no image cap;
``ctx.max_samples`` > 0 only for smoke runs). One fine-tuning run per entry of ``inputs``:

* ``rgb`` — the RGB image alone;
* ``rgb+depth`` — MultiMAE multi-modal input (MultiMAE Sec. 4.3, Tab. 3/4): the checkpoint's own RGB and depth
  input adapters tokenise both, ``[global, rgb tokens, depth tokens]`` goes through the encoder together, and the
  head reads the global and RGB-position tokens of each block (MultiMAE's fine-tuning setting
  ``decoder_main_tasks: rgb``). The depth input is metres (0 = invalid), standardised per image as in pre-training
  when the checkpoint was (``standardize_depth``). A checkpoint without a depth input adapter (MAE, an RGB-only
  MultiMAE, a multitask model) is a :class:`~polymae.pipeline.config.ConfigError` on ``<protocol>.inputs`` before
  any training. For the ``depth`` protocol this input contains the target itself (a check of the multi-modal
  path and an upper bound, not a monocular number).

Metric names carry the input as a suffix: ``miou@rgb``, ``pixel_acc@rgb+depth``, ``delta1@rgb``...

**semseg** (MultiMAE Sec. 4.3 / App. C.3): the ConvNeXt-block head (``models/heads.py`` ``ConvNeXtSegHead``,
``convnext_seg``), pixel-wise cross-entropy with ``ignore_index`` at the crop's resolution; dataset-level mIoU over
the classes present and pixel accuracy (``pipeline/evaluate/metrics.py`` ``SegMetrics``), logits resized
bilinearly to the label before the argmax.

**depth** (MultiMAE Sec. 4.2 / App. C.4, NYUv2): the DPT head (``DPTDepthHead``, ``dpt_depth``) predicting
**metric depth in metres** (MultiMAE fine-tunes NYU depth without standardisation), trained with the berHu loss
(Laina et al. 2016 Eq. 1, ``models/losses.py`` ``berhu_loss``; ``c = berhu_c × max |residual|`` over the batch's
valid pixels) on valid pixels only. Scored by ``DepthMetrics`` with no scale/shift alignment: δ1, δ2, δ3, AbsRel
and RMSE (metres) pixel-weighted over the whole split (``delta1@rgb`` ...) and, beside them, MultiMAE's per-batch
average (``delta1_batch_mean@rgb`` ..., which depends on the batch size). Predictions are clamped to
``[1 mm, max_depth]`` and resized bilinearly to the label; invalid target pixels (0, NaN, inf, beyond
``max_depth``) are never scored.

Layouts (``datasets/dense_folder.py`` has the details)::

    ade20k: {root}/images/{training,validation}/*.jpg + {root}/annotations/{training,validation}/*.png
            (ids 0 = other/ignored, 1..150; reduce_zero_label: id - 1, 0 -> ignore_index 255)
    nyuv2:  {root}/{train,val|test}/rgb/*.png + semseg/*.png (class ids, 255 ignored)
            + depth/*.png (uint16 millimetres: metres = value / 1000; 0 = invalid)

paired by file stem; a missing partner is a ``ConfigError`` on ``<protocol>.root`` naming the file (the dataset is
broken: nothing is skipped). Training: scale jitter, random ``img_size`` crop, flip (``datasets/dense_folder.py``);
evaluation: the whole image resized to ``img_size``; AdamW with BEiT/MAE layer-wise lr decay (timm's
``param_groups_layer_decay``), linear warm-up then cosine decay, per step.

Pictures (``ctx.save_picture``, PNG under ``{output}/pictures/`` and in TensorBoard): for the first ``pictures``
validation images, ``input | prediction | target`` side by side at the label's resolution, colour-mapped (class
palette with ignored pixels black; depth from near = dark to far = bright, invalid black).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from polymae.models.multitask import MultiTaskModel
from polymae.pipeline.config import ConfigError, field_

log = logging.getLogger(__name__)

__all__ = ["DenseConfig", "SemsegConfig", "DepthConfig", "DenseModel", "preflight_dense", "run_semseg", "run_depth",
           "INPUTS"]

#: the input settings a dense protocol can be fine-tuned and scored with
INPUTS = ("rgb", "rgb+depth")
Inputs = Literal["rgb", "rgb+depth"]


@dataclass
class DenseConfig:
    """Settings shared by the ``semseg`` and ``depth`` protocols (defaults: MultiMAE's fine-tuning recipe, App. C;
    ``jobs/configs/eval/*.yaml`` give each dataset's values and their sources)."""

    KEY: ClassVar[str] = "dense"

    root: str = field_("", help="dataset root (local path or URL) in the `layout` folder layout")
    layout: Literal["ade20k", "nyuv2"] = field_("nyuv2", help="ade20k | nyuv2 folder layout")
    inputs: list[Inputs] = field_(["rgb"], help="input settings, each fine-tuned and scored on its own: rgb, "
                                  "rgb+depth (MultiMAE checkpoints with a depth input adapter; nyuv2 layout)")
    img_size: int = field_(256, help="side of the square input (pixels; a multiple of the patch size)")
    epochs: int = field_(10, help="fine-tuning epochs over the training split")
    steps: int = field_(0, help="fine-tuning steps; > 0 replaces epochs")
    warmup_epochs: float = field_(1.0, help="linear lr warm-up (epochs), then cosine decay to min_lr")
    batch_size: int = field_(16, help="training images per step (evaluation uses the job's batch_size)")
    lr: float = field_(1e-4, help="peak AdamW learning rate")
    min_lr: float = field_(0.0, help="learning rate at the end of the cosine decay")
    weight_decay: float = field_(0.05, help="AdamW weight decay (none on biases, norms and tokens)")
    layer_decay: float = field_(0.75, help="layer-wise lr decay (BEiT/MAE): the head gets lr, each "
                                "layer below (final norm, blocks, patch embedding) decay times the one above; 1 = off")
    drop_path: float = field_(0.1, help="stochastic depth rate of the encoder blocks while fine-tuning")
    scale: list[float] = field_([0.5, 2.0], help="training scale jitter [min, max] of the short side / img_size")
    flip: bool = field_(True, help="random horizontal flips in training")
    head_width: int = field_(256, help="channels of the head (ConvNeXt width / DPT fusion features)")
    num_workers: int = field_(4, help="data loader worker processes (0 = in the main process)")
    pictures: int = field_(4, help="validation images drawn as input | prediction | target")
    save_model: bool = field_(True, help="write each fine-tuned model (encoder + head) as a loadable folder "
                              "{output}/finetuned-<inputs>/ (model.safetensors + model_config.json)")
    amp: bool = field_(True, help="bf16 autocast on CUDA (losses and metrics in float32)")

    def validate(self) -> None:
        """Pure value checks (an empty ``root`` is allowed here: the protocol may not be the one run; it is checked
        by :func:`preflight_dense`). Raises :class:`ConfigError` naming the key."""
        positive = {"img_size": self.img_size, "batch_size": self.batch_size, "lr": self.lr}
        for k, v in positive.items():
            if v <= 0:
                raise ConfigError(k, f"must be > 0, got {v}")
        for k in ("epochs", "steps", "warmup_epochs", "min_lr", "weight_decay", "num_workers", "pictures"):
            if getattr(self, k) < 0:
                raise ConfigError(k, f"must be >= 0, got {getattr(self, k)}")
        if self.epochs == 0 and self.steps == 0:
            raise ConfigError("epochs", "epochs and steps are both 0: nothing would be fine-tuned")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("layer_decay", f"must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError("drop_path", f"must be in [0, 1), got {self.drop_path}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ConfigError("scale", f"must be [min, max] with 0 < min <= max, got {list(self.scale)}")
        if self.head_width < 8:
            raise ConfigError("head_width", f"must be >= 8, got {self.head_width}")
        if not self.inputs or len(set(self.inputs)) != len(self.inputs):
            raise ConfigError("inputs", f"must list each of {list(INPUTS)} at most once, at least one; got "
                              f"{list(self.inputs)}")
        if "rgb+depth" in self.inputs and self.layout != "nyuv2":
            raise ConfigError("inputs", f"rgb+depth needs depth files: the {self.layout} layout has none (nyuv2)")


@dataclass
class SemsegConfig(DenseConfig):
    """The ``semseg`` protocol: ConvNeXt head, cross-entropy, mIoU / pixel accuracy (module docstring)."""

    KEY: ClassVar[str] = "semseg"

    layout: Literal["ade20k", "nyuv2"] = field_("ade20k", help="ade20k | nyuv2 folder layout")
    num_classes: int = field_(150, help="classes K after reduce_zero_label (ADE20K 150, NYUv2 40)")
    ignore_index: int = field_(255, help="label value never scored nor trained on")
    reduce_zero_label: bool | None = field_(None, help="label 0 -> ignore, others -1; null = true for ade20k, "
                                            "false for nyuv2")
    head_depth: int = field_(4, help="ConvNeXt blocks of the head (MultiMAE: 4)")

    def validate(self) -> None:
        """:meth:`DenseConfig.validate` plus the label settings. Raises :class:`ConfigError` naming the key."""
        super().validate()
        if self.num_classes < 1:
            raise ConfigError("num_classes", f"must be >= 1, got {self.num_classes}")
        if 0 <= self.ignore_index < self.num_classes:
            raise ConfigError("ignore_index", f"{self.ignore_index} is one of the {self.num_classes} classes")
        if self.head_depth < 0:
            raise ConfigError("head_depth", f"must be >= 0, got {self.head_depth}")

    def reduce_zero(self) -> bool:
        """``reduce_zero_label`` resolved: its value, or (null) True for ade20k and False for nyuv2."""
        return self.layout == "ade20k" if self.reduce_zero_label is None else bool(self.reduce_zero_label)


@dataclass
class DepthConfig(DenseConfig):
    """The ``depth`` protocol: DPT head, berHu loss on metric depth, δ1-δ3 / AbsRel / RMSE (module docstring)."""

    KEY: ClassVar[str] = "depth"

    layout: Literal["nyuv2"] = field_("nyuv2", help="nyuv2 (the only layout with depth)")
    batch_size: int = field_(64, help="training images per step (evaluation uses the job's batch_size)")
    weight_decay: float = field_(1e-4, help="AdamW weight decay (none on biases, norms and tokens)")
    drop_path: float = field_(0.0, help="stochastic depth rate of the encoder blocks while fine-tuning")
    warmup_epochs: float = field_(100.0, help="linear lr warm-up (epochs), then cosine decay to min_lr")
    max_depth: float = field_(10.0, help="metres; targets beyond are invalid, predictions clamped to it (NYU: 10)")
    units_per_metre: float = field_(1000.0, help="depth PNG value of one metre (NYUv2 millimetres: 1000)")
    berhu_c: float = field_(0.2, help="berHu threshold c as a fraction of the batch's largest |residual| (Laina: 0.2)")
    layers: list[int] = field_([], help="the 4 encoder blocks the DPT head reads (empty: evenly spaced, last = final)")
    eval_crop: Literal["none", "eigen"] = field_("none", help="pixels scored: none = every valid pixel; eigen = only "
                                                 "Eigen et al.'s NYUv2 crop (rows 45:471, columns 41:601 of 480x640, "
                                                 "scaled to the label's size), as BTS/AdaBins/DPT report")

    def validate(self) -> None:
        """:meth:`DenseConfig.validate` plus the depth settings. Raises :class:`ConfigError` naming the key."""
        super().validate()
        for k in ("max_depth", "units_per_metre"):
            if getattr(self, k) <= 0:
                raise ConfigError(k, f"must be > 0, got {getattr(self, k)}")
        if not 0 < self.berhu_c <= 1:
            raise ConfigError("berhu_c", f"must be in (0, 1], got {self.berhu_c}")
        if self.layers and len(self.layers) != 4:
            raise ConfigError("layers", f"the DPT head reads 4 blocks, got {list(self.layers)}")


class DenseModel(MultiTaskModel):
    """A :class:`~polymae.models.multitask.MultiTaskModel` with one dense head, whose encoder may also take depth.

    ``encoder_kwargs["in_modalities"]`` is ``["rgb"]`` or ``["rgb", "depth"]`` (then the encoder keeps the
    checkpoint's depth input adapter). :meth:`encode_inputs` tokenises the given inputs, runs them through the
    blocks together and returns, per block, the global and RGB-position tokens ``[B, G + h*w, D]`` (the last after
    the final norm), so every head of ``models/heads.py`` reads them as it reads RGB-only features.
    """

    def encode_inputs(self, rgb: torch.Tensor, depth: torch.Tensor | None = None
                      ) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Encode ``rgb`` ``[B, 3, H, W]`` (ImageNet-normalised) and optionally ``depth`` ``[B, 1, H, W]`` (metres,
        0 = invalid; standardised per image when the checkpoint was pre-trained so).

        Returns:
            ``(feats, (h, w))``: one ``[B, G + h*w, D]`` tensor per block, the patch grid.
        Raises:
            ValueError: depth given to an encoder without a depth input adapter, or wrong shapes.
        """
        from polymae.models.losses import standardize_depth

        enc = self.encoder
        tokens = [enc.input_adapters["rgb"](rgb)]
        if depth is not None:
            if "depth" not in enc.input_adapters:
                raise ValueError("this encoder has no depth input adapter")
            d = standardize_depth(depth.float()) if getattr(enc, "do_standardize_depth", False) else depth.float()
            tokens.append(enc.input_adapters["depth"](d))
        g = enc.global_tokens.shape[1]
        keep = g + tokens[0].shape[1]
        dtype = enc.global_tokens.dtype
        x = torch.cat([enc.global_tokens.expand(rgb.shape[0], -1, -1)] + [t.to(dtype) for t in tokens], dim=1)
        feats = []
        for block in enc.encoder:
            x = block(x)
            feats.append(x[:, :keep])
        feats[-1] = enc.encoder_norm(feats[-1])
        return feats, (rgb.shape[-2] // enc.patch_size, rgb.shape[-1] // enc.patch_size)

    def predict(self, rgb: torch.Tensor, depth: torch.Tensor | None = None,
                out_size: Sequence[int] | None = None) -> torch.Tensor:
        """The head's output on the inputs: semseg logits ``[B, K, H', W']`` or depth ``[B, 1, H', W']`` (metres),
        at ``out_size`` (default the input's ``(H, W)``)."""
        feats, grid = self.encode_inputs(rgb, depth)
        head = next(iter(self.heads.values()))
        return head(feats, grid, tuple(out_size) if out_size is not None else tuple(rgb.shape[-2:]))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer groups for timm's ``param_groups_layer_decay``: input adapters and global tokens first, then one
        group per encoder block, the final norm, and (unmatched, last) the head."""
        return {"stem": r"^encoder\.(?:input_adapters|global_tokens)",
                "blocks": [(r"^encoder\.encoder\.(\d+)", None), (r"^encoder\.encoder_norm", (99999,))]}


def _key(cfg: DenseConfig, name: str) -> str:
    return f"{cfg.KEY}.{name}"


def _modalities(cfg: DenseConfig, task: str) -> list[str]:
    mods = ["rgb", task]
    if any("depth" in i for i in cfg.inputs) and "depth" not in mods:
        mods.append("depth")
    return mods


def preflight_dense(cfg: DenseConfig) -> dict:
    """List the training and validation samples of ``cfg`` (``datasets/dense_folder.py``) before any work.

    Returns:
        ``{"train": [DenseSample], "val": [DenseSample]}``.
    Raises:
        ConfigError: on ``<protocol>.root`` (empty, missing folder, missing partner file: named) or
            ``<protocol>.layout``.
    """
    from polymae.datasets.dense_folder import list_dense_samples

    if not cfg.root:
        raise ConfigError(_key(cfg, "root"), "is required: the dataset root of the protocol")
    task = "semseg" if isinstance(cfg, SemsegConfig) else "depth"
    out = {}
    for split in ("train", "val"):
        try:
            out[split] = list_dense_samples(cfg.root, cfg.layout, split, _modalities(cfg, task))
        except FileNotFoundError as e:
            raise ConfigError(_key(cfg, "root"), f"{cfg.layout} layout, {split} split: {e}") from None
        except ValueError as e:
            raise ConfigError(_key(cfg, "layout"), str(e)) from None
    return out


def _check_encoder(cfg: DenseConfig, loaded: tuple, checkpoint: str) -> None:
    """Settings the checkpoint must allow: ``img_size`` a multiple of its patch size, a depth input adapter for
    ``rgb+depth``. Raises :class:`ConfigError`."""
    enc_kwargs, sd, mc = loaded
    patch = int(enc_kwargs.get("patch_size", 16))
    if cfg.img_size % patch:
        raise ConfigError(_key(cfg, "img_size"), f"{cfg.img_size} is not a multiple of the encoder's patch size "
                          f"{patch}")
    if "rgb+depth" in cfg.inputs and not any(k.startswith("input_adapters.depth.") for k in sd):
        adapters = sorted({k.split(".")[1] for k in sd if k.startswith("input_adapters.")})
        raise ConfigError(_key(cfg, "inputs"), f"rgb+depth needs a MultiMAE checkpoint with a depth input adapter; "
                          f"{checkpoint} ({mc.get('name', '?')}) has input adapters {adapters}")
    if isinstance(cfg, DepthConfig) and cfg.layers:
        depth = int(enc_kwargs.get("depth", 12))
        if any(not 0 <= i < depth for i in cfg.layers):
            raise ConfigError(_key(cfg, "layers"), f"{list(cfg.layers)} outside the encoder's {depth} blocks")


def _head_spec(cfg: DenseConfig, enc_kwargs: dict) -> dict:
    """``{task: {"kind", "kwargs"}}`` of the protocol's head (``models/heads.py``)."""
    dim, g = int(enc_kwargs.get("dim", 192)), int(enc_kwargs.get("num_global_tokens", 1))
    if isinstance(cfg, SemsegConfig):
        return {"semseg": {"kind": "convnext_seg", "kwargs": {"dim": dim, "num_classes": cfg.num_classes,
                                                               "num_global": g, "width": cfg.head_width,
                                                               "depth": cfg.head_depth}}}
    depth = int(enc_kwargs.get("depth", 12))
    layers = list(cfg.layers) or [depth * (i + 1) // 4 - 1 for i in range(4)]
    w = cfg.head_width
    return {"depth": {"kind": "dpt_depth", "kwargs": {
        "dim": dim, "patch_size": int(enc_kwargs.get("patch_size", 16)), "layers": layers, "num_global": g,
        "features": w, "reassemble": [max(8, w // 8 * m) for m in (1, 2, 4, 8)]}}}


def _build_model(cfg: DenseConfig, loaded: tuple, inp: str, seed: int, device: torch.device) -> DenseModel:
    """A fresh :class:`DenseModel` for input setting ``inp``: the checkpoint's encoder weights (and depth input
    adapter for ``rgb+depth``), a head initialised from ``seed``, stochastic depth ``cfg.drop_path``."""
    from polymae.models.multitask import load_encoder_state
    from polymae.patches import global_torch_seed

    enc_kwargs, sd, _ = loaded
    kw = dict(enc_kwargs, drop_path_rate=float(cfg.drop_path))
    if inp == "rgb+depth":
        kw["in_modalities"] = ["rgb", "depth"]
    seeded = global_torch_seed(seed)
    try:
        model = DenseModel(kw, _head_spec(cfg, enc_kwargs))
    finally:
        seeded.restore()
    load_encoder_state(model, sd)
    return model.to(device)


def _lr_at(step: int, total: int, warmup: int, cfg: DenseConfig) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def _optimizer(model: DenseModel, cfg: DenseConfig) -> torch.optim.Optimizer:
    """AdamW on timm's layer-decay groups (each with ``lr_scale``); no decay on 1-d tensors and the encoder's
    tokens/positions (``no_weight_decay``)."""
    from timm.optim import param_groups_layer_decay

    skip = {f"encoder.{n}" for n in model.encoder.no_weight_decay()}
    groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, no_weight_decay_list=skip,
                                      layer_decay=cfg.layer_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))


def _autocast(cfg: DenseConfig, device: torch.device):
    import contextlib

    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(cfg: DenseConfig, pred: torch.Tensor, batch: dict, device: torch.device) -> torch.Tensor:
    """The training loss of one batch: cross-entropy over non-ignored pixels (an all-ignored batch gives 0), or
    berHu over valid depth pixels (metres)."""
    if isinstance(cfg, SemsegConfig):
        target = batch["semseg"].to(device)
        per_pixel = F.cross_entropy(pred.float(), target, ignore_index=cfg.ignore_index, reduction="sum")
        return per_pixel / (target != cfg.ignore_index).sum().clamp_min(1)
    from polymae.models.losses import berhu_loss

    target = batch["depth"].to(device)
    valid = (target > 0) & torch.isfinite(target)
    return berhu_loss(pred, target, valid, cfg.berhu_c)


def _loader(ds, batch_size: int, shuffle: bool, cfg: DenseConfig, seed: int):
    from polymae.datasets.dense_folder import collate_dense

    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=cfg.num_workers, collate_fn=collate_dense, drop_last=False)


def _train(model: DenseModel, cfg: DenseConfig, ds, inp: str, seed: int, device: torch.device) -> list[float]:
    """Fine-tune ``model`` on ``ds`` (``steps``, or ``epochs`` passes); returns the loss of every step."""
    from tqdm import tqdm

    per_epoch = math.ceil(len(ds) / cfg.batch_size)
    total = cfg.steps or cfg.epochs * per_epoch
    warmup = min(total, round(cfg.warmup_epochs * per_epoch))
    opt = _optimizer(model, cfg)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc=f"{cfg.KEY} fine-tune ({inp})", leave=False)
    epoch = 0
    while len(losses) < total:
        ds.set_epoch(epoch)
        for batch in _loader(ds, cfg.batch_size, True, cfg, seed + epoch):
            if len(losses) >= total:
                break
            lr = _lr_at(len(losses), total, warmup, cfg)
            for g in opt.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            depth_in = batch["depth"].to(device) if inp == "rgb+depth" else None
            with _autocast(cfg, device):
                pred = model.predict(batch["rgb"].to(device), depth_in)
            loss = _loss(cfg, pred.float(), batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        epoch += 1
    bar.close()
    return losses


#: Eigen et al. (2014)'s evaluation crop of NYUv2's 480x640 frames: (top, bottom, left, right) as fractions
EIGEN_CROP = (45 / 480, 471 / 480, 41 / 640, 601 / 640)


def eigen_crop(target: torch.Tensor) -> torch.Tensor:
    """``target`` ``[H, W]`` (depth, metres) with every pixel outside :data:`EIGEN_CROP` (scaled to ``H x W``) set to
    0, i.e. invalid for the metrics."""
    H, W = target.shape[-2:]
    top, bottom, left, right = (round(f * n) for f, n in zip(EIGEN_CROP, (H, H, W, W)))
    out = torch.zeros_like(target)
    out[..., top:bottom, left:right] = target[..., top:bottom, left:right]
    return out


def _per_image(cfg: DenseConfig, pred: torch.Tensor, targets) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(prediction, target)`` of each image at the target's resolution: class ids (argmax of the bilinearly
    resized logits) or depth in metres (resized bilinearly, clamped to ``[1 mm, max_depth]``; with
    ``eval_crop=eigen`` the target outside the crop is invalid)."""
    out = []
    for i, t in enumerate(targets):
        p = F.interpolate(pred[i:i + 1].float(), size=tuple(t.shape[-2:]), mode="bilinear", align_corners=False)[0]
        p = p.argmax(0) if isinstance(cfg, SemsegConfig) else p[0].clamp(1e-3, cfg.max_depth)
        if getattr(cfg, "eval_crop", "none") == "eigen":
            t = eigen_crop(t)
        out.append((p.cpu(), t.cpu()))
    return out


@torch.no_grad()
def _evaluate(model: DenseModel, cfg: DenseConfig, ds, inp: str, batch_size: int, device: torch.device) -> dict:
    """Score every image of ``ds``; returns ``{"metrics": {...}, "images": n, "shown": [(index, pred, target)]}``
    (``metrics``: ``miou``/``pixel_acc``, or ``delta1``..``rmse`` and ``*_batch_mean``)."""
    from tqdm import tqdm

    from polymae.pipeline.evaluate.metrics import DepthMetrics, SegMetrics

    seg = isinstance(cfg, SemsegConfig)
    metric = SegMetrics(cfg.num_classes, cfg.ignore_index) if seg else DepthMetrics()
    images, shown = 0, []
    model.eval()
    for batch in tqdm(_loader(ds, batch_size, False, cfg, 0), desc=f"{cfg.KEY} evaluate ({inp})", leave=False):
        depth_in = batch["depth_in"].to(device) if inp == "rgb+depth" else None
        with _autocast(cfg, device):
            pred = model.predict(batch["rgb"].to(device), depth_in)
        pairs = _per_image(cfg, pred, batch["semseg" if seg else "depth"])
        if seg:
            for p, t in pairs:
                metric.update(p[None], t[None])
        else:
            metric.update([p for p, _ in pairs], [t for _, t in pairs], align=False)
        for k, (p, t) in enumerate(pairs):
            if len(shown) < cfg.pictures:
                shown.append((int(batch["index"][k]), p, t))
        images += len(pairs)
    if seg:
        res = metric.compute()
        return {"metrics": {"miou": res["miou"], "pixel_acc": res["pixel_acc"]}, "images": images, "shown": shown,
                "per_class_iou": metric.per_class_iou(), "classes_present": res["classes_present"]}
    return {"metrics": {**metric.compute(), **metric.compute_batch_mean()}, "images": images, "shown": shown,
            "valid_pixels": metric.n, "batches_without_valid_pixels": metric.empty_batches}


def _colour(cfg: DenseConfig, x: torch.Tensor, hi: float) -> np.ndarray:
    """Class ids or depth ``[H, W]`` as uint8 ``[H, W, 3]``: class palette (ignored/out of range black), or the
    depth ramp over ``[0, hi]`` metres (invalid black)."""
    from polymae.pipeline.colours import colour_ramp, semseg_palette

    a = x.numpy()
    if isinstance(cfg, SemsegConfig):
        pal = np.concatenate([semseg_palette(cfg.num_classes), np.zeros((1, 3), np.uint8)])
        return pal[np.where((a >= 0) & (a < cfg.num_classes), a, cfg.num_classes)]
    valid = np.isfinite(a) & (a > 0)
    rgb = colour_ramp(1.0 - np.where(valid, a, 0.0) / max(hi, 1e-6))  # near bright, as in the label preview
    return np.where(valid[..., None], rgb, 0).astype(np.uint8)


def _save_pictures(cfg: DenseConfig, ctx, ds, shown: list, inp: str, max_height: int = 256) -> list[str]:
    """``input | prediction | target`` of each shown validation image, via ``ctx.save_picture``; returns the
    picture names."""
    from PIL import Image

    from polymae.datasets.dense_folder import read_rgb

    names = []
    for index, p, t in shown:
        sample = ds.samples[index]
        h, w = t.shape[-2:]
        rgb = np.asarray(Image.fromarray(read_rgb(sample.files["rgb"])).resize((w, h), Image.BILINEAR))
        hi = 1.0  # depth colour range: [0, the image's farthest valid target] metres
        if isinstance(cfg, DepthConfig):
            ok = torch.isfinite(t) & (t > 0)
            hi = float(t[ok].max()) if ok.any() else cfg.max_depth
        panel = np.concatenate([rgb, _colour(cfg, p, hi), _colour(cfg, t, hi)], axis=1)
        if panel.shape[0] > max_height:
            f = max_height / panel.shape[0]
            panel = np.asarray(Image.fromarray(panel).resize((round(panel.shape[1] * f), max_height), Image.NEAREST))
        name = f"{cfg.KEY}_{inp.replace('+', '-')}_{sample.stem}"
        ctx.save_picture(name, panel)
        names.append(name)
    return names


def _datasets(cfg: DenseConfig, samples: dict, inp: str, seed: int) -> tuple:
    """(train, val) :class:`~polymae.datasets.dense_folder.DenseFolder` of input setting ``inp``."""
    from polymae.datasets.dense_folder import DenseFolder

    seg = isinstance(cfg, SemsegConfig)
    mods = [("semseg" if seg else "depth")] + (["depth"] if seg and inp == "rgb+depth" else [])
    kw = {"reduce_zero_label": cfg.reduce_zero() if seg else False,
          "ignore_index": cfg.ignore_index if seg else 255,
          "units_per_metre": getattr(cfg, "units_per_metre", 1000.0), "max_depth": getattr(cfg, "max_depth", 0.0)}
    train = DenseFolder(samples["train"], mods, cfg.img_size, True, seed, tuple(cfg.scale), cfg.flip, **kw)
    val = DenseFolder(samples["val"], mods, cfg.img_size, False, seed, **kw)
    return train, val


def _run_dense(cfg: DenseConfig, ctx) -> dict:
    """Both protocols: list the data, load the encoder, then per input setting fine-tune, score, draw."""
    from polymae.pipeline.evaluate.results import fingerprint_files
    from polymae.pipeline.train.checkpoint import load_encoder

    samples = preflight_dense(cfg)
    if ctx.max_samples:
        samples = {k: v[:ctx.max_samples] for k, v in samples.items()}
    loaded = load_encoder(ctx.checkpoint)
    _check_encoder(cfg, loaded, ctx.checkpoint)
    device = torch.device(ctx.device)
    metrics: dict[str, float] = {}
    extra: dict = {"train_loss": {}, "scored_images": {}, "pictures_of": {}, "details": {}}
    for inp in cfg.inputs:
        model = _build_model(cfg, loaded, inp, ctx.seed, device)
        train_ds, val_ds = _datasets(cfg, samples, inp, ctx.seed)
        extra["train_loss"][inp] = _train(model, cfg, train_ds, inp, ctx.seed, device)
        res = _evaluate(model, cfg, val_ds, inp, ctx.batch_size, device)
        metrics.update({f"{k}@{inp}": float(v) for k, v in res.pop("metrics").items()})
        extra["scored_images"][inp] = res.pop("images")
        extra["pictures_of"][inp] = _save_pictures(cfg, ctx, val_ds, res.pop("shown"), inp)
        extra["details"][inp] = res
        if cfg.save_model:
            extra.setdefault("models", {})[inp] = _save_model(model, ctx, cfg, inp)
        log.info("%s@%s: %s", cfg.KEY, inp, {k: round(v, 4) for k, v in metrics.items() if k.endswith(f"@{inp}")})
        del model
    files = [f for split in samples.values() for s in split for f in s.files.values()]
    return {"metrics": metrics,
            "dataset": {"path": cfg.root, "fingerprint": fingerprint_files(cfg.root, files),
                        "samples": {k: len(v) for k, v in samples.items()}},
            "layout": cfg.layout, "inputs": list(cfg.inputs), **extra}


def _save_model(model: DenseModel, ctx, cfg: DenseConfig, inp: str) -> str:
    """Write the fine-tuned ``model`` as ``{output}/finetuned-<inp>/`` (``model.safetensors`` + ``model_config.json``
    with ``init_kwargs`` and ``heads``), which ``pipeline/train/checkpoint.py`` ``load_model`` rebuilds as a
    multitask model; returns the folder relative to the output."""
    from safetensors.torch import save

    from polymae.datasets import storage

    rel = f"finetuned-{inp.replace('+', '_')}"
    folder = storage.join(ctx.output, rel)
    storage.makedirs(folder)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes_atomic(f"{folder}/model.safetensors", save(sd, metadata={"format": "pt"}))
    mc = {"name": f"{cfg.KEY}-finetuned", "init_kwargs": dict(model.init_kwargs, drop_path_rate=0.0),
          "heads": model.head_specs, "finetuned": {"protocol": cfg.KEY, "inputs": inp, "layout": cfg.layout}}
    storage.write_json_atomic(f"{folder}/model_config.json", mc)
    return rel


def run_semseg(cfg: SemsegConfig, ctx) -> dict:
    """The ``semseg`` protocol (module docstring) on ``ctx.checkpoint``.

    Args:
        cfg: :class:`SemsegConfig`; ctx: ``pipeline/evaluate/results.py`` ``EvalContext`` (device, seed, evaluation
            batch size, max_samples, pictures).
    Returns:
        ``{"metrics": {"miou@<input>", "pixel_acc@<input>"} (fractions in [0, 1]), "dataset": {"path",
        "fingerprint", "samples": {"train", "val"}}, "train_loss": {input: [per step]}, "scored_images":
        {input: n}, "pictures_of", "details": {input: {"per_class_iou", "classes_present"}}, "layout", "inputs"}``.
    Raises:
        ConfigError: ``semseg.root`` (missing data or partner file), ``semseg.inputs`` (no depth adapter),
            ``semseg.img_size``, before any training; FileNotFoundError / ValueError: as ``load_encoder``.
    """
    return _run_dense(cfg, ctx)


def run_depth(cfg: DepthConfig, ctx) -> dict:
    """The ``depth`` protocol (module docstring) on ``ctx.checkpoint``.

    Args:
        cfg: :class:`DepthConfig`; ctx: ``EvalContext`` as in :func:`run_semseg`.
    Returns:
        ``{"metrics": {"delta1@<input>", "delta2@..", "delta3@..", "abs_rel@..", "rmse@.." (metres), and the same
        with ``_batch_mean`` (MultiMAE's mean over batches)}, "dataset", "train_loss", "scored_images" (= the
        validation split size), "pictures_of", "details": {input: {"valid_pixels", "batches_without_valid_pixels"}},
        "layout", "inputs"}``.
    Raises:
        ConfigError: ``depth.root``, ``depth.inputs``, ``depth.img_size``, ``depth.layers`` before any training.
    """
    return _run_dense(cfg, ctx)
