"""The training stream: one crop/flip shared by all modalities, determinism, balanced readers, O(1) exact resume
with 0-3 loader workers, corrupt samples that keep their position."""

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from polymae.datasets import shards
from polymae.datasets import loader as L
from polymae.datasets.loader import ShardStream, make_loader
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
    with pytest.raises(RuntimeError, match=r"no sample of a micro-batch decodes: \['img00', 'img01'\]"):
        next(iter(ShardStream(urls, 2, MultiModalAugment(img_size=32), shuffle_buffer=0)))
    with pytest.raises(RuntimeError, match="no sample of its 2 batches decodes"):
        list(ShardStream(urls, 2, MultiModalAugment(img_size=32), shuffle_buffer=0, infinite=False))



class CountingAugment(MultiModalAugment):
    """The real transform, counting its calls (samples decoded) in this process."""

    calls = 0

    def __call__(self, raw, rng):
        CountingAugment.calls += 1
        return super().__call__(raw, rng)


def _batches(stream, n, workers=None):
    """The first ``n`` batches of ``stream`` (through ``make_loader`` with ``workers`` workers, else in-process)."""
    it = iter(make_loader(stream, workers) if workers is not None else stream)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_resume_at_any_batch_with_any_worker_count_is_exact(tmp_path, workers):
    """Rank 1 of 2, 0-3 DataLoader workers, chunks (3) that straddle micro-batches (2), several epochs: resuming
    at batch k gives the uninterrupted stream's keys and tensors from batch k on."""
    urls = _write_shards(str(tmp_path), [f"img{i:02d}" for i in range(30)], per_shard=4)
    aug = MultiModalAugment(img_size=32)
    kw = dict(rank=1, world=2, seed=3, shuffle_buffer=3, num_workers=workers)
    total = 14
    full = _batches(ShardStream(urls, 2, aug, **kw), total, workers)
    for k in (1, 5, 9) if workers in (0, 3) else (5,):
        resumed = _batches(ShardStream(urls, 2, aug, skip_batches=k, **kw), total - k, workers)
        assert [b["key"] for b in resumed] == [b["key"] for b in full[k:]], k
        for a, b in zip(resumed, full[k:]):
            assert torch.equal(a["rgb"], b["rgb"]) and torch.equal(a["depth"], b["depth"])
    per_reader = 30 // (2 * max(1, workers))
    assert len({k for b in full for k in b["key"]}) >= min(15, per_reader * max(1, workers))  # not one sample repeated


def test_reader_ranges_partition_every_epoch():
    """Pure arithmetic: readers' ranges tile [0, N) and their lengths differ by at most one."""
    for n in range(0, 40):
        for readers in range(1, 8):
            ranges = [L.reader_range(n, r, readers) for r in range(readers)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            lens = [hi - lo for lo, hi in ranges]
            assert max(lens) - min(lens) <= 1


def test_one_epoch_visits_every_sample_exactly_once(tmp_path):
    """23 samples in shards of 5,5,5,5,3 over 4 readers (micro-batch 2): ranges of 5,6,6,6 samples; a training
    epoch yields each reader's floor(len/2) batches, disjoint, and only the remainder (one sample) is dropped; a
    single pass without drop_last visits all 23 exactly once; the next epoch is another order."""
    names = [f"img{i:02d}" for i in range(23)]
    urls = _write_shards(str(tmp_path), names, per_shard=5)
    aug = MultiModalAugment(img_size=32)
    seen, lens = [], []
    for r in range(4):
        s = ShardStream(urls, 2, aug, rank=r, world=4, seed=7, shuffle_buffer=4)
        lens.append(sum(b - a for _, a, b in s.plan(0, r, 4)))
        per_epoch = s.batches_per_epoch(r, 4)
        assert per_epoch == lens[-1] // 2
        batches = _batches(s, 2 * per_epoch)
        seen += [k for b in batches[:per_epoch] for k in b["key"]]
        assert sorted(k for b in batches[per_epoch:] for k in b["key"]) != sorted(
            k for b in batches[:per_epoch] for k in b["key"]) or lens[-1] % 2 == 0
    assert sorted(lens) == [5, 6, 6, 6]
    assert len(seen) == len(set(seen)) == 22 and set(seen) <= set(names)
    single = []
    for r in range(4):
        s = ShardStream(urls, 2, aug, rank=r, world=4, seed=7, shuffle_buffer=4, infinite=False, drop_last=False)
        single += [k for b in s for k in b["key"]]
    assert sorted(single) == names


@pytest.mark.parametrize("sizes", [(4, 4), (3, 5)])
def test_fewer_shards_than_readers_each_reader_opens_only_its_shards(tmp_path, sizes):
    """2 shards, 4 readers: a reader opens exactly the shards that hold the samples it yields (one shard, or two
    where its range crosses the boundary), not every shard."""
    names = [f"img{i:02d}" for i in range(sum(sizes))]
    urls = []
    for i, (lo, n) in enumerate(zip((0, sizes[0]), sizes)):
        urls += _write_shards(str(tmp_path / str(i)), names[lo:lo + n], per_shard=n)
    home = {k: urls[0] if i < sizes[0] else urls[1] for i, k in enumerate(names)}
    aug = MultiModalAugment(img_size=32)
    opened_any = 0
    for r in range(4):
        s = ShardStream(urls, 1, aug, rank=r, world=4, seed=5, shuffle_buffer=8)
        keys = [k for b in _batches(s, s.batches_per_epoch(r, 4)) for k in b["key"]]
        assert list(s.opened) == list(dict.fromkeys(home[k] for k in keys))  # once each, only those it needs
        assert list(s.opened) == [u for u, _, _ in s.plan(0, r, 4)]
        opened_any += len(s.opened)
    assert opened_any == (4 if sizes == (4, 4) else 5)


def test_a_corrupt_sample_keeps_its_position(tmp_path):
    """Same names, one corrupt: every position holds the clean run's key, except the corrupt sample's, which
    holds a copy of a good sample of the same batch (counted); the tensors of the other positions are equal."""
    names = [f"img{i:02d}" for i in range(12)]
    clean = _write_shards(str(tmp_path / "clean"), names, per_shard=4)
    bad = _write_shards(str(tmp_path / "bad"), names, per_shard=4, corrupt={"img05"})
    aug = MultiModalAugment(img_size=32)
    ref = _batches(ShardStream(clean, 3, aug, seed=2, shuffle_buffer=5), 8)  # two epochs
    s = ShardStream(bad, 3, aug, seed=2, shuffle_buffer=5)
    got = _batches(s, 8)
    replaced = 0
    for a, b in zip(ref, got):
        for i, (ka, kb) in enumerate(zip(a["key"], b["key"])):
            if ka == "img05":
                assert kb != "img05" and kb in a["key"]
                j = b["key"].index(kb)
                assert torch.equal(b["rgb"][i], b["rgb"][j])
                replaced += 1
            else:
                assert ka == kb and torch.equal(a["rgb"][i], b["rgb"][i])
    assert replaced == 2 and s.skipped_corrupt == 2


def test_skipping_to_batch_10000_reads_only_the_batch_it_yields(tmp_path):
    """1500 real 8-sample shards (hard links of one) = 12,000 samples: resuming at batch 10,000 (position 16 of
    its 24-sample chunk) opens only that chunk's shards, decodes only the batch's sample and reads the payload of
    the chunk's 8 remaining samples only; it matches the stream resumed one batch earlier."""
    src = _write_shards(str(tmp_path / "one"), [f"img{i:02d}" for i in range(8)], per_shard=8)[0]
    urls = []
    for i in range(1500):
        u = shards.shard_url(str(tmp_path), "train", i)
        os.makedirs(os.path.dirname(u), exist_ok=True)
        os.link(src, u)
        urls.append((u, 8))
    sample_bytes = max(sum(len(v) for v in raw.values() if isinstance(v, bytes))
                       for raw in shards.iter_raw_samples([src]))
    aug = CountingAugment(img_size=32)
    CountingAugment.calls = 0
    s = ShardStream(urls, 1, aug, seed=1, shuffle_buffer=24, skip_batches=10_000)
    first = next(iter(s))
    assert CountingAugment.calls == 1 and 0 < s.payload_bytes <= 8 * sample_bytes
    chunk_shards = [u for u, a, b in s.plan(0, 0, 1)[1248:1251]]  # the chunk: positions 9984-10007
    assert len(s.opened) <= 3 and set(s.opened) <= set(chunk_shards)
    before = ShardStream(urls, 1, aug, seed=1, shuffle_buffer=24, skip_batches=9_999)
    assert _batches(before, 2)[1]["key"] == first["key"]


def test_shuffle_chunk_is_bounded_in_bytes(tmp_path):
    """``shuffle_buffer_mb`` bounds the chunk at the manifest's mean sample size; at least one sample."""
    assert L.chunk_samples(256, 1.0, 2**20 / 4) == 4
    assert L.chunk_samples(256, 1.0, 2**30) == 1
    assert L.chunk_samples(3, 1.0, 1.0) == 3 and L.chunk_samples(0, 1.0, 1.0) == 0
    urls = _write_shards(str(tmp_path), [f"img{i:02d}" for i in range(6)], per_shard=3)
    mean = shards.mean_sample_bytes(shards.shard_sample_counts(urls))
    s = ShardStream(urls, 1, MultiModalAugment(img_size=32), shuffle_buffer=100, shuffle_buffer_mb=2.5 * mean / 2**20)
    assert s.chunk == 2 and s.total == 6


def test_a_truncated_shard_keeps_every_position(tmp_path):
    """A shard cut short: the stream still yields every batch, the lost samples replaced inside their batches."""
    names = [f"img{i:02d}" for i in range(8)]
    urls = _write_shards(str(tmp_path), names, per_shard=4)
    data = open(urls[1], "rb").read()
    with open(urls[1], "wb") as fh:
        fh.write(data[:len(data) // 3])
    s = ShardStream([(u, 4) for u in urls], 4, MultiModalAugment(img_size=32), shuffle_buffer=0)
    batches = _batches(s, 2)
    assert batches[0]["key"] == names[:4] and batches[1]["key"][0] == "img04"
    assert len(batches[1]["key"]) == 4 and s.skipped_corrupt >= 1


def _global_keys(urls, aug, readers, world, workers, start, count, mb=2):
    """Keys of global micro-batches ``[start, start + count)`` as ``world`` ranks with ``workers`` loader workers
    each see them (rank ``r``'s ``b``-th batch is global micro-batch ``b * world + r``)."""
    out = {}
    for r in range(world):
        s = ShardStream(urls, mb, aug, rank=r, world=world, seed=4, shuffle_buffer=3, num_workers=workers,
                        readers=readers, skip_batches=start // world)
        for b, batch in enumerate(_batches(s, count // world, workers if workers else None)):
            out[L.global_batch_of(start // world + b, r, world)] = batch["key"]
    return [out[g] for g in range(start, start + count)]


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (4, 0), (3, 0), (2, 3)])
def test_global_batches_do_not_depend_on_world_size_or_workers(tmp_path, world, workers):
    """A run started on 2 ranks x 2 workers (4 canonical readers, 31 samples, chunks of 3 that straddle
    micro-batches of 2, several epochs) and resumed at global micro-batch 12 on another world size / worker count
    sees exactly the global micro-batches the original layout would have: none repeated, none skipped."""
    urls = _write_shards(str(tmp_path), [f"img{i:02d}" for i in range(31)], per_shard=4)
    aug = MultiModalAugment(img_size=16)
    reference = _global_keys(urls, aug, readers=4, world=2, workers=2, start=0, count=36)
    start, count = 12, 24 if world != 3 else 24
    assert _global_keys(urls, aug, 4, world, workers, start, count) == reference[start:start + count]
    epoch = [k for ks in reference[:12] for k in ks]  # 3 batches of each of the 4 readers (7-8 samples each)
    assert len(epoch) == len(set(epoch)) == 24
