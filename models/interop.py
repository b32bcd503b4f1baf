"""Weight interoperability: timm ``VisionTransformer`` export and the published MultiMAE / MAE key layouts.

* :func:`encoder_to_timm` -- the encoder as a timm ViT state dict + the ``timm.create_model`` kwargs
  (the RGB input adapter becomes ``patch_embed``, the global token(s) ``cls_token`` (+ ``reg_token``),
  the fixed sin-cos grid ``pos_embed`` with zero rows for the prefix tokens, ``encoder.i`` ->
  ``blocks.i``; MultiMAE has no final norm, so timm's ``norm`` is disabled with ``final_norm=False``).
* :func:`import_multimae_checkpoint` / :func:`export_multimae_checkpoint` -- EPFL-VILAB/MultiMAE layout
  (``input_adapters.rgb.proj.weight``, ``encoder.0.attn.qkv.weight``, ``global_tokens``,
  ``output_adapters.rgb.*``). polymae names its modules like the reference, so the mapping is the
  identity on names; it unwraps ``{"model": ...}`` / ``module.`` prefixes and checks that every key
  belongs to the layout.
* :func:`from_official` -- a model built and loaded from an official MultiMAE or MAE state dict alone: its
  architecture is read off the tensors' names and shapes (:func:`infer_official_config`).
* :func:`import_mae_checkpoint` / :func:`export_mae_checkpoint` -- facebookresearch/mae layout
  (``patch_embed.proj``, ``cls_token``, ``pos_embed [1, 1+N, D]``, ``blocks``, ``norm``,
  ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``, ``decoder_norm``,
  ``decoder_pred``) <-> a polymae :class:`~polymae.models.multimae.MAE`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
import torch.nn as nn

from .vit import VIT_PRESETS

__all__ = ["encoder_to_timm", "import_multimae_checkpoint", "export_multimae_checkpoint",
           "import_mae_checkpoint", "export_mae_checkpoint", "infer_official_config", "from_official"]

_TIMM_SIZE = {"tiny": "tiny", "small": "small", "base": "base", "large": "large", "huge": "huge", "huge14": "huge"}


def _timm_name(dim: int, depth: int, heads: int, patch: int) -> str:
    for preset, cfg in VIT_PRESETS.items():
        if (cfg["dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"]) == (dim, depth, heads, patch):
            return f"vit_{_TIMM_SIZE[preset]}_patch{patch}_224"
    return "vit_base_patch16_224"  # architecture comes entirely from the explicit kwargs


def encoder_to_timm(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Export the RGB encoder of a MultiMAE/MAE as a timm ViT.

    The returned kwargs contain ``model_name`` and every architecture argument, so
    ``timm.create_model(**kwargs)`` (or ``timm.create_model(kwargs.pop("model_name"), **kwargs)``) builds
    a ``VisionTransformer`` with ``num_classes=0``, ``global_pool="token"``, ``class_token=True``,
    ``reg_tokens=G-1``, ``no_embed_class=False``, ``final_norm`` = whether the model has a final encoder
    norm (MultiMAE: False -> ``norm`` is Identity), ``fc_norm=False``; the state dict then loads with
    ``strict=True`` and ``forward_features(rgb)`` equals ``model.forward_encoder({"rgb": rgb})``.
    ``pos_embed`` is ``[1, G + N, D]``: zeros for the prefix tokens (no positional embedding on the global
    token), then the stored sin-cos grid (plus the learned modality embedding when enabled), row-major.
    Other image sizes: pass ``img_size`` / ``dynamic_img_size=True`` to timm (it resamples bicubically).

    Args:
        model: a :class:`~polymae.models.multimae.MultiMAE` (or MAE) with ``"rgb"`` among its inputs.

    Returns:
        ``(state_dict, kwargs)``; tensors are detached CPU copies, kwargs are JSON-serialisable.

    Raises:
        ValueError: the model has no RGB input adapter.
    """
    if "rgb" not in model.input_adapters:
        raise ValueError("encoder_to_timm needs a model with an 'rgb' input adapter")
    ik = model.init_kwargs
    rgb = model.input_adapters["rgb"]
    g = model.num_global_tokens
    d = model.dim

    def _cpu(x: torch.Tensor) -> torch.Tensor:
        return x.detach().to("cpu").clone()

    sd: dict[str, torch.Tensor] = {
        "patch_embed.proj.weight": _cpu(rgb.proj.weight),
        "patch_embed.proj.bias": _cpu(rgb.proj.bias),
        "cls_token": _cpu(model.global_tokens[:, :1]),
    }
    if g > 1:
        sd["reg_token"] = _cpu(model.global_tokens[:, 1:])
    grid_tokens = rgb.pos_emb.detach().flatten(2).transpose(1, 2)  # [1, N, D]
    if rgb.modality_emb is not None:
        grid_tokens = grid_tokens + rgb.modality_emb.detach()
    sd["pos_embed"] = _cpu(torch.cat([grid_tokens.new_zeros(1, g, d), grid_tokens], dim=1))
    for k, v in model.encoder.state_dict().items():
        sd[f"blocks.{k}"] = _cpu(v)
    has_norm = isinstance(model.encoder_norm, nn.LayerNorm)
    if has_norm:
        sd["norm.weight"] = _cpu(model.encoder_norm.weight)
        sd["norm.bias"] = _cpu(model.encoder_norm.bias)
    h, w = model.img_size
    kwargs: dict[str, Any] = dict(
        model_name=_timm_name(d, ik["depth"], ik["num_heads"], model.patch_size),
        img_size=h if h == w else [h, w], patch_size=model.patch_size, in_chans=3, embed_dim=d,
        depth=ik["depth"], num_heads=ik["num_heads"], mlp_ratio=ik["mlp_ratio"], qkv_bias=ik["qkv_bias"],
        num_classes=0, global_pool="token", class_token=True, reg_tokens=g - 1, no_embed_class=False,
        final_norm=has_norm, fc_norm=False)
    return sd, kwargs


def _unwrap(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    sd = state_dict
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    out = {}
    for k, v in sd.items():
        out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


_MULTIMAE_KEY = re.compile(
    r"^(global_tokens"
    r"|input_adapters\.\w+\.(pos_emb|modality_emb|proj\.(weight|bias)|class_emb\.weight)"
    r"|encoder\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
    r"|output_adapters\.\w+\.(task_embeddings\.\w+|mask_token|pos_emb"
    r"|(decoder\.(q|kv|proj)|context_norm|query_norm|out_norm|mlp\.fc1|mlp\.fc2|out_proj|proj_context"
    r"|decoder_transformer\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    r"|decoder_embed|decoder_norm|decoder_pred"
    r"|decoder_blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2))\.(weight|bias))"
    r"|encoder_norm\.(weight|bias))$")


def import_multimae_checkpoint(state_dict: Mapping[str, Any], strict: bool = True) -> dict[str, torch.Tensor]:
    """Map an EPFL-VILAB/MultiMAE state dict (``ckpt["model"]`` or the whole checkpoint) to polymae keys.

    The reference's key names are polymae's (``input_adapters.<m>.proj.weight``,
    ``input_adapters.<m>.pos_emb [1, D, h, w]``, ``input_adapters.semseg.class_emb.weight``,
    ``global_tokens [1, G, D]``, ``encoder.<i>.attn.qkv.weight``, ``output_adapters.<m>.{task_embeddings.<t>,
    mask_token, pos_emb, decoder.{q,kv,proj}, context_norm, query_norm, out_norm, mlp.fc1/fc2,
    decoder_transformer.<i>.*, out_proj, proj_context}``); reference ``pos_emb`` parameters load into
    polymae's ``pos_emb`` buffers. Build the model with the checkpoint's modalities and
    ``semseg_num_classes`` = rows of ``class_emb``. A checkpoint of the official recipe with
    ``extra_norm_pix_loss`` carries a fourth adapter under the official prefix ``output_adapters.norm_rgb.``
    (same structure as ``output_adapters.rgb.``, queries from the rgb tokens); it maps to polymae's
    ``norm_rgb`` adapter, so build that model with ``extra_norm_pix_loss=True`` (equivalently
    ``out_modalities=[..., "norm_rgb"]``), or drop those keys to load the other adapters only.

    Args:
        state_dict: reference state dict, optionally wrapped as ``{"model": sd}`` or ``module.``-prefixed.
        strict: raise on keys outside the layout (else they are dropped).

    Returns:
        polymae state dict (same tensors).

    Raises:
        ValueError: unknown keys when ``strict``.
    """
    sd = _unwrap(state_dict)
    out, unknown = {}, []
    for k, v in sd.items():
        if _MULTIMAE_KEY.match(k):
            out[k] = v
        else:
            unknown.append(k)
    if unknown and strict:
        raise ValueError(f"keys outside the MultiMAE layout: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def export_multimae_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """polymae MultiMAE -> EPFL-VILAB/MultiMAE key layout (identity on names; CPU copies). The
    ``extra_norm_pix_loss`` adapter is written as ``output_adapters.norm_rgb.*``, the official name.

    Raises:
        ValueError: the model is not a MultiMAE-style (``decoder="xattn"``) model.
    """
    if getattr(model, "style", None) != "multimae":
        raise ValueError("export_multimae_checkpoint needs a MultiMAE with cross-attention output adapters")
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    return grid.flatten(2).transpose(1, 2)  # [1, D, h, w] -> [1, h*w, D]


def _tokens_to_grid(tokens: torch.Tensor, grid: tuple[int, int] | None) -> torch.Tensor:
    n, d = tokens.shape[1], tokens.shape[2]
    if grid is None:
        s = math.isqrt(n)
        if s * s != n:
            raise ValueError(f"{n} position embeddings are not a square grid; pass grid=(h, w)")
        grid = (s, s)
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold {n} positions")
    return tokens.transpose(1, 2).reshape(1, d, grid[0], grid[1]).contiguous()


_MAE_BLOCK = re.compile(r"^(decoder_blocks|blocks)\.(\d+)\.(.+)$")


def import_mae_checkpoint(state_dict: Mapping[str, Any], grid: tuple[int, int] | None = None,
                          strict: bool = True) -> dict[str, torch.Tensor]:
    """Map a facebookresearch/mae state dict to a polymae :class:`~polymae.models.multimae.MAE`.

    ``patch_embed.proj`` -> ``input_adapters.rgb.proj``; ``cls_token + pos_embed[:, :1]`` ->
    ``global_tokens``; ``pos_embed[:, 1:]`` -> ``input_adapters.rgb.pos_emb [1, D, h, w]``;
    ``blocks.i`` -> ``encoder.i``; ``norm`` -> ``encoder_norm``; ``decoder_embed``, ``mask_token``,
    ``decoder_blocks.i``, ``decoder_norm``, ``decoder_pred`` -> ``output_adapters.rgb.<same>``;
    ``decoder_pos_embed[:, 1:]`` -> ``output_adapters.rgb.pos_emb``. Encoder-only checkpoints
    (``mae_pretrain_vit_*.pth``) give no decoder keys: load them with ``strict=False``.

    Args:
        state_dict: MAE state dict, optionally wrapped as ``{"model": sd}``.
        grid: patch grid ``(h, w)`` of the position embeddings (default: square).
        strict: raise on keys outside the layout (e.g. a fine-tuning ``head``), else drop them.

    Returns:
        polymae state dict.

    Raises:
        ValueError: unknown keys (strict), non-square grid without ``grid``, or a non-zero class-token
            row in ``decoder_pos_embed`` (not representable; MAE's is zero).
    """
    sd = _unwrap(state_dict)
    out: dict[str, torch.Tensor] = {}
    unknown = []
    plain = {"patch_embed.proj.weight": "input_adapters.rgb.proj.weight",
             "patch_embed.proj.bias": "input_adapters.rgb.proj.bias",
             "norm.weight": "encoder_norm.weight", "norm.bias": "encoder_norm.bias",
             "mask_token": "output_adapters.rgb.mask_token"}
    for name in ("decoder_embed", "decoder_norm", "decoder_pred"):
        for p in ("weight", "bias"):
            plain[f"{name}.{p}"] = f"output_adapters.rgb.{name}.{p}"
    for k, v in sd.items():
        mb = _MAE_BLOCK.match(k)
        if k in plain:
            out[plain[k]] = v
        elif mb:
            prefix = "encoder" if mb.group(1) == "blocks" else "output_adapters.rgb.decoder_blocks"
            out[f"{prefix}.{mb.group(2)}.{mb.group(3)}"] = v
        elif k == "cls_token":
            pos0 = sd["pos_embed"][:, :1] if "pos_embed" in sd else torch.zeros_like(v)
            out["global_tokens"] = v + pos0
        elif k == "pos_embed":
            out["input_adapters.rgb.pos_emb"] = _tokens_to_grid(v[:, 1:], grid)
        elif k == "decoder_pos_embed":
            if bool(v[:, 0].abs().max() > 0):
                raise ValueError("decoder_pos_embed has a non-zero class-token row; cannot import")
            out["output_adapters.rgb.pos_emb"] = _tokens_to_grid(v[:, 1:], grid)
        else:
            unknown.append(k)
    if unknown and strict:
        raise ValueError(f"keys outside the MAE layout: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return out


def export_mae_checkpoint(model: nn.Module) -> dict[str, torch.Tensor]:
    """polymae MAE -> facebookresearch/mae key layout (inverse of :func:`import_mae_checkpoint`).

    Raises:
        ValueError: the model is not an RGB MAE-style model with one global token.
    """
    if getattr(model, "style", None) != "mae" or list(model.output_adapters) != ["rgb"] \
            or model.num_global_tokens != 1:
        raise ValueError("export_mae_checkpoint needs an MAE (decoder='mae', output 'rgb', one class token)")
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu").clone()
        if k == "global_tokens":
            out["cls_token"] = v
        elif k == "input_adapters.rgb.pos_emb":
            tok = _grid_to_tokens(v)
            out["pos_embed"] = torch.cat([tok.new_zeros(1, 1, tok.shape[2]), tok], dim=1)
        elif k == "output_adapters.rgb.pos_emb":
            tok = _grid_to_tokens(v)
            out["decoder_pos_embed"] = torch.cat([tok.new_zeros(1, 1, tok.shape[2]), tok], dim=1)
        elif k.startswith("input_adapters.rgb.proj."):
            out["patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("encoder_norm."):
            out["norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("encoder."):
            out["blocks." + k[len("encoder."):]] = v
        elif k.startswith("output_adapters.rgb."):
            out[k[len("output_adapters.rgb."):]] = v
        else:
            raise ValueError(f"no MAE equivalent for {k!r}")
    return out


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    """How many numbered sub-modules ``{prefix}<i>.`` the state dict holds."""
    idx = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m}
    return max(idx) + 1 if idx else 0


def _heads(dim: int, depth: int, patch: int) -> int:
    """Attention heads of a ``dim``-wide encoder: the ViT preset's (ViT-H: 16 heads of 80), else 64-d heads.
    Head counts are not visible in the weights (``qkv`` is ``[3D, D]`` whatever the split)."""
    for cfg in VIT_PRESETS.values():
        if (cfg["dim"], cfg["depth"]) == (dim, depth):
            return int(cfg["num_heads"])
    return max(1, dim // 64)


def infer_official_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The ``MultiMAEConfig`` fields (``init_kwargs``) of an official checkpoint, read off its tensors.

    MultiMAE layout (``input_adapters``/``output_adapters``): modalities from the adapters, ``dim`` and global
    tokens from ``global_tokens [1, G, D]``, ``patch_size`` and image size from the RGB adapter's ``proj
    [D, 3, p, p]`` and ``pos_emb [1, D, h, w]``, ``depth`` from ``encoder.<i>``, ``mlp_ratio`` from ``fc1``,
    semseg classes from ``class_emb [K, C]``, decoder width/depth from ``proj_context`` and
    ``decoder_transformer.<i>``, the ``extra_norm_pix_loss`` adapter from ``output_adapters.norm_rgb``. MAE
    layout (``patch_embed``, ``blocks``): the same from ``patch_embed.proj``, ``pos_embed [1, 1 + N, D]`` (a
    square grid), ``blocks.<i>``, ``decoder_embed [Dd, D]`` and ``decoder_blocks.<i>``. Head counts are not
    in the weights: the ViT presets' (encoder) and the papers' defaults (decoders: MultiMAE 8, MAE 16).

    Raises:
        ValueError: neither layout is recognised.
    """
    sd = _unwrap(state_dict)
    if "patch_embed.proj.weight" in sd:
        w = sd["patch_embed.proj.weight"]
        dim, patch = int(w.shape[0]), int(w.shape[-1])
        n = int(sd["pos_embed"].shape[1]) - 1 if "pos_embed" in sd else (224 // patch) ** 2
        depth = _count(sd, "blocks.")
        out: dict[str, Any] = {"arch": "mae", "dim": dim, "patch_size": patch, "depth": depth,
                               "num_heads": _heads(dim, depth, patch), "img_size": math.isqrt(n) * patch,
                               "mlp_ratio": sd["blocks.0.mlp.fc1.weight"].shape[0] / dim,
                               "qkv_bias": "blocks.0.attn.qkv.bias" in sd, "encoder_norm": "norm.weight" in sd}
        if "decoder_embed.weight" in sd:
            out.update(decoder_dim=int(sd["decoder_embed.weight"].shape[0]),
                       decoder_depth=_count(sd, "decoder_blocks."), decoder_heads=16)
        return out
    if "global_tokens" not in sd or "input_adapters.rgb.proj.weight" not in sd:
        raise ValueError("not an official MultiMAE (global_tokens, input_adapters) or MAE (patch_embed) state dict")
    g = sd["global_tokens"]
    dim, patch = int(g.shape[-1]), int(sd["input_adapters.rgb.proj.weight"].shape[-1])
    depth = _count(sd, "encoder.")
    ins = sorted({k.split(".")[1] for k in sd if k.startswith("input_adapters.")}, key=["rgb", "depth", "semseg"].index)
    outs = [m for m in ("rgb", "depth", "semseg") if any(k.startswith(f"output_adapters.{m}.") for k in sd)]
    pos = sd.get("input_adapters.rgb.pos_emb")
    out = {"arch": "multimae", "dim": dim, "patch_size": patch, "depth": depth, "num_heads": _heads(dim, depth, patch),
           "num_global_tokens": int(g.shape[1]), "mlp_ratio": sd["encoder.0.mlp.fc1.weight"].shape[0] / dim,
           "qkv_bias": "encoder.0.attn.qkv.bias" in sd, "encoder_norm": "encoder_norm.weight" in sd,
           "in_modalities": tuple(ins), "out_modalities": tuple(outs),
           "modality_embed": any(k.endswith(".modality_emb") for k in sd),
           "extra_norm_pix_loss": any(k.startswith("output_adapters.norm_rgb.") for k in sd)}
    if pos is not None:
        out["img_size"] = (int(pos.shape[2]) * patch, int(pos.shape[3]) * patch)
    if "input_adapters.semseg.class_emb.weight" in sd:
        k, c = sd["input_adapters.semseg.class_emb.weight"].shape
        out.update(semseg_num_classes=int(k), semseg_class_dim=int(c))
    if outs:
        first = outs[0]
        out.update(decoder_dim=int(sd[f"output_adapters.{first}.proj_context.weight"].shape[0]),
                   decoder_depth=_count(sd, f"output_adapters.{first}.decoder_transformer."), decoder_heads=8,
                   decoder_use_task_queries=any(".task_embeddings." in k for k in sd))
    return out


def from_official(state_dict: Mapping[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model an official MultiMAE or MAE state dict describes (:func:`infer_official_config`), load its
    weights through :func:`import_multimae_checkpoint` / :func:`import_mae_checkpoint` (strictly, except that
    an encoder-only MAE checkpoint leaves the decoder at its initialisation), and return ``(model in eval mode,
    init_kwargs)``.

    Raises:
        ValueError: an unrecognised layout, or weights that do not fit the inferred architecture.
    """
    from .multimae import build_from_init_kwargs

    kwargs = infer_official_config(state_dict)
    model = build_from_init_kwargs(kwargs)
    if kwargs["arch"] == "mae":
        sd = import_mae_checkpoint(state_dict, strict=False)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("output_adapters.") for k in missing):
            raise ValueError(f"MAE weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    else:
        model.load_state_dict(import_multimae_checkpoint(state_dict), strict=True)
    return model.eval(), dict(model.init_kwargs)
