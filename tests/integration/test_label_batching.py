"""Output resolution policy and full teacher batches (issue 12, items 4 and 5).

* ``output_short_side``/``output_max_side``: a real photograph upscaled to a large size is stored (rgb and
  every label) at the output size; labels are computed at each teacher's input size and resized to it (depth
  bilinear: smooth, more distinct values than the teacher's map has pixels; semseg: the teacher's class ids);
  the label fingerprint changes with the policy.
* Aspect bucketing: 16 images of 16 ImageNet-like sizes at batch 8 cost each teacher at most 3 forward
  passes (counted by a forward hook on the real tiny teacher model), against more without buckets; the
  shard tar does not depend on the numbers of decode and encode threads.

Real photographs (scikit-image), tiny random-weight teachers, one shard labelled in this process."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymae.datasets import shards as S
from polymae.datasets.sources import SourceEntry, make_key
from polymae.pipeline.label.config import LabelConfig
from polymae.pipeline.label.worker import ShardJob, bucket_input_size, label_shard

pytestmark = pytest.mark.integration

# (height, width) of 16 ImageNet-like images: landscape 4:3, 3:2, 5:4 and 16:10-ish, and portrait ones
IMAGENET_LIKE = [(375, 500), (333, 500), (334, 500), (400, 500), (357, 500), (480, 640), (366, 500), (300, 400),
                 (310, 460), (353, 500), (336, 448),
                 (500, 375), (500, 333), (500, 400), (640, 480), (500, 366)]


@pytest.fixture(scope="module")
def teachers():
    """Tiny random-weight DPT + SegFormer at a 64 px short side, batch 8, as a label worker loads them."""
    from polymae.pipeline.label.teachers import load_teacher

    specs = LabelConfig(input="x", teacher_short_side=64, batch_size=8).teacher_specs()
    return {slot: load_teacher(**spec) for slot, spec in specs.items()}


def _job(folder: Path, files: list[Path], **kw) -> ShardJob:
    base = dict(read_threads=2, batch_size=8)
    base.update(kw)
    return ShardJob("train", 0, str(folder / S.shard_name("train", 0)), str(folder / S.stats_name("train", 0)),
                    [SourceEntry(make_key(p.stem), str(p), None) for p in files], **base)


def _members(tar_path: str) -> dict[str, dict[str, bytes]]:
    """``{key: {member: bytes}}`` of a shard tar, read with Python's tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tf:
        for m in tf.getmembers():
            key, member = m.name.split(".", 1)
            out.setdefault(key, {})[member] = tf.extractfile(m).read()
    return out


def test_output_policy_resizes_rgb_and_labels_once(tmp_path, teachers, skimage_photo):
    src = tmp_path / "src"
    src.mkdir()
    big = Image.fromarray(skimage_photo("chelsea")).resize((3006, 2000), Image.BICUBIC)  # 300x451 -> 2000x3006
    big.save(src / "chelsea.jpg", quality=90)
    job = _job(tmp_path / "out", [src / "chelsea.jpg"], output_short_side=96)
    stats = label_shard(job, teachers)
    assert stats["written"] == 1 and stats["samples"][0]["height"] == 96 and stats["samples"][0]["width"] == 144
    sample = _members(job.url)["chelsea"]
    meta = json.loads(sample["json"])
    rgb = S.decode_rgb(sample[S.RGB])
    depth = S.decode_png(sample[S.DEPTH])
    semseg = S.decode_semseg(sample[S.SEMSEG])
    assert rgb.shape == (96, 144, 3) and depth.shape == semseg.shape == (96, 144)
    assert (meta["height"], meta["width"]) == (96, 144) and meta["source"]["reencoded"] is True
    assert (meta["source"]["height"], meta["source"]["width"]) == (2000, 3006)
    # the teachers ran at their own sizes: square DPT 64x64; SegFormer 64 px short side in the 4:3 bucket
    assert meta["label_resolution"] == {"depth": [64, 64], "semseg": [64, 96]}
    # depth: resized bilinearly from the teacher's 64x64 map: smooth, more distinct levels than the map has
    # pixels (a nearest resize has at most 4096)
    assert len(np.unique(depth)) > 64 * 64
    # semseg: ids of the teacher's classes only (no interpolated ids, no ignore)
    num_classes = teachers["semseg"].num_classes
    assert semseg.min() >= 0 and semseg.max() < num_classes
    # the stored maps are the teachers' own prediction on the stored image from the same teacher input
    stored = S.decode_rgb(sample[S.RGB])
    src_rgb = np.asarray(Image.open(src / "chelsea.jpg").convert("RGB"))  # what the worker decoded
    for slot, member in (("depth", S.DEPTH), ("semseg", S.SEMSEG)):
        t = teachers[slot]
        size = tuple(meta["label_resolution"][slot])
        again = t.predict([stored], resized=[t.resize_input(S.resize_rgb(src_rgb, (96, 144)), size=size)],
                          input_sizes=[size])[0]
        if slot == "semseg":
            assert np.array_equal(again, semseg)
        else:
            code, _ = S.encode_depth(again)
            assert np.abs(S.decode_png(code).astype(np.int64) - depth).max() <= 1


def test_output_max_side_and_no_enlarging(tmp_path, teachers, photo_writer):
    files = photo_writer(tmp_path / "src", ["chelsea", "coins"])  # 300x451, 303x384
    job = _job(tmp_path / "out", files, output_short_side=1000, output_max_side=256)
    stats = label_shard(job, teachers)
    sizes = {r["key"]: (r["height"], r["width"]) for r in stats["samples"]}
    assert sizes == {"chelsea": (170, 256), "coins": (202, 256)}  # long side capped, never enlarged
    for key, sample in _members(job.url).items():
        assert S.decode_png(sample[S.DEPTH]).shape == S.decode_semseg(sample[S.SEMSEG]).shape == sizes[key]


def test_output_policy_is_in_the_label_fingerprint(tmp_path):
    from polymae.pipeline.label.teachers import FingerprintMismatch, check_fingerprint, label_fingerprint

    url = str(tmp_path / "fingerprint.json")
    fps = {k: label_fingerprint(LabelConfig(input="x", **kw).label_policy()) for k, kw in
           {"none": {}, "256": {"output_short_side": 256}, "256/512": {"output_short_side": 256,
                                                                        "output_max_side": 512},
            "own-aspect": {"aspect_buckets": []}}.items()}
    assert len({fp["sha256"] for fp in fps.values()}) == 4
    check_fingerprint(url, fps["256"], finished=0, pending=2)
    with pytest.raises(FingerprintMismatch, match=r"config.output_short_side: 256 -> None"):
        check_fingerprint(url, fps["none"], finished=1, pending=1)
    assert check_fingerprint(url, fps["256"], finished=1, pending=1)["sha256"] == fps["256"]["sha256"]


def test_bucket_input_size(teachers):
    seg, dpt = teachers["semseg"], teachers["depth"]
    landscape = {bucket_input_size(seg, h, w) for h, w in IMAGENET_LIKE if w > h}
    portrait = {bucket_input_size(seg, h, w) for h, w in IMAGENET_LIKE if h > w}
    assert landscape == {(64, 96)} and portrait == {(96, 64)}  # 5:4 ... 3:2 share one size
    assert bucket_input_size(seg, 500, 500) == (64, 64)
    assert {bucket_input_size(dpt, h, w) for h, w in IMAGENET_LIKE} == {(64, 64)}  # plain-ViT DPT: square
    # without buckets, or beyond the allowed stretch, an image keeps its own aspect
    assert bucket_input_size(seg, 333, 500, buckets=()) == seg.input_size(333, 500)
    assert bucket_input_size(seg, 100, 1000, buckets=(1.0, 4 / 3)) == seg.input_size(100, 1000)


def _imagenet_like(folder: Path, photo) -> list[Path]:
    """16 JPEGs of the sizes :data:`IMAGENET_LIKE`: resized scikit-image photographs."""
    folder.mkdir(parents=True)
    names = ["astronaut", "coffee", "chelsea", "rocket"]
    out = []
    for i, (h, w) in enumerate(IMAGENET_LIKE):
        path = folder / f"img{i:02d}_{h}x{w}.jpg"
        Image.fromarray(photo(names[i % 4])).resize((w, h), Image.BICUBIC).save(path, quality=90)
        out.append(path)
    return out


class _ForwardCounter:
    """Counts the forward passes (and their batch sizes) of a real teacher's model, with a forward hook."""

    def __init__(self, teacher):
        self.batches: list[int] = []
        self._handle = teacher.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("pixel_values", args[0] if args else None)
        self.batches.append(int(x.shape[0]))

    def remove(self) -> None:
        self._handle.remove()


def test_aspect_buckets_fill_batches(tmp_path, teachers, skimage_photo):
    files = _imagenet_like(tmp_path / "src", skimage_photo)
    assert len({Image.open(p).size for p in files}) == 16

    def run(name: str, **kw) -> tuple[dict, dict[str, list[int]], str]:
        counters = {slot: _ForwardCounter(t) for slot, t in teachers.items()}
        try:
            stats = label_shard(_job(tmp_path / name, files, **kw), teachers)
        finally:
            for c in counters.values():
                c.remove()
        return stats, {slot: c.batches for slot, c in counters.items()}, stats["sha256"]

    stats, calls, sha = run("bucketed", decode_threads=1, encode_threads=1)
    assert stats["written"] == 16 and sorted(stats["teacher_batches"]) == [3, 5, 8]
    for slot in ("depth", "semseg"):
        assert len(calls[slot]) <= 3 and sum(calls[slot]) == 16, (slot, calls[slot])
    # the same shard with more decode and encode threads: the same tar, byte for byte
    _, _, sha_threads = run("threads", decode_threads=3, encode_threads=3)
    assert sha_threads == sha
    # each image at its own aspect (no buckets): SegFormer needs a forward pass per distinct input size
    _, own, _ = run("own-aspect", aspect_buckets=())
    assert len(own["semseg"]) > 3
    assert len(calls["depth"]) <= len(own["depth"])
    with tarfile.open(tmp_path / "bucketed" / S.shard_name("train", 0)) as tf:
        keys = {m.name.split(".", 1)[0] for m in tf.getmembers()}
    assert keys == {make_key(p.stem) for p in files}
