"""timm interop through files, as users load them: (a) a release's ``encoder.safetensors`` (written as ``polymae
publish`` writes it) through ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=...))`` gives
polymae's encoder features; (b) an official MAE checkpoint file, built by ``from_official`` in polymae and by timm's
MAE ViT from the same file (timm's ViT checkpoint filter; for a file with the decoder, the decoder keys dropped
first), gives the same features. Tiny random models, real photograph input."""

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from polymae.models.interop import encoder_to_timm, export_mae_checkpoint
from polymae.models.multimae import create_model
from polymae.pipeline.train.checkpoint import from_official

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

TINY = dict(dim=32, depth=2, num_heads=2, patch_size=8, decoder_dim=32, decoder_depth=1, decoder_heads=2)
#: head counts are not in the weights: from_official assumes 64-d heads outside the ViT presets
TINY_MAE = dict(TINY, dim=64, num_heads=1)


def _photo(size: int) -> torch.Tensor:
    """The astronaut photograph, ImageNet-normalised, ``[1, 3, size, size]``."""
    import skimage.data
    from PIL import Image

    img = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((size, size), Image.BILINEAR))
    x = torch.tensor(img, dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _perturb(model):
    with torch.no_grad():  # non-trivial tokens, norms and biases
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kwargs", [dict(in_modalities=("rgb", "depth"), semseg_num_classes=4),
                                    dict(in_modalities=("rgb",), num_global_tokens=2)])
def test_release_encoder_file_loads_in_timm_create_model(tmp_path, kwargs):
    torch.manual_seed(0)
    model = _perturb(create_model("multimae_tiny", img_size=32, **TINY, **kwargs))
    sd, kw = encoder_to_timm(model)
    path = tmp_path / "encoder.safetensors"  # as pipeline/publish.py writes it
    save_file({k: v.contiguous().to(torch.float32) for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    kw = dict(kw)
    name = kw.pop("model_name")
    vit = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    x = _photo(32)
    with torch.no_grad():
        ours, theirs = model.forward_encoder({"rgb": x}), vit.forward_features(x)
    assert theirs.shape == ours.shape == (1, model.num_global_tokens + 16, 32)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.equal(vit.patch_embed.proj.weight, model.input_adapters["rgb"].proj.weight)


@pytest.mark.parametrize("with_decoder", [False, True])
def test_official_mae_file_gives_timm_mae_features(tmp_path, with_decoder):
    torch.manual_seed(0)
    ref = _perturb(create_model("mae_tiny", img_size=32, **TINY_MAE))
    sd = export_mae_checkpoint(ref)  # the facebookresearch/mae key layout
    if not with_decoder:  # the layout of the released mae_pretrain_vit_*.pth files (encoder only)
        sd = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save({"model": sd}, path)
    model, mc = from_official(str(path))
    assert (mc["init_kwargs"]["arch"], mc["init_kwargs"]["num_heads"]) == ("mae", 1)
    timm_kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=1, num_classes=0, global_pool="")
    if with_decoder:  # timm's filter reads a mask_token as DINOv2's: drop the decoder, then timm's own ViT filter
        from timm.models.vision_transformer import checkpoint_filter_fn

        vit = timm.create_model("vit_base_patch16_224.mae", pretrained=False, **timm_kw).eval()
        enc = {k: v for k, v in sd.items() if not k.startswith(("decoder", "mask_token"))}
        vit.load_state_dict(checkpoint_filter_fn({"model": enc}, vit), strict=True)
    else:
        vit = timm.create_model("vit_base_patch16_224.mae", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(path)), **timm_kw).eval()
    x = _photo(32)
    with torch.no_grad():
        ours, theirs = model.forward_encoder({"rgb": x}), vit.forward_features(x)
    assert theirs.shape == ours.shape == (1, 1 + 16, 64)
    assert torch.allclose(ours, theirs, atol=1e-5)
