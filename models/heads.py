"""Task decoders ("heads") on a ViT encoder's tokens, for multi-task fine-tuning (``models/multitask.py``).

Written from the papers, not from any released code:

* :class:`DPTDepthHead`: the Dense Prediction Transformer decoder (Ranftl et al., "Vision Transformers for Dense
  Prediction", ICCV 2021, Sec. 3 and Fig. 1), which MultiMAE fine-tunes for depth (arXiv 2204.01678, Sec. 4.2):
  the tokens of four encoder blocks are *reassembled* into image-like maps at strides 4, 8, 16 and 32
  (project with a 1x1 convolution, resample with a transposed or strided convolution), then *fused* from the
  coarsest to the finest by residual convolution units with 2x upsampling, and a small convolutional head
  predicts one depth channel at the input resolution.
* :class:`ConvNeXtSegHead`: the semantic-segmentation decoder MultiMAE fine-tunes with (Sec. 4.3 / App. C):
  the last block's patch tokens as a stride-``p`` map, a 1x1 projection, a few ConvNeXt blocks (Liu et al. 2022:
  7x7 depth-wise convolution, LayerNorm, 4x point-wise MLP with GELU, layer scale, residual), a 1x1 classifier
  and bilinear upsampling to the label resolution.
* :class:`ClassificationHead`: mean of the patch tokens, LayerNorm, linear (MAE App. A.2 fine-tuning's
  global-average-pooled classifier; MultiMAE Sec. 4.1).

Every head takes the encoder's block outputs ``feats`` (a list of ``[B, G + N, D]`` tokens, ``G`` global tokens
first, then the ``N = h x w`` patch tokens row-major) and returns its prediction; ``out_size`` is the ``(H, W)``
the dense heads produce.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["tokens_to_map", "DPTDepthHead", "ConvNeXtBlock", "ConvNeXtSegHead", "ClassificationHead", "HEADS",
           "build_head"]


def tokens_to_map(tokens: torch.Tensor, num_global: int, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, G + h*w, D]`` tokens -> ``[B, D, h, w]`` map of the patch tokens (global tokens dropped).

    Raises:
        ValueError: the token count is not ``G + h*w``.
    """
    b, n, d = tokens.shape
    h, w = grid
    if n != num_global + h * w:
        raise ValueError(f"{n} tokens are not {num_global} global + {h}x{w} patch tokens")
    return tokens[:, num_global:].transpose(1, 2).reshape(b, d, h, w)


class _ResidualConvUnit(nn.Module):
    """DPT's residual convolution unit: ``x + conv(relu(conv(relu(x))))`` with 3x3 convolutions."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class _FusionBlock(nn.Module):
    """DPT fusion: add the (residual-unit-refined) skip map to the coarser path, refine, upsample 2x, project."""

    def __init__(self, ch: int):
        super().__init__()
        self.skip = _ResidualConvUnit(ch)
        self.refine = _ResidualConvUnit(ch)
        self.out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.skip(skip)
        x = self.refine(x)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.out(x)


class DPTDepthHead(nn.Module):
    """DPT depth decoder (Ranftl et al. 2021, Sec. 3) on four encoder blocks.

    Args:
        dim: encoder width ``D``.
        patch_size: encoder patch size ``p`` (16: the four maps land at strides 4, 8, 16, 32).
        layers: the 0-based encoder blocks read (4 of them, shallow to deep), e.g. ``(2, 5, 8, 11)`` for 12 blocks.
        num_global: global tokens ``G`` before the patch tokens.
        features: width of the fusion path (DPT: 256).
        reassemble: widths of the four reassembled maps (DPT-Base: 96, 192, 384, 768).
    Forward: ``feats`` (the encoder's block outputs, ``[B, G + N, D]`` each; only ``layers`` are read), ``grid``
    ``(h, w)`` patches, ``out_size`` ``(H, W)`` -> depth ``[B, 1, H, W]`` (float, in the target's space: the task
    standardises the depth pseudo-labels per sample, ``models/losses.py``).
    Raises:
        ValueError: ``layers`` is not four block indices.
    """

    def __init__(self, dim: int, patch_size: int, layers: Sequence[int], num_global: int = 1, features: int = 64,
                 reassemble: Sequence[int] = (32, 64, 128, 256)):
        super().__init__()
        if len(layers) != 4 or len(reassemble) != 4:
            raise ValueError(f"DPT reads 4 encoder blocks with 4 widths, got layers={list(layers)}, "
                             f"reassemble={list(reassemble)}")
        self.layers, self.num_global = [int(i) for i in layers], num_global
        # resampling of each map relative to the patch grid (stride p): 4x and 2x up, kept, 2x down, i.e. strides
        # 4, 8, 16 and 32 pixels for p = 16 (DPT Sec. 3, "Reassemble")
        self.patch_size = patch_size
        self.resample = nn.ModuleList()
        self.project = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in reassemble)
        for c, f in zip(reassemble, [4.0, 2.0, 1.0, 0.5]):
            if f > 1:
                self.resample.append(nn.ConvTranspose2d(c, c, int(f), stride=int(f)))
            elif f < 1:
                self.resample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
            else:
                self.resample.append(nn.Identity())
        self.to_features = nn.ModuleList(nn.Conv2d(c, features, 3, padding=1, bias=False) for c in reassemble)
        self.fusion = nn.ModuleList(_FusionBlock(features) for _ in range(4))
        self.head = nn.Sequential(nn.Conv2d(features, features // 2, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 1, 1))
        # start near the standardised targets' mean (0), not at noise; small rather than zero weights, so the
        # layers below get a gradient from the first step (with exact zeros Adam amplifies rounding noise)
        nn.init.normal_(self.head[-1].weight, std=1e-3)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, feats: Sequence[torch.Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        maps = []
        for k, layer in enumerate(self.layers):
            x = tokens_to_map(feats[layer], self.num_global, grid)
            maps.append(self.to_features[k](self.resample[k](self.project[k](x))))
        x = self.fusion[3](maps[3])
        for k in (2, 1, 0):
            skip = maps[k]
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fusion[k](x, skip)
        x = F.interpolate(self.head[0](x), size=out_size, mode="bilinear", align_corners=False)
        return self.head[1:](x)


class ConvNeXtBlock(nn.Module):
    """A ConvNeXt block (Liu et al. 2022, Fig. 4): 7x7 depth-wise conv, LayerNorm, point-wise 4x MLP with GELU,
    layer scale (init 1e-6), residual. ``[B, C, h, w] -> [B, C, h, w]``."""

    def __init__(self, ch: int, layer_scale: float = 1e-6):
        super().__init__()
        self.dw = nn.Conv2d(ch, ch, 7, padding=3, groups=ch)
        self.norm = nn.LayerNorm(ch, eps=1e-6)
        self.fc1 = nn.Linear(ch, 4 * ch)
        self.fc2 = nn.Linear(4 * ch, ch)
        self.gamma = nn.Parameter(torch.full((ch,), float(layer_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtSegHead(nn.Module):
    """MultiMAE's semantic-segmentation decoder (Sec. 4.3): last-block patch tokens -> 1x1 projection to
    ``width`` -> ``depth`` :class:`ConvNeXtBlock` -> 1x1 classifier -> bilinear upsampling.

    Args:
        dim: encoder width ``D``; num_classes: ``K``; num_global: ``G``; width, depth: of the ConvNeXt stage
            (MultiMAE: 4 blocks).
    Forward: ``feats`` (last one read), ``grid`` ``(h, w)``, ``out_size`` ``(H', W')`` (the label map's size, e.g.
    stride 4) -> logits ``[B, K, H', W']``.
    """

    def __init__(self, dim: int, num_classes: int, num_global: int = 1, width: int = 96, depth: int = 2):
        super().__init__()
        self.num_global = num_global
        self.proj = nn.Conv2d(dim, width, 1)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(width) for _ in range(depth)])
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor], grid: tuple[int, int], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.blocks(self.proj(tokens_to_map(feats[-1], self.num_global, grid)))
        return F.interpolate(self.classifier(x), size=out_size, mode="bilinear", align_corners=False)


class ClassificationHead(nn.Module):
    """Mean-pooled patch tokens of the last block, LayerNorm, linear (MAE App. A.2; MultiMAE Sec. 4.1).

    Args:
        dim: encoder width ``D``; num_classes: ``K``; num_global: ``G`` (left out of the mean).
    Forward: ``feats`` (last one read) -> logits ``[B, K]`` (``grid`` and ``out_size`` are ignored).
    """

    def __init__(self, dim: int, num_classes: int, num_global: int = 1):
        super().__init__()
        self.num_global = num_global
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=2e-5)  # MAE fine-tuning's head init
        nn.init.zeros_(self.fc.bias)

    def forward(self, feats: Sequence[torch.Tensor], grid: tuple[int, int] | None = None,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.fc(self.norm(feats[-1][:, self.num_global:].mean(dim=1)))


#: head kinds by name (``model_config.json["heads"][task]["kind"]``)
HEADS = {"dpt_depth": DPTDepthHead, "convnext_seg": ConvNeXtSegHead, "linear_cls": ClassificationHead}


def build_head(kind: str, **kwargs) -> nn.Module:
    """A head of kind ``kind`` (a key of :data:`HEADS`) built with ``kwargs``.

    Raises:
        ValueError: unknown kind.
    """
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**kwargs)
