"""``MultitaskConfig``: everything ``polymae multitask`` takes (unmixed multi-task training of task decoders on a
pre-trained encoder with MT-AdamW; Uni-Perceiver v2, arXiv 2211.09808, Sec. 4.4).

``tasks`` maps a task name to its :class:`TaskConfig` (kind, data, decoder, batch sizes, sampling weight ``s_k``
and loss weight ``omega_k``), so ``tasks.depth.micro_batch=4`` overrides one task from the command line. Sampling
weights are either given for every task (normalised to sum 1) or for none (then proportional to the tasks' dataset
sizes, ``pipeline/train/sampler.py``). As in ``config.py``, ``validate()`` is pure and ``preflight()`` reads the world.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

from polymae.pipeline.config import ConfigError, field_, redact

#: task kinds of this job (``pipeline/train/tasks.py``)
TASK_KINDS = ("depth", "semseg", "cls", "det", "seg", "kpt", "cap")
#: the sequence kinds (Masked AutoDecoder, ``models/mad.py``): COCO-format data, one decoder shared by all of them
SEQUENCE_KINDS = ("det", "seg", "kpt", "cap")
#: settings of the shared sequence decoder, which every sequence task must give alike
SEQUENCE_DECODER_KEYS = ("head_width", "decoder_depth", "decoder_heads", "caption_vocab")


@dataclass
class TaskConfig:
    """One task: its kind, data, decoder, batch sizes and weights."""

    kind: Literal["depth", "semseg", "cls", "det", "seg", "kpt", "cap"] = field_(
        "depth", help="depth | semseg (labelled shards) | cls (ImageNet-style folder, or shards with a `cls` "
        "member) | det | seg | kpt | cap (COCO-format annotations; one shared Masked AutoDecoder)")
    shards: str = field_("", help="root of labelled shards (the label job's output; depth, semseg, cls)")
    split: str = field_("train", help="split folder under `shards`")
    folder: str = field_("", help="cls: ImageNet-style folder, one sub-folder per class (instead of shards)")
    num_classes: int = field_(0, help="semseg: 0 = from the shards' manifest; cls from shards: required")
    micro_batch: int = field_(4, help="samples per rank per forward/backward of this task")
    global_batch: int = field_(16, help="samples per optimizer step of this task = micro_batch x ranks x accumulation")
    sampling_weight: float | None = field_(None, help="s_k before normalisation; null for every task = "
                                           "proportional to dataset size")
    loss_weight: float = field_(1.0, help="omega_k: the norm of the task's normalised gradient (MT-AdamW)")
    head_width: int = field_(0, help="decoder width: DPT fusion features / ConvNeXt width (0 = the kind's default)")
    head_depth: int = field_(2, help="semseg: ConvNeXt blocks")
    layers: list[int] = field_([], help="depth: the 4 encoder blocks DPT reads (0-based; [] = evenly spaced)")
    annotations: str = field_("", help="det/seg/kpt/cap: COCO annotation JSON (instances / person_keypoints / "
                              "captions), local path or fsspec URL")
    images: str = field_("", help="det/seg/kpt/cap: folder or fsspec URL holding the annotations' file_name")
    val_annotations: str = field_("", help="det/seg/kpt/cap: held-out COCO JSON scored by evaluate ('' = none)")
    val_images: str = field_("", help="det/seg/kpt/cap: folder of the held-out images ('' = `images`)")
    instances_per_image: int = field_(4, help="seg/kpt: at most this many instance sequences per image in a batch")
    decoder_depth: int = field_(6, help="det/seg/kpt/cap: layers of the shared Masked AutoDecoder")
    decoder_heads: int = field_(8, help="det/seg/kpt/cap: attention heads of the shared decoder "
                                "(its width: head_width, 0 = 256)")
    caption_vocab: int = field_(8000, help="cap: largest caption-tokenizer vocabulary (trained on the captions)")
    crop_scale: list[float] = field_([0.2, 1.0], help="random-resized-crop area range")
    hflip: float = field_(0.5, help="horizontal flip probability")

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: no data source (``shards`` / ``folder``; ``annotations`` + ``images`` for a sequence
                task), a folder for a dense task, batch sizes below 1 or ``global_batch`` not a multiple of
                ``micro_batch``, negative weights, a bad crop range, ``layers`` not 4 indices, sequence-decoder
                settings below 1.
        """
        if self.kind in SEQUENCE_KINDS and not (self.annotations and self.images):
            raise ConfigError("annotations" if not self.annotations else "images",
                              f"a {self.kind} task reads COCO annotations and their images: set both")
        if self.kind in SEQUENCE_KINDS and min(self.instances_per_image, self.decoder_depth, self.decoder_heads,
                                               self.caption_vocab) < 1:
            raise ConfigError("instances_per_image", "instances_per_image, decoder_depth, decoder_heads and "
                              "caption_vocab must be >= 1")
            raise ConfigError("shards", f"a {self.kind} task reads labelled shards: set shards")
        if self.kind == "cls" and bool(self.shards) == bool(self.folder):
            raise ConfigError("folder", "a cls task reads either an ImageNet-style folder or shards: set one")
        if self.kind == "cls" and self.shards and self.num_classes < 1:
            raise ConfigError("num_classes", "a cls task on shards needs num_classes (the `cls` member's range)")
        if self.micro_batch < 1 or self.global_batch < 1:
            raise ConfigError("micro_batch" if self.micro_batch < 1 else "global_batch", "must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ConfigError("global_batch", f"{self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        if self.sampling_weight is not None and self.sampling_weight < 0:
            raise ConfigError("sampling_weight", f"must be >= 0, got {self.sampling_weight}")
        if self.loss_weight < 0:
            raise ConfigError("loss_weight", f"must be >= 0, got {self.loss_weight}")
        lo, hi = (list(self.crop_scale) + [None, None])[:2]
        if len(self.crop_scale) != 2 or not (0 < lo <= hi <= 1):
            raise ConfigError("crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.layers and len(self.layers) != 4:
            raise ConfigError("layers", f"DPT reads 4 encoder blocks, got {self.layers}")
        if self.head_width < 0 or self.head_depth < 1:
            raise ConfigError("head_width" if self.head_width < 0 else "head_depth", "out of range")


@dataclass
class MTOptimConfig:
    """MT-AdamW (``pipeline/train/mt_adamw.py``) with linear warm-up and cosine decay."""

    lr: float = field_(1e-4, help="peak learning rate of the decoders (absolute, after warm-up)")
    min_lr: float = field_(1e-6, help="cosine floor")
    warmup_steps: int = field_(10, help="linear warm-up steps")
    weight_decay: float = field_(0.05, help="decoupled weight decay (none on biases, norms, tokens)")
    betas: list[float] = field_([0.9, 0.999], help="MT-AdamW betas, PyTorch convention (weights of the old moments)")
    eps: float = field_(1e-8, help="added to sqrt(v_hat)")
    encoder_lr_mult: float = field_(0.1, help="encoder lr = lr x this (0 freezes the encoder)")
    layer_decay: float = field_(1.0, help="layer-wise lr decay of the encoder (BEiT/MAE fine-tuning; 1 = none)")

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``lr <= 0``, negative ``min_lr``/``warmup_steps``/``weight_decay``/``encoder_lr_mult``,
                ``betas`` not two numbers in [0, 1), ``layer_decay`` outside (0, 1].
        """
        if self.lr <= 0:
            raise ConfigError("lr", "must be > 0")
        for key in ("min_lr", "warmup_steps", "weight_decay", "encoder_lr_mult", "eps"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError("layer_decay", f"must be in (0, 1], got {self.layer_decay}")


@dataclass
class MTTrainConfig:
    """Steps, ZeRO stage, precision, data loading, checkpoints and logging of the multitask run."""

    steps: int = field_(100, help="optimizer steps (each trains one drawn task)")
    zero_stage: int = field_(2, help="DeepSpeed ZeRO stage 0/1/2/3")
    precision: Literal["auto", "fp32", "amp_bf16"] = field_(
        "auto", help="auto = amp_bf16 on GPU, fp32 on CPU; amp_bf16: fp32 weights, forward under "
                     "torch.autocast(bfloat16)")
    seed: int = field_(0, help="seed of head init, task draws, data order and augmentation")
    num_workers: int = field_(1, help="data-loader workers per rank and task")
    readers: int = field_(0, help="canonical readers of each shard task (0 = ranks x max(1, num_workers) at the "
                          "first start; kept on resume)")
    shuffle_buffer: int = field_(256, help="shard tasks: shuffle chunk in samples per reader")
    save_interval: int = field_(50, help="checkpoint every N steps (and at the end and on the preemption signal)")
    keep_last: int = field_(2, help="complete checkpoints to keep")
    log_interval: int = field_(1, help="metrics row every N steps")
    preempt_signal: Literal["SIGTERM", "SIGUSR1"] = field_("SIGTERM", help="finish the step, save, exit 75")
    publish_every: int = field_(0, help="publish a release (encoder + heads) every N steps in the background (a "
                                "multiple of save_interval; 0 = off)")
    publish_to: str = field_("", help="folder of the background releases (local path, file:// or s3://): "
                             "{publish_to}/step-NNNNNNNN/ and {publish_to}/latest")

    def resolved_precision(self, cuda: bool) -> str:
        """``precision`` with ``auto`` resolved: ``amp_bf16`` on CUDA, ``fp32`` on the CPU."""
        if self.precision == "auto":
            return "amp_bf16" if cuda else "fp32"
        return self.precision

    def validate(self) -> None:
        """Pure value checks.

        Raises:
            ConfigError: ``steps``, ``save_interval``, ``keep_last`` or ``log_interval`` below 1; ``zero_stage``
                not 0-3; negative ``num_workers``, ``readers`` or ``shuffle_buffer``.
        """
        for key in ("steps", "save_interval", "keep_last", "log_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(key, "must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        for key in ("num_workers", "readers", "shuffle_buffer"):
            if getattr(self, key) < 0:
                raise ConfigError(key, "must be >= 0")
        from polymae.pipeline.train.config import check_publish_settings

        check_publish_settings(self.publish_every, self.publish_to, self.save_interval)


@dataclass
class MultitaskConfig:
    """Everything ``polymae multitask`` takes."""

    output: str = field_("work/runs/multitask", help="run folder (local path): checkpoints, metrics, tb/")
    encoder: str = field_("work/runs/pretrain", help="pre-trained encoder: a pretrain run folder or a release "
                          "(folder or URL), MultiMAE or MAE")
    img_size: int = field_(224, help="training resolution in pixels (multiple of the patch size)")
    tasks: dict[str, TaskConfig] = field_({}, help="task name -> TaskConfig")
    optim: MTOptimConfig = field(default_factory=MTOptimConfig)
    train: MTTrainConfig = field(default_factory=MTTrainConfig)
    resume: bool = field_(False, help="continue from the newest complete checkpoint in `output`")

    def validate(self) -> None:
        """Pure checks of the whole config (each task's :meth:`TaskConfig.validate`, keys ``tasks.<name>.<key>``).

        Raises:
            ConfigError: no tasks; a task's own check; sequence tasks that disagree on the shared decoder
                (:data:`SEQUENCE_DECODER_KEYS`); sampling weights given for some tasks only, or all zero;
                ``output`` a URL; ``img_size`` not a positive multiple of 16... (the patch size is checked against
                the encoder by the trainer).
        """
        if not self.tasks:
            raise ConfigError("tasks", "name at least one task (e.g. tasks.depth.kind=depth tasks.depth.shards=...)")
        for name, task in self.tasks.items():
            try:
                task.validate()
            except ConfigError as e:
                raise ConfigError(f"tasks.{name}.{e.key}", str(e).split(": ", 1)[1]) from None
        weights = [t.sampling_weight for t in self.tasks.values()]
        if any(w is None for w in weights) and not all(w is None for w in weights):
            raise ConfigError("tasks", "give every task a sampling_weight, or none (then proportional to size)")
        if all(w is not None for w in weights) and sum(weights) <= 0:
            raise ConfigError("tasks", "sampling weights sum to 0")
        if "://" in self.output or "::" in self.output:
            raise ConfigError("output", f"must be a local folder, not {redact(self.output)!r}")
        seq = [(n, t) for n, t in self.tasks.items() if t.kind in SEQUENCE_KINDS]
        for n, t in seq[1:]:
            for key in SEQUENCE_DECODER_KEYS:
                if getattr(t, key) != getattr(seq[0][1], key):
                    raise ConfigError(f"tasks.{n}.{key}", f"{getattr(t, key)} differs from tasks.{seq[0][0]}.{key} = "
                                      f"{getattr(seq[0][1], key)}: the sequence tasks share one decoder")
        if self.img_size <= 0 or self.img_size % 2:
            raise ConfigError("img_size", f"must be a positive even number of pixels, got {self.img_size}")

    def preflight(self) -> None:
        """Local inputs exist and the launcher's world size divides every task's batch.

        Raises:
            ConfigError: a missing local encoder or data folder (``encoder``, ``tasks.<name>.shards|folder``); a
                ``global_batch`` not divisible by ``micro_batch x ranks``.
        """
        from polymae.datasets import storage
        from polymae.pipeline.train.distributed import world_size

        if "://" not in self.encoder and not os.path.exists(os.path.join(self.encoder, "model_config.json")):
            raise ConfigError("encoder", f"{self.encoder!r} has no model_config.json (not a run folder or release)")
        world = world_size()
        for name, t in self.tasks.items():
            for key in ("shards", "folder", "annotations", "images"):
                url = getattr(t, key)
                if url and "://" not in url and not storage.exists(url):
                    raise ConfigError(f"tasks.{name}.{key}", f"{url!r} does not exist")
            if t.global_batch % (t.micro_batch * world):
                raise ConfigError(f"tasks.{name}.global_batch", f"{t.global_batch} is not divisible by micro_batch "
                                  f"{t.micro_batch} x {world} ranks")


__all__ = ["TaskConfig", "MTOptimConfig", "MTTrainConfig", "MultitaskConfig", "TASK_KINDS", "SEQUENCE_KINDS",
           "SEQUENCE_DECODER_KEYS"]
