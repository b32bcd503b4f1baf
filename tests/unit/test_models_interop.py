"""Interop: timm ViT export equality, MultiMAE / MAE reference key layouts (round trip), and the sin-cos
positional embeddings against independent re-derivations of the two reference formulas."""

import math

import numpy as np
import pytest
import timm
import torch

from polymae.models.interop import (encoder_to_timm, export_mae_checkpoint, export_multimae_checkpoint,
                                    import_mae_checkpoint, import_multimae_checkpoint)
from polymae.models.multimae import MAE, MultiMAE
from polymae.models.pos_embed import build_2d_sincos_pos_embed

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


SMALL = dict(patch_size=8, dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=2, decoder_heads=2)
BLOCK_KEYS = [f"{n}.{p}" for n in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
              for p in ("weight", "bias")]


@pytest.mark.parametrize("cfg", [
    dict(cls=MultiMAE, img_size=32, in_modalities=("rgb", "depth"), num_global_tokens=1),
    dict(cls=MultiMAE, img_size=(32, 48), in_modalities=("rgb",), num_global_tokens=2, modality_embed=True),
    dict(cls=MAE, img_size=32),
])
def test_timm_forward_features_equals_encoder(cfg):
    cfg = dict(cfg)
    cls = cfg.pop("cls")
    torch.manual_seed(0)
    model = cls(**SMALL, **cfg).eval()
    with torch.no_grad():  # make the tokens/embeddings non-trivial
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd, kw = encoder_to_timm(model)
    assert kw["final_norm"] == (cls is MAE) and kw["num_classes"] == 0
    vit = timm.create_model(**kw).eval()
    vit.load_state_dict(sd, strict=True)
    if cls is MultiMAE:
        assert isinstance(vit.norm, torch.nn.Identity)
    h, w = model.img_size
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        ours = model.forward_encoder({"rgb": x})
        theirs = vit.forward_features(x)
    assert ours.shape == theirs.shape == (2, cfg.get("num_global_tokens", 1) + (h // 8) * (w // 8), 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.count_nonzero(sd["pos_embed"][:, :model.num_global_tokens]) == 0


def _multimae_reference_keys(in_mods, out_mods, depth, dec_depth):
    """Key names of EPFL-VILAB/MultiMAE's MultiMAE (input/output adapters, encoder Sequential)."""
    keys = ["global_tokens"]
    for m in in_mods:
        keys += [f"input_adapters.{m}.pos_emb", f"input_adapters.{m}.proj.weight", f"input_adapters.{m}.proj.bias"]
        if m == "semseg":
            keys.append("input_adapters.semseg.class_emb.weight")
    keys += [f"encoder.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    for o in out_mods:
        p = f"output_adapters.{o}."
        keys += [p + f"task_embeddings.{m}" for m in in_mods] + [p + "mask_token", p + "pos_emb"]
        for lin in ("decoder.q", "decoder.kv", "decoder.proj", "context_norm", "query_norm", "out_norm", "mlp.fc1",
                    "mlp.fc2", "out_proj", "proj_context"):
            keys += [p + lin + ".weight", p + lin + ".bias"]
        keys += [p + f"decoder_transformer.{i}.{k}" for i in range(dec_depth) for k in BLOCK_KEYS]
    return set(keys)


def test_multimae_checkpoint_round_trip():
    torch.manual_seed(0)
    ins, outs = ("rgb", "depth", "semseg"), ("rgb", "depth", "semseg", "norm_rgb")
    model = MultiMAE(img_size=32, in_modalities=ins, out_modalities=outs, semseg_num_classes=6, **SMALL)
    ref = export_multimae_checkpoint(model)
    assert set(ref) == _multimae_reference_keys(ins, outs, 2, 2)
    assert ref["input_adapters.rgb.pos_emb"].shape == (1, 32, 4, 4)
    assert ref["output_adapters.rgb.task_embeddings.depth"].shape == (1, 1, 32)
    assert ref["output_adapters.semseg.out_proj.weight"].shape == (6 * 2 * 2, 32)
    ckpt = {"model": {"module." + k: v for k, v in ref.items()}, "epoch": 3}
    back = import_multimae_checkpoint(ckpt)
    own = model.state_dict()
    assert set(back) == set(own)
    assert all(torch.equal(back[k], own[k]) for k in own)
    fresh = MultiMAE(img_size=32, in_modalities=ins, out_modalities=outs, semseg_num_classes=6, **SMALL)
    fresh.load_state_dict(back, strict=True)
    with pytest.raises(ValueError):
        import_multimae_checkpoint(dict(ref, **{"head.weight": torch.zeros(1)}))
    assert "head.weight" not in import_multimae_checkpoint(dict(ref, **{"head.weight": torch.zeros(1)}), strict=False)


def test_extra_norm_pix_adapter_uses_the_official_norm_rgb_prefix():
    """The official recipe's ``extra_norm_pix_loss`` head is ``output_adapters.norm_rgb.*``, with the same
    structure as ``output_adapters.rgb.*``; a checkpoint with it loads into ``extra_norm_pix_loss=True``."""
    torch.manual_seed(0)
    ins = ("rgb", "depth", "semseg")
    model = MultiMAE(img_size=32, in_modalities=ins, semseg_num_classes=6, extra_norm_pix_loss=True, **SMALL)
    ref = export_multimae_checkpoint(model)
    assert set(ref) == _multimae_reference_keys(ins, ins + ("norm_rgb",), 2, 2)
    rgb = {k[len("output_adapters.rgb."):]: v.shape for k, v in ref.items() if k.startswith("output_adapters.rgb.")}
    norm = {k[len("output_adapters.norm_rgb."):]: v.shape for k, v in ref.items()
            if k.startswith("output_adapters.norm_rgb.")}
    assert rgb == norm
    fresh = MultiMAE(img_size=32, in_modalities=ins, semseg_num_classes=6, extra_norm_pix_loss=True, **SMALL)
    fresh.load_state_dict(import_multimae_checkpoint({"model": ref}), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    # a model without the head loads such a checkpoint once the norm_rgb keys are dropped
    plain = MultiMAE(img_size=32, in_modalities=ins, semseg_num_classes=6, **SMALL)
    plain.load_state_dict({k: v for k, v in import_multimae_checkpoint(ref).items()
                           if not k.startswith("output_adapters.norm_rgb.")}, strict=True)


def _mae_reference_keys(depth, dec_depth):
    """Key names of facebookresearch/mae's MaskedAutoencoderViT."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
            "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias", "decoder_norm.weight",
            "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in BLOCK_KEYS]
    keys += [f"decoder_blocks.{i}.{k}" for i in range(dec_depth) for k in BLOCK_KEYS]
    return set(keys)


def test_mae_checkpoint_round_trip():
    torch.manual_seed(0)
    model = MAE(img_size=32, **SMALL)
    ref = export_mae_checkpoint(model)
    assert set(ref) == _mae_reference_keys(2, 2)
    assert ref["pos_embed"].shape == (1, 17, 32) and ref["decoder_pos_embed"].shape == (1, 17, 32)
    assert torch.count_nonzero(ref["pos_embed"][:, 0]) == 0
    assert ref["decoder_pred.weight"].shape == (8 * 8 * 3, 32)
    back = import_mae_checkpoint({"model": ref})
    own = model.state_dict()
    assert set(back) == set(own)
    assert all(torch.equal(back[k], own[k]) for k in own)
    # encoder-only MAE checkpoints (no decoder) import too, for strict=False loading
    enc_only = {k: v for k, v in ref.items() if not k.startswith(("decoder", "mask_token"))}
    part = import_mae_checkpoint(enc_only)
    missing, unexpected = MAE(img_size=32, **SMALL).load_state_dict(part, strict=False)
    assert not unexpected and all(k.startswith("output_adapters.rgb.") for k in missing)
    with pytest.raises(ValueError):
        import_mae_checkpoint(dict(ref, **{"head.weight": torch.zeros(1)}))


def test_mae_reference_sincos_and_patch_layout():
    """MAE encoder pos_embed matches MAE's get_2d_sincos_pos_embed (numpy re-derivation)."""
    dim, n = 32, 4
    ys, xs = np.meshgrid(np.arange(n, dtype=np.float64), np.arange(n, dtype=np.float64), indexing="ij")
    freqs = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))

    def enc(pos):
        a = np.outer(pos.reshape(-1), freqs)
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    expect = np.concatenate([enc(xs), enc(ys)], axis=1)  # MAE: first half encodes the column ("grid_w")
    expect = np.concatenate([np.zeros((1, dim)), expect], axis=0)[None]
    torch.manual_seed(0)
    ref = export_mae_checkpoint(MAE(img_size=32, **SMALL))
    assert np.allclose(ref["pos_embed"].numpy(), expect, atol=1e-6)
    assert np.allclose(ref["decoder_pos_embed"].numpy(), expect, atol=1e-6)


def test_multimae_reference_sincos():
    """MultiMAE's build_2d_sincos_posemb (MoCo-v3 style, meshgrid 'ij' then '(h w) -> h w') on square grids."""
    dim, n = 64, 5
    gw, gh = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(n, dtype=torch.float64),
                            indexing="ij")
    om = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    ow = gw.reshape(-1)[:, None] * om[None]
    oh = gh.reshape(-1)[:, None] * om[None]
    flat = torch.cat([ow.sin(), ow.cos(), oh.sin(), oh.cos()], dim=1)  # [(h w), D]
    expect = flat.reshape(n, n, dim).permute(2, 0, 1)[None].float()
    got = build_2d_sincos_pos_embed(n, n, dim, "row_first")
    assert torch.allclose(got, expect, atol=1e-6)
    # both orders are the same embedding with the two halves swapped
    other = build_2d_sincos_pos_embed(n, n, dim, "col_first")
    assert torch.allclose(torch.cat([other[:, dim // 2:], other[:, :dim // 2]], 1), got)
    # non-square grids: explicit row/column coordinates
    g = build_2d_sincos_pos_embed(2, 3, 8, "row_first")
    assert math.isclose(g[0, 0, 1, 2].item(), math.sin(1.0), abs_tol=1e-6)  # row 1, first freq
    assert math.isclose(g[0, 4, 1, 2].item(), math.sin(2.0), abs_tol=1e-6)  # col 2, first freq
    with pytest.raises(ValueError):
        build_2d_sincos_pos_embed(2, 2, 30)
