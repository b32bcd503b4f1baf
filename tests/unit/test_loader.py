"""The training stream: one crop/flip shared by all modalities, determinism, resume skipping, corrupt samples."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polymae.datasets import shards
from polymae.datasets.loader import ShardStream
from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, MultiModalAugment, sample_rng

pytestmark = pytest.mark.unit


def _photo(name: str, size: int = 96) -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").resize((size, size)))


def test_crop_and_flip_are_shared_by_all_modalities():
    """R encodes the column, G the row (B keeps a real photo); depth = column, semseg = row // 8. After a
    shared crop + flip + resize the three must still agree pixel for pixel."""
    H = W = 128
    rgb = _photo("astronaut", 128).copy()
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    rgb[..., 0] = (cols * 2).astype(np.uint8)
    rgb[..., 1] = (rows * 2).astype(np.uint8)
    sample = {"key": "x", "rgb": rgb, "depth": cols.astype(np.float32) * 2, "semseg": (rows // 8).astype(np.int64)}
    aug = MultiModalAugment(img_size=64, scale=(0.3, 0.6), hflip=0.5)
    flipped = 0
    for seed in range(8):
        out = aug(sample, sample_rng(seed, "x", 0))
        red = (out["rgb"][0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        green = (out["rgb"][1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]) * 255
        assert (out["depth"][0] - red).abs().mean() < 1.0  # same columns, same flip
        row_of_semseg = out["semseg"].repeat_interleave(4, 0).repeat_interleave(4, 1).float() * 16 + 8
        assert (row_of_semseg - green).abs().mean() < 12  # same rows (bins of 16 grey levels)
        assert out["semseg"].shape == (16, 16) and out["depth"].shape == (1, 64, 64)
        flipped += int(red[:, 0].mean() > red[:, -1].mean())
        again = aug(sample, sample_rng(seed, "x", 0))
        assert torch.equal(again["rgb"], out["rgb"])  # a pure function of (seed, key, epoch)
    assert 0 < flipped < 8  # both flipped and unflipped crops occur


def _write_shards(root: str, names: list[str], per_shard: int, corrupt: set[str] = frozenset()) -> list[str]:
    urls = []
    for i in range(0, len(names), per_shard):
        url = shards.shard_url(root, "train", i // per_shard)
        os.makedirs(os.path.dirname(url), exist_ok=True)
        with shards.ShardTarWriter(url) as w:
            for n in names[i:i + per_shard]:
                rgb = _photo("astronaut" if len(n) % 2 else "coffee", 64)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG")
                data = b"not a jpeg" if n in corrupt else buf.getvalue()
                w.write(shards.LabelledSample(key=n, rgb_jpeg=data, depth=rgb[..., 0] / 255.0 + 0.1,
                                              semseg=(rgb[..., 1] // 64).astype(np.int64), num_classes=4))
        urls.append(url)
    return urls


def _keys(stream, n_batches):
    it = iter(stream)
    return [k for _ in range(n_batches) for k in next(it)["key"]]


def test_ranks_get_disjoint_data_and_resume_skips_exactly(tmp_path):
    names = [f"img{i:02d}" for i in range(12)]
    urls = _write_shards(str(tmp_path), names, per_shard=3)
    aug = MultiModalAugment(img_size=32)
    r0 = _keys(ShardStream(urls, 2, aug, rank=0, world=2, seed=1, shuffle_buffer=4), 3)
    r1 = _keys(ShardStream(urls, 2, aug, rank=1, world=2, seed=1, shuffle_buffer=4), 3)
    assert not set(r0) & set(r1) and len(set(r0) | set(r1)) == 12  # one epoch: every key exactly once
    full = _keys(ShardStream(urls, 2, aug, rank=0, world=2, seed=1, shuffle_buffer=4), 6)
    resumed = _keys(ShardStream(urls, 2, aug, rank=0, world=2, seed=1, shuffle_buffer=4, skip_batches=2), 4)
    assert resumed == full[4:]
    s1 = next(iter(ShardStream(urls, 2, aug, seed=1, shuffle_buffer=4, skip_batches=1)))
    s2 = list(zip(range(2), ShardStream(urls, 2, aug, seed=1, shuffle_buffer=4)))[1][1]
    assert torch.equal(s1["rgb"], s2["rgb"]) and torch.equal(s1["semseg"], s2["semseg"])


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    names = [f"img{i:02d}" for i in range(6)]
    urls = _write_shards(str(tmp_path), names, per_shard=6, corrupt={"img02"})
    stream = ShardStream(urls, 1, MultiModalAugment(img_size=32, scale=None), shuffle_buffer=0, infinite=False)
    keys = [b["key"][0] for b in stream]
    assert keys == ["img00", "img01", "img03", "img04", "img05"]
    assert stream.skipped_corrupt == 1
