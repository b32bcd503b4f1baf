"""Official MultiMAE / MAE checkpoints in: the architecture is inferred from the checkpoint alone and the weights
load strictly (files written here in the official key layouts, as .pth with an ``args`` Namespace and as
safetensors)."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from polymae.models.interop import export_mae_checkpoint, export_multimae_checkpoint, infer_official_config
from polymae.models.multimae import create_model
from polymae.pipeline.train.checkpoint import from_official, load_model, read_state_dict

pytestmark = pytest.mark.unit


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("kwargs", [
    dict(in_modalities=("rgb", "depth", "semseg"), semseg_num_classes=13, decoder_depth=1, img_size=64, patch_size=8),
    dict(in_modalities=("rgb", "depth"), out_modalities=("rgb", "depth"), img_size=(32, 48), decoder_dim=64,
         num_global_tokens=2, extra_norm_pix_loss=True)])
def test_multimae_from_an_official_pth(tmp_path, kwargs):
    torch.manual_seed(0)
    ref = create_model("multimae_tiny", **kwargs).eval()
    path = tmp_path / "multimae-b_98_rgb+-depth-semseg_1600e.pth"
    torch.save({"model": export_multimae_checkpoint(ref), "args": argparse.Namespace(epochs=1600)}, path)
    model, mc = load_model(str(path))
    assert _same(model, ref) and mc["init_kwargs"]["arch"] == "multimae"
    x = {"rgb": torch.randn(1, 3, *ref.config.img_hw)}
    torch.manual_seed(1)
    a = ref(x, num_visible=4)
    torch.manual_seed(1)
    b = model(x, num_visible=4)
    assert torch.equal(a.loss, b.loss)


def test_mae_from_official_safetensors_and_encoder_only(tmp_path):
    torch.manual_seed(0)
    ref = create_model("mae_tiny", img_size=64, patch_size=8, decoder_dim=64, decoder_depth=2).eval()
    sd = export_mae_checkpoint(ref)
    save_file(sd, str(tmp_path / "mae.safetensors"))
    model, mc = from_official(str(tmp_path / "mae.safetensors"))
    assert _same(model, ref)
    assert (mc["init_kwargs"]["decoder_dim"], mc["init_kwargs"]["decoder_depth"]) == (64, 2)
    enc_only = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": enc_only}, tmp_path / "mae_pretrain_vit_tiny.pth")
    model, _ = from_official(str(tmp_path / "mae_pretrain_vit_tiny.pth"))
    enc = {k: v for k, v in ref.state_dict().items() if not k.startswith("output_adapters.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in enc.items())


def test_the_vit_h_head_count_comes_from_the_preset_and_bad_files_are_refused(tmp_path):
    """ViT-H (1280-d, 32 blocks) has 16 heads of 80, not 1280 / 64 = 20: read off shapes only."""
    sd = {"patch_embed.proj.weight": torch.zeros(1280, 3, 14, 14), "pos_embed": torch.zeros(1, 257, 1280),
          "cls_token": torch.zeros(1, 1, 1280), **{f"blocks.{i}.mlp.fc1.weight": torch.zeros(5120, 1280)
                                                  for i in range(32)}}
    cfg = infer_official_config(sd)
    assert (cfg["num_heads"], cfg["depth"], cfg["img_size"], cfg["patch_size"]) == (16, 32, 224, 14)
    with pytest.raises(ValueError, match="not an official"):
        infer_official_config({"weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="ends with"):
        read_state_dict(str(tmp_path / "model.bin"))
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "obj": pytest.approx(1.0)}, evil)  # an arbitrary object is never unpickled
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        read_state_dict(str(evil))
