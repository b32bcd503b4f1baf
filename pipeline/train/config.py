"""``PretrainConfig``: everything ``polymae pretrain`` takes, as nested dataclasses (``data``, ``model``, ``optim``,
``train``) loaded by :func:`polymae.pipeline.config.load_config`.

Each section's ``validate()`` is pure: it reads only the config's own values, changes nothing, does no I/O and
reads no environment, so a config can be checked for another machine (``load_config(..., preflight=False)``).
The checks that need the world (the shards folder exists, the launcher's world size divides the batch, wandb
is installed) are in ``preflight()``. Values derived from others (the modalities an MAE actually uses) are
methods, never written back into the fields. Defaults follow MultiMAE (arXiv 2204.01678, App. A.1) and MAE
(arXiv 2111.06377, App. A.1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

from polymae.pipeline.config import ConfigError, field_, redact

#: modalities a MultiMAE can take as input and reconstruct (MultiMAE Sec. 3)
MODALITIES = ("rgb", "depth", "semseg")


@dataclass
class DataConfig:
    """Which shards to read and how to augment them (random-resized crop + flip shared by every modality,
    MultiMAE App. A.1)."""

    shards: str = field_("work/shards", help="root of labelled shards (the label job's output); any fsspec URL")
    split: str = field_("train", help="split folder under `shards`")
    img_size: int = field_(224, help="training resolution in pixels (multiple of 16)")
    crop_scale: list[float] = field_([0.2, 1.0], help="random-resized-crop area range (MultiMAE: 0.2-1.0)")
    hflip: float = field_(0.5, help="horizontal flip probability (shared by all modalities)")
    num_workers: int = field_(1, help="data-loader worker processes per rank")
    readers: int = field_(0, help="canonical readers that define the data order (0 = ranks x max(1, num_workers) "
                          "at the run's first start); a resumed run keeps its checkpoint's value, so the order "
                          "survives a change of world size or worker count")
    shuffle_buffer: int = field_(256, help="shuffle chunk in samples per reader: each reader permutes chunks of "
                                 "this many consecutive samples of its range (0 = no shuffle)")
    rgb_decode: Literal["cpu", "device"] = field_(
        "cpu", help="where RGB JPEGs are decoded: cpu = in the loader workers (libjpeg-turbo); device = on the "
                    "training device from the loader's bytes + crop boxes (nvJPEG on a GPU), for hosts whose "
                    "CPUs cannot keep the GPU fed")
    shuffle_buffer_mb: float = field_(512.0, help="bound on the shuffle chunk in MiB of raw samples per reader, at "
                                      "the shards' mean sample size (manifest sizes / counts)")

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``img_size`` not a positive multiple of 16 (pixels), ``crop_scale`` not
                ``[lo, hi]`` with ``0 < lo <= hi <= 1`` (fractions of the image area), ``hflip`` outside
                ``[0, 1]``, ``num_workers < 0``, ``readers < 0``, ``shuffle_buffer < 0``, ``shuffle_buffer_mb <= 0`` (MiB).
        """
        if self.img_size <= 0 or self.img_size % 16:
            raise ConfigError("img_size", f"must be a positive multiple of 16, got {self.img_size}")
        lo, hi = (self.crop_scale + [None, None])[:2]
        if len(self.crop_scale) != 2 or not (0 < lo <= hi <= 1):
            raise ConfigError("crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", "must be >= 0")
        if self.readers < 0:
            raise ConfigError("readers", f"must be >= 0 (0 = ranks x workers), got {self.readers}")
        if self.shuffle_buffer < 0:
            raise ConfigError("shuffle_buffer", f"must be >= 0 (samples), got {self.shuffle_buffer}")
        if not self.shuffle_buffer_mb > 0:
            raise ConfigError("shuffle_buffer_mb", f"must be > 0 (MiB), got {self.shuffle_buffer_mb}")

    def preflight(self) -> None:
        """The local shards folder exists (remote URLs are checked when the loader lists them).

        Raises:
            ConfigError: ``shards`` names a local folder that does not exist.
        """
        from polymae.datasets import storage

        if "://" not in self.shards and not storage.exists(self.shards):
            raise ConfigError("shards", f"input folder {self.shards!r} does not exist (run `polymae label` first)")


@dataclass
class ModelConfig:
    """MultiMAE/MAE architecture and masking: preset, modalities, visible tokens, decoders, losses
    (MultiMAE Sec. 3 and App. A.1; MAE Sec. 3)."""

    arch: Literal["multimae", "mae"] = field_("multimae", help="multimae (RGB+depth+semseg) or mae (RGB only)")
    preset: Literal["tiny", "small", "base", "large", "huge", "huge14"] = field_("tiny", help="ViT size")
    modalities: list[str] = field_(["rgb", "depth", "semseg"], help="MultiMAE input = output modalities")
    num_visible: int = field_(98, help="MultiMAE visible tokens per sample, split by a Dirichlet draw")
    alpha: float = field_(1.0, help="Dirichlet concentration for the visible-token split")
    sample_tasks_uniform: bool = field_(False, help="draw the visible modality subset uniformly first")
    mask_ratio: float = field_(0.75, help="MAE mask ratio (arch=mae)")
    decoder_dim: int = field_(256, help="output-adapter width (MultiMAE 256; MAE 512)")
    decoder_depth: int = field_(2, help="output-adapter blocks (MultiMAE 2; MAE 8)")
    norm_pix_loss: bool = field_(False, help="per-patch normalised RGB target")
    loss_weights: dict[str, float] = field_({}, help="per-modality loss weight (default 1); norm_rgb too")
    extra_norm_pix_loss: bool = field_(False, help="MultiMAE: a 4th output adapter norm_rgb with the per-patch "
                                       "normalised RGB target and its own loss beside plain RGB (official recipe)")
    fp32_output_adapters: list[str] = field_([], help="output adapters run in fp32 under autocast (the official "
                                             "recipe: [semseg]); losses are always fp32")
    grad_checkpointing: bool = field_(False, help="activation checkpointing per encoder block")

    def active_modalities(self) -> list[str]:
        """The modalities the model takes and reconstructs: ``modalities`` for MultiMAE, ``["rgb"]`` for MAE
        (which ignores ``modalities``). A fresh list each call."""
        return ["rgb"] if self.arch == "mae" else list(self.modalities)

    def loss_names(self) -> list[str]:
        """The per-output losses the model reports: :meth:`active_modalities`, then ``norm_rgb`` with
        ``extra_norm_pix_loss`` (MultiMAE)."""
        extra = ["norm_rgb"] if self.extra_norm_pix_loss and self.arch == "multimae" else []
        return self.active_modalities() + extra

    @property
    def model_name(self) -> str:
        """The ``polymae.models.multimae.create_model`` name, e.g. ``multimae_tiny`` or ``mae_huge14``."""
        return f"{self.arch}_{self.preset}"

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``modalities`` empty or not a subset of rgb/depth/semseg, ``mask_ratio`` outside
                ``[0, 1)``, ``num_visible < 1`` (tokens), ``alpha <= 0``, a ``loss_weights`` key that is not
                one of :meth:`active_modalities` (named ``loss_weights.<key>``).
        """
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad or not self.modalities:
            raise ConfigError("modalities",
                              f"must be a non-empty subset of {sorted(MODALITIES)}, got {self.modalities}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError("mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        if self.num_visible < 1:
            raise ConfigError("num_visible", f"must be >= 1, got {self.num_visible}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        outputs = self.loss_names()
        for k in self.loss_weights:
            if k not in outputs:
                raise ConfigError(f"loss_weights.{k}", f"not one of the model's outputs {outputs}")
        for i, k in enumerate(self.fp32_output_adapters):
            if k not in outputs:
                raise ConfigError(f"fp32_output_adapters[{i}]", f"{k!r} is not one of the model's outputs {outputs}")
        if self.extra_norm_pix_loss and self.arch == "mae":
            raise ConfigError("extra_norm_pix_loss", "is a MultiMAE option (MAE: norm_pix_loss)")


@dataclass
class OptimConfig:
    """AdamW + linear warm-up / cosine schedule (MAE App. A.1, MultiMAE App. A.1); lr scales with global batch / 256."""

    base_lr: float = field_(1e-4, help="lr = base_lr * global_batch / 256")
    min_lr: float = field_(0.0, help="cosine floor")
    warmup_steps: int = field_(10, help="linear warm-up iterations")
    weight_decay: float = field_(0.05, help="AdamW weight decay (none on biases, norms, pos-embeds, tokens)")
    betas: list[float] = field_([0.9, 0.95], help="AdamW betas")
    grad_clip: float = field_(0.0, help="global grad-norm clip; 0 = off (DeepSpeed's default 1.0 is overridden)")

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``base_lr <= 0``, ``betas`` not two numbers in ``[0, 1)``, a negative
                ``warmup_steps``, ``grad_clip`` or ``weight_decay``.
        """
        if self.base_lr <= 0:
            raise ConfigError("base_lr", "must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        for key in ("warmup_steps", "grad_clip", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")


def check_publish_settings(publish_every: int, publish_to: str, save_interval: int) -> None:
    """Pure checks of background publishing (a train section's ``publish_every`` / ``publish_to``).

    Raises:
        ConfigError: ``publish_every`` negative, not a multiple of ``save_interval`` (only saved checkpoints can
            be published), or 0 while ``publish_to`` is set; ``publish_to`` empty while ``publish_every`` is set.
    """
    if publish_every < 0:
        raise ConfigError("publish_every", f"must be >= 0 steps (0 = off), got {publish_every}")
    if publish_every and publish_every % save_interval:
        raise ConfigError("publish_every", f"{publish_every} is not a multiple of save_interval ({save_interval}): "
                          f"only saved checkpoints can be published")
    if publish_every and not publish_to:
        raise ConfigError("publish_to", f"must name the releases' folder (local path or URL) when publish_every "
                          f"is set ({publish_every})")
    if publish_to and not publish_every:
        raise ConfigError("publish_every", f"is 0 but publish_to is set ({redact(publish_to)!r}): set the interval "
                          f"in steps (a multiple of save_interval)")


@dataclass
class TrainConfig:
    """Steps, batch sizes (global = micro-batch x ranks x accumulation), ZeRO stage (arXiv 1910.02054),
    precision, checkpoints, logging."""

    steps: int = field_(100, help="optimizer steps (iterations)")
    global_batch: int = field_(16, help="samples per step over all ranks = micro_batch * ranks * accumulation")
    micro_batch: int = field_(4, help="samples per rank per forward/backward")
    zero_stage: int = field_(2, help="DeepSpeed ZeRO stage 0/1/2/3")
    precision: Literal["auto", "fp32", "bf16", "amp_bf16", "fp16"] = field_(
        "auto", help="auto = bf16 on GPU, fp32 on CPU; bf16: DeepSpeed bf16 weights, fp32 master weights and "
                     "gradient accumulation; amp_bf16: fp32 weights, forward under torch.autocast(bf16) (the official "
                     "MultiMAE recipe; honours model.fp32_output_adapters); fp16 (V100-class GPUs): dynamic loss "
                     "scaling")
    seed: int = field_(0, help="seed for init, data order, augmentation and masks")
    save_interval: int = field_(50, help="save a checkpoint every N steps (and at the end, and on the preemption "
                                "signal)")
    keep_last: int = field_(2, help="complete checkpoints to keep")
    preempt_signal: Literal["SIGTERM", "SIGUSR1"] = field_(
        "SIGTERM", help="the signal that means 'preempted / time limit ahead': finish the step, save, exit with "
                        "status 75 (requeue me; slurm/pretrain.sbatch's --signal must send the same one)")
    log_interval: int = field_(1, help="log/tensorboard every N steps")
    peak_tflops: float = field_(0.0, help="per-device peak TFLOP/s for MFU; 0 = known GPUs' bf16 dense peak "
                                "(H100/H200 989, A100 312), none on CPU")
    wandb_project: str = field_("", help="also log to this Weights & Biases project (needs `pip install wandb`)")
    zero_init: bool = field_(False, help="ZeRO-3 only: build the model inside deepspeed.zero.Init so no rank ever "
                             "holds it whole (for models too big for one rank's memory)")
    keep_host_memory: bool = field_(True, help="CPU training: glibc malloc keeps freed blocks instead of unmapping "
                                    "them, so ZeRO's per-step flat buffers are not page-faulted anew each step "
                                    "(ZeRO-2 step 229 -> 164 ms on MultiMAE-tiny); RSS stays at its peak")
    gloo_bucketed_comm: bool = field_(True, help="CPU (gloo) ZeRO-1/2: all-reduce gradient buckets instead of "
                                      "per-owner reduces (reduce_scatter=false) and all-gather updated parameters "
                                      "in 16 MB buckets; gloo is 1.3-1.7x slower on single multi-MB messages")
    compile: bool = field_(False, help="regional torch.compile: compile each encoder block in place (one graph shared "
                           "by identical blocks; parameter names and checkpoints unchanged). Cost: a one-off compile "
                           "in the first step (~25 s for MultiMAE-tiny on 2 CPU cores, ~2 s from inductor's disk "
                           "cache; CPU needs a C++ compiler). For ZeRO 0-2: ZeRO-3's parameter hooks split the graphs "
                           "(CPU: ~2 min to compile, 2x slower steps)")
    publish_every: int = field_(0, help="publish a release of the checkpoint every N steps (a multiple of "
                                "save_interval; 0 = off), in a separate background process (`polymae publish`), so "
                                "steps go on meanwhile; at most one in flight, a later one due meanwhile waits (only "
                                "the newest); the job waits for it at the end and fails if it failed")
    publish_to: str = field_("", help="folder of the background releases (local path, file:// or s3://): "
                             "{publish_to}/step-NNNNNNNN/ and {publish_to}/latest naming the newest complete one")

    def resolved_precision(self, cuda: bool) -> str:
        """``precision`` with ``auto`` resolved: ``bf16`` on a CUDA device, ``fp32`` on the CPU."""
        if self.precision == "auto":
            return "bf16" if cuda else "fp32"
        return self.precision

    def validate(self) -> None:
        """Pure value checks (the world size is checked by :meth:`preflight`).

        Raises:
            ConfigError: ``steps < 1``, ``micro_batch < 1``, ``global_batch`` not a multiple of
                ``micro_batch`` (samples), ``zero_stage`` not 0-3, ``save_interval < 1`` or ``keep_last < 1``;
                background publishing settings (:func:`check_publish_settings`).
        """
        if self.steps < 1:
            raise ConfigError("steps", "must be >= 1")
        if self.micro_batch < 1:
            raise ConfigError("micro_batch", "must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ConfigError("global_batch",
                              f"{self.global_batch} is not divisible by micro_batch ({self.micro_batch})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key in ("save_interval", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(key, "must be >= 1")
        check_publish_settings(self.publish_every, self.publish_to, self.save_interval)

    def preflight(self) -> None:
        """The launcher's world size divides the batch, and wandb is installed when asked for.

        Raises:
            ConfigError: ``global_batch`` not divisible by ``micro_batch x ranks`` (ranks from
                ``WORLD_SIZE``/``SLURM_NTASKS``, 1 when launched alone); ``wandb_project`` set without wandb.
        """
        from polymae.pipeline.train.distributed import use_cuda, world_size

        if self.precision == "fp16" and not use_cuda():
            raise ConfigError("precision", "fp16 (loss-scaled) training needs a CUDA device; use bf16 or fp32 on CPU")
        ws = world_size()
        if self.global_batch % (self.micro_batch * ws):
            raise ConfigError("global_batch", f"{self.global_batch} is not divisible by micro_batch "
                              f"({self.micro_batch}) x ranks ({ws})")
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("wandb_project", "is set but wandb is not installed (pip install wandb)")


@dataclass
class PretrainConfig:
    """Everything ``polymae pretrain`` takes: run folder, resume flag and the four sections."""

    output: str = field_("work/runs/pretrain", help="run folder, a local path: checkpoints/, config.yaml, "
                         "metrics.jsonl, tb/ (`polymae publish` uploads a release to object storage)")
    resume: bool = field_(False, help="continue from the newest complete checkpoint in {output}/checkpoints")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def patch_size(self) -> int:
        """ViT patch size in pixels of ``model.preset``: 14 for ``huge14``, else 16."""
        return 14 if self.model.preset == "huge14" else 16

    def validate(self) -> None:
        """Pure cross-section checks (after each section's own).

        Raises:
            ConfigError: ``output`` is a URL (``s3://``, ``file://``, ...): the run folder is written with local
                file I/O (DeepSpeed checkpoints, metrics, TensorBoard), so it must be a local path; ``data.img_size``
                not a multiple of the patch size; for MultiMAE, ``model.num_visible`` above the number of tokens,
                ``(img_size / patch)^2 x modalities``.
        """
        if "://" in self.output or "::" in self.output:
            raise ConfigError("output", f"must be a local folder, not the URL {redact(self.output)!r} (the run folder "
                              "holds DeepSpeed checkpoints; publish the run to object storage with `polymae publish`)")
        patch = self.patch_size
        if self.data.img_size % patch:
            raise ConfigError("data.img_size", f"{self.data.img_size} is not a multiple of the patch size {patch}")
        n_mods = len(self.model.active_modalities())
        total = (self.data.img_size // patch) ** 2 * n_mods
        if self.model.arch == "multimae" and self.model.num_visible > total:
            raise ConfigError("model.num_visible", f"{self.model.num_visible} > {total} tokens "
                              f"({n_mods} modalities at {self.data.img_size} px)")

    def resolved(self) -> "PretrainConfig":
        """A copy with derived values written out (``model.modalities`` = :meth:`ModelConfig.active_modalities`),
        as saved to the run's ``config.yaml``; ``self`` is unchanged."""
        out = copy.deepcopy(self)
        out.model.modalities = self.model.active_modalities()
        return out


__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "TrainConfig", "PretrainConfig", "MODALITIES",
           "check_publish_settings"]
