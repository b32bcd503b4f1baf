"""Seeking inside shards: ``SampleCursor`` groups members as webdataset does, skips with headers only, ends a
truncated tar early; per-shard sample counts from the manifest, the stats files or the tar headers."""

import os

import numpy as np
import pytest

from polymae.datasets import shards, storage

pytestmark = pytest.mark.unit


def _shard(url: str, keys: list[str]) -> None:
    os.makedirs(os.path.dirname(url), exist_ok=True)
    with shards.ShardTarWriter(url) as w:
        for i, k in enumerate(keys):
            w.write(shards.LabelledSample(key=k, rgb_jpeg=bytes([i]) * (100 + 700 * i), depth=np.full((4, 4), i + 1.0),
                                          semseg=np.zeros((4, 4), np.int64), num_classes=3, cls=i,
                                          extra={"depth.teacher2.png": b"x" * i}))


def _strip(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}


def test_cursor_reads_what_webdataset_reads_and_skips_without_payload(tmp_path):
    keys = ["a", "b" * 150, "c", "d"]  # a 150-character name needs a long-name header
    url = shards.shard_url(str(tmp_path), "train", 0)
    _shard(url, keys)
    ref = [_strip(s) for s in shards.iter_raw_samples([url])]
    cur = shards.SampleCursor(url)
    got = []
    while (s := cur.next_sample()) is not None:
        got.append(_strip(s))
    assert got == ref and [s["__key__"] for s in got] == keys and not cur.truncated
    cur = shards.SampleCursor(url)
    assert cur.skip(2) == 2 and cur.payload_bytes == 0
    assert _strip(cur.next_sample()) == ref[2]
    assert cur.skip(5) == 1 and cur.next_sample() is None
    assert shards.count_samples(url) == 4


def test_truncated_shard_ends_early(tmp_path):
    url = shards.shard_url(str(tmp_path), "train", 0)
    _shard(url, ["a", "b", "c"])
    data = storage.read_bytes(url)
    cut = str(tmp_path / "cut.tar")
    with open(cut, "wb") as fh:
        fh.write(data[:len(data) // 2])
    cur = shards.SampleCursor(cut)
    n = 0
    while cur.next_sample() is not None:
        n += 1
    assert 0 < n < 3 and cur.truncated


def test_counts_from_manifest_stats_or_headers(tmp_path):
    root = str(tmp_path)
    for i, n in enumerate((3, 2, 4)):
        _shard(shards.shard_url(root, "train", i), [f"s{i}k{j}" for j in range(n)])
    urls = [shards.shard_url(root, "train", i) for i in range(3)]
    assert shards.shard_sample_counts(urls) == [(urls[0], 3), (urls[1], 2), (urls[2], 4)]  # from headers
    storage.write_json_atomic(shards.stats_url(root, "train", 1), {"samples_in": 9, "written": 7, "size": 700})
    storage.write_json_atomic(shards.manifest_url(root, "train"), {
        "schema_version": 1, "shards": [{"index": 0, "samples": 30, "size": 3000, "sha256": "x"}]})
    assert shards.shard_sample_counts(urls) == [(urls[0], 30), (urls[1], 7), (urls[2], 4)]
    assert shards.trusted_shard_counts(root, "train") == [(urls[0], 30), (urls[1], 7)]
    assert shards.mean_sample_bytes([(urls[0], 30), (urls[1], 7)]) == pytest.approx(3700 / 37)
