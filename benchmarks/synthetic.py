"""Shared by the benchmarks: synthetic labelled shards, the stats files and manifest a trainer reads, and the
set-up every CPU rank of a multi-rank benchmark does first."""

from __future__ import annotations

import io
import logging
import math
import os
import warnings

import numpy as np


def write_split_index(root: str, urls: list[str], counts: list[int], num_classes: int, split: str = "train") -> None:
    """Stats files (done markers) for the shard ``urls`` holding ``counts`` samples, then the split's manifest
    with size + sha256 per shard and a ``num_classes``-class semseg label set, as the label job writes them."""
    from polymae.datasets import shards, storage

    entries = []
    for idx, (url, count) in enumerate(zip(urls, counts)):
        storage.write_json_atomic(shards.stats_url(root, split, idx), {"samples_in": count, "written": count})
        digest, nbytes = storage.sha256_of(url)
        entries.append({"index": idx, "samples": count, "size": nbytes, "sha256": digest})
    storage.write_json_atomic(shards.manifest_url(root, split), {
        "schema_version": shards.SCHEMA_VERSION, "shards": entries,
        "teachers": {"semseg": {"num_classes": num_classes, "label_set": f"synthetic-{num_classes}"}}})


def write_shards(root: str, n: int, size: int, num_classes: int = 8, per_shard: int = 16, seed: int = 0) -> None:
    """Write ``n`` synthetic labelled samples of ``size`` px (smooth colour fields + noise as JPEG, a depth ramp, a
    ``num_classes``-class semseg from intensity bands) as polymae shards + stats + manifest under ``root/train``."""
    from PIL import Image

    from polymae.datasets import shards, storage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    storage.makedirs(shards.split_dir(root, "train"))
    urls, counts = [], []
    for idx in range(math.ceil(n / per_shard)):
        urls.append(shards.shard_url(root, "train", idx))
        counts.append(min(per_shard, n - idx * per_shard))
        with shards.ShardTarWriter(urls[-1]) as w:
            for j in range(counts[-1]):
                a, b, c = rng.uniform(0.5, 4.0, 3)
                rgb = np.stack([np.sin(a * xx + b * yy), np.cos(b * xx - c * yy), np.sin(c * (xx + yy))], -1)
                rgb = np.clip((rgb * 0.5 + 0.5) * 255 + rng.normal(0, 12, rgb.shape), 0, 255).astype(np.uint8)
                buf = io.BytesIO()
                Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
                lum = rgb.mean(-1) / 255.0
                w.write(shards.LabelledSample(
                    key=f"s{idx:03d}x{j:03d}", rgb_jpeg=buf.getvalue(), depth=(1.0 + yy * 4.0 + 0.1 * lum),
                    semseg=np.minimum(lum * num_classes, num_classes - 1).astype(np.int64),
                    num_classes=num_classes, meta={"source": "synthetic"}))
    write_split_index(root, urls, counts, num_classes)


def cpu_rank_setup() -> None:
    """What every CPU rank of a benchmark does first: DeepSpeed on the CPU, one torch thread, quiet warnings and
    logs, then the gloo process group (``init_deepspeed_distributed``)."""
    import torch

    from polymae.pipeline.train.distributed import init_deepspeed_distributed

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    init_deepspeed_distributed()
