"""Loader speed: polymae's training stream against a plain decode path, on ImageNet-size samples, in one run.

Writes its own shards from the photographs scikit-image ships: every sample is a 500x375 (or 375x500) RGB
JPEG (quality 90), a 16-bit depth PNG and a 150-class semseg PNG at the same size, as the label job writes
them. Then, on the same shards and the same cores:

* **plain**: iterate the tars with ``tarfile``, decode the three members with PIL, one random-resized crop
  shared by all three (the same geometry code as polymae), resize the crops as uint8/uint16 with PIL
  (RGB bicubic to S, depth bilinear to S, semseg nearest to S/4) and stack them into batches;
* **polymae**: ``ShardStream`` + ``make_loader`` as the trainer builds them (shuffle buffer, shared crop and
  flip, batches), at the same micro-batch.

Each is timed at 1 and 2 reader processes (plain: one process per reader, each on its own shards;
polymae: DataLoader workers), torch at one thread per process, in ``--repeats`` interleaved rounds (median
shown). Samples/s is counted after a warm-up batch per reader; the ratio polymae / plain is printed side by
side (target >= 1.0).

    .venv/bin/python benchmarks/loader_speed.py                      # 384 samples, 224 px, ~1-2 min
    .venv/bin/python benchmarks/loader_speed.py --samples 768 --img-size 224 --batch 32
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "colorwheel", "motorcycle_left",
          "retina", "camera", "hubble_deep_field")
NUM_CLASSES = 150
TARGET = 1.0


def _photos():
    import numpy as np
    import skimage.data
    from PIL import Image

    out = []
    for name in PHOTOS:
        try:
            out.append(Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB"))
        except Exception:  # noqa: BLE001 - a photograph that needs a download is left out
            continue
    return out


def write_shards(root: str, n: int, per_shard: int) -> list[str]:
    """``n`` ImageNet-size samples in shards of ``per_shard`` under ``root/train``; returns the shard URLs.

    RGB: a 500x375 crop (or its 375x500 transpose) of a photograph, rescaled, mirrored and offset per
    sample; depth: a smooth field from the image's luminance (relative inverse depth, O(1)); semseg:
    the luminance and hue quantised into 150 classes (large regions with real edges)."""
    import numpy as np
    from PIL import Image, ImageFilter

    from polymae.datasets import shards, storage

    photos = _photos()
    urls = []
    writer = None
    for i in range(n):
        if i % per_shard == 0:
            if writer is not None:
                writer.close()
            urls.append(shards.shard_url(root, "train", i // per_shard))
            storage.makedirs(shards.split_dir(root, "train"))
            writer = shards.ShardTarWriter(urls[-1])
        img = photos[i % len(photos)]
        w, h = (500, 375) if (i // len(photos)) % 2 == 0 else (375, 500)
        scale = max(w / img.width, h / img.height) * (1.0 + 0.15 * ((i * 7) % 5))
        big = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
        left, top = (i * 37) % (big.width - w + 1), (i * 53) % (big.height - h + 1)
        crop = big.crop((left, top, left + w, top + h))
        if i % 3 == 1:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        lum = np.asarray(crop.convert("L").filter(ImageFilter.GaussianBlur(6)), dtype=np.float32) / 255.0
        depth = 0.2 + lum + np.linspace(0, 0.5, h, dtype=np.float32)[:, None]
        hue = np.asarray(crop.convert("HSV"), dtype=np.int64)[..., 0] // 26
        semseg = (np.minimum((lum * 15).astype(np.int64), 14) * 10 + hue) % NUM_CLASSES
        writer.write(shards.LabelledSample(key=f"s{i:06d}", rgb_jpeg=buf.getvalue(), depth=depth, semseg=semseg,
                                           num_classes=NUM_CLASSES, meta={"width": w, "height": h}).encode())
    writer.close()
    return urls


# --------------------------------------------------------------------------------------- plain path
def _plain_reader(args: tuple) -> tuple[int, float]:
    """One reader process of the plain path: returns ``(samples after the warm-up batch, seconds)``."""
    urls, size, batch, seed = args
    import numpy as np
    import torch
    from PIL import Image

    from polymae.datasets.transforms import rrc_params, sample_rng

    torch.set_num_threads(1)
    s4 = size // 4
    pending, done, t0 = [], 0, None
    for url in urls:
        with tarfile.open(url) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for m in tar:
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key, mem in members.items():
                rgb = Image.open(io.BytesIO(mem["rgb.jpg"])).convert("RGB")
                depth = Image.open(io.BytesIO(mem["depth.png"]))
                semseg = Image.open(io.BytesIO(mem["semseg.png"]))
                top, left, h, w = rrc_params(rgb.height, rgb.width, (0.2, 1.0), (3 / 4, 4 / 3),
                                             sample_rng(seed, key, 0))
                box = (left, top, left + w, top + h)
                r = np.array(rgb.crop(box).resize((size, size), Image.BICUBIC))
                d = np.array(depth.crop(box).resize((size, size), Image.BILINEAR), dtype=np.int32)
                s = np.array(semseg.crop(box).resize((s4, s4), Image.NEAREST))
                pending.append((torch.from_numpy(r).permute(2, 0, 1), torch.from_numpy(d), torch.from_numpy(s)))
                if len(pending) == batch:
                    torch.stack([p[0] for p in pending]), torch.stack([p[1] for p in pending])
                    torch.stack([p[2] for p in pending])
                    pending = []
                    if t0 is None:
                        t0 = time.perf_counter()
                    else:
                        done += batch
    return done, time.perf_counter() - (t0 or time.perf_counter())


def run_plain(urls: list[str], readers: int, size: int, batch: int) -> float:
    """Samples/s of ``readers`` plain-path processes, each on every ``readers``-th shard."""
    jobs = [(urls[r::readers], size, batch, 0) for r in range(readers)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(readers) as pool:
        res = pool.map(_plain_reader, jobs)
    return sum(n for n, _ in res) / max(s for _, s in res)


# ------------------------------------------------------------------------------------- polymae path
def run_polymae(urls: list[str], workers: int, size: int, batch: int, jpeg_draft: bool = True) -> float:
    """Samples/s of polymae's training stream with ``workers`` DataLoader workers (warm-up: one batch per
    worker), over one pass of the shards; ``jpeg_draft``: the loader's JPEG draft-mode decoding."""
    import torch

    from polymae.datasets.loader import ShardStream, make_loader
    from polymae.datasets.transforms import MultiModalAugment

    torch.set_num_threads(1)
    aug = MultiModalAugment(img_size=size, scale=(0.2, 1.0), hflip=0.5, jpeg_draft=jpeg_draft)
    stream = ShardStream(urls, batch, aug, seed=0, shuffle_buffer=64, infinite=False, num_workers=workers)
    loader = make_loader(stream, workers)
    n, t0 = 0, None
    for i, b in enumerate(loader):
        if i + 1 == max(1, workers):
            t0 = time.perf_counter()
        elif t0 is not None:
            n += b["rgb"].shape[0]
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Write the shards, time both paths at 1 and 2 readers, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--per-shard", type=int, default=48)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--readers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row; the median is shown")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        t = time.perf_counter()
        urls = write_shards(tmp, args.samples, args.per_shard)
        nbytes = sum(os.path.getsize(u) for u in urls)
        print(f"{args.samples} samples (500x375 rgb JPEG q90 + 16-bit depth PNG + {NUM_CLASSES}-class semseg PNG) in "
              f"{len(urls)} shards, {nbytes / 2**20:.1f} MiB, written in {time.perf_counter() - t:.1f} s; "
              f"crops to {args.img_size} px, micro-batch {args.batch}")
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
        print()
        print("polymae: libjpeg-turbo via torchvision.io, crop before convert, uint8/uint16 out; 'draft' adds PIL's "
              "JPEG DCT down-scaling where the crop is >= 2x the output")
        print(f"{'readers':>7} | {'plain samples/s':>15} | {'polymae':>9} | {'ratio':>6} | {'+ draft':>9} | {'ratio':>6} |"
              f" target >= {TARGET}")
        for r in args.readers:
            rounds = [(run_plain(urls, r, args.img_size, args.batch),
                       run_polymae(urls, r, args.img_size, args.batch, jpeg_draft=False),
                       run_polymae(urls, r, args.img_size, args.batch, jpeg_draft=True)) for _ in range(args.repeats)]
            plain, ours, draft = (statistics.median(x[i] for x in rounds) for i in range(3))
            ok = "ok" if min(ours, draft) / plain >= TARGET else "BELOW"
            print(f"{r:>7} | {plain:>15.1f} | {ours:>9.1f} | {ours / plain:>6.3f} | {draft:>9.1f} | {draft / plain:>6.3f} |"
                  f" {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
