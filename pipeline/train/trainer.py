"""MultiMAE / MAE pre-training with DeepSpeed ZeRO (torchtitan-style ``Trainer`` with a nested ``Config``).

Recipe (MultiMAE arXiv 2204.01678 App. A.1; MAE arXiv 2111.06377 App. A.1): AdamW (β = 0.9, 0.95),
weight decay 0.05 except biases, norms, positional embeddings and learned tokens, linear warm-up then a
per-iteration cosine decay, ``lr = base_lr × global_batch / 256``. The data stream, the masks (seeded by
``(seed, step, micro-step, rank)``) and the schedule (a pure function of the step) are all determined
by the step, so ``resume=true`` continues exactly from the newest DeepSpeed checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from polymae.pipeline.config import ConfigError, field_, save_config, to_dict
from polymae.pipeline.train.distributed import GLOO_ALLGATHER_BUCKET, world_size

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Which shards to read and how to augment them (shared crop/flip, MultiMAE App. A.1)."""

    shards: str = field_("work/shards", help="root of labelled shards (the label job's output); any fsspec URL")
    split: str = field_("train", help="split folder under `shards`")
    img_size: int = field_(224, help="training resolution in pixels (multiple of 16)")
    crop_scale: list[float] = field_([0.2, 1.0], help="random-resized-crop area range (MultiMAE: 0.2-1.0)")
    hflip: float = field_(0.5, help="horizontal flip probability (shared by all modalities)")
    num_workers: int = field_(1, help="data-loader worker processes per rank")
    shuffle_buffer: int = field_(256, help="raw samples held for shuffling per reader")

    def validate(self) -> None:
        if self.img_size <= 0 or self.img_size % 16:
            raise ConfigError("img_size", f"must be a positive multiple of 16, got {self.img_size}")
        lo, hi = (self.crop_scale + [None, None])[:2]
        if len(self.crop_scale) != 2 or not (0 < lo <= hi <= 1):
            raise ConfigError("crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not 0 <= self.hflip <= 1:
            raise ConfigError("hflip", f"must be in [0, 1], got {self.hflip}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", "must be >= 0")
        from polymae.datasets import storage

        if "://" not in self.shards and not storage.exists(self.shards):
            raise ConfigError("shards", f"input folder {self.shards!r} does not exist (run `polymae label` first)")


@dataclass
class ModelConfig:
    """MultiMAE/MAE architecture and masking: preset, modalities, visible tokens, decoders, losses."""

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
    loss_weights: dict[str, float] = field_({}, help="per-modality loss weight (default 1)")
    grad_checkpointing: bool = field_(False, help="activation checkpointing per encoder block")

    def validate(self) -> None:
        allowed = {"rgb", "depth", "semseg"}
        bad = [m for m in self.modalities if m not in allowed]
        if bad or not self.modalities:
            raise ConfigError("modalities", f"must be a non-empty subset of {sorted(allowed)}, got {self.modalities}")
        if self.arch == "mae" and list(self.modalities) != ["rgb"]:
            self.modalities = ["rgb"]
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ConfigError("mask_ratio", f"must be in [0, 1), got {self.mask_ratio}")
        if self.num_visible < 1:
            raise ConfigError("num_visible", f"must be >= 1, got {self.num_visible}")
        if self.alpha <= 0:
            raise ConfigError("alpha", f"must be > 0, got {self.alpha}")
        for k in self.loss_weights:
            if k not in self.modalities:
                raise ConfigError(f"loss_weights.{k}", "not one of the model's modalities")


@dataclass
class OptimConfig:
    """AdamW + warm-up/cosine schedule (MAE/MultiMAE recipe); lr scales with global batch / 256."""

    base_lr: float = field_(1e-4, help="lr = base_lr * global_batch / 256")
    min_lr: float = field_(0.0, help="cosine floor")
    warmup_steps: int = field_(10, help="linear warm-up iterations")
    weight_decay: float = field_(0.05, help="AdamW weight decay (none on biases, norms, pos-embeds, tokens)")
    betas: list[float] = field_([0.9, 0.95], help="AdamW betas")
    grad_clip: float = field_(0.0, help="global grad-norm clip; 0 = off (DeepSpeed's default 1.0 is overridden)")

    def validate(self) -> None:
        if self.base_lr <= 0:
            raise ConfigError("base_lr", "must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps" if self.warmup_steps < 0 else
                              "grad_clip" if self.grad_clip < 0 else "weight_decay", "must be >= 0")


@dataclass
class TrainConfig:
    """Steps, batch sizes (global = micro-batch x ranks x accumulation), ZeRO stage, precision, checkpoints."""

    steps: int = field_(100, help="optimizer steps (iterations)")
    global_batch: int = field_(16, help="samples per step over all ranks = micro_batch * ranks * accumulation")
    micro_batch: int = field_(4, help="samples per rank per forward/backward")
    zero_stage: int = field_(2, help="DeepSpeed ZeRO stage 0/1/2/3")
    precision: Literal["auto", "fp32", "bf16"] = field_("auto", help="auto = bf16 on GPU, fp32 on CPU")
    seed: int = field_(0, help="seed for init, data order, augmentation and masks")
    save_interval: int = field_(50, help="save a checkpoint every N steps (and at the end, and on SIGTERM)")
    keep_last: int = field_(2, help="checkpoints to keep")
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

    def validate(self) -> None:
        ws = world_size()
        if self.steps < 1:
            raise ConfigError("steps", "must be >= 1")
        if self.micro_batch < 1:
            raise ConfigError("micro_batch", "must be >= 1")
        if self.global_batch % (self.micro_batch * ws):
            raise ConfigError("global_batch", f"{self.global_batch} is not divisible by micro_batch ({self.micro_batch})"
                              f" x ranks ({ws})")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError("zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("wandb_project", "is set but wandb is not installed (pip install wandb)")
        if self.save_interval < 1 or self.keep_last < 1:
            raise ConfigError("save_interval" if self.save_interval < 1 else "keep_last", "must be >= 1")


@dataclass
class PretrainConfig:
    """Everything ``polymae pretrain`` takes."""

    output: str = field_("work/runs/pretrain", help="run folder: checkpoints/, config.yaml, metrics.jsonl, tb/")
    resume: bool = field_(False, help="continue from {output}/checkpoints/latest")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        patch = 14 if self.model.preset == "huge14" else 16
        if self.data.img_size % patch:
            raise ConfigError("data.img_size", f"{self.data.img_size} is not a multiple of the patch size {patch}")
        total = (self.data.img_size // patch) ** 2 * len(self.model.modalities)
        if self.model.arch == "multimae" and self.model.num_visible > total:
            raise ConfigError("model.num_visible", f"{self.model.num_visible} > {total} tokens "
                              f"({len(self.model.modalities)} modalities at {self.data.img_size} px)")


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to ``min_lr``."""
    peak = cfg.optim.base_lr * cfg.train.global_batch / 256
    w = cfg.optim.warmup_steps
    if step < w:
        return peak * (step + 1) / w
    progress = (step - w) / max(1, cfg.train.steps - w)
    return cfg.optim.min_lr + (peak - cfg.optim.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on biases, norms (ndim <= 1) and the names in
    ``model.no_weight_decay()`` (positional embeddings, global/mask tokens)."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: torch.nn.Module, cfg: "PretrainConfig") -> torch.optim.AdamW:
    """The AdamW of the recipe (β from the config, decoupled weight decay on :func:`param_groups`).

    Uses torch's fused kernel (one pass over each tensor), which matters most under ZeRO: DeepSpeed hands
    the optimizer one flat 1-D partition per group, and torch's default single-tensor path on CPU is ~8x
    slower there (benchmarks/RESULTS.md)."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr_at(0, cfg),
                             betas=tuple(cfg.optim.betas), fused=True)


def device_peak_flops(cfg_tflops: float) -> float | None:
    """Peak dense bf16 FLOP/s of one device for MFU: the configured value, else a known GPU's, else None."""
    if cfg_tflops > 0:
        return cfg_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
            if key in name:
                return tf * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of ``device`` in GiB: the CUDA allocator's peak, or on CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def register_zero3_external_params(model: torch.nn.Module) -> int:
    """ZeRO-3 gathers a module's own parameters around its forward; parameters kept in a
    ``ParameterDict``/``ParameterList`` child are read by the parent without that child's forward running,
    so they are registered as the parent's external parameters. Returns how many were registered."""
    import deepspeed

    n = 0
    for parent in model.modules():
        for child in parent.children():
            if isinstance(child, (torch.nn.ParameterDict, torch.nn.ParameterList)):
                for p in child.parameters():
                    deepspeed.zero.register_external_parameter(parent, p)
                    n += 1
    return n


def bucketed_gloo_comm(cfg: PretrainConfig, world: int, gloo: bool) -> bool:
    """Whether this run uses polymae's gloo message sizes (``train.gloo_bucketed_comm``): ZeRO-1/2 on a gloo
    process group of 2+ ranks; ZeRO-0/3, NCCL and a single rank keep DeepSpeed's own."""
    return cfg.train.gloo_bucketed_comm and cfg.train.zero_stage in (1, 2) and gloo and world > 1


def deepspeed_config(cfg: PretrainConfig, world: int, bf16: bool, gloo: bool = False) -> dict:
    """The DeepSpeed JSON config for this run (ZeRO stage, batch sizes, clipping, precision).

    ``gloo``: the process group is gloo (CPU); with ``train.gloo_bucketed_comm`` and 2+ ranks ZeRO-1/2 all-reduce
    gradient buckets (``reduce_scatter: false``) and all-gather parameters in ``GLOO_ALLGATHER_BUCKET``-element
    buckets (see ``polymae.patches.bucketed_all_gather``)."""
    ga = cfg.train.global_batch // (cfg.train.micro_batch * world)
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 1:  # DeepSpeed's default 5e8-element bucket is 1.9 GiB in fp32
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7), overlap_comm=False,
                    contiguous_gradients=True)
    if bucketed_gloo_comm(cfg, world, gloo):
        zero.update(reduce_scatter=False, allgather_bucket_size=GLOO_ALLGATHER_BUCKET)
    if cfg.train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e4),
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def model_kwargs(cfg: PretrainConfig, semseg_num_classes: int | None, semseg_ignore: int | None) -> dict:
    """Keyword arguments for ``polymae.models.multimae.create_model`` from the config + shard manifest."""
    m = cfg.model
    kw: dict = dict(img_size=cfg.data.img_size, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                    norm_pix_loss=m.norm_pix_loss)
    if m.arch == "mae":
        kw.update(mask_ratio=m.mask_ratio)
    else:
        kw.update(in_modalities=tuple(m.modalities), out_modalities=tuple(m.modalities),
                  loss_weights=dict(m.loss_weights) or None)
        if "semseg" in m.modalities:
            kw.update(semseg_num_classes=semseg_num_classes, semseg_ignore_index=semseg_ignore)
    return kw


def shard_label_info(root: str, split: str) -> tuple[int | None, int | None]:
    """``(semseg num_classes, ignore value)`` from the shards' manifest or first stats file."""
    from polymae.datasets import shards

    murl = shards.manifest_url(root, split)
    from polymae.datasets import storage

    if storage.exists(murl):
        man = storage.read_json(murl)
        ls = man.get("teachers", {}).get("semseg") or {}
        if "num_classes" in ls:
            n = int(ls["num_classes"])
            return n, shards.semseg_ignore_value(n)
    # fall back to the first sample's json
    urls = shards.trusted_shard_urls(root, split)
    for raw in shards.iter_raw_samples(urls[:1]):
        meta = json.loads(raw[shards.META])
        if "semseg" in meta:
            return int(meta["semseg"]["num_classes"]), int(meta["semseg"]["ignore_index"])
        break
    return None, None


class Trainer:
    """Runs pre-training for one ``PretrainConfig`` on this rank.

    Files under ``cfg.output``: ``config.yaml`` (resolved), ``model_config.json`` (the model's
    ``init_kwargs``), ``checkpoints/step-XXXXXXXX/`` + ``checkpoints/latest`` (DeepSpeed),
    ``metrics.jsonl`` (one line per logged step), ``tb/`` (TensorBoard).
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self._stop = False
        self._patches: list = []  # polymae.patches handles, restored when train() returns
        self.flops_per_sample: float | None = None  # training FLOPs per sample, counted once (MFU)
        self.tokens_per_sample: int | None = None  # encoder tokens per sample (tokens/s)

    # -- set-up ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        import deepspeed
        import torch.distributed as dist

        from polymae.datasets import shards
        from polymae.datasets.loader import ShardStream, make_loader
        from polymae.datasets.transforms import MultiModalAugment
        from polymae.models.multimae import create_model
        from polymae.patches import global_torch_seed, keep_freed_host_memory, skip_backward_allreduce
        from polymae.pipeline.train.distributed import init_deepspeed_distributed, use_cuda

        cfg = self.cfg
        init_deepspeed_distributed()
        if cfg.train.keep_host_memory and not use_cuda():
            self._patches.append(keep_freed_host_memory())
            log.info("host allocator keeps freed memory (train.keep_host_memory): %s", self._patches[-1] is not None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if use_cuda() else torch.device("cpu")
        bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and use_cuda())
        self.ga = cfg.train.global_batch // (cfg.train.micro_batch * self.world)
        self.ds_config = deepspeed_config(cfg, self.world, bf16, gloo=not use_cuda())

        n_cls, ignore = (None, None)
        if cfg.model.arch == "multimae" and "semseg" in cfg.model.modalities:
            n_cls, ignore = shard_label_info(cfg.data.shards, cfg.data.split)
            if n_cls is None:
                raise ConfigError("model.modalities", f"semseg requested but shards under {cfg.data.shards} have none")
        self._patches.append(global_torch_seed(cfg.train.seed))
        name = f"{cfg.model.arch}_{cfg.model.preset}"
        kw = model_kwargs(cfg, n_cls, ignore)
        if cfg.train.zero_stage == 3 and cfg.train.zero_init:
            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = create_model(name, **kw)
        else:
            model = create_model(name, **kw)
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.train.zero_stage == 3:
            register_zero3_external_params(model)
        self.init_kwargs = dict(model.init_kwargs)
        n_params = sum(p.numel() for p in model.parameters())
        opt = make_optimizer(model, cfg)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=self.ds_config)
        if self.world == 1 and cfg.train.zero_stage == 0:
            # nothing to average over one rank: skip DeepSpeed's flatten + all-reduce + unflatten of every grad
            self._patches.append(skip_backward_allreduce(self.engine))
        self.ckpt_dir = f"{cfg.output.rstrip('/')}/checkpoints"
        self.start_step = 0
        if cfg.resume:
            path, client = self.engine.load_checkpoint(self.ckpt_dir)
            if path is None:
                log.warning("resume=true but no checkpoint in %s: starting from step 0", self.ckpt_dir)
            else:
                self.start_step = int(client["step"])
                log.info("resumed from %s at step %d", path, self.start_step)
        if self.rank == 0:
            from polymae.datasets import storage

            storage.makedirs(cfg.output)
            save_config(cfg, f"{cfg.output.rstrip('/')}/config.yaml")
            with open(os.path.join(cfg.output, "model_config.json"), "w") as fh:
                json.dump({"name": name, "init_kwargs": self.init_kwargs,
                           "pretrain": {"img_size": cfg.data.img_size, "num_visible": cfg.model.num_visible,
                                        "alpha": cfg.model.alpha, "mask_ratio": cfg.model.mask_ratio,
                                        "modalities": list(cfg.model.modalities), "arch": cfg.model.arch}},
                          fh, indent=2)
            log.info("model %s: %.2f M parameters; ZeRO stage %d; %d ranks x micro-batch %d x accumulation %d = %d; %s",
                     name, n_params / 1e6, cfg.train.zero_stage, self.world, cfg.train.micro_batch, self.ga,
                     cfg.train.global_batch, "bf16" if bf16 else "fp32")

        urls = shards.trusted_shard_urls(cfg.data.shards, cfg.data.split)
        aug = MultiModalAugment(img_size=cfg.data.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip)
        self.stream = ShardStream(urls, cfg.train.micro_batch, aug, rank=self.rank, world=self.world,
                                  seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                                  skip_batches=self.start_step * self.ga, num_workers=cfg.data.num_workers)
        self.loader = make_loader(self.stream, cfg.data.num_workers)

    def _apply_comm_settings(self) -> None:
        """Process-wide comm choices of this run (set per ``train()``: several Trainers may share a process)."""
        from polymae.patches import bucketed_all_gather
        from polymae.pipeline.train.distributed import use_cuda

        if self.world > 1 and not use_cuda():  # on gloo: set either way, undoing another Trainer's choice
            self._patches.append(bucketed_all_gather(bucketed_gloo_comm(self.cfg, self.world, gloo=True)))

    # -- one step -------------------------------------------------------------------------------
    def _inputs(self, batch: dict) -> dict:
        mods = self.cfg.model.modalities if self.cfg.model.arch == "multimae" else ["rgb"]
        return {m: batch[m].to(self.device, non_blocking=True) for m in mods}

    def _mask_generator(self, step: int, micro: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed(((self.cfg.train.seed * 1_000_003 + step) * 131 + micro) * 4099 + self.rank)
        return g

    def _forward(self, inputs: dict, gen: torch.Generator):
        m = self.cfg.model
        if m.arch == "mae":
            return self.engine(inputs, generator=gen)
        return self.engine(inputs, num_visible=m.num_visible, alphas=m.alpha,
                           sample_tasks_uniform=m.sample_tasks_uniform, generator=gen)

    def _save(self, step: int) -> None:
        import torch.distributed as dist

        tag = f"step-{step:08d}"
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state={"step": step}, save_latest=True)
        dist.barrier()
        if self.rank == 0:
            import shutil

            tags = sorted(d for d in os.listdir(self.ckpt_dir) if d.startswith("step-"))
            for old in tags[:-self.cfg.train.keep_last]:
                shutil.rmtree(os.path.join(self.ckpt_dir, old), ignore_errors=True)
            log.info("saved checkpoint %s/%s", self.ckpt_dir, tag)

    def _on_sigterm(self, signum, frame) -> None:  # Slurm preemption: save at the end of this step
        log.warning("signal %d: will save a checkpoint and stop after this step", signum)
        self._stop = True

    # -- loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run from the start (or resumed) step to ``train.steps``. Returns the last logged metrics."""
        import torch.distributed as dist
        from tqdm import tqdm

        self._setup()
        cfg = self.cfg
        self._apply_comm_settings()
        from polymae.patches import signal_handlers

        self._patches.append(signal_handlers(self._on_sigterm, (signal.SIGTERM,)))
        tb = None
        if self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(os.path.join(cfg.output, "tb"))
            except ImportError:
                log.warning("tensorboard not installed: no TensorBoard logs")
        metrics_path = os.path.join(cfg.output, "metrics.jsonl")
        it = iter(self.loader)
        mods = self.cfg.model.modalities if self.cfg.model.arch == "multimae" else ["rgb"]
        bar = tqdm(total=cfg.train.steps, initial=self.start_step, disable=self.rank != 0, desc="pretrain",
                   unit="step", dynamic_ncols=True)
        last: dict = {}
        step = self.start_step
        peak = device_peak_flops(cfg.train.peak_tflops)
        wandb_run = None
        if self.rank == 0 and cfg.train.wandb_project:
            import wandb

            wandb_run = wandb.init(project=cfg.train.wandb_project, config=to_dict(cfg), resume="allow")
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            wait = 0.0
            lr = lr_at(step, cfg)
            for g in self.engine.optimizer.param_groups:
                g["lr"] = lr
            # one all-reduce per step carries the losses and the SIGTERM flag (last slot)
            loss_sum = torch.zeros(2 + len(mods), dtype=torch.float64)
            for micro in range(self.ga):
                tw = time.perf_counter()
                batch = next(it)
                wait += time.perf_counter() - tw
                if self.flops_per_sample is None:  # count once per Trainer, on a micro-batch (torch's FLOP counter)
                    from torch.utils.flop_counter import FlopCounterMode

                    with FlopCounterMode(display=False) as fc:
                        out = self._forward(self._inputs(batch), self._mask_generator(step, micro))
                        self.engine.backward(out.loss)
                    self.flops_per_sample = fc.get_total_flops() / batch["rgb"].shape[0]
                else:
                    out = self._forward(self._inputs(batch), self._mask_generator(step, micro))
                    self.engine.backward(out.loss)
                self.engine.step()
                loss_sum[0] += out.loss.detach().float().cpu().item()
                for i, m in enumerate(mods):
                    if m in out.losses:
                        loss_sum[1 + i] += out.losses[m].detach().float().cpu().item()
                if self.tokens_per_sample is None:
                    self.tokens_per_sample = int(sum((~mk).sum().item() for mk in out.masks.values()) / batch["rgb"].shape[0])
            loss_sum[-1] = 1.0 if self._stop else 0.0
            dist.all_reduce(loss_sum)
            stop = bool(loss_sum[-1] > 0)
            loss_sum /= self.ga * self.world
            step += 1
            dt = time.perf_counter() - t0
            if self.rank == 0 and (step % cfg.train.log_interval == 0 or step == cfg.train.steps or step == 1):
                gn = self.engine.get_global_grad_norm()
                ips = cfg.train.global_batch / dt
                last = {"step": step, "loss": float(loss_sum[0]),
                        "losses": {m: float(loss_sum[1 + i]) for i, m in enumerate(mods)},
                        "lr": lr, "grad_norm": float(gn) if gn is not None else None,
                        "images_per_s": ips, "tokens_per_s": ips * (self.tokens_per_sample or 0),
                        "data_wait_pct": 100.0 * wait / dt, "step_s": dt,
                        "tflops_per_s": (self.flops_per_sample or 0) * ips / 1e12,
                        "mfu": (self.flops_per_sample or 0) * ips / (peak * self.world) if peak else None,
                        "peak_memory_gib": peak_memory_gib(self.device)}
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(last) + "\n")
                if tb is not None:
                    tb.add_scalar("loss/total", last["loss"], step)
                    for m, v in last["losses"].items():
                        tb.add_scalar(f"loss/{m}", v, step)
                    tb.add_scalar("lr", lr, step)
                    if last["grad_norm"] is not None:
                        tb.add_scalar("grad_norm", last["grad_norm"], step)
                    tb.add_scalar("throughput/images_per_s", ips, step)
                    tb.add_scalar("throughput/tokens_per_s", last["tokens_per_s"], step)
                    tb.add_scalar("throughput/data_wait_pct", last["data_wait_pct"], step)
                    tb.add_scalar("throughput/tflops_per_s", last["tflops_per_s"], step)
                    if last["mfu"] is not None:
                        tb.add_scalar("throughput/mfu", last["mfu"], step)
                    tb.add_scalar("memory/peak_gib", last["peak_memory_gib"], step)
                if wandb_run is not None:
                    wandb_run.log({k: v for k, v in last.items() if k != "losses"}
                                  | {f"loss/{m}": v for m, v in last["losses"].items()}, step=step)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", img_s=f"{ips:.1f}")
            bar.update(1)
            if step % cfg.train.save_interval == 0 or step == cfg.train.steps or stop:
                self._save(step)
            if stop:
                log.warning("stopped at step %d after SIGTERM (checkpoint saved)", step)
                break
        bar.close()
        if tb is not None:
            tb.close()
        if wandb_run is not None:
            wandb_run.finish()
        if self.stream.skipped_corrupt:
            log.warning("skipped %d corrupt samples in the main process", self.stream.skipped_corrupt)
        for p in reversed(self._patches):
            if p is not None:
                p.restore()
        self._patches.clear()
        return last


def summary_from_metrics(output: str) -> list[dict]:
    """All logged steps of a run (``metrics.jsonl``), in order; later duplicates (after resume) win."""
    path = os.path.join(output, "metrics.jsonl")
    rows: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


__all__ = ["PretrainConfig", "Trainer", "lr_at", "deepspeed_config", "param_groups", "to_dict",
           "summary_from_metrics"]
