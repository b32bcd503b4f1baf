"""MultiMAE / MAE pre-training with DeepSpeed ZeRO: the :class:`Trainer`, composed of public parts.

``Trainer.train()`` is a short loop over :meth:`Trainer.train_step` (one optimizer step), a
:class:`~polymae.pipeline.train.metrics_log.MetricsLogger` and a
:class:`~polymae.pipeline.train.checkpoint.Checkpointer`; each part can be driven on its own
(``benchmarks/train_speed.py`` runs ``train_step`` in timed windows). The recipe (schedule, optimizer groups,
masks, DeepSpeed config) is in ``recipe.py``, the config in ``config.py``, the data in ``data.py``.

The data stream, the masks (seeded by ``(seed, step, micro-step, rank)``) and the learning rate are functions of
the step, so ``resume=true`` continues exactly from the newest complete checkpoint (all ranks checked to resume
from the same step). Every change to process-global state (host allocator, torch seed, DeepSpeed's all-gather path
and backward all-reduce, the preemption-signal handler) goes through ``polymae.patches`` and is undone when
``train()`` ends (docs/ARCHITECTURE.md, "Where each concern lives").

Preemption: ``train.preempt_signal`` (SIGTERM or SIGUSR1, what Slurm's ``--signal`` sends ahead of the time limit)
makes every rank finish the current step, save a checkpoint and stop; :attr:`Trainer.preempted` is then True and
``polymae pretrain`` exits with :data:`PREEMPTED_EXIT_CODE`, on which ``slurm/pretrain.sbatch`` requeues the job.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from polymae.datasets.loader import global_batch_of
from polymae.datasets.transforms import to_model_inputs
from polymae.pipeline.config import ConfigError, save_config, to_dict
from polymae.pipeline.train.checkpoint import (MODEL_CONFIG, Checkpointer, ResumePlan, agreed_step, prepare_universal,
                                               resume_plan)
from polymae.pipeline.train.config import PretrainConfig
from polymae.pipeline.train.data import build_loader, shard_label_info
from polymae.pipeline.train.metrics_log import MetricsLogger, device_peak_flops, peak_memory_gib
from polymae.pipeline.train.publisher import background_publisher
from polymae.pipeline.train.recipe import (bucketed_gloo_comm, deepspeed_config, lr_at, make_optimizer, mask_generator,
                                           masking_kwargs, model_kwargs, register_zero3_external_params)

log = logging.getLogger(__name__)

#: exit status of a run stopped early by ``train.preempt_signal`` after saving its checkpoint: 75 is sysexits.h's
#: EX_TEMPFAIL ("temporary failure, try again"), distinct from success (0), Python errors (1), usage errors (2)
#: and deaths by signal (128 + n); slurm/pretrain.sbatch requeues the job on it and only on it
PREEMPTED_EXIT_CODE = 75


@dataclass(frozen=True)
class StepResult:
    """What :meth:`Trainer.train_step` returns for one optimizer step.

    Attributes:
        metrics: on a logging step, the ``metrics.jsonl`` row (see ``metrics_log.py``): ``step`` (1-based),
            ``loss`` and ``losses`` averaged over all ranks, micro-batches and the steps since the last logged
            one, ``lr``, ``grad_norm``, throughput over those steps, memory; ``None`` on other steps.
        stop: some rank was asked to stop (``train.preempt_signal``) during the step; all ranks agree on it.
        data_wait_s: seconds this rank waited for its micro-batches.
    """

    metrics: dict[str, Any] | None
    stop: bool
    data_wait_s: float


class Trainer:
    """Runs pre-training for one ``PretrainConfig`` on this rank.

    Files under ``cfg.output`` (docs/ARCHITECTURE.md, "Run folder and release"): ``config.yaml`` (resolved),
    ``model_config.json`` (the model's ``init_kwargs``), ``checkpoints/step-XXXXXXXX/`` + ``checkpoints/latest``
    (DeepSpeed), ``metrics.jsonl`` (one line per logged step), ``tb/`` (TensorBoard).

    Use: ``Trainer(cfg).train()``; or :meth:`setup`, then :meth:`train_step` / :meth:`forward` inside
    ``with trainer.process_settings():``, then :meth:`close`.
    """

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        self.engine = None  # the DeepSpeed engine, built by setup()
        self.checkpointer: Checkpointer | None = None
        self.loader = None  # this rank's micro-batches (DataLoader over self.stream)
        self.stream = None
        self.start_step = 0  # optimizer steps already done (resume)
        self.flops_per_sample: float | None = None  # training FLOPs per sample, counted once (MFU)
        self.tokens_per_sample: int | None = None  # encoder tokens per sample (tokens/s)
        self._stop = False
        self.preempted = False  # train() stopped early on the preemption signal (after saving)
        self._patches: list = []  # polymae.patches handles of setup(), restored by close()
        # device-side sums of [total loss, per-modality losses] since the last logged step (no host sync per step)
        self._loss_sums: torch.Tensor | None = None
        self._interval = {"steps": 0, "seconds": 0.0, "wait": 0.0}
        self._flag_group = None  # process group for host-side flags (gloo beside NCCL; the default group on gloo)

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything once (later calls do nothing): process group, model (seeded by ``train.seed``),
        fused AdamW, DeepSpeed engine, checkpointer (and the resumed state when ``resume``), the run's
        ``config.yaml`` + ``model_config.json`` (rank 0) and this rank's loader.

        Raises:
            ConfigError: ``model.modalities`` has semseg but the shards have no semseg labels.
        """
        if self.engine is not None:
            return
        import deepspeed

        from polymae.patches import keep_freed_host_memory, skip_backward_allreduce
        from polymae.pipeline.train.distributed import init_deepspeed_distributed, use_cuda

        cfg = self.cfg
        init_deepspeed_distributed()
        if cfg.train.keep_host_memory and not use_cuda():
            self._patches.append(keep_freed_host_memory())
            log.info("host allocator keeps freed memory (train.keep_host_memory): %s", self._patches[-1] is not None)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if use_cuda() else torch.device("cpu")
        self.precision = cfg.train.resolved_precision(use_cuda())
        self.ga = cfg.train.global_batch // (cfg.train.micro_batch * self.world)
        self.ds_config = deepspeed_config(cfg, self.world, self.precision, gloo=not use_cuda())
        self.peak_flops = device_peak_flops(cfg.train.peak_tflops)
        self.readers = cfg.data.readers or self.world * max(1, cfg.data.num_workers)
        if self.world > 1:  # the stop flag is a host-side scalar: NCCL only takes CUDA tensors
            self._flag_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

        plan = self._resume_plan() if cfg.resume else None
        model = self._build_model()
        n_params = sum(p.numel() for p in model.parameters())
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg),
                                                                 config=self.ds_config)
        if self.world == 1 and cfg.train.zero_stage == 0:
            # nothing to average over one rank: skip DeepSpeed's flatten + all-reduce + unflatten of every grad
            self._patches.append(skip_backward_allreduce(self.engine))
        data = {"readers": self.readers, "micro_batch": cfg.train.micro_batch, "global_batch": cfg.train.global_batch}
        self.checkpointer = Checkpointer(self.engine, cfg.output, keep_last=cfg.train.keep_last, data=data)
        self.start_step = self._agree_resumed_step(self.checkpointer.load(plan)) if plan else 0
        if self.rank == 0:
            self._write_run_files(n_params)
        self.stream, self.loader = build_loader(cfg, self.rank, self.world, skip_batches=self.start_step * self.ga,
                                                readers=self.readers)

    def _resume_plan(self) -> ResumePlan:
        """The resume plan (:func:`resume_plan`) and its consequences, before the engine is built: the data
        layout's canonical readers (the run's, kept across world sizes), and for a ZeRO 1-3 checkpoint of another
        world size its universal conversion (collective) with ``checkpoint.load_universal`` in the DeepSpeed
        config.

        Raises:
            ConfigError: an impossible combination (see :func:`resume_plan`), or ``data.readers`` set to another
                value than the run's.
        """
        cfg = self.cfg
        plan = resume_plan(cfg.output, self.world, cfg.train.zero_stage,
                           {"micro_batch": cfg.train.micro_batch, "global_batch": cfg.train.global_batch})
        saved = plan.data.get("readers")
        if saved and cfg.data.readers and saved != cfg.data.readers:
            raise ConfigError("data.readers", f"the run in {cfg.output} reads its data through {saved} canonical "
                              f"readers; resuming with {cfg.data.readers} would change the data order: leave "
                              f"data.readers=0 (the run's value is kept)")
        if saved:
            self.readers = int(saved)
        elif plan.tag is not None:
            log.warning("checkpoint %s records no data layout (an older run): canonical readers = %d ranks x "
                        "workers now; the data order may differ from the run's before", plan.tag, self.readers)
        if plan.universal:
            log.warning("%s was saved by %s ranks at ZeRO stage %s; this run has %d ranks at stage %d: resuming "
                        "through a universal checkpoint", plan.tag, plan.world_size, plan.zero_stage, self.world,
                        cfg.train.zero_stage)
            prepare_universal(cfg.output, plan.tag)
            self.ds_config["checkpoint"] = {"load_universal": True}
        return plan

    def _agree_resumed_step(self, step: int) -> int:
        """``step`` once every rank is known to have resumed from it: every rank's step is gathered on the host flag
        group (one collective) and :func:`agreed_step` raises RuntimeError naming them on a mismatch."""
        if self._flag_group is None:
            return step
        steps = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(steps, torch.tensor([step], dtype=torch.int64), group=self._flag_group)
        return agreed_step([int(t.numpy()[0]) for t in steps])

    def _build_model(self) -> torch.nn.Module:
        """The model, seeded by ``train.seed`` (inside ``deepspeed.zero.Init`` for ZeRO-3 with ``zero_init``)."""
        import deepspeed

        from polymae.models.multimae import create_model
        from polymae.patches import global_torch_seed

        cfg = self.cfg
        n_cls, ignore = None, None
        if "semseg" in cfg.model.active_modalities():
            n_cls, ignore = shard_label_info(cfg.data.shards, cfg.data.split)
            if n_cls is None:
                raise ConfigError("model.modalities", f"semseg requested but shards under {cfg.data.shards} have none")
        self._patches.append(global_torch_seed(cfg.train.seed))
        zero_init = cfg.train.zero_stage == 3 and cfg.train.zero_init
        with deepspeed.zero.Init(config_dict_or_path=self.ds_config) if zero_init else contextlib.nullcontext():
            model = create_model(cfg.model.model_name, **model_kwargs(cfg, n_cls, ignore))
        if zero_init:  # partitioned as built: init_weights() skipped them; re-run it on the gathered parameters
            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                model.init_weights()
        if cfg.model.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if cfg.train.compile:  # per encoder block, lazily at the first forward; keeps names and module hooks
            model.encoder.compile_blocks()
        if cfg.train.zero_stage == 3:
            register_zero3_external_params(model)
        self.init_kwargs = dict(model.init_kwargs)
        return model

    def _write_run_files(self, n_params: int) -> None:
        """Rank 0: ``config.yaml`` (resolved) and ``model_config.json`` in the run folder; logs the run's shape."""
        from polymae.datasets import storage

        cfg, m = self.cfg, self.cfg.model
        storage.makedirs(cfg.output)
        save_config(cfg.resolved(), f"{cfg.output.rstrip('/')}/config.yaml")
        pretrain = {"img_size": cfg.data.img_size, "num_visible": m.num_visible, "alpha": m.alpha,
                    "mask_ratio": m.mask_ratio, "modalities": m.active_modalities(), "arch": m.arch}
        with open(os.path.join(cfg.output, MODEL_CONFIG), "w") as fh:
            json.dump({"name": m.model_name, "init_kwargs": self.init_kwargs, "pretrain": pretrain}, fh, indent=2)
        log.info("model %s: %.2f M parameters; ZeRO stage %d; %d ranks x micro-batch %d x accumulation %d = %d; %s",
                 m.model_name, n_params / 1e6, cfg.train.zero_stage, self.world, cfg.train.micro_batch, self.ga,
                 cfg.train.global_batch, self.precision)

    @contextlib.contextmanager
    def process_settings(self) -> Iterator[None]:
        """While inside: this run's process-wide settings, undone on exit (several Trainers may share a process,
        so each ``train()`` sets its own): on gloo with 2+ ranks the ZeRO-1/2 all-gather path
        (``train.gloo_bucketed_comm``, set either way to undo another Trainer's choice), and the handler of
        ``train.preempt_signal`` (Slurm preemption: finish the step, save, stop). Needs :meth:`setup` first."""
        from polymae.patches import bucketed_all_gather, signal_handlers
        from polymae.pipeline.train.distributed import use_cuda

        with contextlib.ExitStack() as stack:
            if self.world > 1 and not use_cuda():
                stack.enter_context(bucketed_all_gather(bucketed_gloo_comm(self.cfg, self.world, gloo=True)))
            stack.enter_context(signal_handlers(self._on_preempt, (getattr(signal, self.cfg.train.preempt_signal),)))
            yield

    def metrics_logger(self, first_step: int | None = None) -> MetricsLogger:
        """This run's :class:`MetricsLogger` (writing on rank 0 only), its bar starting at ``first_step``
        (default: the resumed step). Needs :meth:`setup` first."""
        cfg = self.cfg
        return MetricsLogger(cfg.output, total_steps=cfg.train.steps,
                             first_step=self.start_step if first_step is None else first_step,
                             log_interval=cfg.train.log_interval, enabled=self.rank == 0,
                             wandb_project=cfg.train.wandb_project, wandb_config=to_dict(cfg.resolved()))

    def close(self) -> None:
        """Undo :meth:`setup`'s process-global changes (host allocator, torch seed, backward all-reduce), newest
        first. The engine stays usable; idempotent."""
        for p in reversed(self._patches):
            if p is not None:
                p.restore()
        self._patches.clear()

    # -- one step -------------------------------------------------------------------------------
    def request_stop(self) -> None:
        """Ask the run to stop after the current step (all ranks learn of it in that step's all-reduce); the
        preemption-signal handler calls this."""
        self._stop = True

    def _on_preempt(self, signum: int, frame: Any) -> None:
        """Handler of ``train.preempt_signal``: log and :meth:`request_stop` (nothing else is safe in a handler)."""
        log.warning("%s: will save a checkpoint and stop after this step", signal.Signals(signum).name)
        self.request_stop()

    def forward(self, batch: dict, step: int, micro: int):
        """The engine's forward on one micro-batch of :func:`~polymae.pipeline.train.data.build_loader` (inputs
        moved to this rank's device), with masks drawn from :func:`mask_generator` seeded by the global micro-batch
        index ``(step x accumulation + micro) x world + rank``, the same whatever the world size.
        Returns the model output (``.loss`` scalar, ``.losses`` per modality, ``.masks`` ``[B, N]`` True = masked)."""
        inputs = to_model_inputs(batch, self.device, self.cfg.model.active_modalities())
        gen = mask_generator(self.cfg.train.seed, global_batch_of(step * self.ga + micro, self.rank, self.world))
        return self.engine(inputs, generator=gen, **masking_kwargs(self.cfg.model))

    def _forward_backward(self, batch: dict, step: int, micro: int):
        """Forward + backward of one micro-batch. The first forward runs under torch's FLOP counter: the model
        FLOPs of a training sample are 3x its forward FLOPs (backward = 2x forward), counted without the
        re-computed forward of activation checkpointing, so MFU is model FLOPs utilisation, not hardware FLOPs
        (PaLM, Chowdhery et al. 2022, App. B)."""
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False) if self.flops_per_sample is None else None
        with counter or contextlib.nullcontext():
            out = self.forward(batch, step, micro)
        if counter is not None:
            self.flops_per_sample = 3 * counter.get_total_flops() / len(batch["key"])
        self.engine.backward(out.loss)
        return out

    def train_step(self, batches: Iterator[dict], step: int, log: bool = True) -> StepResult:
        """One optimizer step ``step`` (0-based): set the lr from :func:`lr_at`, then for each of the
        ``global_batch / (micro_batch × ranks)`` micro-batches taken from ``batches`` forward, backward and
        ``engine.step()`` (DeepSpeed applies the update at the accumulation boundary). Losses are summed on the
        device; the ranks agree on the stop flag through a host-side (gloo) all-reduce, which never waits for
        the device. Only when ``log`` are the loss sums all-reduced and copied to the host (one transfer), so a
        step that does not log makes no host synchronisation of its own. Collective: every rank calls it with
        the same ``step`` and ``log``. Needs :meth:`setup`.

        Args:
            batches: this rank's micro-batches (``iter(trainer.loader)`` or the same compact dicts from
                elsewhere: ``rgb`` uint8 ``[B, 3, S, S]``, ``depth`` ``[B, 1, S, S]``, ``semseg`` ``[B, S/4, S/4]``).
            step: optimizer steps done before this one; sets the lr and seeds the masks.
            log: build the metrics row (reducing the losses accumulated since the last logged step).
        Returns:
            the step's :class:`StepResult` (metrics row with ``step = step + 1`` when ``log``, the agreed stop flag).
        Raises:
            StopIteration: ``batches`` ran out.
        """
        t0 = time.perf_counter()
        lr = lr_at(step, self.cfg)
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr
        wait = 0.0
        for micro in range(self.ga):
            tw = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tw
            out = self._forward_backward(batch, step, micro)
            self.engine.step()
            self._accumulate(out, batch)
        stop = self._agree_stop()
        dt = time.perf_counter() - t0
        self._interval["steps"] += 1
        self._interval["seconds"] += dt
        self._interval["wait"] += wait
        return StepResult(self._metrics(step + 1, lr) if log else None, stop, wait)

    def _accumulate(self, out: Any, batch: dict) -> None:
        """Add a micro-batch's losses to the device-side sums (no host synchronisation)."""
        mods = self.cfg.model.loss_names()
        if self._loss_sums is None:
            self._loss_sums = torch.zeros(1 + len(mods), dtype=torch.float32, device=out.loss.device)
            if self.tokens_per_sample is None:  # visible (encoder) tokens, from the first micro-batch only
                visible = sum(int((~mk).sum()) for mk in out.masks.values())
                self.tokens_per_sample = int(visible / len(batch["key"]))
        zero = out.loss.new_zeros(())
        parts = [out.loss.detach()] + [out.losses[m].detach() if m in out.losses else zero for m in mods]
        self._loss_sums += torch.stack([p.float() for p in parts])

    def _agree_stop(self) -> bool:
        """Whether any rank asked to stop, agreed by all ranks (a CPU all-reduce on the flag group)."""
        if self._flag_group is None:
            return self._stop
        flag = torch.tensor([1 if self._stop else 0], dtype=torch.int32)  # a host tensor by construction
        dist.all_reduce(flag, group=self._flag_group)
        return bool(flag.numpy()[0])  # read through numpy: host memory, never a device synchronisation

    def _metrics(self, step: int, lr: float) -> dict:
        """The ``metrics.jsonl`` row of step ``step`` (1-based): losses and throughput over the steps since the
        last logged one (one all-reduce of the device-side loss sums, one device-to-host copy), then reset."""
        mods = self.cfg.model.loss_names()
        sums = self._loss_sums if self._loss_sums is not None else torch.zeros(1 + len(mods), device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        steps = max(1, self._interval["steps"])
        values = (sums / (steps * self.ga * self.world)).tolist()
        gn = self.engine.get_global_grad_norm()
        dt, wait = self._interval["seconds"], self._interval["wait"]
        ips = self.cfg.train.global_batch * steps / max(dt, 1e-9)
        flops = (self.flops_per_sample or 0) * ips
        self._loss_sums = None
        self._interval = {"steps": 0, "seconds": 0.0, "wait": 0.0}
        return {"step": step, "loss": values[0], "losses": dict(zip(mods, values[1:])), "lr": lr,
                "grad_norm": float(gn) if gn is not None else None,
                "images_per_s": ips, "tokens_per_s": ips * (self.tokens_per_sample or 0),
                "data_wait_pct": 100.0 * wait / max(dt, 1e-9), "step_s": dt / steps, "tflops_per_s": flops / 1e12,
                "mfu": flops / (self.peak_flops * self.world) if self.peak_flops else None,
                "peak_memory_gib": peak_memory_gib(self.device)}

    # -- loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run from the start (or resumed) step to ``train.steps``, saving every ``train.save_interval`` steps, at
        the end, and after ``train.preempt_signal`` (then stopping early with :attr:`preempted` set); rank 0
        publishes every ``train.publish_every`` steps in the background (``publisher.py``) and waits for it at the
        end. Returns the last logged metrics row ({} on ranks other than 0). Process-global changes are undone when
        it returns or raises.

        Raises:
            BackgroundPublishError: (rank 0, after training) a background publish failed.
        """
        cfg = self.cfg
        last: dict = {}
        try:
            self.setup()
            with self.process_settings(), self.metrics_logger() as logger, \
                    background_publisher(cfg.output, cfg.train, self.rank) as publisher:  # train.publish_every
                batches = iter(self.loader)
                for step in range(self.start_step, cfg.train.steps):
                    result = self.train_step(batches, step, log=logger.due(step + 1))
                    if logger.record(step + 1, result.metrics):
                        last = result.metrics
                    done = step + 1
                    if result.stop or done % cfg.train.save_interval == 0 or done == cfg.train.steps:
                        self.checkpointer.save(done)
                    publisher.step_done(done)
                    if result.stop and done < cfg.train.steps:
                        self.preempted = True
                        publisher.interrupt()  # no wait for a publish in the grace period
                        log.warning("stopped at step %d after %s (checkpoint saved); exit status %d means: requeue",
                                    done, cfg.train.preempt_signal, PREEMPTED_EXIT_CODE)
                        break
            if self.stream.skipped_corrupt:
                log.warning("skipped %d corrupt samples in the main process", self.stream.skipped_corrupt)
        finally:
            self.close()
        return last


__all__ = ["Trainer", "StepResult", "PREEMPTED_EXIT_CODE"]
