"""The pre-training recipe as pure functions of a :class:`~polymae.pipeline.train.config.PretrainConfig`: learning-rate
schedule, AdamW parameter groups, model constructor arguments, masking arguments and seeds, and the DeepSpeed config.

Recipe (MultiMAE arXiv 2204.01678 App. A.1; MAE arXiv 2111.06377 App. A.1): AdamW (β = 0.9, 0.95), weight
decay 0.05 except biases, norms, positional embeddings and learned tokens, linear warm-up then a per-iteration
cosine decay, ``lr = base_lr × global_batch / 256``. The schedule and the masks (seeded by
``(seed, step, micro-step, rank)``) are functions of the step alone, which is what makes a resumed run continue
exactly where the checkpoint left off.
"""

from __future__ import annotations

import math

import torch

from polymae.pipeline.train.config import ModelConfig, PretrainConfig
from polymae.pipeline.train.distributed import GLOO_ALLGATHER_BUCKET


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up over ``optim.warmup_steps`` to
    ``base_lr × global_batch / 256``, then a cosine to ``optim.min_lr`` at ``train.steps`` (MAE App. A.1)."""
    peak = cfg.optim.base_lr * cfg.train.global_batch / 256
    w = cfg.optim.warmup_steps
    if step < w:
        return peak * (step + 1) / w
    progress = (step - w) / max(1, cfg.train.steps - w)
    return cfg.optim.min_lr + (peak - cfg.optim.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups ``[decay, no_decay]``: weight decay on weight matrices only; none on biases, norms
    (``ndim <= 1``) and the names in ``model.no_weight_decay()`` (positional embeddings, global/mask tokens),
    as in MAE App. A.1. Parameters with ``requires_grad=False`` are left out."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.split(".")[-1] in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    """The AdamW of the recipe (β from the config, decoupled weight decay on :func:`param_groups`, lr of step 0).

    Uses torch's fused kernel (one pass over each tensor), which matters most under ZeRO: DeepSpeed hands
    the optimizer one flat 1-D partition per group, and torch's default single-tensor path on CPU is ~8x
    slower there (benchmarks/RESULTS.md)."""
    return torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr_at(0, cfg),
                             betas=tuple(cfg.optim.betas), fused=True)


def model_kwargs(cfg: PretrainConfig, semseg_num_classes: int | None, semseg_ignore: int | None) -> dict:
    """Keyword arguments for ``polymae.models.multimae.create_model(cfg.model.model_name, **kw)``.

    Args:
        semseg_num_classes, semseg_ignore: the shards' semantic classes and ignore value
            (:func:`polymae.pipeline.train.data.shard_label_info`); used when semseg is a modality.
    """
    m = cfg.model
    kw: dict = dict(img_size=cfg.data.img_size, decoder_dim=m.decoder_dim, decoder_depth=m.decoder_depth,
                    norm_pix_loss=m.norm_pix_loss)
    if m.fp32_output_adapters:
        kw.update(fp32_output_adapters=tuple(m.fp32_output_adapters))
    if m.arch == "mae":
        kw.update(mask_ratio=m.mask_ratio)
    else:
        mods = tuple(m.active_modalities())
        kw.update(in_modalities=mods, out_modalities=mods, loss_weights=dict(m.loss_weights) or None)
        if m.extra_norm_pix_loss:
            kw.update(extra_norm_pix_loss=True)
        if "semseg" in mods:
            kw.update(semseg_num_classes=semseg_num_classes, semseg_ignore_index=semseg_ignore)
    return kw


def masking_kwargs(m: ModelConfig) -> dict:
    """Masking keyword arguments of the model's forward: none for MAE (its ``mask_ratio`` is a constructor
    argument); for MultiMAE ``num_visible`` tokens split over modalities by a Dirichlet(``alpha``) draw
    (MultiMAE Sec. 3.2 "Multi-modal masking"), optionally after a uniform draw of the visible subset."""
    if m.arch == "mae":
        return {}
    return {"num_visible": m.num_visible, "alphas": m.alpha, "sample_tasks_uniform": m.sample_tasks_uniform}


def mask_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The CPU generator that draws the masks of one micro-batch: seeded by ``(seed, global micro-batch index)``
    only (``datasets.loader.global_batch_of``: ``(step x accumulation + micro) x world + rank``), so a resumed run,
    a run resumed on another world size (whose global micro-batches hold the same samples) or another
    implementation of the loop draws the same masks for the same data."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed * 1_000_003 + micro_batch)
    return g


def register_zero3_external_params(model: torch.nn.Module) -> int:
    """ZeRO-3 (arXiv 1910.02054, Sec. 5.3) gathers a module's own parameters around its forward; parameters kept
    in a ``ParameterDict``/``ParameterList`` child are read by the parent without that child's forward running,
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


def deepspeed_config(cfg: PretrainConfig, world: int, precision: str = "fp32", gloo: bool = False) -> dict:
    """The DeepSpeed JSON config for this run: ZeRO stage (arXiv 1910.02054), batch sizes (gradient accumulation
    = ``global_batch / (micro_batch × world)``), clipping, precision; 5e7-element (200 MB fp32) buckets.

    ``precision`` (``TrainConfig.resolved_precision``): ``bf16`` = DeepSpeed's bf16 mode with gradients
    accumulated in fp32 (``data_types.grad_accum_dtype``);
    ``fp16`` = fp16 with dynamic loss scaling (2^16 initial scale, halved on overflow, doubled after 1000 clean
    steps); ``amp_bf16`` = fp32 weights with the forward under ``torch.autocast(bfloat16)`` (DeepSpeed's
    ``torch_autocast``; the official MultiMAE recipe's mixed precision, where ``fp32_output_adapters`` apply);
    none = fp32. Without gradient clipping ZeRO-1/2 do not compute the global gradient norm
    (``compute_grad_norm: false``): it is needed only to clip, and computing it reads it on the host every step;
    ``grad_norm`` is then not logged. (DeepSpeed's ZeRO-1 bf16 optimizer and fp16 need it, so they keep it.)

    ``gloo``: the process group is gloo (CPU); with ``train.gloo_bucketed_comm`` and 2+ ranks ZeRO-1/2 all-reduce
    gradient buckets (``reduce_scatter: false``) and all-gather parameters in ``GLOO_ALLGATHER_BUCKET``-element
    buckets (see ``polymae.patches.bucketed_all_gather``)."""
    ga = cfg.train.global_batch // (cfg.train.micro_batch * world)
    bf16, fp16 = precision == "bf16", precision == "fp16"
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 1:  # DeepSpeed's default 5e8-element bucket is 1.9 GiB in fp32
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7), overlap_comm=False,
                    contiguous_gradients=True)
    if bucketed_gloo_comm(cfg, world, gloo):
        zero.update(reduce_scatter=False, allgather_bucket_size=GLOO_ALLGATHER_BUCKET)
    if cfg.train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e4),
                    stage3_gather_16bit_weights_on_model_save=False)
    if cfg.optim.grad_clip == 0 and cfg.train.zero_stage in (1, 2) and not fp16 and not (bf16 and cfg.train.zero_stage == 1):
        zero["compute_grad_norm"] = False
    ds_precision: dict = {"bf16": {"enabled": bf16}}
    if bf16:
        ds_precision["data_types"] = {"grad_accum_dtype": "fp32"}
    if precision == "amp_bf16":
        ds_precision["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if fp16:
        ds_precision["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                             "hysteresis": 2, "min_loss_scale": 1}
    return {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        **ds_precision,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


__all__ = ["lr_at", "param_groups", "make_optimizer", "model_kwargs", "masking_kwargs", "mask_generator",
           "register_zero3_external_params", "bucketed_gloo_comm", "deepspeed_config"]
