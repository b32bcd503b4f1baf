"""ViT building blocks shared by MultiMAE and MAE: presets, a checkpointable block stack, reference init.

Blocks are ``timm.models.vision_transformer.Block`` (pre-norm attention + MLP; timm's Attention uses
fused ``F.scaled_dot_product_attention``), built with ``mlp_ratio=4``, ``qkv_bias=True`` and
LayerNorm ``eps=1e-6`` as in ViT (Dosovitskiy et al. 2021), MAE and MultiMAE.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.checkpoint import checkpoint

__all__ = ["VIT_PRESETS", "BlockStack", "make_blocks", "layer_norm", "is_partitioned", "xavier_linear_",
           "xavier_conv_as_linear_", "trunc_normal_token_"]

#: ViT sizes (Dosovitskiy et al. 2021, Table 1; DeiT for tiny/small; MAE's ViT-H/14 as ``huge14``).
VIT_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(dim=192, depth=12, num_heads=3, patch_size=16),
    "small": dict(dim=384, depth=12, num_heads=6, patch_size=16),
    "base": dict(dim=768, depth=12, num_heads=12, patch_size=16),
    "large": dict(dim=1024, depth=24, num_heads=16, patch_size=16),
    "huge": dict(dim=1280, depth=32, num_heads=16, patch_size=16),
    "huge14": dict(dim=1280, depth=32, num_heads=16, patch_size=14),
}

#: LayerNorm used everywhere (eps 1e-6, as in the references).
layer_norm = partial(nn.LayerNorm, eps=1e-6)


class BlockStack(nn.Sequential):
    """A sequence of transformer blocks mapping ``[B, N, D] -> [B, N, D]``.

    Child names are ``"0"``, ``"1"``, ... so a stack stored as ``encoder`` has the state-dict keys of
    MultiMAE's ``nn.Sequential`` encoder (``encoder.0.attn.qkv.weight``). When ``grad_checkpointing``
    is True and autograd is recording, each block runs under ``torch.utils.checkpoint.checkpoint``
    (``use_reentrant=False``): activations are recomputed in backward, results are identical.
    """

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, D] -> [B, N, D]`` through every block in order."""
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        # torch runs compiled code eagerly under a TorchDispatchMode (FlopCounterMode); a checkpointed block must
        # then be recomputed eagerly too (the recompute runs outside the mode), or the saved tensors differ
        eager = use_ckpt and _get_current_dispatch_mode() is not None
        for blk in self:
            if use_ckpt:
                x = checkpoint(blk._call_impl if eager else blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """Regional ``torch.compile``: compile each block in place (``nn.Module.compile``), not the stack or model.

        What is compiled: each block's call (pre-norm attention + MLP, and any hooks on the block and its
        sub-modules), lazily at its first call. Identical blocks share one compiled graph (dynamo guards on
        the block's structure, not its identity), so the compile time is that of one block, not ``depth``.
        Everything else (adapters, masking, decoders, losses) stays eager.

        Why per block: compiling the whole model takes far longer and meets every data-dependent step of
        masking, while the blocks hold most of the FLOPs (the trainer compiles the encoder's: nearly all of
        MultiMAE's; MAE's 8-block decoder costs about as much and stays eager). ``nn.Module.compile`` keeps
        the module tree, so parameter names and state-dict keys are unchanged: checkpoints written with and
        without compilation load into each other strictly, and DeepSpeed still finds every module. Under
        ZeRO-3 its parameter hooks on the blocks' sub-modules are traced too and split each block into many
        small graphs: correct, but slow to compile and slower than eager (measured on CPU), so it is meant
        for ZeRO 0-2.

        Activation checkpointing: with ``grad_checkpointing`` the compiled block runs under
        ``torch.utils.checkpoint`` and is re-run in backward; under a ``TorchDispatchMode`` (the trainer's
        ``FlopCounterMode``) torch runs it eagerly, and :meth:`forward` then recomputes it eagerly too. Shapes
        default to static (``dynamic=False``): a new token count compiles a new graph rather than a dynamic
        one, so a checkpointed block's recompute always picks the graph its forward ran.

        Args:
            compile_kwargs: passed to ``torch.compile`` (``mode``, ``backend``, ``dynamic``, ...).
        """
        compile_kwargs.setdefault("dynamic", False)
        for blk in self:
            blk.compile(**compile_kwargs)


def make_blocks(dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                drop_path_rate: float = 0.0) -> BlockStack:
    """``depth`` timm ViT blocks (ViT, Dosovitskiy et al. 2021, Eq. 2-3: pre-norm MSA + MLP, ``[B, N, D]`` in
    and out) of width ``dim`` with a linear stochastic-depth schedule ``0 .. drop_path_rate`` (DeiT/MAE).

    Raises:
        ValueError: if ``dim`` is not divisible by ``num_heads``.
    """
    if dim % num_heads:
        raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
    rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth
    return BlockStack(*[
        Block(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path=r,
              norm_layer=layer_norm)
        for r in rates
    ])


def is_partitioned(t: torch.Tensor) -> bool:
    """True for a parameter whose storage was partitioned away (e.g. DeepSpeed ZeRO-3 ``zero.Init``:
    ``numel() == 0`` while ``ds_shape`` holds the real shape). Such tensors are skipped by the init
    helpers; initialise them under a gathering context by calling the model's ``init_weights()``."""
    return t.numel() == 0 and hasattr(t, "ds_shape")


@torch.no_grad()
def xavier_linear_(lin: nn.Linear, fused: int = 1) -> None:
    """Xavier-uniform weight, zero bias (ViT/JAX init used by MAE and MultiMAE).

    ``fused`` > 1 treats the weight as that many stacked matrices (MultiMAE: ``qkv`` -> 3, ``kv`` -> 2),
    i.e. the bound is ``sqrt(6 / (out/fused + in))``.
    """
    if is_partitioned(lin.weight):
        return
    out_f, in_f = lin.weight.shape
    bound = math.sqrt(6.0 / float(out_f // fused + in_f))
    lin.weight.uniform_(-bound, bound)
    if lin.bias is not None:
        lin.bias.zero_()


@torch.no_grad()
def xavier_conv_as_linear_(conv: nn.Conv2d) -> None:
    """Patch-embedding conv initialised like a linear layer (MAE Sec. "Implementation": xavier on the
    weight viewed as ``[out, in*k*k]``); the bias keeps PyTorch's default init, as in both references."""
    if is_partitioned(conv.weight):
        return
    w = conv.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


@torch.no_grad()
def trunc_normal_token_(t: torch.Tensor, std: float = 0.02) -> None:
    """Truncated normal (std 0.02, cut at +-2 absolute, as timm's ``trunc_normal_``) for learned tokens."""
    if is_partitioned(t):
        return
    nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0)
