"""Full-size MultiMAE ViT-H (``jobs/configs/multimae_vit_huge.yaml``): a few ZeRO-3 optimizer steps on 2 CPU ranks.

Run ``python benchmarks/vith_step.py`` (it launches itself under ``torchrun --nproc_per_node=2``, gloo, 1 torch
thread per rank; 3-4 minutes on 2 cores; peak RSS ~9.9 GiB per rank, ~20 GiB in all). What runs is the recipe as
written (``model.preset=huge``: ViT-H/16, 32 blocks of width 1280; ``model.grad_checkpointing=true``; 224 px; 98
of 3 x 196 tokens visible; output adapters 256-d x 2 blocks, plus the official extra ``norm_rgb`` adapter) in its
memory-short form, ``train.zero_stage=3`` with ``train.zero_init=true`` (what the recipe's header says to set
where memory is short; ``--no-zero-init`` leaves zero_init off), with only what a 2-rank CPU run must change:
``train.precision=fp32`` (amp_bf16 is the GPU recipe), ``train.micro_batch=1``, ``train.global_batch=2`` (1 per
rank, no accumulation), ``data.num_workers=0``, the synthetic shards below, and the host allocator:

* ``--host-malloc release`` (default): ``train.keep_host_memory=false`` and ``MALLOC_MMAP_THRESHOLD_=131072`` in
  the ranks' environment, so glibc serves every block over 128 KiB with ``mmap`` and returns it on free; RSS then
  follows the live tensors. ``keep`` is the Trainer's CPU default (glibc keeps freed memory, no ``mmap``): the
  heap keeps every freed gather/gradient buffer it cannot reuse, and at ViT-H size the two ranks outgrow 24 GB in
  the first step (benchmarks/RESULTS.md).

``--set key=value`` adds any other config override; ``--ds-zero JSON`` adds DeepSpeed ``zero_optimization``
keys polymae's config does not have (e.g. ``stage3_max_live_parameters``), by wrapping the ``deepspeed_config``
the Trainer calls: a stand-in for a config key, named as such in the report.

Everything goes through polymae's public ``Trainer`` API, as ``Trainer.train()`` composes it: ``Trainer(cfg)``,
``setup()`` (process group, model built and seeded as the recipe builds it, fused AdamW, DeepSpeed engine,
loader), then ``train_step(iter(trainer.loader), step)`` per step inside ``process_settings()``, then
``close()``. Checkpoints are not written (a ViT-H checkpoint is ~10 GB of disk per save).

Data: rank 0 writes 8 synthetic 298-px samples (smooth colour fields + noise as JPEG, a depth ramp, a
150-class semseg from intensity bands) as 2 polymae shards + stats + a manifest whose semseg teacher has
``num_classes: 150`` (the ADE20K label set of the paper); each rank reads its part through the Trainer's own
loader (random-resized crop to 224 px + flip). The learning rate is the recipe's (warm-up over 25,023 steps, so
~1e-10 here): the losses of the 3 steps differ by their data and masks, not by training.

Printed per rank: Ψ (parameter count, ``ds_numel``), the model state DeepSpeed holds (its partitioned fp32
parameters, gradient partition, fp32 master partition and Adam m/v, inventoried from the engine and its
optimizer the way ``zero_memory.py`` does, aliases counted once) at the last step's end of backward and after
its optimizer step, next to the formulas 16Ψ/N (fp32 Adam: 4+4+8 bytes), 20Ψ/N (DeepSpeed 0.19 in fp32, which
keeps a cloned fp32 master partition) and the ZeRO paper's mixed-precision 16Ψ/N (2+2+12 bytes); the peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) after set-up and at the end; seconds per step; each step's
loss (all-reduced, so it must be the same on both ranks; checked, with finiteness). Progress lines (rank, time,
RSS) go to stderr as set-up and each step finish.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import cpu_env, torchrun_cmd  # noqa: E402
from synthetic import cpu_rank_setup, write_shards  # noqa: E402
from zero_memory import CATEGORIES, MODEL_STATE, inventory, rss_bytes  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "jobs", "configs", "multimae_vit_huge.yaml")
NUM_CLASSES = 150
GiB = 2**30
#: glibc mmap threshold for --host-malloc release (bytes; a fixed value also turns off glibc's dynamic threshold)
MMAP_THRESHOLD = "131072"


# ------------------------------------------------------------------------------------------ data
def overrides(args, root: str, out: str, world: int) -> list[str]:
    """The ``key=value`` overrides applied to the recipe YAML: what a 2-rank CPU run must change, then ``--set``."""
    keys = [f"output={out}", f"data.shards={root}", "data.num_workers=0", "data.shuffle_buffer=8", "train.zero_stage=3",
            "train.micro_batch=1", f"train.global_batch={world}", "train.precision=fp32",
            f"train.steps={args.steps}", "train.log_interval=1", "train.save_interval=1000000000"]
    if args.preset:
        keys.append(f"model.preset={args.preset}")
    if args.host_malloc == "release":
        keys.append("train.keep_host_memory=false")
    keys.append(f"train.zero_init={'true' if args.zero_init else 'false'}")
    return keys + list(args.set)


# ------------------------------------------------------------------------------------------ worker
def progress(rank: int, what: str) -> None:
    """One progress line on stderr (the report is on stdout): rank, what happened, RSS and peak RSS in GiB."""
    sys.stderr.write(f"[vith_step rank {rank} {time.strftime('%H:%M:%S')}] {what}; RSS {rss_bytes() / GiB:.2f} GiB, "
                     f"peak {max_rss() / GiB:.2f} GiB\n")
    sys.stderr.flush()


def max_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_steps(trainer, steps: int) -> tuple[list[dict], dict]:
    """``steps`` optimizer steps through ``Trainer.train_step`` inside ``process_settings()``; per step its
    seconds, losses, grad norm, RSS and peak RSS. During the last step the engine's model state is inventoried
    at the end of backward (B: ``engine.step`` is wrapped to look first; the inventory's own time is taken out of
    the step's seconds) and after the step (C)."""
    import torch.distributed as dist

    engine = trainer.engine
    snaps: dict[str, dict] = {}

    def snapshot_then_step(*a, **kw):
        """Inventory the engine's model state (once), then run ``DeepSpeedEngine.step``."""
        if "B" not in snaps:
            t0 = time.perf_counter()
            snaps["B"] = dict(inventory(engine).totals(), rss=rss_bytes())
            snaps["B"]["seconds"] = time.perf_counter() - t0  # taken out of the step's time
        return type(engine).step(engine, *a, **kw)

    rows = []
    batches = iter(trainer.loader)
    with trainer.process_settings():
        for step in range(steps):
            if step == steps - 1:
                engine.step = snapshot_then_step  # the instance attribute shadows the method
            dist.barrier()
            t0 = time.perf_counter()
            result = trainer.train_step(batches, step, log=True)
            dt = time.perf_counter() - t0 - snaps.get("B", {}).get("seconds", 0.0)
            m = result.metrics
            rows.append({"step": step + 1, "seconds": dt, "loss": m["loss"], "losses": m["losses"],
                         "grad_norm": m["grad_norm"], "lr": m["lr"], "rss": rss_bytes(), "max_rss": max_rss()})
            progress(trainer.rank, f"step {step + 1} in {dt:.1f} s, loss {m['loss']:.6f}")
        del engine.step
        snaps["C"] = dict(inventory(engine).totals(), rss=rss_bytes())
    return rows, snaps


def extra_zero_keys(extra: dict):
    """Stand-in for config keys polymae does not have (``--ds-zero``): wrap the ``deepspeed_config`` the Trainer
    calls so its ``zero_optimization`` also gets ``extra`` (e.g. ``stage3_max_live_parameters``,
    ``offload_optimizer``). Returns a function that undoes the wrap. Not the recipe: the report names these keys."""
    import polymae.pipeline.train.trainer as trainer_module

    original = trainer_module.deepspeed_config

    def with_extra(*a, **kw):
        """``deepspeed_config(...)`` with ``extra`` merged into its ``zero_optimization``."""
        cfg = original(*a, **kw)
        cfg["zero_optimization"].update(extra)
        return cfg

    trainer_module.deepspeed_config = with_extra

    def restore() -> None:
        """Put the Trainer's own ``deepspeed_config`` back."""
        trainer_module.deepspeed_config = original

    return restore


def worker(args) -> None:
    """One rank: write the shards (rank 0), set up the Trainer on the recipe, run the steps, gather, report."""
    from polymae.pipeline.config import load_config
    from polymae.pipeline.train.config import PretrainConfig
    from polymae.pipeline.train.trainer import Trainer

    cpu_rank_setup()
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.ERROR)
    logging.getLogger("polymae").setLevel(logging.ERROR)
    rank, world = dist.get_rank(), dist.get_world_size()
    t_all = time.perf_counter()
    box = [tempfile.mkdtemp(prefix="polymae-vith-") if rank == 0 else None]
    dist.broadcast_object_list(box)
    tmp = box[0]
    root, out = os.path.join(tmp, "shards"), os.path.join(tmp, "run")
    try:
        if rank == 0:
            write_shards(root, n=4 * world, size=args.img_size * 4 // 3, num_classes=args.classes)
        dist.barrier()
        cfg = load_config(PretrainConfig, args.config, overrides(args, root, out, world))
        res: dict = {"rank": rank, "rss0": rss_bytes(), "threads": torch.get_num_threads()}
        restore = extra_zero_keys(json.loads(args.ds_zero)) if args.ds_zero else None
        trainer = Trainer(cfg)
        progress(rank, "set-up starts")
        t0 = time.perf_counter()
        try:
            trainer.setup()
        finally:
            if restore is not None:
                restore()
        progress(rank, f"set-up done in {time.perf_counter() - t0:.1f} s")
        res.update(setup_s=time.perf_counter() - t0, rss_setup=rss_bytes(), max_rss_setup=max_rss(),
                   psi=sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters()),
                   optimizer=type(trainer.engine.optimizer).__name__,
                   ds_zero=trainer.ds_config["zero_optimization"])
        try:
            res["rows"], res["snaps"] = run_steps(trainer, args.steps)
        finally:
            trainer.close()
        res["max_rss"] = max_rss()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, res)
        if rank == 0:
            print(report(args, cfg, gathered, time.perf_counter() - t_all))
            sys.stdout.flush()
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ report
def gib(x: float) -> str:
    """Bytes as GiB (2**30) with 3 decimals."""
    return f"{x / GiB:.3f}"


def grad_norm(x: float | None) -> str:
    """The logged global gradient norm (9 characters; ``-`` when DeepSpeed did not compute one)."""
    return f"{x:>9.4f}" if x is not None else f"{'-':>9}"


def model_state(r: dict) -> dict[str, int]:
    """One rank's per-category bytes, each at its larger over the instants B and C."""
    return {c: max(r["snaps"][k][c] for k in "BC") for c in CATEGORIES}


def report(args, cfg, ranks: list[dict], wall: float) -> str:
    """The printed result (sizes in GiB = 2**30 bytes) from every rank's measurements."""
    import deepspeed

    n = len(ranks)
    psi = ranks[0]["psi"]
    m = cfg.model
    tokens = (cfg.data.img_size // cfg.patch_size) ** 2 * len(m.active_modalities())
    lines = [
        f"{m.model_name} from {os.path.relpath(args.config, ROOT)}: Ψ = {psi:,} parameters ({gib(4 * psi)} GiB fp32); "
        f"{cfg.data.img_size} px, {m.num_visible} of {tokens} tokens visible, decoders {m.decoder_dim}-d x "
        f"{m.decoder_depth}, {args.classes} semseg classes, grad_checkpointing={m.grad_checkpointing}",
        f"ZeRO-{cfg.train.zero_stage}, zero_init={cfg.train.zero_init}, {cfg.train.precision}, N = {n} ranks "
        f"(torchrun, gloo, {ranks[0]['threads']} torch thread per rank), micro-batch {cfg.train.micro_batch}, "
        f"global batch {cfg.train.global_batch}; optimizer {ranks[0]['optimizer']} around fused AdamW; overrides: "
        + " ".join(overrides(args, "<tmp>/shards", "<tmp>/run", n)),
        f"host allocator: train.keep_host_memory={cfg.train.keep_host_memory}, MALLOC_MMAP_THRESHOLD_="
        f"{os.environ.get('MALLOC_MMAP_THRESHOLD_', '(unset)')}",
        f"DeepSpeed zero_optimization: {ranks[0]['ds_zero']}"
        + (f"\n  of which NOT from polymae's config (--ds-zero, wrapping recipe.deepspeed_config): {args.ds_zero}"
           if args.ds_zero else ""),
        "",
        "Model state per rank, GiB (2**30 B), each category at its larger over B = end of step "
        f"{args.steps}'s backward, C = after its optimizer step:",
    ]
    hdr = (f"{'rank':>4} | {'params':>7} {'grads':>7} {'master':>7} {'Adam':>7} | {'model st.':>9} | "
           f"{'16Ψ/N':>7} {'ratio':>5} | {'20Ψ/N DS':>8} {'ratio':>5} | {'paper':>7} | {'buckets':>7} {'other':>7}")
    lines += [hdr, "-" * len(hdr)]
    fp32, ds, paper = 16 * psi / n, 20 * psi / n, (2 + 2 + 12) * psi / n
    for r in ranks:
        c = model_state(r)
        ms = sum(c[k] for k in MODEL_STATE)
        lines.append(f"{r['rank']:>4} | {gib(c['params']):>7} {gib(c['grads']):>7} {gib(c['fp32 master']):>7} "
                     f"{gib(c['Adam m+v']):>7} | {gib(ms):>9} | {gib(fp32):>7} {ms / fp32:>5.2f} | {gib(ds):>8} "
                     f"{ms / ds:>5.2f} | {gib(paper):>7} | {gib(c['buckets']):>7} {gib(c['other']):>7}")
    lines += [
        "16Ψ/N    = fp32 Adam, no master copy: params 4Ψ/N + grads 4Ψ/N + Adam m,v 8Ψ/N (ZeRO-3, Pos+g+p)",
        "20Ψ/N DS = what DeepSpeed 0.19 keeps in fp32: the above + a cloned fp32 master partition 4Ψ/N",
        "paper    = Rajbhandari et al. 2020 Fig. 1, mixed precision (K=12): fp16 params 2Ψ/N + fp16 grads 2Ψ/N + "
        "fp32 master, m, v 12Ψ/N = 16Ψ/N",
        "buckets  = ZeRO-3 ipg reduce bucket (residual state, outside the formulas); other = scalars",
        "",
        "Per step (seconds = one train_step, all ranks; loss = all-reduced mean over ranks as train_step logs it, "
        "then its parts; RSS in GiB):",
    ]
    names = m.loss_names()
    hdr = (f"{'step':>4} | " + " ".join(f"{'s r' + str(r['rank']):>7}" for r in ranks) + " | "
           + " ".join(f"{'loss r' + str(r['rank']):>10}" for r in ranks) + " | "
           + " ".join(f"{k:>8}" for k in names) + " | "
           f"{'grad norm':>9} | {'lr':>8} | " + " ".join(f"{'RSS r' + str(r['rank']):>8}" for r in ranks))
    lines += [hdr, "-" * len(hdr)]
    for i, row0 in enumerate(ranks[0]["rows"]):
        rows = [r["rows"][i] for r in ranks]
        ls = row0["losses"]
        lines.append(f"{row0['step']:>4} | " + " ".join(f"{x['seconds']:>7.1f}" for x in rows) + " | "
                     + " ".join(f"{x['loss']:>10.6f}" for x in rows) + " | "
                     + " ".join(f"{ls.get(k, float('nan')):>8.4f}" for k in names)
                     + f" | {grad_norm(row0['grad_norm'])} | {row0['lr']:>8.2e} | "
                     + " ".join(f"{gib(x['rss']):>8}" for x in rows))
    losses = [[x["loss"] for x in r["rows"]] for r in ranks]
    finite = all(math.isfinite(v) for ls in losses for v in ls)
    gap = max(abs(a - b) for ls in losses[1:] for a, b in zip(losses[0], ls)) if n > 1 else 0.0
    lines += [
        "",
        f"losses finite: {'yes' if finite else 'NO'}; equal on all ranks: {'yes' if gap == 0 else 'NO'} "
        f"(max |difference| {gap:.2e})",
        "set-up (model build + deepspeed.initialize + loader), s: "
        + ", ".join(f"r{r['rank']} {r['setup_s']:.1f}" for r in ranks),
        "peak RSS (ru_maxrss), GiB: "
        + ", ".join(f"r{r['rank']} {gib(r['max_rss_setup'])} after set-up, {gib(r['max_rss'])} at the end"
                    for r in ranks)
        + f"; sum of the ranks' peaks {gib(sum(r['max_rss'] for r in ranks))} GiB of "
          f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / GiB:.1f} GiB RAM",
        "RSS at B / C of the last step, GiB: "
        + ", ".join(f"r{r['rank']} {gib(r['snaps']['B']['rss'])} / {gib(r['snaps']['C']['rss'])}" for r in ranks),
        f"wall {wall:.0f} s (workers, shard writing included); load average at the end {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}, deepspeed {deepspeed.__version__}",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    """Parse arguments; under torchrun run a rank, otherwise launch ``--nproc`` ranks of this script."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=RECIPE, help="recipe YAML (default jobs/configs/multimae_vit_huge.yaml)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    ap.add_argument("--no-zero-init", dest="zero_init", action="store_false",
                    help="train.zero_init=false: every rank builds the whole model before DeepSpeed partitions it")
    ap.add_argument("--preset", default="", help="override model.preset (e.g. tiny, to try the script quickly)")
    ap.add_argument("--img-size", type=int, default=224, help="pixels of the shards' crops (default 224)")
    ap.add_argument("--classes", type=int, default=NUM_CLASSES, help="semseg classes in the manifest (default 150)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further config override")
    ap.add_argument("--ds-zero", default="", metavar="JSON",
                    help="extra DeepSpeed zero_optimization keys as JSON, e.g. "
                         "'{\"stage3_max_live_parameters\": 20000000}': a stand-in for config keys polymae does not "
                         "have; printed in the report as not the recipe")
    ap.add_argument("--host-malloc", choices=["release", "keep"], default="release",
                    help="release (default): train.keep_host_memory=false and MALLOC_MMAP_THRESHOLD_=131072 for the "
                         "ranks, so glibc returns every freed block over 128 KiB to the OS and RSS follows the live "
                         "tensors; keep: the Trainer's CPU default (glibc keeps freed memory; RSS stays at its peak)")
    ap.add_argument("--nproc", type=int, default=2, help="ranks when launching itself (default 2)")
    args = ap.parse_args(argv)
    if args.img_size != 224:
        args.set = [f"data.img_size={args.img_size}"] + args.set
    if "LOCAL_RANK" in os.environ:  # started by torchrun
        worker(args)
        return
    t0 = time.perf_counter()
    extra = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD} if args.host_malloc == "release" else {}
    rc = subprocess.run(torchrun_cmd(__file__, args.nproc, sys.argv[1:] if argv is None else argv),
                        env=cpu_env(**extra)).returncode
    print(f"end to end (torchrun launch included) {time.perf_counter() - t0:.0f} s")
    raise SystemExit(rc)


if __name__ == "__main__":
    main()
