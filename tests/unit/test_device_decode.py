"""``rgb_decode="device"``: the loader ships JPEG bytes and crop boxes, and the training device decodes them
(nvJPEG on a GPU). On the CPU both paths must give the same pixels, so the option changes where, not what."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from polymae.datasets import shards
from polymae.datasets.transforms import MultiModalAugment, collate, sample_rng, to_model_inputs

pytestmark = pytest.mark.unit


def _raws(n: int) -> list[dict]:
    import skimage.data

    out = []
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket")[:n]):
        rgb = np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"))
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
        lum = rgb.mean(-1) / 255.0
        out.append(shards.LabelledSample(key=f"k{i}", rgb_jpeg=buf.getvalue(), depth=lum + 0.1,
                                         semseg=(lum * 4).astype(np.int64).clip(0, 3), num_classes=4).encode())
    return out


@pytest.mark.parametrize("scale", [None, (0.2, 1.0)])
def test_device_decoding_equals_loader_decoding(scale):
    raws = _raws(4)
    cpu = MultiModalAugment(img_size=64, scale=scale, jpeg_draft=False)
    dev = MultiModalAugment(img_size=64, scale=scale, jpeg_draft=False, rgb_decode="device")
    a = collate([cpu(r, sample_rng(3, r["__key__"], 0)) for r in raws])
    b = collate([dev(r, sample_rng(3, r["__key__"], 0)) for r in raws])
    assert "rgb" not in b and len(b["rgb_jpeg"]) == 4
    xa, xb = to_model_inputs(a), to_model_inputs(b)
    assert torch.equal(xa["rgb"], xb["rgb"]) and torch.equal(xa["depth"], xb["depth"])
    assert torch.equal(xa["semseg"], xb["semseg"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (nvJPEG)")
def test_nvjpeg_decoding_close_to_cpu_decoding():
    raws = _raws(4)
    dev = MultiModalAugment(img_size=64, scale=(0.2, 1.0), jpeg_draft=False, rgb_decode="device")
    b = collate([dev(r, sample_rng(3, r["__key__"], 0)) for r in raws])
    gpu = to_model_inputs(b, "cuda")["rgb"].cpu()
    cpu = to_model_inputs(b, "cpu")["rgb"]
    assert (gpu - cpu).abs().mean() < 0.05  # IDCT implementations differ by a grey level at most, mostly
