"""MultiMAE (arXiv 2204.01678) and MAE (arXiv 2111.06377) pre-training models.

``MultiMAE`` is one ViT encoder over the visible tokens of several modalities (rgb, depth, semseg),
with one learned global token, per-modality input adapters and cross-attention output adapters
(Sec. 3.1), Dirichlet multi-modal masking (Sec. 3.2) and per-modality masked losses (Sec. 3.3).
``MAE`` is the same class configured as in the MAE paper: RGB only, random masking with ratio 0.75,
a class token, a final encoder LayerNorm, the 8-block 512-d self-attention decoder over all tokens and
the normalised-pixel loss.

Both are built from one :class:`~polymae.models.config.MultiMAEConfig` (or its fields as keyword
arguments); ``model.init_kwargs`` is that config as a JSON-ready dict (with ``"arch"``) and
:func:`build_from_init_kwargs` rebuilds the model from such a dict.

A training step (``forward`` with sampled masks, then ``loss.backward()``) reads no tensor value on the
host, so it never waits for an accelerator: masks are drawn on the generator's device and copied over
asynchronously (``polymae.models.masking``) and the losses use masked arithmetic (``polymae.models.losses``).
Only caller-supplied masks are validated on the host. Losses are always computed in float32 with autocast
off; ``fp32_output_adapters`` runs chosen output adapters in float32 as well.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .adapters import MAEOutputAdapter, PatchedInputAdapter, SemSegInputAdapter, SpatialOutputAdapter, TokenLayout
from .config import INPUT_MODALITIES, OUTPUT_MODALITIES, SEMSEG_STRIDE, MultiMAEConfig
from .losses import fp32_region, masked_cross_entropy_loss, masked_l1_loss, masked_mse_loss, standardize_depth
from .masking import check_masks, num_kept, random_masking, sample_dirichlet_masks, visible_indices
from .vit import (VIT_PRESETS, BlockStack, layer_norm, make_blocks, trunc_normal_token_, xavier_conv_as_linear_,
                  xavier_linear_)

__all__ = ["MultiMAEOutput", "MultiMAE", "MAE", "MultiMAEConfig", "create_model", "build_model",
           "build_from_init_kwargs",
           "multimae_vit_tiny_patch16", "multimae_vit_small_patch16", "multimae_vit_base_patch16",
           "multimae_vit_large_patch16", "multimae_vit_huge_patch16", "mae_vit_base_patch16",
           "mae_vit_large_patch16", "mae_vit_huge_patch14", "IMAGE_CHANNELS", "INPUT_MODALITIES",
           "OUTPUT_MODALITIES"]

#: channels of the image-like modalities
IMAGE_CHANNELS = {"rgb": 3, "depth": 1}
_SOURCE = {"norm_rgb": "rgb"}


class MultiMAEOutput(dict):
    """Result of :meth:`MultiMAE.forward`: a ``dict`` with attribute access (like transformers'
    ``ModelOutput``), so that module hooks — DeepSpeed ZeRO-3 re-gathers parameters for backward through
    hooks on a module's output tensors — see every tensor inside it.

    Attributes:
        loss: float32 scalar, ``sum_m loss_weights[m] * losses[m]`` (MultiMAE Sec. 3.3).
        losses: ``{modality: float32 scalar}`` unweighted per-modality losses (only modalities whose
            target is in the inputs; ``norm_rgb``'s target is the rgb input).
        preds: ``{modality: prediction}`` for every output modality: rgb ``[B, 3, H, W]`` in the
            loss's target space (normalised RGB, or per-patch-normalised pixels with
            ``norm_pix_loss``), depth ``[B, 1, H, W]`` in standardised-depth space, semseg logits
            ``[B, K, H/4, W/4]``, norm_rgb ``[B, 3, H, W]`` in per-patch-normalised pixel space (with
            ``extra_norm_pix_loss``). Dtype: the autocast dtype, or float32 for ``fp32_output_adapters``.
        masks: ``{modality: bool [B, N_m]}`` for the encoded modalities, True = masked.
    """

    def __init__(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], preds: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor]):
        super().__init__(loss=loss, losses=losses, preds=preds, masks=masks)

    loss = property(lambda self: self["loss"])
    losses = property(lambda self: self["losses"])
    preds = property(lambda self: self["preds"])
    masks = property(lambda self: self["masks"])


class MultiMAE(nn.Module):
    """Multi-modal multi-task masked autoencoder (MultiMAE, arXiv 2204.01678, Fig. 2 / Sec. 3).

    Encoder: input adapters -> concatenation of all modalities' tokens -> the visible ones (ascending
    position order) -> ``[global token(s), visible tokens]`` -> ``depth`` ViT blocks -> optional final
    LayerNorm (``encoder_norm``; MultiMAE has none). Note: the reference appends its global token at
    the end of the sequence; here it is prepended (timm/MAE layout). With no positional embedding on
    the global token, self-attention is permutation-equivariant, so outputs are the same tokens in a
    different order and weights are interchangeable.

    Args:
        config: the settings (:class:`~polymae.models.config.MultiMAEConfig`); None = the defaults of
            this class (``MultiMAEConfig.for_arch(cls.ARCH)``). ``config.arch`` must be ``cls.ARCH``
            (build any config with :func:`build_model`).
        **overrides: fields of :class:`MultiMAEConfig` replacing those of ``config`` (or of the
            defaults), e.g. ``MultiMAE(dim=64, depth=2)``.

    Output adapters: one per ``out_modalities`` entry, named like the modality; with
    ``extra_norm_pix_loss`` (the official MultiMAE recipe) a fourth one, ``norm_rgb``, built like the rgb
    adapter with its own weights, predicts the per-patch-normalised rgb pixels (MAE Sec. 3).

    Attributes:
        config: the resolved :class:`MultiMAEConfig`.
        init_kwargs: ``config.to_dict()``, the JSON-ready dict stored in ``model_config.json``.
        extra_norm_pix_loss: whether the model has the ``norm_rgb`` output adapter.
        fp32_output_adapters: frozenset of output modalities decoded in float32 with autocast off.

    Raises:
        ValueError: invalid settings (see :class:`MultiMAEConfig`), or ``config.arch != cls.ARCH``.
        TypeError: an override that is not a field of :class:`MultiMAEConfig`.
    """

    ARCH = "multimae"

    def __init__(self, config: MultiMAEConfig | None = None, **overrides: Any):
        super().__init__()
        if config is None:
            config = MultiMAEConfig.for_arch(self.ARCH, **overrides)
        elif overrides:
            config = dataclasses.replace(config, **overrides)
        if config.arch != self.ARCH:
            raise ValueError(f"config.arch is {config.arch!r} but {type(self).__name__} is {self.ARCH!r}; "
                             f"use build_model(config)")
        self.config = c = config
        img = c.img_hw
        self.img_size = img
        self.patch_size = c.patch_size
        self.dim = c.dim
        self.in_modalities = list(c.in_modalities)
        self.out_modalities = list(c.out_modalities)
        self.num_global_tokens = c.num_global_tokens
        self.num_visible = c.num_visible
        self.mask_ratio = c.mask_ratio
        self.norm_pix_loss = c.norm_pix_loss
        self.extra_norm_pix_loss = "norm_rgb" in c.out_modalities
        self.fp32_output_adapters = frozenset(c.fp32_output_adapters)
        self.loss_weights = {m: 1.0 for m in c.out_modalities} | dict(c.loss_weights or {})
        self.semseg_ignore_index = c.semseg_ignore_index
        self.semseg_stride = SEMSEG_STRIDE
        self.do_standardize_depth = c.standardize_depth
        self.style = "mae" if c.decoder == "mae" else "multimae"
        pos_order = "col_first" if self.style == "mae" else "row_first"
        grid = (img[0] // c.patch_size, img[1] // c.patch_size)

        adapters: dict[str, nn.Module] = {}
        for m in c.in_modalities:
            if m == "semseg":
                adapters[m] = SemSegInputAdapter(c.semseg_num_classes, c.patch_size, img, c.dim, self.semseg_stride,
                                                 c.semseg_class_dim, c.semseg_ignore_index, pos_order,
                                                 c.modality_embed)
            else:
                adapters[m] = PatchedInputAdapter(IMAGE_CHANNELS[m], c.patch_size, img, c.dim, pos_order,
                                                  c.modality_embed)
        self.input_adapters = nn.ModuleDict(adapters)
        self.global_tokens = nn.Parameter(torch.zeros(1, c.num_global_tokens, c.dim))
        self.encoder = make_blocks(c.dim, c.depth, c.num_heads, c.mlp_ratio, c.qkv_bias, c.drop_path_rate)
        self.encoder_norm = layer_norm(c.dim) if c.encoder_norm else nn.Identity()

        outs: dict[str, nn.Module] = {}
        for m in c.out_modalities:
            src = _SOURCE.get(m, m)
            if m == "semseg":
                channels, patch = c.semseg_num_classes, c.patch_size // self.semseg_stride
            else:
                channels, patch = IMAGE_CHANNELS[src], c.patch_size
            if c.decoder == "mae":
                outs[m] = MAEOutputAdapter(channels, patch, grid, c.dim, src, c.decoder_dim, c.decoder_depth,
                                           c.decoder_heads, c.mlp_ratio, c.qkv_bias, c.drop_path_rate, pos_order)
            else:
                outs[m] = SpatialOutputAdapter(channels, patch, grid, c.dim, self.in_modalities, src, c.decoder_dim,
                                               c.decoder_depth, c.decoder_heads, c.mlp_ratio, c.qkv_bias,
                                               c.drop_path_rate, c.decoder_use_task_queries)
        self.output_adapters = nn.ModuleDict(outs)
        self.init_weights()

    @property
    def init_kwargs(self) -> dict[str, Any]:
        """``self.config.to_dict()``: the JSON-ready settings (``"arch"`` first, tuples as lists, a square
        ``img_size`` as an int) stored as ``model_config.json["init_kwargs"]``; a fresh dict each call."""
        return self.config.to_dict()

    # ------------------------------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """(Re-)initialise all learned weights as the reference does.

        MultiMAE style: xavier-uniform Linear weights (``qkv`` / ``kv`` bounds computed per stacked
        matrix), zero biases, LayerNorm 1/0, patch convs xavier as a linear layer, global tokens, task
        embeddings, modality embeddings and the semseg class embedding trunc-normal(0.02), output mask
        tokens zero (the reference leaves them at zero). MAE style: xavier-uniform on every Linear
        (``qkv`` as one matrix), class and mask token normal(0.02). Fixed positional buffers are not
        touched. Parameters partitioned by DeepSpeed ``zero.Init`` are skipped: call this again inside
        ``deepspeed.zero.GatheredParameters(model.parameters(), modifier_rank=0)`` in that case.
        """
        mae = self.style == "mae"
        for name, mod in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(mod, nn.Linear):
                fused = 1 if mae else (3 if leaf == "qkv" else 2 if leaf == "kv" else 1)
                xavier_linear_(mod, fused)
            elif isinstance(mod, nn.LayerNorm):
                if mod.weight is not None and mod.weight.numel():
                    nn.init.ones_(mod.weight)
                if mod.bias is not None and mod.bias.numel():
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Conv2d) and name.startswith("input_adapters."):
                xavier_conv_as_linear_(mod)
            elif isinstance(mod, nn.Embedding):
                trunc_normal_token_(mod.weight)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "global_tokens" or leaf == "mask_token":
                if mae:
                    if p.numel():
                        with torch.no_grad():
                            p.normal_(0.0, 0.02)
                elif leaf == "global_tokens":
                    trunc_normal_token_(p)
                elif p.numel():
                    with torch.no_grad():
                        p.zero_()
            elif leaf == "modality_emb" or ".task_embeddings." in name:
                trunc_normal_token_(p)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Run every transformer block (encoder and decoders) under ``torch.utils.checkpoint``
        (``use_reentrant=False``) when ``enable``; results and gradients are unchanged."""
        for mod in self.modules():
            if isinstance(mod, BlockStack):
                mod.grad_checkpointing = enable

    def no_weight_decay(self) -> set[str]:
        """Full names of tensors that must get no weight decay: global tokens, mask tokens, task and
        modality embeddings, the semseg class embedding, and the (non-trainable) positional buffers.
        Biases and norm weights are left to the trainer's ``ndim <= 1`` rule."""
        names = set()
        for name, _ in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("global_tokens", "mask_token", "modality_emb") or ".task_embeddings." in name \
                    or name.endswith("class_emb.weight"):
                names.add(name)
        for name, _ in self.named_buffers():
            if name.rsplit(".", 1)[-1] == "pos_emb":
                names.add(name)
        return names

    # ------------------------------------------------------------------------------------- helpers
    def _prepare(self, inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int,
                                                                     tuple[int, int]]:
        """Validate inputs, standardise depth. Returns ``(data, B, (H, W))``."""
        wanted = set(self.in_modalities) | {_SOURCE.get(m, m) for m in self.out_modalities}
        data: dict[str, torch.Tensor] = {}
        size = None
        batch = None
        for m in sorted(wanted):
            if m not in inputs:
                continue
            x = inputs[m]
            if m == "semseg":
                if x.ndim != 3 or x.dtype.is_floating_point:
                    raise ValueError(f"semseg must be integer [B, H/4, W/4], got {x.dtype} {tuple(x.shape)}")
                hw = (x.shape[1] * self.semseg_stride, x.shape[2] * self.semseg_stride)
            else:
                c = IMAGE_CHANNELS[m]
                if x.ndim != 4 or x.shape[1] != c or not x.dtype.is_floating_point:
                    raise ValueError(f"{m} must be float [B, {c}, H, W], got {x.dtype} {tuple(x.shape)}")
                hw = (x.shape[2], x.shape[3])
                if m == "depth" and self.do_standardize_depth:
                    x = standardize_depth(x)
            if size is None:
                size, batch = hw, x.shape[0]
            elif hw != size or x.shape[0] != batch:
                raise ValueError(f"{m}: batch/size {x.shape[0]}/{hw} differs from {batch}/{size} of other inputs")
            data[m] = x
        if not any(m in data for m in self.in_modalities):
            raise ValueError(f"inputs contain none of the input modalities {self.in_modalities}")
        assert size is not None and batch is not None
        if size[0] % self.patch_size or size[1] % self.patch_size:
            raise ValueError(f"image size {size} is not divisible by patch_size {self.patch_size}")
        return data, batch, size

    def _tokens(self, data: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # inputs in the adapters' weight dtype (bf16 weights under DeepSpeed's bf16 mode); the targets of the losses
        # stay the caller's (fp32) tensors
        dtype = self.global_tokens.dtype
        return {m: self.input_adapters[m](data[m] if m == "semseg" else data[m].to(dtype))
                for m in self.in_modalities if m in data}

    def _encode(self, tokens: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], num_visible: int,
                grid: tuple[int, int]) -> tuple[torch.Tensor, TokenLayout]:
        names = list(tokens)
        slices, start = {}, 0
        for m in names:
            slices[m] = (start, start + tokens[m].shape[1])
            start += tokens[m].shape[1]
        x_all = torch.cat([tokens[m] for m in names], dim=1)
        mask_all = torch.cat([masks[m] for m in names], dim=1)
        ids = visible_indices(mask_all, num_visible)
        b, _, d = x_all.shape
        x = torch.gather(x_all, 1, ids[..., None].expand(-1, -1, d))
        # the encoder's dtype (bf16 weights under DeepSpeed's bf16 mode; fp32 buffers such as position embeddings
        # would otherwise promote the tokens to fp32); under autocast the weights are fp32 and nothing changes
        x = torch.cat([self.global_tokens.expand(b, -1, -1), x.to(self.global_tokens.dtype)], dim=1)
        x = self.encoder_norm(self.encoder(x))
        return x, TokenLayout(names, slices, grid, ids, self.num_global_tokens, start)

    def _make_masks(self, tokens: Mapping[str, torch.Tensor], batch: int, num_visible: int | None,
                    alphas: float | Mapping[str, float], masks: Mapping[str, torch.Tensor] | None,
                    sample_tasks_uniform: bool, generator: torch.Generator | None
                    ) -> tuple[dict[str, torch.Tensor], int]:
        counts = {m: t.shape[1] for m, t in tokens.items()}
        device = next(iter(tokens.values())).device
        if masks is not None:
            k = check_masks(masks, counts, batch)  # caller's masks: validated on the host
            return {m: masks[m].to(device) for m in counts}, k
        if self.mask_ratio is not None:
            out = {m: random_masking(batch, n, self.mask_ratio, generator, device) for m, n in counts.items()}
            return out, sum(num_kept(n, self.mask_ratio) for n in counts.values())
        k = self.num_visible if num_visible is None else int(num_visible)
        out = sample_dirichlet_masks(counts, batch, k, alphas, sample_tasks_uniform, generator, device)
        return out, k

    def _decode(self, m: str, enc: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Output adapter ``m`` on the encoder output; in float32 with autocast off when ``m`` is one of
        ``fp32_output_adapters`` (inputs cast to the adapter's weight dtype: float32 unless the model was
        converted to a lower precision)."""
        adapter = self.output_adapters[m]
        if m not in self.fp32_output_adapters:
            return adapter(enc, layout)
        dtype = next((p.dtype for p in adapter.parameters() if p.is_floating_point()), torch.float32)
        with fp32_region(enc):
            return adapter(enc.to(dtype), layout)

    def _loss(self, m: str, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if m == "semseg":
            return masked_cross_entropy_loss(pred, target, mask, self.patch_size // self.semseg_stride,
                                             self.semseg_ignore_index)
        if m == "depth":
            return masked_l1_loss(pred, target, mask, self.patch_size)
        norm_pix = m == "norm_rgb" or self.norm_pix_loss
        return masked_mse_loss(pred, target, mask, self.patch_size, norm_pix=norm_pix)

    # ------------------------------------------------------------------------------------- forward
    def forward_encoder(self, inputs: Mapping[str, torch.Tensor],
                        masks: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Encode (for downstream use).

        Args:
            inputs: as in :meth:`forward` (any non-empty subset of the input modalities).
            masks: optional ``{modality: bool [B, N_m]}`` (True = masked) for every given input modality;
                None = all tokens visible.

        Returns:
            ``[B, G + N_vis, D]``: global token(s) first, then the visible tokens of the modalities in
            ``in_modalities`` order, each modality's tokens in row-major grid order.

        Raises:
            ValueError: invalid inputs or masks.
        """
        data, batch, size = self._prepare(inputs)
        tokens = self._tokens(data)
        counts = {m: t.shape[1] for m, t in tokens.items()}
        if masks is None:  # everything visible: nothing to validate (and no host read)
            masks = {m: torch.zeros(t.shape[:2], dtype=torch.bool, device=t.device) for m, t in tokens.items()}
            k = sum(counts.values())
        else:
            k = check_masks(masks, counts, batch)
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        x, _ = self._encode(tokens, {m: masks[m].to(tokens[m].device) for m in tokens}, k, grid)
        return x

    def forward(self, inputs: Mapping[str, torch.Tensor], num_visible: int | None = None,
                alphas: float | Mapping[str, float] = 1.0, masks: Mapping[str, torch.Tensor] | None = None,
                sample_tasks_uniform: bool = False, generator: torch.Generator | None = None) -> MultiMAEOutput:
        """Mask, encode, decode every output modality and compute the masked losses.

        Args:
            inputs: ``{"rgb": float [B, 3, H, W]`` ImageNet-mean/std-normalised, ``"depth": float
                [B, 1, H, W]`` raw non-negative depth (standardised inside), ``"semseg": int64
                [B, H/4, W/4]}``; keys outside the model's modalities are ignored. Modalities missing
                from ``inputs`` are neither encoded nor scored (their predictions are still returned).
            num_visible: visible tokens per sample (default ``self.num_visible``); ignored in MAE mode
                (``mask_ratio`` set) and when ``masks`` is given.
            alphas: Dirichlet concentration (float or ``{modality: alpha}``, MultiMAE Sec. 3.2).
            masks: caller-supplied ``{modality: bool [B, N_m]}`` (True = masked) for every encoded
                modality; overrides sampling. All samples must keep the same number of visible tokens.
            sample_tasks_uniform: draw a random non-empty modality subset per sample before the Dirichlet.
            generator: optional ``torch.Generator`` making the masks reproducible.

        Returns:
            :class:`MultiMAEOutput`. A loss is computed on the masked tokens of its modality (all tokens
            of an output modality that is not encoded; ``norm_rgb`` uses the rgb mask), in float32 with
            autocast off; the output adapters of ``fp32_output_adapters`` run in float32 too.

        With sampled masks (``masks=None``) nothing here reads a tensor value on the host, in forward or
        backward: a step queues its kernels without waiting for the accelerator. A CPU ``generator`` is
        fine with inputs on an accelerator (masks are drawn on the CPU and copied asynchronously).

        Raises:
            ValueError: invalid inputs, masks, ``num_visible`` or ``alphas``.
        """
        data, batch, size = self._prepare(inputs)
        tokens = self._tokens(data)
        mk, k = self._make_masks(tokens, batch, num_visible, alphas, masks, sample_tasks_uniform, generator)
        grid = (size[0] // self.patch_size, size[1] // self.patch_size)
        enc, layout = self._encode(tokens, mk, k, grid)
        preds: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        n = grid[0] * grid[1]
        for m in self.output_adapters:
            preds[m] = self._decode(m, enc, layout)
            src = _SOURCE.get(m, m)
            if src in data:
                mask = mk.get(src)
                if mask is None:
                    mask = torch.ones(batch, n, dtype=torch.bool, device=enc.device)
                losses[m] = self._loss(m, preds[m], data[src], mask)
        with fp32_region(enc):
            total = enc.float().sum() * 0.0
            for m, v in losses.items():
                total = total + self.loss_weights[m] * v
        return MultiMAEOutput(loss=total, losses=losses, preds=preds, masks=mk)


class MAE(MultiMAE):
    """Masked autoencoder (MAE, arXiv 2111.06377) as a configured :class:`MultiMAE`.

    Same arguments as :class:`MultiMAE`; the defaults are :meth:`MultiMAEConfig.mae`'s (Sec. 3: RGB only,
    random masking with ratio 0.75, class token, final encoder LayerNorm, 512-d x 8-block self-attention
    decoder, normalised-pixel loss, ViT-B encoder), and ``config.arch`` must be ``"mae"``.
    """

    ARCH = "mae"


# ------------------------------------------------------------------------------------------ factories
def _with_preset(preset: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**VIT_PRESETS[preset], **kwargs}


def multimae_vit_tiny_patch16(**kwargs: Any) -> MultiMAE:
    """MultiMAE with a ViT-Ti/16 encoder (192-d, 12 blocks, 3 heads); ``kwargs`` as :class:`MultiMAE`."""
    return MultiMAE(**_with_preset("tiny", kwargs))


def multimae_vit_small_patch16(**kwargs: Any) -> MultiMAE:
    """MultiMAE with a ViT-S/16 encoder (384-d, 12 blocks, 6 heads)."""
    return MultiMAE(**_with_preset("small", kwargs))


def multimae_vit_base_patch16(**kwargs: Any) -> MultiMAE:
    """MultiMAE with a ViT-B/16 encoder (768-d, 12 blocks, 12 heads) -- the paper's model."""
    return MultiMAE(**_with_preset("base", kwargs))


def multimae_vit_large_patch16(**kwargs: Any) -> MultiMAE:
    """MultiMAE with a ViT-L/16 encoder (1024-d, 24 blocks, 16 heads)."""
    return MultiMAE(**_with_preset("large", kwargs))


def multimae_vit_huge_patch16(**kwargs: Any) -> MultiMAE:
    """MultiMAE with a ViT-H/16 encoder (1280-d, 32 blocks, 16 heads)."""
    return MultiMAE(**_with_preset("huge", kwargs))


def mae_vit_base_patch16(**kwargs: Any) -> MAE:
    """MAE ViT-B/16 with the 512-d 8-block decoder (reference ``mae_vit_base_patch16_dec512d8b``)."""
    return MAE(**_with_preset("base", kwargs))


def mae_vit_large_patch16(**kwargs: Any) -> MAE:
    """MAE ViT-L/16 with the 512-d 8-block decoder (reference ``mae_vit_large_patch16_dec512d8b``)."""
    return MAE(**_with_preset("large", kwargs))


def mae_vit_huge_patch14(**kwargs: Any) -> MAE:
    """MAE ViT-H/14 with the 512-d 8-block decoder (reference ``mae_vit_huge_patch14_dec512d8b``)."""
    return MAE(**_with_preset("huge14", kwargs))


_FACTORIES: dict[str, Callable[..., MultiMAE]] = {
    f.__name__: f for f in (multimae_vit_tiny_patch16, multimae_vit_small_patch16, multimae_vit_base_patch16,
                            multimae_vit_large_patch16, multimae_vit_huge_patch16, mae_vit_base_patch16,
                            mae_vit_large_patch16, mae_vit_huge_patch14)
}
_ARCHS: dict[str, type[MultiMAE]] = {"multimae": MultiMAE, "mae": MAE}


def create_model(name_or_preset: str, **kwargs: Any) -> MultiMAE:
    """Build a model by name.

    Accepted names: a factory name (``"multimae_vit_base_patch16"``, ``"mae_vit_huge_patch14"``, ...),
    ``"<arch>_<preset>"`` with arch ``multimae``/``mae`` and a preset of :data:`VIT_PRESETS`
    (``"multimae_base"``, ``"mae_huge14"``), or a bare preset (``"base"`` -> MultiMAE). ``kwargs``
    override the preset and the class defaults.

    Raises:
        ValueError: unknown name.
    """
    if name_or_preset in _FACTORIES:
        return _FACTORIES[name_or_preset](**kwargs)
    if name_or_preset in VIT_PRESETS:
        return MultiMAE(**_with_preset(name_or_preset, kwargs))
    arch, _, preset = name_or_preset.partition("_")
    if arch in _ARCHS and preset in VIT_PRESETS:
        return _ARCHS[arch](**_with_preset(preset, kwargs))
    raise ValueError(f"unknown model {name_or_preset!r}; use one of {sorted(_FACTORIES)}, "
                     f"'multimae_<preset>' / 'mae_<preset>' or a preset {sorted(VIT_PRESETS)}")


def build_model(config: MultiMAEConfig) -> MultiMAE:
    """A freshly initialised model of ``config``'s class (``config.arch``: ``"multimae"`` -> :class:`MultiMAE`,
    ``"mae"`` -> :class:`MAE`); load a state dict afterwards to restore weights."""
    return _ARCHS[config.arch](config)


def build_from_init_kwargs(d: Mapping[str, Any]) -> MultiMAE:
    """Rebuild a model from its ``init_kwargs`` (e.g. ``model_config.json["init_kwargs"]``, written by
    this version or an earlier one).

    Args:
        d: ``model.init_kwargs``; ``d["arch"]`` is ``"multimae"`` or ``"mae"``; other missing keys take
            that arch's defaults (:meth:`MultiMAEConfig.from_dict`).

    Returns:
        a freshly initialised :class:`MultiMAE` or :class:`MAE` with the same architecture (load the
        state dict afterwards).

    Raises:
        ValueError: missing/unknown ``arch``, a key that is not a :class:`MultiMAEConfig` field, invalid
            values.
    """
    arch = d.get("arch")
    if arch not in _ARCHS:
        raise ValueError(f"init_kwargs['arch'] must be one of {sorted(_ARCHS)}, got {arch!r}")
    return build_model(MultiMAEConfig.from_dict(d))
