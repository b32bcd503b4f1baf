"""Gloo (CPU) collectives at ZeRO-1/2's message sizes: one message vs buckets, reduce vs all-reduce.

Run ``python benchmarks/gloo_collectives.py`` (it launches itself under ``torchrun --nproc_per_node=2``; about
half a minute on 2 cores). For a flat fp32 parameter group of ``--numel`` elements (default 29.79 M, the
size of MultiMAE-small) each rank owns ``1/world`` of, it times, with 1 torch thread per rank:

* the parameter all-gather after the optimizer step (ZeRO paper, Rajbhandari et al. 2020, sec. 5), as
  DeepSpeed's ``deepspeed.runtime.utils.all_gather_dp_groups`` does it: one ``all_gather_into_tensor`` per
  group (its path when torch has that function) vs its bucketed path with ``allgather_bucket_size`` =
  polymae's ``GLOO_ALLGATHER_BUCKET`` (the path ``polymae.patches.bucketed_all_gather(True)`` selects), the latter through
  DeepSpeed's own function;
* the gradient reduction: ZeRO-2's per-owner ``reduce`` of each half (``reduce_scatter: true``, DeepSpeed's
  default) vs one ``all_reduce`` of the whole bucket (``reduce_scatter: false``, polymae's gloo default), and
  DDP's all-reduce for reference.

Every timing is the median of ``--repeats`` calls after a barrier; rank 0 prints milliseconds and GB/s of
the bytes each rank receives, and checks that both all-gather paths leave identical tensors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import relaunch  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls, each after a barrier (one untimed call first)."""
    import torch.distributed as dist

    fn()
    ts = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def worker(args) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's all_gather_into_tensor rename
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.utils import all_gather_dp_groups

    from polymae.patches import bucketed_all_gather
    from polymae.pipeline.train.distributed import GLOO_ALLGATHER_BUCKET, init_deepspeed_distributed

    init_deepspeed_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    n = args.numel - args.numel % (2 * world)
    flat = torch.randn(n, generator=torch.Generator().manual_seed(rank))
    parts = [list(flat.chunk(world))]
    groups = [dist.group.WORLD]

    def gather(bucketed: bool):
        def fn():
            with bucketed_all_gather(bucketed):
                all_gather_dp_groups(groups_flat=[flat], partitioned_param_groups=parts, dp_process_group=groups,
                                     start_alignment_factor=2, allgather_bucket_size=GLOO_ALLGATHER_BUCKET)
        return fn

    half = n // world

    def reduce_owners():
        handles = [dist.reduce(flat[r * half:(r + 1) * half], dst=r, async_op=True) for r in range(world)]
        for h in handles:
            h.wait()

    rows = [("all-gather, one message per group (DeepSpeed default)", gather(False), (world - 1) * half),
            (f"all-gather, {GLOO_ALLGATHER_BUCKET / 1e6:g} M-element buckets (polymae on gloo)", gather(True),
             (world - 1) * half),
            ("gradient reduce to each owner (reduce_scatter: true)", reduce_owners, (world - 1) * half),
            ("gradient all-reduce (reduce_scatter: false; DDP)", lambda: dist.all_reduce(flat), 2 * (world - 1) * half)]
    ms = [(name, timed(fn, args.repeats) * 1e3, nbytes * 4) for name, fn, nbytes in rows]
    # both all-gather paths must leave the same bytes: fill each rank's part, gather, compare
    results = []
    for bucketed in (False, True):
        flat.fill_(-1.0)
        parts[0][rank].copy_(torch.arange(half, dtype=torch.float32) + 1e7 * rank)
        gather(bucketed)()
        results.append(flat.clone())
    same = bool(torch.equal(results[0], results[1]))
    if rank == 0:
        print(f"{world} ranks, gloo, 1 torch thread per rank; flat fp32 group of {n / 1e6:.2f} M elements "
              f"({n * 4 / 2**20:.0f} MiB), {half / 1e6:.2f} M per rank; median of {args.repeats} calls")
        print()
        hdr = f"{'collective':<58} | {'ms':>8} | {'GB/s recv':>9}"
        print(hdr)
        print("-" * len(hdr))
        for name, t, nbytes in ms:
            print(f"{name:<58} | {t:>8.1f} | {nbytes / t / 1e6:>9.2f}")
        print()
        print(f"all-gather bucketed / one message: {ms[1][1] / ms[0][1]:.2f}x the time; "
              f"all-reduce / per-owner reduce: {ms[3][1] / ms[2][1]:.2f}x; both all-gather paths identical: {same}")
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch {torch.__version__}, "
              f"deepspeed {deepspeed.__version__}")
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=29_790_000, help="flat group size in fp32 elements (default "
                    "29.79 M, MultiMAE-small)")
    ap.add_argument("--repeats", type=int, default=9, help="timed calls per collective (default 9)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks when launching itself (default 2)")
    args = ap.parse_args(argv)
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        worker(args)
        return
    raise SystemExit(relaunch(__file__, args.nproc, argv))


if __name__ == "__main__":
    main()
