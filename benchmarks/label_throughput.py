"""Label throughput: the Ray runner (``run_label``, embedded Ray, 1 and 2 workers of 1 CPU) against a plain
Python loop doing the same work with the same teachers, in one process run.

Images: ``--sizes imagenet`` (default) cycles through 16 ImageNet-like sizes (landscape 4:3, 3:2, 5:4 and
portrait ones, ~500 px), ``--sizes fixed`` uses ``--width x --height``. Teachers: ``--teacher realistic``
(default) is a random-weight DPT of ViT-Tiny width (192, 6 layers) + SegFormer, saved with save_pretrained
and loaded as weights, so one forward costs tens of ms per image on a CPU core; ``--teacher tiny`` uses the
registry's tiny ones (the pipeline's own overhead). The plain loop batches images in entry order (what a
bare loop does); the runner buckets them by aspect ratio (full batches), decodes ahead and encodes/writes
on its own threads. Printed per Ray variant: the fraction of the shards' time the teacher thread waited for
decoded images (``teacher_wait_seconds / seconds``) and the teacher forward passes (batches).

Same work in every variant: read the JPEG bytes, decode (``load_rgb``), tiny random DPT + SegFormer at
``teacher_short_side`` in batches of ``batch_size`` within shards of ``samples_per_shard``, encode the
sample (``LabelledSample.encode``) and write the shard tar (``ShardTarWriter``). Torch uses one thread
per worker and one in the plain loop, so images/s per worker compare per core.

Timed region: plain loop, from the first image read to the last shard closed; Ray, from the first shard's
start to the last shard's end, from the per-shard stats (``started``/``finished``, unix seconds). Ray
start-up and teacher loading are excluded and printed separately.

    .venv/bin/python benchmarks/label_throughput.py                 # 128 images of 512x384
    .venv/bin/python benchmarks/label_throughput.py --images 96 --workdir /tmp/lt

Targets printed beside the figures: Ray >= 0.9x the plain loop per worker; 1 -> 2 workers >= 1.7x.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# what the benchmark process needs besides the label job's own RAY_* variables (scheduler.RAY_ENV); the
# embedded Ray's workers run at the plain loop's priority, as in run_label's own embedded Ray
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_worker_niceness": "0"}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "colorwheel", "retina",
          "motorcycle_left", "hubble_deep_field")
TARGET_PER_WORKER = 0.9
TARGET_SPEEDUP = 1.7


def write_images(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """``n`` JPEGs (quality 90) of ``width x height`` pixels cut from the scikit-image photographs (crops
    at different offsets and mirror images, so no two are alike); returns their paths."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for name in PHOTOS:
        try:
            arr = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo that needs a download (pooch) is left out
            continue
        img = Image.fromarray(arr).convert("RGB")
        scale = max(width * 1.25 / img.width, height * 1.25 / img.height)
        photos.append(img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC))
    paths = []
    for i in range(n):
        img = photos[i % len(photos)]
        k = i // len(photos)
        x = (k * 37) % (img.width - width + 1)
        y = (k * 23) % (img.height - height + 1)
        crop = img.crop((x, y, x + width, y + height))
        if k % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        p = folder / f"img{i:04d}.jpg"
        crop.save(p, format="JPEG", quality=90)
        paths.append(p)
    return paths


# (height, width) of ImageNet-like images: landscape 4:3, 3:2, 5:4, portrait
IMAGENET_LIKE = [(375, 500), (333, 500), (334, 500), (400, 500), (357, 500), (480, 640), (366, 500), (300, 400),
                 (310, 460), (353, 500), (336, 448), (500, 375), (500, 333), (500, 400), (640, 480), (500, 366)]


def write_mixed_images(folder: Path, n: int, sizes: list[tuple[int, int]]) -> list[Path]:
    """``n`` JPEGs cycling through ``sizes`` (``(height, width)`` pixels), cut from the photographs as in
    :func:`write_images`; returns their paths in order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for j, (h, w) in enumerate(sizes):
        count = len(range(j, n, len(sizes)))
        if not count:
            continue
        made = write_images(folder / f"s{j}", count, w, h)
        for k, p in enumerate(made):
            dest = folder / f"img{j + k * len(sizes):04d}.jpg"
            p.rename(dest)
            paths.append(dest)
        (folder / f"s{j}").rmdir()
    return sorted(paths)


def realistic_dpt(folder: Path) -> str:
    """Save a random-weight DPT of ViT-Tiny width (hidden 192, 6 layers, 3 heads) with its image processor
    to ``folder`` (``save_pretrained``), the realistic-cost depth teacher; returns the folder."""
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    from polymae.patches import global_torch_seed

    cfg = DPTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                    image_size=384, patch_size=16, backbone_out_indices=[1, 3, 4, 5],
                    neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64)
    with global_torch_seed(0):
        model = DPTForDepthEstimation(cfg).eval()
    model.save_pretrained(folder)
    DPTImageProcessor(size={"height": 384, "width": 384}, ensure_multiple_of=32).save_pretrained(folder)
    return str(folder)


def plain_loop(paths: list[Path], out: Path, cfg) -> dict:
    """Label ``paths`` in this process with a plain loop (no Ray, no threads); returns timings."""
    import torch

    from polymae.datasets import shards as S
    from polymae.pipeline.label.teachers import load_teacher
    from polymae.pipeline.label.worker import teacher_brief

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    teachers = {slot: load_teacher(**spec) for slot, spec in cfg.teacher_specs("cpu").items()}
    load_s = time.perf_counter() - t0
    metas = {slot: t.metadata() for slot, t in teachers.items()}
    briefs = {slot: teacher_brief(m) for slot, m in metas.items()}
    out.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    n = batches = 0
    for shard, s0 in enumerate(range(0, len(paths), cfg.samples_per_shard)):
        writer = S.ShardTarWriter(str(out / S.shard_name("train", shard)))
        chunk = paths[s0:s0 + cfg.samples_per_shard]
        for b0 in range(0, len(chunk), cfg.batch_size):
            batch = chunk[b0:b0 + cfg.batch_size]
            decoded = [(p, *S.load_rgb(p.read_bytes())) for p in batch]
            images = [d[1] for d in decoded]
            preds = {task: t.predict(images) for task, t in teachers.items()}
            batches += len({teachers["semseg"].input_size(*im.shape[:2]) for im in images})
            for j, (p, rgb, jpeg) in enumerate(decoded):
                sample = S.LabelledSample(key=p.stem, rgb_jpeg=jpeg, depth=preds["depth"][j],
                                          semseg=preds["semseg"][j], num_classes=metas["semseg"]["num_classes"],
                                          meta={"key": p.stem, "width": rgb.shape[1], "height": rgb.shape[0],
                                                "teachers": briefs, "source": {"uri": str(p)}})
                writer.write(sample)
                n += 1
        writer.close()
    return {"images": n, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "load_seconds": load_s, "batches": batches}


def ray_run(src: Path, out: Path, cfg, workers: int) -> dict:
    """``run_label`` with ``workers`` actors of 1 CPU on the running (embedded) Ray; returns timings."""
    from dataclasses import replace

    from polymae.pipeline.label.driver import run_label

    with contextlib.redirect_stdout(io.StringIO()):  # run_label's own summary table
        summary = run_label(replace(cfg, input=str(src), output=str(out), num_workers=workers, mode="overwrite"))
    stats = [json.loads(p.read_text()) for p in sorted((out / "train").glob("*.stats.json"))]
    window = max(s["finished"] for s in stats) - min(s["started"] for s in stats)
    return {"images": summary["run"]["samples_in"], "seconds": window, "load_seconds": summary["teacher_load_seconds"],
            "teacher_wait_fraction": sum(s["teacher_wait_seconds"] for s in stats) / sum(s["seconds"] for s in stats),
            "teacher_batches": sum(len(s["teacher_batches"]) for s in stats),
            "cpu_seconds": sum(s["cpu_seconds"] for s in stats),
            "driver_seconds": summary["label_seconds"], "stages": summary["stages"], "workers": summary["workers"]}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    """Write the images, run the plain loop, start embedded Ray, run the runner with 1 then 2 workers and
    print the table (see the module docstring); returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--height", type=int, default=384)
    ap.add_argument("--teacher-short-side", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--samples-per-shard", type=int, default=8)
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--sizes", choices=("imagenet", "fixed"), default="imagenet")
    ap.add_argument("--teacher", choices=("realistic", "tiny"), default="realistic")
    args = ap.parse_args(argv)
    from polymae.patches import environment
    from polymae.pipeline.label.config import LabelConfig, TeacherConfig
    from polymae.pipeline.label.scheduler import EMBEDDED_OBJECT_STORE_BYTES, RAY_ENV

    environment({**RAY_ENV, **BENCH_ENV})  # for this process's life (a user's exported values win)
    import ray
    import torch
    import transformers

    work = Path(args.workdir or tempfile.mkdtemp(prefix="label_throughput-"))
    src = work / "images"
    if src.exists():
        shutil.rmtree(src)
    sizes = IMAGENET_LIKE if args.sizes == "imagenet" else [(args.height, args.width)]
    paths = write_mixed_images(src, args.images, sizes)
    depth_weights = realistic_dpt(work / "dpt-vit-tiny") if args.teacher == "realistic" else None
    cfg = LabelConfig(input=str(src), samples_per_shard=args.samples_per_shard, batch_size=args.batch_size,
                      teachers=[TeacherConfig("dpt", weights=depth_weights), TeacherConfig("segformer")],
                      teacher_short_side=args.teacher_short_side, cpus_per_worker=1, progress=False, read_threads=4)
    print(f"{len(paths)} images of {len(sizes)} size(s) ({args.sizes}), teacher {args.teacher}, teacher_short_side={args.teacher_short_side}, "
          f"batch_size={args.batch_size}, samples_per_shard={args.samples_per_shard}, teachers dpt + segformer "
          f"({args.teacher}, random weights); python {platform.python_version()}, torch {torch.__version__}, ray {ray.__version__}, "
          f"transformers {transformers.__version__}; {os.cpu_count()} CPUs", flush=True)

    rows, load = {}, {}
    print(f"loadavg before: {_loadavg()}", flush=True)
    r = plain_loop(paths, work / "plain", cfg)
    rows["plain loop"] = (1, r)
    load["plain loop"] = _loadavg()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=EMBEDDED_OBJECT_STORE_BYTES,
             logging_level="WARNING")
    ray_start = time.perf_counter() - t0
    try:
        for w in (1, 2):
            rows[f"ray, {w} worker{'s' if w > 1 else ''}"] = (w, ray_run(src, work / f"ray{w}", cfg, w))
            load[f"ray, {w} worker{'s' if w > 1 else ''}"] = _loadavg()
    finally:
        ray.shutdown()

    plain_ips = rows["plain loop"][1]["images"] / rows["plain loop"][1]["seconds"]
    print(f"\nnot timed: Ray start {ray_start:.1f} s; teacher load: "
          + ", ".join(f"{k} {v[1]['load_seconds']:.1f} s" for k, v in rows.items()))
    head = (f"{'variant':<16} {'images':>6} {'seconds':>8} {'images/s':>9} {'per worker vs plain':>26} "
            f"{'CPU share':>9} {'img/CPU-s':>9} {'loadavg after':>15}")
    print(head)
    print("-" * len(head))
    ips = {}
    for name, (w, r) in rows.items():
        ips[name] = r["images"] / r["seconds"]
        ratio = ips[name] / w / plain_ips
        target = "" if name == "plain loop" else f"(target >= {TARGET_PER_WORKER})"
        share = r["cpu_seconds"] / (r["seconds"] * w)  # CPU time the workers got / the cores they were given
        print(f"{name:<16} {r['images']:>6} {r['seconds']:>8.2f} {ips[name]:>9.2f} {ratio:>6.2f}x {target:<18} "
              f"{share:>9.2f} {r['images'] / r['cpu_seconds']:>9.2f} {load[name]:>15}")
    speedup = ips["ray, 2 workers"] / ips["ray, 1 worker"]
    print(f"1 -> 2 workers speed-up: {speedup:.2f}x (target >= {TARGET_SPEEDUP})")
    print("CPU share: CPU seconds of the labelling processes / (seconds x workers); below ~0.95 the machine was "
          "busy with other work. img/CPU-s: images per CPU second (contention-free per-core efficiency).")
    verdict = (ips["ray, 1 worker"] / plain_ips >= TARGET_PER_WORKER and ips["ray, 2 workers"] / 2 / plain_ips
               >= TARGET_PER_WORKER and speedup >= TARGET_SPEEDUP)
    print(f"targets {'met' if verdict else 'MISSED'}")
    for name, (w, r) in rows.items():
        if "teacher_wait_fraction" in r:
            print(f"{name}: teacher waited {100 * r['teacher_wait_fraction']:.1f} % of the shards' time for decoded "
                  f"images; {r['teacher_batches']} teacher batches (plain loop: {rows['plain loop'][1]['batches']} SegFormer "
                  f"forward calls per teacher)")
        if "stages" in r:
            print(f"{name} stage busy seconds (all workers): "
                  + ", ".join(f"{k} {v['busy_seconds']:.1f}" for k, v in r["stages"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": {k: v[1] for k, v in rows.items()}, "ray_start": ray_start,
                                               "speedup": speedup, "plain_ips": plain_ips}, indent=1))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
