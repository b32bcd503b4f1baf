"""Input and output adapters of MultiMAE (arXiv 2204.01678, Sec. 3.1 "Multi-modal encoder" and
"Decoders"), plus the MAE decoder (arXiv 2111.06377, Sec. 3 "MAE decoder") in the same interface.

Input adapters turn one modality into a token sequence ``[B, N, D]`` (patch projection + fixed 2D
sin-cos positional embedding). Output adapters turn the encoder output (global token(s) followed by the
visible tokens of all modalities) into a dense prediction of one modality. Module and parameter names
follow the reference code (``proj``, ``pos_emb``, ``class_emb``, ``task_embeddings``, ``mask_token``,
``decoder``, ``context_norm``, ``query_norm``, ``out_norm``, ``mlp``, ``decoder_transformer``,
``out_proj``, ``proj_context``; MAE: ``decoder_embed``, ``decoder_blocks``, ``decoder_norm``,
``decoder_pred``) so that published checkpoints map by name (see ``polymae.models.interop``).

Fixed positional embeddings are registered as persistent **buffers** named ``pos_emb`` (``[1, D, h, w]``
for the patch grid of the configured image size); they are saved in the state dict but never trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Mlp

from .losses import unpatchify
from .pos_embed import Order, build_2d_sincos_pos_embed, pos_embed_tokens
from .vit import layer_norm, make_blocks

__all__ = ["TokenLayout", "PatchedInputAdapter", "SemSegInputAdapter", "CrossAttention",
           "SpatialOutputAdapter", "MAEOutputAdapter"]


@dataclass
class TokenLayout:
    """Where every token of the encoder input came from.

    Attributes:
        modalities: encoded modalities, in concatenation order.
        slices: ``{modality: (start, end)}`` in the concatenated sequence of all tokens (length
            ``num_tokens``) before masking.
        grid: ``(nh, nw)`` patch grid, shared by all modalities.
        ids_keep: int64 ``[B, K]`` positions (in the concatenated sequence) of the visible tokens, in
            increasing order; encoder token ``num_global + k`` is the token at ``ids_keep[:, k]``.
        num_global: number of global tokens ``G`` prepended to the encoder input.
        num_tokens: total tokens of all encoded modalities ``N_total``.
    """

    modalities: list[str]
    slices: dict[str, tuple[int, int]]
    grid: tuple[int, int]
    ids_keep: torch.Tensor
    num_global: int
    num_tokens: int


def _scatter_visible(fill: torch.Tensor, visible: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """``[B, N_total, D]``: ``fill`` (a ``[1, 1, D]`` token) everywhere, ``visible`` ``[B, K, D]`` at
    ``layout.ids_keep``."""
    b, _, d = visible.shape
    full = fill.to(visible.dtype).expand(b, layout.num_tokens, d)
    idx = layout.ids_keep[..., None].expand(-1, -1, d)
    return full.scatter(1, idx, visible)


class PatchedInputAdapter(nn.Module):
    """Image-like modality -> tokens (MultiMAE Sec. 3.1; ViT patch embedding).

    ``Conv2d(C, D, kernel=stride=patch_size)`` over a ``[B, C, H, W]`` image, flattened row-major to
    ``[B, (H/p)*(W/p), D]``, plus the fixed sin-cos positional embedding (bicubically interpolated when
    the grid differs from the stored one, as in the reference) and, optionally, a learned modality
    embedding ``[1, 1, D]`` added to every token.

    Args:
        num_channels: ``C`` (rgb 3, depth 1).
        patch_size: ``p`` in pixels.
        img_size: ``(H, W)`` the stored positional grid is built for.
        dim: token width ``D``.
        pos_order: sin-cos channel order (``"row_first"`` MultiMAE, ``"col_first"`` MAE).
        modality_embed: add a learned modality embedding (``modality_emb``).

    Raises:
        ValueError: if ``img_size`` is not divisible by ``patch_size``.
    """

    pos_mode = "bicubic"

    def __init__(self, num_channels: int, patch_size: int, img_size: tuple[int, int], dim: int,
                 pos_order: Order = "row_first", modality_embed: bool = False):
        super().__init__()
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.dim = dim
        self.proj = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.register_buffer("pos_emb", build_2d_sincos_pos_embed(grid[0], grid[1], dim, pos_order))
        self.modality_emb = nn.Parameter(torch.zeros(1, 1, dim)) if modality_embed else None

    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid ``(H/p, W/p)`` of an input ``[B, C, H, W]``."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` float -> ``[B, (H/p)*(W/p), D]``.

        Raises:
            ValueError: wrong channel count or ``H``/``W`` not divisible by ``p``.
        """
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"expected [B, {self.num_channels}, H, W], got {tuple(x.shape)}")
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(f"image {tuple(x.shape[-2:])} is not divisible by patch size {self.patch_size}")
        tokens = self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # bf16/fp16 model: cast
        tokens = tokens + pos_embed_tokens(self.pos_emb, self.grid_for(x), self.pos_mode)
        if self.modality_emb is not None:
            tokens = tokens + self.modality_emb
        return tokens


class SemSegInputAdapter(nn.Module):
    """Semantic segmentation map -> tokens (MultiMAE Sec. 3.1, "semantic segmentation" input).

    Class ids at stride 4 (``[B, H/4, W/4]`` int64) are looked up in a learned class embedding
    ``nn.Embedding(num_classes, class_dim=64)``; pixels labelled ``ignore_index`` get a **zero vector**
    (masked to 0, so the table keeps the reference's ``[num_classes, 64]`` shape). The embedded map is
    patchified with ``Conv2d(class_dim, D, kernel=stride=patch_size/4)``, and the fixed sin-cos
    positional embedding is added (bilinear interpolation, as in the reference).

    Args:
        num_classes: number of classes ``K`` (ids ``0..K-1``).
        patch_size: ``p`` at full resolution (must be divisible by ``stride``).
        img_size: full-resolution ``(H, W)`` for the stored positional grid.
        dim: token width ``D``.
        stride: 4.
        class_dim: 64.
        ignore_index: label value treated as "no label" (255).
        pos_order: sin-cos channel order.
        modality_embed: add a learned modality embedding.

    Raises:
        ValueError: if ``patch_size`` is not divisible by ``stride`` or ``img_size`` by ``patch_size``.
    """

    pos_mode = "bilinear"

    def __init__(self, num_classes: int, patch_size: int, img_size: tuple[int, int], dim: int, stride: int = 4,
                 class_dim: int = 64, ignore_index: int = 255, pos_order: Order = "row_first",
                 modality_embed: bool = False):
        super().__init__()
        if patch_size % stride:
            raise ValueError(f"patch_size {patch_size} must be divisible by the semseg stride {stride}")
        if img_size[0] % patch_size or img_size[1] % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.num_classes = num_classes
        self.stride = stride
        self.patch = patch_size // stride
        self.ignore_index = ignore_index
        self.class_emb = nn.Embedding(num_classes, class_dim)
        self.proj = nn.Conv2d(class_dim, dim, kernel_size=self.patch, stride=self.patch)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.register_buffer("pos_emb", build_2d_sincos_pos_embed(grid[0], grid[1], dim, pos_order))
        self.modality_emb = nn.Parameter(torch.zeros(1, 1, dim)) if modality_embed else None

    def grid_for(self, x: torch.Tensor) -> tuple[int, int]:
        """Patch grid of a ``[B, h, w]`` stride-4 label map."""
        return x.shape[-2] // self.patch, x.shape[-1] // self.patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, H/4, W/4]`` -> ``[B, (H/p)*(W/p), D]``.

        Raises:
            ValueError: wrong rank/dtype or size not divisible by ``p/4``. Ids outside
                ``[0, K)`` other than ``ignore_index`` fail in ``nn.Embedding`` (IndexError on CPU).
        """
        if x.ndim != 3 or x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"semseg must be an integer [B, H/4, W/4] tensor, got {x.dtype} {tuple(x.shape)}")
        if x.shape[-2] % self.patch or x.shape[-1] % self.patch:
            raise ValueError(f"semseg map {tuple(x.shape[-2:])} is not divisible by {self.patch}")
        ids = x.long()
        valid = ids != self.ignore_index
        emb = self.class_emb(ids.masked_fill(~valid, 0)) * valid[..., None].to(self.class_emb.weight.dtype)
        tokens = self.proj(emb.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        tokens = tokens + pos_embed_tokens(self.pos_emb, self.grid_for(x), self.pos_mode)
        if self.modality_emb is not None:
            tokens = tokens + self.modality_emb
        return tokens


class CrossAttention(nn.Module):
    """Multi-head cross-attention (queries attend to a context), fused SDPA; the first layer of
    MultiMAE's decoders (Sec. 3.1 "Decoders": "a cross-attention layer ... queries ... keys and values from
    the encoder tokens").

    ``q = Linear(D, D)``, ``kv = Linear(D, 2D)`` (first half keys, second half values, as the reference's
    ``kv`` layout), output ``proj = Linear(D, D)``.

    Args:
        dim: ``D`` (divisible by ``num_heads``).
        num_heads: heads.
        qkv_bias: bias on ``q`` and ``kv``.
        attn_drop: attention dropout (training only).
        proj_drop: output dropout.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Queries ``[B, N, D]``, context ``[B, M, D]`` -> ``[B, N, D]``."""
        b, n, d = x.shape
        m = context.shape[1]
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(context).reshape(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))


class SpatialOutputAdapter(nn.Module):
    """MultiMAE decoder for one output modality (Sec. 3.1 "Decoders", Fig. 2; reference
    ``SpatialOutputAdapter`` with ``use_xattn=True``).

    1. Encoder tokens ``[B, G+K, D_enc]`` are projected to ``dim`` (``proj_context``).
    2. Context = the projected visible tokens of all modalities, each plus the positional embedding of
       its position and the task embedding of its modality (zero for modalities without one), followed
       by the projected global token(s) (no embeddings added).
    3. Queries = one per position of this modality: the learned ``mask_token`` + positional embedding +
       this modality's task embedding; with ``use_task_queries`` (reference default) the *visible*
       positions of this modality use their projected encoder token instead of the mask token.
    4. ``x = CrossAttn(query_norm(q), context_norm(c))``; ``x = x + MLP(out_norm(x))`` (no residual
       around the cross-attention, as in the reference); ``depth`` self-attention blocks; linear
       ``out_proj`` to ``channels * patch**2`` values per token, unpatchified channel-first.

    Args:
        channels: output channels ``C`` (rgb 3, depth 1, semseg ``num_classes``).
        patch: pixels per token side at the output stride (``patch_size`` or ``patch_size/4``).
        grid: stored positional grid ``(h, w)`` (configured image size / ``patch_size``).
        enc_dim: encoder width ``D_enc``.
        context_modalities: modalities with a learned task embedding (the model's input modalities).
        query_modality: whose tokens/positions the queries use (itself; ``"rgb"`` for ``norm_rgb``).
        dim: decoder width (256). depth: self-attention blocks after the cross-attention (2).
        num_heads: 8. mlp_ratio: 4. qkv_bias: True. drop_path_rate: stochastic depth of the blocks.
        use_task_queries: see step 3.
    """

    channel_last = False
    pos_mode = "bilinear"

    def __init__(self, channels: int, patch: int, grid: tuple[int, int], enc_dim: int,
                 context_modalities: Sequence[str], query_modality: str, dim: int = 256, depth: int = 2,
                 num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path_rate: float = 0.0,
                 use_task_queries: bool = True):
        super().__init__()
        self.channels = channels
        self.patch = patch
        self.query_modality = query_modality
        self.use_task_queries = use_task_queries
        self.task_embeddings = nn.ParameterDict(
            {m: nn.Parameter(torch.zeros(1, 1, dim)) for m in context_modalities})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", build_2d_sincos_pos_embed(grid[0], grid[1], dim, "row_first"))
        self.decoder = CrossAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.context_norm = layer_norm(dim)
        self.query_norm = layer_norm(dim)
        self.out_norm = layer_norm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio))
        self.decoder_transformer = make_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate)
        self.out_proj = nn.Linear(dim, channels * patch * patch)
        self.proj_context = nn.Linear(enc_dim, dim)

    def _task_emb(self, modality: str, like: torch.Tensor) -> torch.Tensor:
        if modality in self.task_embeddings:
            return self.task_embeddings[modality]
        return like.new_zeros(1, 1, like.shape[-1])

    def forward(self, encoder_tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Encoder output ``[B, G+K, D_enc]`` -> prediction ``[B, C, nh*patch, nw*patch]``."""
        ctx = self.proj_context(encoder_tokens)
        g = layout.num_global
        glob, vis = ctx[:, :g], ctx[:, g:]
        pos = pos_embed_tokens(self.pos_emb, layout.grid, self.pos_mode).to(ctx.dtype)  # [1, n, d]
        emb_all = torch.cat([pos + self._task_emb(m, pos) for m in layout.modalities], dim=1)  # [1, N_tot, d]
        b, _, d = vis.shape
        vis_emb = torch.gather(emb_all.expand(b, -1, -1), 1, layout.ids_keep[..., None].expand(-1, -1, d))
        context = torch.cat([vis + vis_emb, glob], dim=1)

        query_emb = pos + self._task_emb(self.query_modality, pos)
        if self.use_task_queries and self.query_modality in layout.slices:
            s, e = layout.slices[self.query_modality]
            queries = _scatter_visible(self.mask_token, vis, layout)[:, s:e] + query_emb
        else:
            queries = (self.mask_token.to(ctx.dtype) + query_emb).expand(b, -1, -1)

        x = self.decoder(self.query_norm(queries), self.context_norm(context))
        x = x + self.mlp(self.out_norm(x))
        x = self.decoder_transformer(x)
        x = self.out_proj(x)
        return unpatchify(x, layout.grid, self.patch, self.channels, channel_last=self.channel_last)


class MAEOutputAdapter(nn.Module):
    """MAE decoder (arXiv 2111.06377, Sec. 3 "MAE decoder"; reference ``forward_decoder``).

    Encoder tokens are embedded to ``dim`` (``decoder_embed``); the sequence is rebuilt with the learned
    ``mask_token`` at the masked positions of ``query_modality``, the fixed sin-cos positional embedding
    is added to the patch tokens (the global/class token gets none: MAE's class-token position
    embedding is zero), then ``depth`` self-attention blocks over global + all patch tokens,
    ``decoder_norm`` and the linear ``decoder_pred`` to ``patch**2 * channels`` values per token in MAE's
    ``(p, p, C)`` order. Tokens of other encoded modalities are not decoded.

    Args:
        channels: 3 for RGB. patch: ``p``. grid: stored positional grid.
        enc_dim: encoder width. query_modality: the modality reconstructed ("rgb").
        dim: 512. depth: 8. num_heads: 16. mlp_ratio: 4. qkv_bias: True. drop_path_rate: 0.
        pos_order: sin-cos order (``"col_first"`` as MAE).
    """

    channel_last = True
    pos_mode = "bicubic"

    def __init__(self, channels: int, patch: int, grid: tuple[int, int], enc_dim: int, query_modality: str,
                 dim: int = 512, depth: int = 8, num_heads: int = 16, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_path_rate: float = 0.0, pos_order: Order = "col_first"):
        super().__init__()
        self.channels = channels
        self.patch = patch
        self.query_modality = query_modality
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", build_2d_sincos_pos_embed(grid[0], grid[1], dim, pos_order))
        self.decoder_blocks = make_blocks(dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate)
        self.decoder_norm = layer_norm(dim)
        self.decoder_pred = nn.Linear(dim, patch * patch * channels)

    def forward(self, encoder_tokens: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Encoder output ``[B, G+K, D_enc]`` -> prediction ``[B, C, nh*p, nw*p]``."""
        x = self.decoder_embed(encoder_tokens)
        g = layout.num_global
        glob, vis = x[:, :g], x[:, g:]
        pos = pos_embed_tokens(self.pos_emb, layout.grid, self.pos_mode).to(x.dtype)
        if self.query_modality in layout.slices:
            s, e = layout.slices[self.query_modality]
            own = _scatter_visible(self.mask_token, vis, layout)[:, s:e]
        else:
            own = self.mask_token.to(x.dtype).expand(x.shape[0], pos.shape[1], -1)
        x = torch.cat([glob, own + pos], dim=1)
        x = self.decoder_norm(self.decoder_blocks(x))
        x = self.decoder_pred(x[:, g:])
        return unpatchify(x, layout.grid, self.patch, self.channels, channel_last=self.channel_last)
