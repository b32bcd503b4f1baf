"""Pre-training speed on one GPU: MultiMAE ViT-B and ViT-L at 224 px, bf16, eager and compiled, through polymae's
``Trainer`` with its default loader, on ImageNet-size shards written from real photographs.

For each (preset, compile) it runs ``--warmup`` + ``--steps`` optimizer steps (logging every step) and prints
images/s, MFU (model FLOPs = 3x the forward, over the device's dense bf16 peak), peak memory and the share of step
time spent waiting for data, medians over the measured steps. Targets (issue "pretrain where users run it"):
ViT-B >= 40 % MFU on an H100/H200-class GPU, data wait < 5 %.

    bash benchmarks/gpu_pretrain.sh                     # the one command (installs carried wheels first)
    python benchmarks/gpu_pretrain.py --presets base large --steps 20
    python benchmarks/gpu_pretrain.py --cpu --presets tiny --img-size 64 --num-visible 16 --batch 4 --samples 64 \
        --workers 1 --compile eager --steps 2 --warmup 1                              # smoke test on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def write_run_shards(root: str, n: int) -> None:
    """``n`` ImageNet-size samples (``loader_speed.write_shards``) plus the stats files and manifest the trainer
    reads (150 semseg classes)."""
    sys.path.insert(0, HERE)
    from loader_speed import NUM_CLASSES, write_shards

    from synthetic import write_split_index

    urls = write_shards(root, n, per_shard=64)
    write_split_index(root, urls, [min(64, n - 64 * i) for i in range(len(urls))], NUM_CLASSES)


def run_one(shards_root: str, out: str, preset: str, compile_: bool, args, rgb_decode: str = "cpu") -> dict:
    """Train ``--warmup + --steps`` steps of MultiMAE-``preset``; returns the medians of the measured steps."""
    import torch

    from polymae.pipeline.config import load_config
    from polymae.pipeline.train.config import PretrainConfig
    from polymae.pipeline.train.trainer import Trainer

    steps = args.warmup + args.steps
    overrides = [f"data.shards={shards_root}", f"output={out}", f"model.preset={preset}", f"data.img_size={args.img_size}",
                 f"train.steps={steps}", f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}",
                 f"train.precision={args.precision}", "train.zero_stage=2", f"train.compile={str(compile_).lower()}",
                 f"data.num_workers={args.workers}", "train.save_interval=1000000", "train.log_interval=1",
                 "model.extra_norm_pix_loss=true", f"model.num_visible={args.num_visible}",
                 f"data.rgb_decode={rgb_decode}"]
    cfg = load_config(PretrainConfig, None, overrides)
    trainer = Trainer(cfg)
    t0 = time.perf_counter()
    trainer.setup()
    rows = []
    with trainer.process_settings():
        batches = iter(trainer.loader)
        for step in range(steps):
            rows.append(trainer.train_step(batches, step, log=True).metrics)
    trainer.close()
    wall = time.perf_counter() - t0
    measured = rows[args.warmup:]

    def med(key):
        vals = [r[key] for r in measured if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"preset": preset, "compile": compile_, "rgb_decode": rgb_decode, "images_per_s": med("images_per_s"), "mfu": med("mfu"),
            "tflops_per_s": med("tflops_per_s"), "peak_memory_gib": max(r["peak_memory_gib"] for r in rows),
            "data_wait_pct": med("data_wait_pct"), "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, write the shards, run every (preset, compile) pair in this process, print the table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["base", "large"])
    p.add_argument("--compile", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=128, help="micro-batch = global batch (one GPU)")
    p.add_argument("--num-visible", type=int, default=98, help="visible tokens (MultiMAE: 98 of 3 x 196 at 224 px)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8, help="loader workers (the default recipe uses 8 per GPU)")
    p.add_argument("--precision", default="amp_bf16", choices=["amp_bf16", "bf16", "fp32"])
    p.add_argument("--rgb-decode", nargs="+", default=["cpu", "device"], choices=["cpu", "device"],
                   help="JPEG decoding in the loader workers and/or on the GPU (nvJPEG); eager ViT-B only for 'device'")
    p.add_argument("--samples", type=int, default=1024, help="samples in the synthetic ImageNet-size shards")
    p.add_argument("--cpu", action="store_true", help="smoke test on CPU (fp32)")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.cpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
        args.precision = "fp32"
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "CPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_run_shards(os.path.join(tmp, "shards"), args.samples)
        for preset in args.presets:
            for mode in args.compile:
                rows.append(run_one(os.path.join(tmp, "shards"), os.path.join(tmp, f"run-{preset}-{mode}"), preset,
                                    mode == "compiled", args))
        if "device" in args.rgb_decode:  # nvJPEG on the training device, eager, the first preset
            rows.append(run_one(os.path.join(tmp, "shards"), os.path.join(tmp, "run-nvjpeg"), args.presets[0], False,
                                args, rgb_decode="device"))
    import deepspeed

    print(f"{device}; torch {torch.__version__}, deepspeed {deepspeed.__version__}; {args.precision}, ZeRO-2, world 1, "
          f"{args.img_size} px, micro-batch {args.batch}, {args.workers} loader workers; medians of {args.steps} steps "
          f"after {args.warmup}")
    print(f"{'model':<10} | {'mode':<8} | {'jpeg':<6} | {'images/s':>9} | {'TFLOP/s':>8} | {'MFU':>6} | {'peak GiB':>8} | "
          f"{'data wait %':>11} | {'loss first->last':>18}")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"MultiMAE-{r['preset'][0].upper()} | {'compiled' if r['compile'] else 'eager':<8} | {r['rgb_decode']:<6} | "
              f"{r['images_per_s']:>9.1f} | "
              f"{r['tflops_per_s']:>8.1f} | {mfu:>6} | {r['peak_memory_gib']:>8.2f} | {r['data_wait_pct']:>11.2f} | "
              f"{r['loss_first']:>8.4f}->{r['loss_last']:.4f}")
    print("targets: ViT-B MFU >= 40 % (H100/H200, 989 TFLOP/s dense bf16 peak), data wait < 5 %")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
