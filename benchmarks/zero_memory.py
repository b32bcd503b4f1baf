"""Per-rank model-state memory of polymae's DeepSpeed set-up for ZeRO stages 0, 1, 2 and 3 (2 ranks, fp32, CPU).

Run ``python benchmarks/zero_memory.py`` (driver; 1-2 minutes on 2 cores): for each stage it launches
itself under ``torchrun`` with 2 processes (``--worker``; fresh processes per stage, so the RSS readings
are per stage); rank 0 gathers both ranks' results into a JSON file and the driver prints one table.
Sizes are counted in bytes and printed in MiB (2**20 bytes).

What is built is what ``polymae.pipeline.train.trainer.Trainer`` builds: ``create_model`` with
``model_kwargs(cfg, ...)``, ``torch.optim.AdamW(param_groups(model, wd))`` as the client optimizer,
``deepspeed_config(cfg, world, "fp32")`` (its ZeRO buckets included) and, for stage 3,
``register_zero3_external_params``. Only the data is synthetic (random tensors of the right shapes).

Method (what "held by one rank" means):

* Two training steps run. Step 1 creates the Adam state. During step 2 the rank's tensors are
  inventoried at three instants: **A** end of autograd backward, just before DeepSpeed's gradient
  reduction (``engine.allreduce_gradients`` is wrapped to take the snapshot first), **B** after
  ``engine.backward``, **C** after ``engine.step``. Categories peak at different instants (ZeRO 0/1
  hold every full ``p.grad`` at A; ZeRO-2's gradient partition is filled during the reduction and
  is largest at B, while its grads sit in the reduce bucket at A), so the table gives each category
  at its largest over A, B and C -- the steady-state size of that model state -- and separately the
  largest total held at any one instant. The totals at A, B and C and the process RSS growth since
  before the model was built are printed below the table as a cross-check.
* Inventory: the module's parameters (``p`` and, under ZeRO-3, the partition ``p.ds_tensor``) and
  their ``p.grad``, then every tensor reachable from the DeepSpeed optimizer wrapper's attributes
  (lists, dicts and nested DeepSpeed objects are walked; the inner torch optimizer's ``state`` and
  ``param_groups`` too). That covers ZeRO 1/2's ``bit16_groups_flat`` (the flat buffer the module's
  parameters are views into), ``single_partition_of_fp32_groups``, ``averaged_gradients``,
  ``grads_in_partition`` and ``ipg_buckets``, and ZeRO-3's ``fp16_partitioned_groups_flat``,
  ``fp32_partitioned_groups_flat``, ``grad_partitions_flat_buffer``, ``ipg_buckets`` and persistent
  (never partitioned, below ``stage3_param_persistence_threshold``) parameters.
* Aliases are counted once: tensors are deduplicated by ``untyped_storage().data_ptr()`` and each
  storage counts its full ``nbytes()`` (a view into a flat buffer costs nothing extra; the buffer
  is counted whole, as allocated: pages of a large CPU buffer that were never written need not be
  resident). When several paths reach one storage the category is chosen by priority: buckets,
  fp32 master, Adam, grads, params (with ``contiguous_gradients`` the ``p.grad`` of ZeRO 2/3 are
  views into the reduce bucket, so they count as bucket).
* Categories: ``params`` (the model's working weights), ``grads``, ``fp32 master`` (DeepSpeed's own
  fp32 copy of this rank's partition: ``single_partition_of_fp32_groups`` /
  ``fp32_partitioned_groups_flat``), ``Adam m+v`` (the inner optimizer's ``state``), and
  ``buckets`` (``ipg`` reduce buckets: the ZeRO paper's residual-state buffers, kept out of the
  model-state total and shown separately). Tensors of other categories are negligible (< 1 KiB) and
  go to ``other``.
* Ψ is the parameter count (``ds_numel`` under ZeRO-3). Formulas are per-rank bytes for N = 2 ranks:
  the paper's mixed-precision Adam (Rajbhandari et al. 2020, Fig. 1, K = 12: 16Ψ, 4Ψ+12Ψ/N,
  2Ψ+14Ψ/N, 16Ψ/N); the fp32 form with no master copy (4Ψ params + 4Ψ grads + 8Ψ Adam: 16Ψ,
  4Ψ+4Ψ+8Ψ/N, 4Ψ+(4Ψ+8Ψ)/N, 16Ψ/N); and the fp32 form of what DeepSpeed 0.19 actually does, which
  clones this rank's partition into a separate fp32 master copy at stages 1-3 even when the weights
  are already fp32 (stage 0 with a client optimizer has none): 16Ψ, 8Ψ+12Ψ/N, 4Ψ+16Ψ/N, 20Ψ/N.

Not counted: activations, autograd temporaries, the transient flat buffers of the ZeRO-0 all-reduce and
the ZeRO-3 parameter all-gathers (alive only inside those calls), the process's Python/library memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import cpu_env, torchrun_cmd  # noqa: E402

STAGES = (0, 1, 2, 3)
MiB = 2**20
CATEGORIES = ("params", "grads", "fp32 master", "Adam m+v", "other", "buckets")
MODEL_STATE = ("params", "grads", "fp32 master", "Adam m+v", "other")
#: when several paths reach one storage, the earliest category here wins (p.grad views into a bucket are buckets)
PRIORITY = ("buckets", "fp32 master", "Adam m+v", "grads", "params", "other")


# ------------------------------------------------------------------------------------------ formulas
def paper_bytes(stage: int, psi: int, n: int) -> float:
    """ZeRO paper (Fig. 1) per-rank model-state bytes, mixed-precision Adam (fp16 params/grads, K = 12)."""
    return {0: 16 * psi, 1: 4 * psi + 12 * psi / n, 2: 2 * psi + 14 * psi / n, 3: 16 * psi / n}[stage]


def fp32_bytes(stage: int, psi: int, n: int) -> float:
    """fp32 adaptation with no separate master copy: fp32 params 4Ψ, fp32 grads 4Ψ, Adam m+v 8Ψ."""
    return {0: 16 * psi, 1: 8 * psi + 8 * psi / n, 2: 4 * psi + 12 * psi / n, 3: 16 * psi / n}[stage]


def deepspeed_fp32_bytes(stage: int, psi: int, n: int) -> float:
    """fp32 as DeepSpeed 0.19 does it: stages 1-3 add a cloned fp32 master partition (4Ψ/N)."""
    return {0: 16 * psi, 1: 8 * psi + 12 * psi / n, 2: 4 * psi + 16 * psi / n, 3: 20 * psi / n}[stage]


# ------------------------------------------------------------------------------------------ inventory
class Inventory:
    """Storages held by this rank, each counted once (by ``untyped_storage().data_ptr()``) in bytes."""

    def __init__(self) -> None:
        self.storages: dict[int, tuple[str, int, str]] = {}  # data_ptr -> (category, nbytes, path)

    def add(self, t: torch.Tensor | None, category: str, path: str) -> None:
        if t is None or not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        if st.nbytes() == 0:
            return
        old = self.storages.get(st.data_ptr())
        if old is None or PRIORITY.index(category) < PRIORITY.index(old[0]):
            self.storages[st.data_ptr()] = (category, st.nbytes(), path)

    def walk(self, obj, path: str, seen: set[int], depth: int = 0) -> None:
        """Add every tensor reachable from ``obj`` (DeepSpeed objects, torch optimizers, lists, dicts)."""
        if isinstance(obj, torch.Tensor):
            self.add(obj, categorize(path), path)
            return
        if depth > 8 or id(obj) in seen or isinstance(obj, (torch.nn.Module, str, bytes, int, float)):
            return
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            for i, x in enumerate(obj):
                self.walk(x, f"{path}[{i}]", seen, depth + 1)
        elif isinstance(obj, dict):
            for k, x in obj.items():
                self.walk(x, f"{path}[{k if isinstance(k, (str, int)) else type(k).__name__}]", seen, depth + 1)
        elif isinstance(obj, torch.optim.Optimizer):
            self.walk(obj.state, f"{path}.state", seen, depth + 1)
            self.walk(obj.param_groups, f"{path}.param_groups", seen, depth + 1)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
            for k, x in vars(obj).items():
                self.walk(x, f"{path}.{k}", seen, depth + 1)

    def totals(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for cat, nbytes, _ in self.storages.values():
            out[cat] += nbytes
        return out

    def listing(self) -> list[tuple[str, int, str]]:
        return sorted(((c, b, p) for c, b, p in self.storages.values()), key=lambda r: -r[1])


def categorize(path: str) -> str:
    """Category of a tensor reached through the optimizer walk, from its attribute path."""
    low = path.lower()
    if "ipg" in low:
        return "buckets"
    if ".state[" in path:
        return "Adam m+v"
    if "single_partition_of_fp32" in path or "fp32_partitioned_groups" in path or ".optimizer.param_groups" in path:
        return "fp32 master"
    if "grad_norm" in low:
        return "other"
    if "grad" in low:
        return "grads"
    return "params"


def inventory(engine) -> Inventory:
    """Everything ``engine`` holds on this rank for the model (see the module docstring)."""
    inv = Inventory()
    params = list(engine.module.parameters())
    for i, p in enumerate(params):
        inv.add(p.data, "params", f"module.param[{i}]")
    for i, p in enumerate(params):
        inv.add(p.grad, "grads", f"module.param[{i}].grad")
    for i, p in enumerate(params):
        inv.add(getattr(p, "ds_tensor", None), "params", f"module.param[{i}].ds_tensor")
    inv.walk(engine.optimizer, "opt", set())
    return inv


# ------------------------------------------------------------------------------------------ worker
def rss_bytes() -> int:
    """Resident set size of this process in bytes (``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def build_engine(args, stage: int, world: int):
    """Model, client AdamW and DeepSpeed engine as ``Trainer.setup`` builds them (fp32)."""
    import deepspeed

    from polymae.datasets.shards import semseg_ignore_value
    from polymae.models.multimae import create_model
    from polymae.pipeline.train.config import PretrainConfig
    from polymae.pipeline.train.recipe import (deepspeed_config, lr_at, model_kwargs, param_groups,
                                               register_zero3_external_params)

    cfg = PretrainConfig()
    cfg.data.img_size = args.img_size
    cfg.model.preset = args.preset
    cfg.model.num_visible = args.num_visible
    cfg.train.zero_stage = stage
    cfg.train.micro_batch = args.batch
    cfg.train.global_batch = args.batch * world
    cfg.train.precision = "fp32"
    ds_config = deepspeed_config(cfg, world, "fp32")
    torch.manual_seed(cfg.train.seed)
    model = create_model(f"multimae_{args.preset}",
                         **model_kwargs(cfg, args.classes, semseg_ignore_value(args.classes)))
    if stage == 3:
        register_zero3_external_params(model)
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=lr_at(0, cfg),
                            betas=tuple(cfg.optim.betas))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    return engine, cfg, ds_config


def measure_stage(args, stage: int, rank: int, world: int) -> dict:
    """Two steps of ZeRO ``stage``; inventories at A (before grad reduction), B (after backward), C (after step)."""
    rss0 = rss_bytes()
    engine, cfg, ds_config = build_engine(args, stage, world)
    psi = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    g = torch.Generator().manual_seed(1000 + rank)
    s, b = args.img_size, args.batch
    batch = {"rgb": torch.randn(b, 3, s, s, generator=g), "depth": torch.rand(b, 1, s, s, generator=g),
             "semseg": torch.randint(0, args.classes, (b, s // 4, s // 4), generator=g)}
    snaps: dict[str, Inventory] = {}
    rss: dict[str, int] = {}
    original = engine.allreduce_gradients

    def snapshot_then_reduce(*a, **kw):
        if "A" not in snaps:
            snaps["A"], rss["A"] = inventory(engine), rss_bytes()
        return original(*a, **kw)

    for step in range(2):
        if step == 1:
            engine.allreduce_gradients = snapshot_then_reduce  # the instance attribute shadows the method
        out = engine(batch, num_visible=cfg.model.num_visible, generator=torch.Generator().manual_seed(step))
        engine.backward(out.loss)
        if step == 1:
            snaps["B"], rss["B"] = inventory(engine), rss_bytes()
        engine.step()
    snaps["C"], rss["C"] = inventory(engine), rss_bytes()
    res = {"stage": stage, "rank": rank, "psi": psi,
           "reduce_bucket": int(engine.zero_reduce_bucket_size()),
           "contiguous_gradients": bool(engine.zero_contiguous_gradients()),
           "optimizer": type(engine.optimizer).__name__, "rss": rss, "rss0": rss0,
           **{k: inv.totals() for k, inv in snaps.items()}}
    if args.list:
        res["listing"] = {k: [(c, n, p) for c, n, p in inv.listing() if n >= 1 << 20] for k, inv in snaps.items()}
    del engine, out, snaps
    return res


def worker(args) -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    from polymae.pipeline.train.distributed import init_deepspeed_distributed

    init_deepspeed_distributed()
    import deepspeed
    import torch.distributed as dist

    deepspeed.utils.logger.setLevel(logging.WARNING)
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for stage in args.stages:
        t0 = time.perf_counter()
        res = measure_stage(args, stage, rank, world)
        res["seconds"] = time.perf_counter() - t0
        gathered: list = [None] * world
        dist.all_gather_object(gathered, res)
        results.append(gathered)
        dist.barrier()
    if rank == 0:
        with open(args.out, "w") as fh:
            json.dump({"world": world, "threads": torch.get_num_threads(), "results": results}, fh)


# ------------------------------------------------------------------------------------------ driver
def mib(x: float) -> str:
    return f"{x / MiB:.1f}"


def state_columns(r: dict) -> dict[str, int]:
    """Per-category bytes for one rank: each category at its largest over the instants A, B, C."""
    return {c: max(r[k][c] for k in "ABC") for c in CATEGORIES}


def peak_held(r: dict) -> tuple[int, str]:
    """Largest total (model state + buckets) held at one instant, and that instant."""
    return max((sum(r[k].values()), k) for k in "ABC")


def report(data: dict, args) -> str:
    """The printed table (bytes shown in MiB) from the rank results."""
    n = data["world"]
    rows = data["results"]
    psi = rows[0][0]["psi"]
    lines = [f"MultiMAE-{args.preset} at {args.img_size} px, {args.classes} semseg classes: "
             f"Ψ = {psi:,} parameters ({mib(4 * psi)} MiB in fp32); N = {n} ranks; fp32; micro-batch {args.batch}; "
             "client AdamW; polymae deepspeed_config.",
             "Per-rank MiB (2**20 bytes), rank 0 (rank 1's model state in brackets). Each category at its largest over "
             "A = end of autograd backward (before grad reduction), B = after engine.backward, C = after engine.step "
             "(step 2).", ""]
    hdr = (f"{'ZeRO':>4} | {'params':>7} {'grads':>7} {'master':>7} {'Adam':>7} | {'model st.':>9} {'[rank 1]':>9} | "
           f"{'paper':>7} {'ratio':>5} | {'fp32':>7} {'ratio':>5} | {'fp32 DS':>7} {'ratio':>5} | "
           f"{'vs Z0':>5} || {'buckets':>7} | {'peak held':>11} {'vs Z0':>5}")
    lines += [hdr, "-" * len(hdr)]
    base_ms = base_peak = None
    for per_rank in rows:
        r0 = per_rank[0]
        st = r0["stage"]
        cols = state_columns(r0)
        ms = sum(cols[c] for c in MODEL_STATE)
        ms1 = sum(state_columns(per_rank[-1])[c] for c in MODEL_STATE)
        peak, at = peak_held(r0)
        if st == 0:
            base_ms, base_peak = ms, peak
        p, f, d = paper_bytes(st, psi, n), fp32_bytes(st, psi, n), deepspeed_fp32_bytes(st, psi, n)
        vs0 = f"{ms / base_ms:>5.2f}" if base_ms else f"{'-':>5}"
        pvs0 = f"{peak / base_peak:>5.2f}" if base_peak else f"{'-':>5}"
        lines.append(
            f"{st:>4} | {mib(cols['params']):>7} {mib(cols['grads']):>7} {mib(cols['fp32 master']):>7} "
            f"{mib(cols['Adam m+v']):>7} | {mib(ms):>9} {'[' + mib(ms1) + ']':>9} | {mib(p):>7} {ms / p:>5.2f} | "
            f"{mib(f):>7} {ms / f:>5.2f} | {mib(d):>7} {ms / d:>5.2f} | {vs0} || {mib(cols['buckets']):>7} | "
            f"{mib(peak) + ' @' + at:>11} {pvs0}")
    lines += ["",
              "paper   = Rajbhandari et al. 2020 Fig. 1, mixed-precision Adam (K=12): 16Ψ | 4Ψ+12Ψ/N | 2Ψ+14Ψ/N | 16Ψ/N",
              "fp32    = fp32 params 4Ψ, grads 4Ψ, Adam m+v 8Ψ, no master copy: 16Ψ | 4Ψ+4Ψ+8Ψ/N | 4Ψ+(4Ψ+8Ψ)/N | 16Ψ/N",
              "fp32 DS = what DeepSpeed 0.19 keeps in fp32: params 4Ψ|4Ψ|4Ψ|4Ψ/N + grads 4Ψ|4Ψ|4Ψ/N|4Ψ/N + cloned fp32 "
              "master 0|4Ψ/N|4Ψ/N|4Ψ/N + Adam 8Ψ|8Ψ/N|8Ψ/N|8Ψ/N",
              "          = 16Ψ | 8Ψ+12Ψ/N | 4Ψ+16Ψ/N | 20Ψ/N",
              "model st. = params + grads + master + Adam (+ scalars), aliases counted once; ratios = model st. / formula.",
              "buckets = ZeRO ipg reduce buckets as allocated (residual state, outside the formulas); peak held = largest "
              "model st. + buckets at one instant.",
              "Per instant, MiB, rank 0: model state (+ buckets), and process RSS growth since before the model was "
              "built (includes activations and allocator slack; pages never written are not resident):"]
    for per_rank in rows:
        r0 = per_rank[0]
        parts = [f"{k}={mib(sum(r0[k][c] for c in MODEL_STATE))}(+{mib(r0[k]['buckets'])}) "
                 f"rss+{mib(r0['rss'][k] - r0['rss0'])}"
                 for k in "ABC"]
        cfg = (f", reduce_bucket_size {r0['reduce_bucket']:.0e}{', contiguous grads' if r0['contiguous_gradients'] else ''}"
               if r0["stage"] else "")
        lines.append(f"  ZeRO-{r0['stage']}: " + " | ".join(parts) + f"  [{r0['optimizer']}{cfg}]")
    if args.list:
        for per_rank in rows:
            for k, listing in per_rank[0]["listing"].items():
                lines.append(f"Storages >= 1 MiB at {k}, ZeRO-{per_rank[0]['stage']} rank 0:")
                lines += [f"    {c:11s} {mib(b):>8} MiB  {p}" for c, b, p in listing]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="base", help="ViT preset of multimae_<preset> (default base)")
    ap.add_argument("--img-size", type=int, default=64, help="pixels (multiple of 16; default 64)")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per rank (default 2)")
    ap.add_argument("--num-visible", type=int, default=16, help="visible tokens per sample (default 16)")
    ap.add_argument("--classes", type=int, default=151, help="semseg classes (default 151, ADE20K-sized head)")
    ap.add_argument("--stages", type=int, nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--list", action="store_true", help="also list every storage >= 1 MiB held at A, B and C")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return

    env = cpu_env(MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"))
    shared = ["--preset", args.preset, "--img-size", str(args.img_size), "--batch", str(args.batch),
              "--num-visible", str(args.num_visible), "--classes", str(args.classes)] + (["--list"] if args.list else [])
    t0 = time.perf_counter()
    data: dict = {"results": []}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:  # one torchrun per stage: fresh processes, so RSS readings are per stage
            out = os.path.join(tmp, f"stage{stage}.json")
            cmd = torchrun_cmd(__file__, args.nproc, ["--worker", "--out", out, "--stages", str(stage), *shared])
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode != 0 or not os.path.exists(out):
                sys.stderr.write(r.stdout[-4000:] + r.stderr[-8000:])
                raise SystemExit(f"ZeRO-{stage} worker failed (exit {r.returncode})")
            with open(out) as fh:
                part = json.load(fh)
            data.update(world=part["world"], threads=part["threads"])
            data["results"] += part["results"]
    print(report(data, args))
    print(f"(one torchrun of {args.nproc} ranks x {data['threads']} thread(s) per stage; wall "
          f"{time.perf_counter() - t0:.0f} s; torch {torch.__version__}, deepspeed {version('deepspeed')})")

if __name__ == "__main__":
    main()
