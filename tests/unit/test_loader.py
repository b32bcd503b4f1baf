"""The training stream: one crop/flip shared by all modalities, determinism, resume skipping, corrupt samples."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polymae.datasets import shards
from polymae.datasets.loader import ShardStream
from polymae.datasets.transforms import (IMAGENET_MEAN, IMAGENET_STD, MultiModalAugment, collate, sample_rng,
                                         to_model_inputs)

pytestmark = pytest.mark.unit


def _photo(name: str, size: int = 96) -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB").resize((size, size)))


def _raw(key: str, rgb: np.ndarray, depth: np.ndarray, semseg: np.ndarray, num_classes: int,
         quality: int = 95) -> dict:
    """A raw shard sample (member -> bytes) as the label job writes it; the JPEG at ``quality`` without
    chroma subsampling."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0)
    return shards.LabelledSample(key=key, rgb_jpeg=buf.getvalue(), depth=depth, semseg=semseg,
                                 num_classes=num_classes).encode()


def test_crop_and_flip_are_shared_by_all_modalities():
    """R encodes the column, G the row (B keeps a real photo); depth = column, semseg = row // 8. After a
    shared crop + flip + resize the three must still agree pixel for pixel."""
    H = W = 128
    rgb = _photo("astronaut", 128).copy()
    cols, rows = np.meshgrid(np.arange(W), np.arange(H))
    rgb[..., 0] = (cols * 2).astype(np.uint8)
    rgb[..., 1] = (rows * 2).astype(np.uint8)
    raw = _raw("x", rgb, cols.astype(np.float32) * 2, (rows // 8).astype(np.int64), 16, quality=100)
    aug = MultiModalAugment(img_size=64, scale=(0.3, 0.6), hflip=0.5)
    flipped = 0
    for seed in range(8):
        out = aug(raw, sample_rng(seed, "x", 0))
        x = to_model_inputs(collate([out]))
        red = (x["rgb"][0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]) * 255
        green = (x["rgb"][0, 1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]) * 255
        assert (x["depth"][0, 0] - red).abs().mean() < 1.5  # same columns, same flip
        row_of_semseg = x["semseg"][0].repeat_interleave(4, 0).repeat_interleave(4, 1).float() * 16 + 8
        assert (row_of_semseg - green).abs().mean() < 12  # same rows (bins of 16 grey levels)
        assert out["rgb"].dtype == torch.uint8 and out["depth"].dtype == torch.uint16
        assert x["semseg"].shape == (1, 16, 16) and x["depth"].shape == (1, 1, 64, 64)
        flipped += int(red[:, 0].mean() > red[:, -1].mean())
        again = aug(raw, sample_rng(seed, "x", 0))
        assert torch.equal(again["rgb"], out["rgb"])  # a pure function of (seed, key, epoch)
    assert 0 < flipped < 8  # both flipped and unflipped crops occur


def _crossing(v: torch.Tensor, mid: float) -> float:
    """Position (output pixel units, pixel edges at integers) where the 1-D profile ``v`` crosses ``mid``."""
    j = int(((v[:-1] - mid) * (v[1:] - mid) <= 0).nonzero()[0])
    return j + 0.5 + float((mid - v[j]) / (v[j + 1] - v[j]))


@pytest.mark.parametrize("draft", [False, True])
def test_label_edges_stay_aligned_to_the_pixel(draft):
    """A vertical edge at column 83 of a 200x150 image (grey 50|200, depth 1|3, class 0|1), crop + flip at
    several scales: RGB and depth put the edge where the geometry says within half an output pixel, and each
    semseg pixel takes the label under its centre (``nearest-exact``), in both flip directions."""
    H, W, e, S = 150, 200, 83, 64
    cols = np.broadcast_to(np.arange(W), (H, W))
    rgb = np.repeat(np.where(cols >= e, 200, 50).astype(np.uint8)[..., None], 3, axis=2)
    raw = _raw("edge", rgb, np.where(cols >= e, 3.0, 1.0).astype(np.float32), (cols >= e).astype(np.int64), 2, 100)
    seen = {True: 0, False: 0}
    for scale in ((0.2, 0.3), (0.5, 0.6), (0.9, 1.0)):
        aug = MultiModalAugment(img_size=S, scale=scale, hflip=0.5, jpeg_draft=draft)
        for seed in range(12):
            (top, left, h, w), flip = aug.box(H, W, sample_rng(seed, "edge", 0))
            xe = (e - left) * S / w
            if not 3 < xe < S - 3:
                continue
            out = aug(raw, sample_rng(seed, "edge", 0))
            x = to_model_inputs(collate([out]))
            want = S - xe if flip else xe
            rgb_edge = _crossing(out["rgb"][0, S // 2].float(), 125.0)
            depth_edge = _crossing(x["depth"][0, 0, S // 2], 2.0)
            assert abs(rgb_edge - want) < 0.5 and abs(depth_edge - want) < 0.5, (scale, seed, flip, want)
            s4 = S // 4
            centre_src = np.floor(left + (np.arange(s4) + 0.5) * w / s4)
            labels = torch.from_numpy((centre_src >= e).astype(np.uint8))
            expect = labels.flip(0) if flip else labels
            assert torch.equal(x["semseg"][0, s4 // 2].to(torch.uint8), expect), (scale, seed, flip)
            seen[flip] += 1
    assert seen[True] >= 3 and seen[False] >= 3


def test_jpeg_draft_decoding_close_to_full_decoding():
    """Draft mode (DCT down-scaling) on a large crop changes the RGB by a few grey levels at most on average."""
    rgb = _photo("astronaut", 512)
    raw = _raw("big", rgb, rgb[..., 0] / 255.0 + 0.1, (rgb[..., 1] // 64).astype(np.int64), 4)
    full = MultiModalAugment(img_size=64, scale=None, jpeg_draft=False)(raw, sample_rng(0, "big", 0))["rgb"]
    fast = MultiModalAugment(img_size=64, scale=None, jpeg_draft=True)(raw, sample_rng(0, "big", 0))["rgb"]
    diff = (full.float() - fast.float()).abs()
    assert diff.mean() < 3.0 and not torch.equal(full, fast)  # draft mode really was used (512 >= 2*2*64)


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


PREEMPT_SNIPPET = """
import os, signal, sys
from polymae.datasets.loader import ShardStream, make_loader
from polymae.datasets.transforms import MultiModalAugment
urls = sys.argv[1:]
got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))  # the trainer's handler: note it, go on
loader = make_loader(ShardStream(urls, 2, MultiModalAugment(img_size=32), num_workers=2, shuffle_buffer=4), 2)
it = iter(loader)
keys = [next(it)["key"] for _ in range(2)]
os.killpg(os.getpgid(0), signal.SIGTERM)  # as Slurm: every process of the step, the loader workers too
keys += [next(it)["key"] for _ in range(6)]
print(len(keys), got == [signal.SIGTERM])
"""


def test_loader_workers_survive_sigterm_to_the_whole_process_group(tmp_path):
    import subprocess
    import sys

    urls = _write_shards(str(tmp_path), [f"img{i:02d}" for i in range(12)], per_shard=3)
    r = subprocess.run([sys.executable, "-c", PREEMPT_SNIPPET, *urls], capture_output=True, text=True, timeout=120,
                       start_new_session=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["8", "True"]


def test_a_stream_whose_every_sample_fails_raises_instead_of_spinning(tmp_path):
    names = [f"img{i:02d}" for i in range(4)]
    urls = _write_shards(str(tmp_path), names, per_shard=4, corrupt=set(names))
    with pytest.raises(RuntimeError, match="all 4 samples of epoch 0 failed"):
        next(iter(ShardStream(urls, 2, MultiModalAugment(img_size=32), shuffle_buffer=0)))
