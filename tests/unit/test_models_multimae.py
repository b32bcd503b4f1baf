"""MultiMAE / MAE model: shapes, positional-embedding interpolation, factories, rebuild from init_kwargs,
gradient checkpointing, a short training run, and the models/ layout rules."""

import ast
import json
import pathlib

import pytest
import torch
import torch.nn.functional as F

from polymae.models.multimae import (MAE, MultiMAE, build_from_init_kwargs, create_model, mae_vit_huge_patch14,
                                     multimae_vit_tiny_patch16)
from polymae.models.pos_embed import build_2d_sincos_pos_embed, pos_embed_tokens, resize_pos_embed
from polymae.models.vit import VIT_PRESETS

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


TINY = dict(patch_size=8, dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2,
            semseg_num_classes=5)
MODELS_DIR = pathlib.Path(__file__).resolve().parents[2] / "models"


def _batch(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"rgb": torch.randn(b, 3, h, w, generator=g),
            "depth": torch.rand(b, 1, h, w, generator=g) * 5,
            "semseg": torch.randint(0, 5, (b, h // 4, w // 4), generator=g)}


def test_encoder_sees_num_visible_plus_global_token():
    torch.manual_seed(0)
    model = MultiMAE(img_size=32, **TINY)
    seen = []
    model.encoder.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape)))
    out = model(_batch(4, 32, 32), num_visible=11, generator=torch.Generator().manual_seed(0))
    assert seen == [(4, 12, 32)]
    vis = sum((~m).sum(1) for m in out.masks.values())
    assert bool((vis == 11).all())
    enc = model.forward_encoder(_batch(4, 32, 32), masks=out.masks)
    assert enc.shape == (4, 12, 32)
    assert model.forward_encoder(_batch(2, 32, 32)).shape == (2, 1 + 3 * 16, 32)
    assert model.forward_encoder({"rgb": torch.randn(2, 3, 32, 32)}).shape == (2, 17, 32)


def test_preds_shapes_non_square():
    torch.manual_seed(0)
    model = MultiMAE(img_size=(32, 48), out_modalities=("rgb", "depth", "semseg", "norm_rgb"), **TINY)
    out = model(_batch(2, 32, 48), num_visible=10)
    assert out.preds["rgb"].shape == (2, 3, 32, 48)
    assert out.preds["norm_rgb"].shape == (2, 3, 32, 48)
    assert out.preds["depth"].shape == (2, 1, 32, 48)
    assert out.preds["semseg"].shape == (2, 5, 8, 12)
    assert all(m.shape == (2, 24) for m in out.masks.values())
    assert set(out.losses) == {"rgb", "depth", "semseg", "norm_rgb"} and out.loss.ndim == 0


def test_pos_embed_interpolation_to_other_resolution():
    grid = build_2d_sincos_pos_embed(4, 4, 32)
    assert resize_pos_embed(grid, (4, 4)) is grid
    assert resize_pos_embed(grid, (6, 3), "bilinear").shape == (1, 32, 6, 3)
    torch.manual_seed(0)
    model = MultiMAE(img_size=32, **TINY).eval()
    batch = _batch(2, 48, 64)  # model built for 32x32 (4x4 grid) run at 6x8
    with torch.no_grad():
        out = model(batch, num_visible=30)
        assert out.preds["rgb"].shape == (2, 3, 48, 64) and out.preds["semseg"].shape == (2, 5, 12, 16)
        ad = model.input_adapters["rgb"]
        tok = ad(batch["rgb"]) - ad.proj(batch["rgb"]).flatten(2).transpose(1, 2)
        expect = F.interpolate(ad.pos_emb, size=(6, 8), mode="bicubic", align_corners=False)
        assert torch.allclose(tok[0], expect.flatten(2).transpose(1, 2)[0], atol=1e-5)
        assert torch.allclose(pos_embed_tokens(ad.pos_emb, (4, 4)), ad.pos_emb.flatten(2).transpose(1, 2))


def test_semseg_ignore_pixels_embed_to_zero():
    torch.manual_seed(0)
    ad = MultiMAE(img_size=32, **TINY).input_adapters["semseg"]
    ids = torch.full((1, 8, 8), 255)
    with torch.no_grad():
        tok = ad(ids)
        expect = ad.proj.bias[None, None, :] + ad.pos_emb.flatten(2).transpose(1, 2)
    assert torch.allclose(tok, expect, atol=1e-6)


def test_training_reduces_loss():
    torch.manual_seed(0)
    model = MultiMAE(img_size=32, **TINY)
    batch = _batch(4, 32, 32)
    masks = model(batch, num_visible=16, generator=torch.Generator().manual_seed(0)).masks
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        out = model(batch, masks=masks)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("arch", ["multimae", "mae"])
def test_grad_checkpointing_same_loss_and_grads(arch):
    def run(ckpt):
        torch.manual_seed(0)
        cls = MultiMAE if arch == "multimae" else MAE
        kw = dict(TINY) if arch == "multimae" else {k: v for k, v in TINY.items() if k != "semseg_num_classes"}
        model = cls(img_size=32, drop_path_rate=0.1, **kw)
        model.set_grad_checkpointing(ckpt)
        b = _batch(2, 32, 32) if arch == "multimae" else {"rgb": _batch(2, 32, 32)["rgb"]}
        torch.manual_seed(1)  # same drop-path draws
        out = model(b, num_visible=12, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    l0, g0 = run(False)
    l1, g1 = run(True)
    assert torch.allclose(l0, l1, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def test_init_kwargs_json_rebuild_and_factories():
    torch.manual_seed(0)
    model = multimae_vit_tiny_patch16(img_size=[32, 48], dim=32, depth=1, num_heads=2, semseg_num_classes=7,
                                      loss_weights={"depth": 0.5})
    ik = json.loads(json.dumps(model.init_kwargs))
    assert ik["arch"] == "multimae" and ik["img_size"] == [32, 48] and ik["patch_size"] == 16
    clone = build_from_init_kwargs(ik)
    clone.load_state_dict(model.state_dict(), strict=True)
    batch = _batch(2, 32, 48)
    batch["semseg"] = batch["semseg"] % 7
    with torch.no_grad():
        a = model(batch, num_visible=5, generator=torch.Generator().manual_seed(3)).loss
        b = clone(batch, num_visible=5, generator=torch.Generator().manual_seed(3)).loss
    assert torch.equal(a, b)
    mae = mae_vit_huge_patch14(img_size=28, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1)
    assert isinstance(mae, MAE) and mae.init_kwargs["arch"] == "mae" and mae.init_kwargs["patch_size"] == 14
    assert isinstance(build_from_init_kwargs(json.loads(json.dumps(mae.init_kwargs))), MAE)
    assert isinstance(create_model("mae_base", dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                                   img_size=32), MAE)
    m2 = create_model("multimae_small", dim=32, depth=1, num_heads=2, img_size=32)
    assert type(m2) is MultiMAE and m2.init_kwargs["decoder_dim"] == 256
    assert create_model("tiny", depth=1, img_size=32).init_kwargs["dim"] == 192
    with pytest.raises(ValueError):
        create_model("vit_gigantic")
    with pytest.raises(ValueError):
        build_from_init_kwargs({k: v for k, v in ik.items() if k != "arch"})
    assert VIT_PRESETS["base"] == dict(dim=768, depth=12, num_heads=12, patch_size=16)
    assert VIT_PRESETS["huge14"] == dict(dim=1280, depth=32, num_heads=16, patch_size=14)
    assert (VIT_PRESETS["tiny"]["dim"], VIT_PRESETS["small"]["dim"], VIT_PRESETS["large"]["depth"],
            VIT_PRESETS["huge"]["dim"]) == (192, 384, 24, 1280)


def test_mae_mode_configuration():
    torch.manual_seed(0)
    mae = MAE(img_size=32, patch_size=8, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=2,
              decoder_heads=2)
    ik = mae.init_kwargs
    assert (ik["mask_ratio"], ik["decoder"], ik["encoder_norm"], ik["norm_pix_loss"]) == (0.75, "mae", True, True)
    assert isinstance(mae.encoder_norm, torch.nn.LayerNorm) and mae.global_tokens.shape == (1, 1, 32)
    assert len(mae.output_adapters["rgb"].decoder_blocks) == 2
    d = MAE()  # reference defaults: ViT-B encoder, 512-d x 8 decoder with 16 heads
    assert (d.dim, len(d.encoder), len(d.output_adapters["rgb"].decoder_blocks)) == (768, 12, 8)
    assert d.output_adapters["rgb"].decoder_embed.out_features == 512
    assert d.output_adapters["rgb"].decoder_blocks[0].attn.num_heads == 16
    m = MultiMAE(img_size=32, **TINY)
    assert isinstance(m.encoder_norm, torch.nn.Identity) and m.encoder[0].attn.num_heads == 2


def test_no_weight_decay_and_init():
    torch.manual_seed(0)
    model = MultiMAE(img_size=32, modality_embed=True, **TINY)
    nwd = model.no_weight_decay()
    assert "global_tokens" in nwd and "input_adapters.rgb.pos_emb" in nwd
    assert "output_adapters.depth.mask_token" in nwd and "output_adapters.depth.task_embeddings.semseg" in nwd
    assert "input_adapters.semseg.class_emb.weight" in nwd and "input_adapters.rgb.modality_emb" in nwd
    assert not any(".attn." in n or "proj.weight" in n for n in nwd)
    params = dict(model.named_parameters())
    assert all(n in params or n in dict(model.named_buffers()) for n in nwd)
    assert "input_adapters.rgb.pos_emb" not in params  # fixed sin-cos buffer, not trained
    assert 0.005 < model.global_tokens.std().item() < 0.05
    assert torch.count_nonzero(model.output_adapters["rgb"].mask_token) == 0  # reference: zeros
    qkv = model.encoder[0].attn.qkv.weight
    bound = (6.0 / (qkv.shape[0] // 3 + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.encoder[0].attn.qkv.bias) == 0


def test_input_errors():
    model = MultiMAE(img_size=32, **TINY)
    b = _batch(2, 32, 32)
    with pytest.raises(ValueError):
        model({"rgb": b["rgb"], "depth": torch.rand(2, 1, 40, 40)})
    with pytest.raises(ValueError):
        model({"rgb": torch.randn(2, 3, 36, 36)})
    with pytest.raises(ValueError):
        model({"semseg": b["semseg"].float()})
    with pytest.raises(ValueError):
        model(b, num_visible=49)
    with pytest.raises(ValueError):
        MultiMAE(in_modalities=("rgb", "normals"))


def test_models_layout_rules():
    assert not (MODELS_DIR / "__init__.py").exists()
    allowed = {"torch", "timm", "numpy", "math", "__future__", "dataclasses", "typing", "functools", "re",
               "collections", "itertools", "scipy"}  # scipy: the Hungarian matching of MAD's detection loss
    for path in MODELS_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods = [node.module.split(".")[0]]
            else:
                continue
            assert set(mods) <= allowed, f"{path.name} imports {mods}"
        text = path.read_text()
        assert "torch.distributed" not in text and "open(" not in text, path.name
