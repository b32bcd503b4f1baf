"""2-rank training throughput: polymae's ``Trainer`` (DeepSpeed ZeRO-2 / ZeRO-0) vs plain PyTorch DDP, on CPU (gloo).

Run ``python benchmarks/train_speed_ddp.py`` (it launches itself under ``torchrun --nproc_per_node=2``;
defaults finish in about 2-3 minutes on 2 cores), or start it yourself with
``torchrun --nnodes=1 --nproc_per_node=2 benchmarks/train_speed_ddp.py``. Each rank runs torch with 1
thread. All variants live in the same processes and the same (gloo) process group:

* ``DDP``: the model built as the Trainer builds it (same seed, ``create_model`` + ``model_kwargs``), wrapped
  in ``torch.nn.parallel.DistributedDataParallel`` (gloo, default buckets), ``make_optimizer`` (the same
  fused AdamW on ``param_groups``), and per step: lr from ``lr_at``, forward, ``loss.backward(); opt.step();
  opt.zero_grad()``, then the step's mean loss over both ranks with one ``all_reduce`` (the Trainer logs the
  same number, with one all-reduce per step too).
* ``polymae Trainer ZeRO-2`` / ``ZeRO-0`` (``--stages``, ZeRO-1 optional): the ``Trainer`` through its public
  API, as in ``train_speed.py`` (``setup()`` once, then per window ``train_step`` + ``MetricsLogger.record`` for
  each step inside ``process_settings()``: what ``train()`` runs per step, minus checkpoint writes), fed the
  in-memory batches.

Data: rank 0 writes synthetic shards once; every rank decodes the same ``--pool x 2`` micro-batches through
``ShardStream`` and keeps every second one from its rank on, so the ranks' batches are disjoint and the
same for every variant (step ``s`` uses the rank's batch ``s mod pool``). Masks: ``recipe.mask_generator``
(seeded by step and rank) for every variant. Check: the all-reduced mean loss per step of each
Trainer variant vs DDP (fp32: expect ~1e-6).

Timing: ``--warmup`` untimed steps per variant, then ``--repeats`` rounds in which each variant runs the
same ``--steps`` steps in rotated order. A barrier precedes every window; rank 0 times the window (first
batch request to the end of the last step, as in ``train_speed.py``). Global images/s = steps x micro-batch
x ranks / seconds; reported: median over rounds, min-max, ratio vs DDP (target >= 0.95).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import relaunch  # noqa: E402
from train_speed import (TARGET, PolymaeTrainer, Variant, add_host_malloc_arg, apply_host_malloc,  # noqa: E402
                         build_model, decode_pool, host_malloc_text, make_config, plain_forward, write_shards)


class DDPLoop(Variant):
    """Plain PyTorch DDP (gloo): the Trainer's model, param groups, fused AdamW, lr schedule and masks."""

    def __init__(self, cfg, pool: list[dict], rank: int):
        from torch.nn.parallel import DistributedDataParallel

        from polymae.pipeline.train.recipe import make_optimizer

        self.name = "plain PyTorch DDP (AdamW)"
        self.cfg, self.pool, self.rank = cfg, pool, rank
        self.module = build_model(cfg)
        self.model = DistributedDataParallel(self.module)
        self.opt = make_optimizer(self.module, cfg)
        self.losses = {}

    def run(self, first_step: int, n_steps: int) -> float:
        import torch.distributed as dist

        t0 = time.perf_counter()
        for step in range(first_step, first_step + n_steps):
            out = plain_forward(self.model, self.opt, self.cfg, self.pool[step % len(self.pool)], step, self.rank)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            loss = torch.tensor([out.loss.item()], dtype=torch.float64)
            dist.all_reduce(loss)
            self.losses[step] = float(loss[0]) / dist.get_world_size()
        return time.perf_counter() - t0


def worker(args) -> None:
    from synthetic import cpu_rank_setup

    cpu_rank_setup()
    apply_host_malloc(args)
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.ERROR)
    logging.getLogger("polymae").setLevel(logging.ERROR)
    rank, world = dist.get_rank(), dist.get_world_size()

    total = args.warmup + args.repeats * args.steps
    t_all = time.perf_counter()
    box = [tempfile.mkdtemp(prefix="polymae-speed-ddp-") if rank == 0 else None]
    dist.broadcast_object_list(box)
    tmp = box[0]
    root = os.path.join(tmp, "shards")
    try:
        if rank == 0:
            write_shards(root, n=args.pool * world * args.batch, size=args.img_size * 4 // 3)
        dist.barrier()
        stages = [("z2", 2)] + [(f"z{s}", s) for s in args.stages if s != 2]
        cfgs = {k: make_config(args, root, os.path.join(tmp, k), stage, total, world)
                for k, stage in [("ddp", 0)] + stages}
        labels = {k: f"polymae Trainer ZeRO-{s}" for k, s in stages}
        if args.ds_collectives:  # the same ZeRO-2 run with DeepSpeed's own gloo collectives
            stages.append(("z2ds", 2))
            cfgs["z2ds"] = make_config(args, root, os.path.join(tmp, "z2ds"), 2, total, world)
            cfgs["z2ds"].train.gloo_bucketed_comm = False
            labels["z2ds"] = "Trainer ZeRO-2, DS collectives"
        pool = decode_pool(cfgs["ddp"], args.pool * world)[rank::world]  # disjoint per rank, same for all variants
        variants: list[Variant] = [DDPLoop(cfgs["ddp"], pool, rank)]
        variants += [PolymaeTrainer(cfgs[k], pool, labels[k]) for k, s in stages]
        for v in variants:
            dist.barrier()
            v.run(0, args.warmup)
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(args.repeats):
            first = args.warmup + r * args.steps
            for k in range(len(variants)):
                v = variants[(r + k) % len(variants)]
                dist.barrier()
                times[v.name].append(v.run(first, args.steps))
        dist.barrier()
        wall = time.perf_counter() - t_all
        for v in reversed(variants):
            v.close()
        if rank == 0:
            report(args, variants, times, total, world, wall)
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.destroy_process_group()


def report(args, variants, times, total, world, wall) -> None:
    import deepspeed

    cfg = variants[0].cfg
    ips = {k: [args.steps * args.batch * world / t for t in ts] for k, ts in times.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}
    ref = variants[0]
    gap = {v.name: max(abs(v.losses[s] - ref.losses[s]) for s in range(total)) for v in variants[1:]}
    n_params = sum(p.numel() for p in ref.module.parameters())
    print(f"MultiMAE-{args.preset} ({n_params / 1e6:.2f} M params) at {args.img_size} px, {cfg.model.num_visible} of "
          f"{(args.img_size // 16) ** 2 * 3} tokens visible, {world} ranks x micro-batch {args.batch} "
          f"(global {world * args.batch}), fp32, CPU, gloo, {torch.get_num_threads()} torch thread(s) per rank, "
          f"{host_malloc_text(args)}")
    print(f"{args.repeats} interleaved rounds (order rotated each round) x {args.steps} timed steps per variant, "
          f"after {args.warmup} warm-up steps; global images/s = steps x batch x ranks / rank-0 window seconds")
    print()
    hdr = (f"{'variant':<30} | {'median img/s':>12} | {'min - max img/s':>17} | {'vs DDP':>6} | {'target':>8}    | "
           f"{'max |loss - DDP|':>16}")
    print(hdr)
    print("-" * len(hdr))
    for v in variants:
        k = v.name
        ratio = med[k] / med[ref.name]
        verdict = "" if v is ref else ("ok" if ratio >= TARGET else "BELOW")
        tgt = "" if v is ref else f">= {TARGET:.2f}"
        g = "" if v is ref else f"{gap[k]:.2e}"
        print(f"{k:<30} | {med[k]:>12.2f} | {min(ips[k]):>7.2f} - {max(ips[k]):>7.2f} | {ratio:>6.3f} | "
              f"{tgt:>8} {verdict:<5} | {g:>16}")
    print()
    print(f"losses (DDP, mean of both ranks): step 0 {ref.losses[0]:.4f}, step {total - 1} {ref.losses[total - 1]:.4f}; "
          f"loss column: max over all {total} steps")
    print(f"wall {wall:.0f} s (workers); load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}, deepspeed {deepspeed.__version__}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="ViT preset of multimae_<preset> (default tiny)")
    ap.add_argument("--img-size", type=int, default=128, help="pixels, multiple of 16 (default 128)")
    ap.add_argument("--batch", type=int, default=32, help="micro-batch per rank (default 32)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round (default 5)")
    ap.add_argument("--repeats", type=int, default=4, help="interleaved rounds (default 4)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    ap.add_argument("--num-visible", type=int, default=0, help="visible tokens (default: 1/6 of all, as MultiMAE)")
    ap.add_argument("--pool", type=int, default=4, help="distinct in-memory batches per rank (default 4)")
    ap.add_argument("--stages", type=int, nargs="+", default=[2, 0], choices=[0, 1, 2],
                    help="Trainer ZeRO stages to compare with DDP (default 2 0; add 1 for ZeRO-1)")
    ap.add_argument("--ds-collectives", action="store_true",
                    help="add a ZeRO-2 variant with train.gloo_bucketed_comm=false (DeepSpeed's own reduce and "
                         "all-gather messages on gloo) to measure polymae's bucketed ones against it")
    ap.add_argument("--nproc", type=int, default=2, help="ranks when launching itself (default 2)")
    add_host_malloc_arg(ap)
    args = ap.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        worker(args)
        return

    t0 = time.perf_counter()
    rc = relaunch(__file__, args.nproc, argv)
    print(f"end to end (torchrun launch included) {time.perf_counter() - t0:.0f} s")
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
