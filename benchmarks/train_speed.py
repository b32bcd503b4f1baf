"""Training throughput (images/s) of polymae's ``Trainer`` (DeepSpeed, world 1, fp32 on CPU) vs a plain PyTorch loop.

Run ``python benchmarks/train_speed.py`` (defaults finish in about 1-2 minutes on 2 cores). Everything runs
in one process, so the variants share the machine's conditions:

* ``plain``: the model built as the Trainer builds it (same seed, ``create_model`` +
  ``model_kwargs``), ``make_optimizer(model, cfg)`` (fused AdamW on ``param_groups``), and per step: set the lr from
  ``lr_at``, forward, ``loss.backward(); opt.step(); opt.zero_grad()``, ``loss.item()``.
* ``polymae ZeRO-2`` / ``polymae ZeRO-0``: polymae's ``Trainer`` (``polymae.pipeline.train.trainer``) through its
  public API, as ``Trainer.train()`` composes it: ``setup()`` once (DeepSpeed engine, patches), then per window,
  inside ``process_settings()`` and a ``metrics_logger()``, ``train_step(batches, step)`` (per-step loss
  all-reduce) and ``MetricsLogger.record`` (metrics.jsonl, TensorBoard, progress bar) for each step. Left out
  of ``train()``'s loop: checkpoint writes (checkpoint I/O is not training speed). Its batches are the same
  in-memory batches the plain loop gets.
* ``polymae ZeRO-2 + ShardStream`` (``--loader``, on by default): as ZeRO-2 but fed by the Trainer's real
  ``ShardStream`` loader (``Trainer.loader``) over synthetic shards written to a temporary folder (JPEG/PNG
  decode + augment in this process, ``data.num_workers=0``), i.e. including data loading. Its data differs, so
  its losses are not compared.

Same batches (pre-decoded once from the same synthetic shards through ``ShardStream``; step ``s`` uses
batch ``s mod pool``), same masks (every variant draws them from ``recipe.mask_generator(seed, step x 1024 + rank)``),
same lr schedule (``lr_at`` with the same config), same initial weights. As a check, the per-step losses
of the in-memory variants are compared (fp32 DeepSpeed at world 1 matches plain PyTorch to ~1e-6).

Timing: each variant first runs ``--warmup`` untimed steps, then ``--repeats`` rounds; in every round each
variant runs the same ``--steps`` steps, in an order rotated each round (A B C, B C A, ...), so slow
periods caused by other load on the machine hit all variants alike. A window is timed from the request
for its first batch until its last step has finished; for the Trainer that is until its metrics logger is
closed (per-step metrics/TensorBoard logging and the writer's close included; the writer's and progress bar's
creation at the start of each window excluded, as at the start of ``train()``). Reported: median over
rounds of images/s (= steps x micro-batch / seconds), min-max, and the ratio of medians polymae / plain
with the target >= 0.95.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import tempfile
import time
import warnings

import torch

TARGET = 0.95
NUM_CLASSES = 8
from synthetic import write_shards  # noqa: E402  (benchmarks/ is on sys.path when run)


# ------------------------------------------------------------------------------------------ data
def decode_pool(cfg, n_batches: int) -> list[dict]:
    """``n_batches`` micro-batches decoded and augmented once through the Trainer's ``ShardStream``."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream
    from polymae.datasets.transforms import MultiModalAugment

    aug = MultiModalAugment(img_size=cfg.data.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip)
    stream = ShardStream(shards.trusted_shard_urls(cfg.data.shards, cfg.data.split), cfg.train.micro_batch, aug,
                         seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, num_workers=0)
    it = iter(stream)
    return [next(it) for _ in range(n_batches)]


# ------------------------------------------------------------------------------------------ variants
class Variant:
    """One way of training; ``run(first_step, n_steps)`` trains those steps and returns seconds."""

    name = ""

    def run(self, first_step: int, n_steps: int) -> float:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the variant changed in the process (nothing by default)."""

    losses: dict[int, float]


class PlainLoop(Variant):
    """Plain PyTorch: the Trainer's model, param groups, lr schedule and masks, no DeepSpeed."""

    def __init__(self, cfg, pool: list[dict]):
        from polymae.pipeline.train.recipe import make_optimizer

        self.name = "plain PyTorch (AdamW)"
        self.cfg, self.pool = cfg, pool
        self.model = build_model(cfg)
        self.opt = make_optimizer(self.model, cfg)  # the same (fused) AdamW as the Trainer
        self.losses = {}

    def run(self, first_step: int, n_steps: int) -> float:
        t0 = time.perf_counter()
        for step in range(first_step, first_step + n_steps):
            out = plain_forward(self.model, self.opt, self.cfg, self.pool[step % len(self.pool)], step, rank=0)
            out.loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.losses[step] = out.loss.item()
        return time.perf_counter() - t0


def build_model(cfg):
    """The model as the Trainer builds it (seeded by ``train.seed``, ``create_model`` + ``model_kwargs``)."""
    from polymae.models.multimae import create_model
    from polymae.pipeline.train.data import shard_label_info
    from polymae.pipeline.train.recipe import model_kwargs

    n_cls, ignore = shard_label_info(cfg.data.shards, cfg.data.split)
    torch.manual_seed(cfg.train.seed)
    return create_model(cfg.model.model_name, **model_kwargs(cfg, n_cls, ignore))


def plain_forward(model, opt, cfg, batch: dict, step: int, rank: int):
    """A plain loop's step up to the loss: lr of ``step`` set on ``opt``, forward on ``batch`` with the Trainer's
    masking arguments and mask generator. Returns the model output."""
    from polymae.pipeline.train.recipe import lr_at, mask_generator, masking_kwargs

    lr = lr_at(step, cfg)
    for g in opt.param_groups:
        g["lr"] = lr
    from polymae.datasets.transforms import to_model_inputs

    return model(to_model_inputs(batch, "cpu", cfg.model.active_modalities()),
                 generator=mask_generator(cfg.train.seed, step * 1024 + rank), **masking_kwargs(cfg.model))


class PolymaeTrainer(Variant):
    """polymae's ``Trainer`` (built once) over in-memory batches (``pool``) or over its own ShardStream
    (``pool=None``): per window, what ``Trainer.train()`` runs per step except checkpoint writes."""

    def __init__(self, cfg, pool: list[dict] | None, label: str):
        from polymae.pipeline.train.trainer import Trainer

        self.name, self.cfg, self.pool = label, cfg, pool
        self.trainer = Trainer(cfg)
        self.trainer.setup()
        self.losses = {}
        self._stream_it = None

    def _batches(self, first: int, n: int):
        """The micro-batches of steps ``[first, first + n)`` (gradient accumulation: ``ga`` per step)."""
        for i in range(n * self.trainer.ga):
            if self.pool is not None:
                yield self.pool[(first + i // self.trainer.ga) % len(self.pool)]
            else:
                if self._stream_it is None:
                    self._stream_it = iter(self.trainer.loader)
                yield next(self._stream_it)

    def run(self, first_step: int, n_steps: int) -> float:
        tr = self.trainer
        batches = self._batches(first_step, n_steps)
        with tr.process_settings(), contextlib.redirect_stderr(io.StringIO()):  # the logger's tqdm bar
            with tr.metrics_logger(first_step) as logger:
                t0 = time.perf_counter()
                for step in range(first_step, first_step + n_steps):
                    result = tr.train_step(batches, step)
                    logger.record(step + 1, result.metrics)
                    self.losses[step] = result.metrics["loss"]
            t1 = time.perf_counter()
        return t1 - t0

    def close(self) -> None:
        """Undo the Trainer's process-global changes."""
        self.trainer.close()


class EngineLoop(Variant):
    """The Trainer's DeepSpeed engine (built by ``Trainer.setup``) driven by a bare loop: lr, ``Trainer.forward``,
    ``engine.backward``, ``engine.step``, ``loss.item()``; separates DeepSpeed's cost from the Trainer's."""

    def __init__(self, cfg, pool: list[dict], label: str):
        from polymae.pipeline.train.trainer import Trainer

        self.name, self.cfg, self.pool = label, cfg, pool
        self.trainer = Trainer(cfg)
        self.trainer.setup()
        self.losses = {}

    def run(self, first_step: int, n_steps: int) -> float:
        from polymae.pipeline.train.recipe import lr_at

        tr = self.trainer
        t0 = time.perf_counter()
        for step in range(first_step, first_step + n_steps):
            lr = lr_at(step, self.cfg)
            for g in tr.engine.optimizer.param_groups:
                g["lr"] = lr
            for micro in range(tr.ga):
                out = tr.forward(self.pool[step % len(self.pool)], step, micro)
                tr.engine.backward(out.loss)
                tr.engine.step()
                self.losses[step] = out.loss.item()
        return time.perf_counter() - t0

    def close(self) -> None:
        """Undo the Trainer's process-global changes."""
        self.trainer.close()


def make_config(args, root: str, out: str, stage: int, total_steps: int, world: int = 1):
    """The benchmark's ``PretrainConfig``: micro-batch ``args.batch`` per rank, global batch ``args.batch x world``."""
    from polymae.pipeline.train.config import PretrainConfig
    from polymae.pipeline.config import validate_tree

    cfg = PretrainConfig()
    cfg.output = out
    cfg.data.shards = root
    cfg.data.img_size = args.img_size
    cfg.data.num_workers = 0
    cfg.data.shuffle_buffer = 16
    cfg.model.preset = args.preset
    tokens = (args.img_size // 16) ** 2 * len(cfg.model.modalities)
    cfg.model.num_visible = args.num_visible or max(1, round(tokens * 98 / 588))  # MultiMAE's 1/6 at 224 px
    cfg.train.micro_batch = args.batch
    cfg.train.global_batch = args.batch * world
    cfg.train.zero_stage = stage
    cfg.train.precision = "fp32"
    cfg.train.steps = total_steps
    cfg.train.save_interval = 10**9
    cfg.train.keep_host_memory = getattr(args, "host_malloc", "keep") == "keep"
    validate_tree(cfg)
    return cfg


# ------------------------------------------------------------------------------------------ host allocator
def add_host_malloc_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--host-malloc", choices=["keep", "default"], default="keep",
                    help="keep: glibc keeps freed memory (train.keep_host_memory, the Trainer's default on CPU), set "
                         "at the start so every variant, the plain loop included, runs with it; default: glibc's "
                         "own mmap/trim behaviour for every variant (default keep)")


def apply_host_malloc(args) -> None:
    """Set the host allocator for the whole process before any variant runs (all variants share it)."""
    from polymae.patches import keep_freed_host_memory

    if args.host_malloc == "keep" and keep_freed_host_memory() is None:
        raise SystemExit("--host-malloc keep needs glibc on Linux")


def host_malloc_text(args) -> str:
    return ("host malloc keeps freed memory (all variants)" if args.host_malloc == "keep"
            else "glibc default malloc (all variants)")


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="ViT preset of multimae_<preset> (default tiny)")
    ap.add_argument("--img-size", type=int, default=96, help="pixels, multiple of 16 (default 96)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch = global batch, world 1 (default 8)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant per round (default 10)")
    ap.add_argument("--repeats", type=int, default=6, help="interleaved rounds (default 6)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    ap.add_argument("--num-visible", type=int, default=0, help="visible tokens (default: 1/6 of all, as MultiMAE)")
    ap.add_argument("--pool", type=int, default=8, help="distinct in-memory batches (default 8)")
    ap.add_argument("--no-loader", dest="loader", action="store_false", help="skip the ShardStream variant")
    ap.add_argument("--breakdown", action="store_true",
                    help="add bare DeepSpeed-engine loops (ZeRO-2, ZeRO-0) without the Trainer around them")
    ap.add_argument("--json", help="also write the raw timings here")
    add_host_malloc_arg(ap)
    args = ap.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.ERROR)
    from polymae.pipeline.train.distributed import init_deepspeed_distributed

    init_deepspeed_distributed()
    apply_host_malloc(args)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    logging.getLogger("polymae").setLevel(logging.ERROR)

    total = args.warmup + args.repeats * args.steps
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="polymae-speed-") as tmp:
        root = os.path.join(tmp, "shards")
        write_shards(root, n=max(4 * args.batch, args.pool * args.batch), size=args.img_size * 4 // 3)
        cfgs = {k: make_config(args, root, os.path.join(tmp, k), stage, total)
                for k, stage in (("plain", 2), ("z2", 2), ("z0", 0), ("z2_loader", 2), ("e2", 2), ("e0", 0))}
        pool = decode_pool(cfgs["plain"], args.pool)
        variants: list[Variant] = [PlainLoop(cfgs["plain"], pool),
                                   PolymaeTrainer(cfgs["z2"], pool, "polymae Trainer ZeRO-2"),
                                   PolymaeTrainer(cfgs["z0"], pool, "polymae Trainer ZeRO-0")]
        if args.breakdown:
            variants += [EngineLoop(cfgs["e2"], pool, "bare DeepSpeed engine ZeRO-2"),
                         EngineLoop(cfgs["e0"], pool, "bare DeepSpeed engine ZeRO-0")]
        in_memory = list(variants)
        if args.loader:
            variants.append(PolymaeTrainer(cfgs["z2_loader"], None, "polymae Trainer ZeRO-2 + ShardStream"))
        for v in variants:
            v.run(0, args.warmup)
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in range(args.repeats):
            first = args.warmup + r * args.steps
            for k in range(len(variants)):
                v = variants[(r + k) % len(variants)]
                times[v.name].append(v.run(first, args.steps))
        loss_gap = max(abs(v.losses[s] - variants[0].losses[s]) for v in in_memory[1:] for s in range(total))
        for v in reversed(variants):
            v.close()
        wall = time.perf_counter() - t_all

    cfg = cfgs["plain"]
    ips = {k: [args.steps * args.batch / t for t in ts] for k, ts in times.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}
    plain = variants[0].name
    n_params = sum(p.numel() for p in variants[0].model.parameters())
    print(f"MultiMAE-{args.preset} ({n_params / 1e6:.2f} M params) at {args.img_size} px, {cfg.model.num_visible} of "
          f"{(args.img_size // 16) ** 2 * 3} tokens visible, micro-batch {args.batch}, world 1, fp32, CPU, "
          f"{torch.get_num_threads()} torch threads, {host_malloc_text(args)}")
    print(f"{args.repeats} interleaved rounds (order rotated each round) x {args.steps} timed steps per variant, "
          f"after {args.warmup} warm-up steps; images/s = steps x batch / window seconds")
    print()
    hdr = f"{'variant':<38} | {'median img/s':>12} | {'min - max img/s':>17} | {'vs plain':>8} | {'target':>8}"
    print(hdr)
    print("-" * len(hdr))
    for v in variants:
        k = v.name
        ratio = med[k] / med[plain]
        verdict = "" if k == plain else ("ok" if ratio >= TARGET else "BELOW")
        tgt = "" if k == plain else f">= {TARGET:.2f}"
        print(f"{k:<38} | {med[k]:>12.2f} | {min(ips[k]):>7.2f} - {max(ips[k]):>7.2f} | {ratio:>8.3f} | "
              f"{tgt:>8} {verdict}")
    print()
    print(f"losses (plain): step 0 {variants[0].losses[0]:.4f}, step {total - 1} {variants[0].losses[total - 1]:.4f}; "
          f"max |difference| of the other in-memory variants vs plain over all {total} steps: {loss_gap:.2e}")
    print(f"wall {wall:.0f} s; load average at the end {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; torch {torch.__version__}, deepspeed {deepspeed.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "seconds": times, "images_per_s": ips}, fh, indent=1)


if __name__ == "__main__":
    main()
