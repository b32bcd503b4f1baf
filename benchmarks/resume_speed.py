"""Resume speed: start-to-first-batch of the training stream resumed at step 10 against step 10,000.

The stream seeks straight to a resumed batch (``datasets/loader.py``: the reader opens the shard of that batch's
shuffle chunk at its sample offset through the tar headers and reads only the chunk's remaining samples), so
both should cost the same: the target is a ratio (10,000 / 10) within 1.2x.

Writes one real shard of ``--per-shard`` samples (``--img-size`` px RGB JPEG, 16-bit depth PNG, semseg PNG, as
the label job writes them) and hard-links (or copies) it under ``--shards`` shard names with stats files and a
manifest, so the counts are those of a large dataset (default 2000 x 16 = 32,000 samples) without writing one.
Each timing builds the stream as the trainer does (``shards.trusted_shard_counts`` + ``ShardStream`` +
``make_loader``; ``skip_batches = step x grad-accumulation``) and takes the first batch; ``--repeats``
interleaved rounds, medians printed.

    .venv/bin/python benchmarks/resume_speed.py                 # in-process reader, ~10 s
    .venv/bin/python benchmarks/resume_speed.py --workers 2     # two DataLoader workers
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

TARGET = 1.2


def write_dataset(root: str, n_shards: int, per_shard: int, size: int) -> int:
    """One real shard of ``per_shard`` samples linked under ``n_shards`` names in ``root/train`` with stats files
    and a manifest; returns the total number of samples."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from polymae.datasets import shards, storage

    storage.makedirs(shards.split_dir(root, "train"))
    src = shards.shard_url(root, "train", 0)
    photo = Image.fromarray(np.asarray(skimage.data.astronaut())).convert("RGB")
    with shards.ShardTarWriter(src) as w:
        for i in range(per_shard):
            img = photo.rotate(7 * i).resize((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            lum = np.asarray(img).mean(-1) / 255.0
            w.write(shards.LabelledSample(key=f"s{i:04d}", rgb_jpeg=buf.getvalue(), depth=1.0 - lum + 0.05,
                                          semseg=np.minimum(lum * 8, 7).astype(np.int64), num_classes=8))
    digest, nbytes = storage.sha256_of(src)
    entries = []
    for i in range(n_shards):
        url = shards.shard_url(root, "train", i)
        if i:
            try:
                os.link(src, url)
            except OSError:
                storage.copy_atomic(src, url)
        storage.write_json_atomic(shards.stats_url(root, "train", i), {"samples_in": per_shard, "written": per_shard})
        entries.append({"index": i, "samples": per_shard, "size": nbytes, "sha256": digest})
    storage.write_json_atomic(shards.manifest_url(root, "train"), {"schema_version": shards.SCHEMA_VERSION,
                                                                   "shards": entries})
    return n_shards * per_shard


def first_batch_seconds(root: str, step: int, args: argparse.Namespace) -> float:
    """Seconds from listing the shards to the first batch of a stream resumed at ``step``."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream, make_loader
    from polymae.datasets.transforms import MultiModalAugment

    t0 = time.perf_counter()
    counts = shards.trusted_shard_counts(root, "train")
    stream = ShardStream(counts, args.batch, MultiModalAugment(img_size=args.img_size), seed=0,
                         shuffle_buffer=args.shuffle_buffer, shuffle_buffer_mb=512.0, skip_batches=step * args.ga,
                         num_workers=args.workers)
    batch = next(iter(make_loader(stream, args.workers)))
    assert len(batch["key"]) == args.batch
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Write the dataset, time resumes at the two steps in interleaved rounds, print medians and their ratio."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=2000, help="shard names (links of one real shard)")
    p.add_argument("--per-shard", type=int, default=16, help="samples per shard")
    p.add_argument("--img-size", type=int, default=128, help="sample and crop side in pixels")
    p.add_argument("--batch", type=int, default=8, help="micro-batch (samples)")
    p.add_argument("--ga", type=int, default=1, help="micro-batches per step")
    p.add_argument("--shuffle-buffer", type=int, default=256, help="shuffle chunk (samples)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--steps", type=int, nargs=2, default=[10, 10_000], help="the two resume steps")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        n = write_dataset(root, args.shards, args.per_shard, args.img_size)
        print(f"{args.shards} shards x {args.per_shard} = {n} samples; micro-batch {args.batch}, ga {args.ga}, "
              f"shuffle chunk {args.shuffle_buffer}, workers {args.workers}")
        first_batch_seconds(root, args.steps[0], args)  # warm-up (imports, page cache)
        times: dict[int, list[float]] = {s: [] for s in args.steps}
        for _ in range(args.repeats):
            for s in args.steps:
                times[s].append(first_batch_seconds(root, s, args))
    med = {s: statistics.median(t) for s, t in times.items()}
    lo, hi = args.steps
    for s in args.steps:
        print(f"resume at step {s:>6}: {med[s] * 1000:8.1f} ms to the first batch (median of {args.repeats}; "
              f"{'%.1f' % (s * args.ga * args.batch / n)} epochs in)")
    ratio = med[hi] / med[lo]
    print(f"ratio step {hi} / step {lo}: {ratio:.2f}x (target <= {TARGET}x) {'OK' if ratio <= TARGET else 'SLOW'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
