"""Unmixed multi-task training of task decoders on a pre-trained encoder with MT-AdamW under DeepSpeed ZeRO 0-3
(Uni-Perceiver v2, arXiv 2211.09808, Sec. 4.4): :class:`MultitaskTrainer`.

**A step.** Optimizer step ``t`` trains one task ``k``, drawn by :class:`~polymae.pipeline.train.sampler.UnmixedSampler`
from ``(seed, t)`` alone, the same on every rank without communication. The step takes ``ga_k = global_batch_k /
(micro_batch_k x ranks)`` micro-batches of task ``k``'s own stream; each is forwarded through the encoder and task
``k``'s head, and its loss divided by ``ga_k`` is back-propagated with ``engine.backward(..., scale_wrt_gas=False)``
(DeepSpeed is configured with one accumulation step; the accumulation boundary, where ZeRO reduces the gradients,
is set by hand on the last micro-batch with ``engine.set_gradient_accumulation_boundary``), then ``engine.step()``
runs MT-AdamW (``mt_adamw.py``) with ``set_task(k, s_k, omega_k)``: the other tasks' decoders are not touched. Under
ZeRO 1-3 the gradient norm MT-AdamW divides by is DeepSpeed's global one (``compute_grad_norm`` on); under ZeRO-3
every head takes part in every backward with weight 0 (``models/multitask.py``, ``touch_all``).

**Resume.** The task of every step is a function of the step, so the position of each task's stream is too: task
``k`` has consumed ``ga_k x (draws of k in steps [0, t))`` micro-batches on each rank (``skip_batches``). A checkpoint
holds the step (DeepSpeed client state), the optimizer state (MT-AdamW's moments and step counts, partitioned under
ZeRO) and, in its marker, the data layout (per task: micro-batch, global batch, canonical readers; the sampling
probabilities and seed), which a resumed run must match. SIGKILL + ``resume=true`` continues step for step.

**Run folder.** As pretrain's (docs/ARCHITECTURE.md, "Run folder and release"), with ``model_config.json`` describing
encoder + heads (``models/multitask.py``) and ``metrics.jsonl`` rows holding ``task`` (the step's task), ``losses``
(mean loss per task over the logged interval, tasks drawn in it), ``drawn`` (draws per task since step 0), ``lr``,
``grad_norm`` (the norm MT-AdamW divided by), ``images_per_s``, ``step_s``; TensorBoard gets ``loss/<task>`` and
``drawn/<task>``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time
from typing import Any

import torch
import torch.distributed as dist

from polymae.pipeline.config import ConfigError, save_config
from polymae.pipeline.train.checkpoint import MODEL_CONFIG, Checkpointer, load_encoder, prepare_universal, resume_plan
from polymae.pipeline.train.metrics_log import MetricsLogger
from polymae.pipeline.train.mt_adamw import MTAdamW
from polymae.pipeline.train.multitask_config import MultitaskConfig
from polymae.pipeline.train.publisher import background_publisher
from polymae.pipeline.train.sampler import UnmixedSampler, sampling_probs
from polymae.pipeline.train.tasks import Task, build_task, link_sequence_tasks

log = logging.getLogger(__name__)


def lr_at(step: int, cfg: MultitaskConfig) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up over ``optim.warmup_steps`` to ``optim.lr``, then a
    cosine to ``optim.min_lr`` at ``train.steps``."""
    o = cfg.optim
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, cfg.train.steps - o.warmup_steps))
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, p: torch.Tensor, skip: set[str]) -> bool:
    return p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip


def param_groups(model: torch.nn.Module, cfg: MultitaskConfig) -> list[dict]:
    """MT-AdamW groups: the encoder (``task=None``) one group per layer and decay class with ``lr_scale =
    encoder_lr_mult x layer_decay^(L + 1 - layer)`` (layer 0 = patch embedding and global tokens, ``i + 1`` = block
    ``i``, ``L + 1`` = final norm; BEiT/MAE layer-wise decay), left out when ``encoder_lr_mult`` is 0 (frozen, and
    ``requires_grad`` turned off); each head one group per decay class with ``task=<name>``, ``lr_scale = 1``; the
    sequence decoder shared by the det/seg/kpt/cap tasks one group per decay class with ``task`` = the tuple of
    those tasks (MT-AdamW updates it whenever any of them is drawn). No weight decay on biases, norms, the encoder's
    tokens (``no_weight_decay``) and the decoder's positions and logit scale."""
    o, enc = cfg.optim, model.encoder
    depth = len(enc.encoder)
    skip = set(enc.no_weight_decay())
    groups: dict[tuple, dict] = {}
    for name, p in enc.named_parameters():
        if o.encoder_lr_mult == 0:
            p.requires_grad_(False)
            continue
        layer = int(name.split(".")[1]) + 1 if name.startswith("encoder.") else (
            depth + 1 if name.startswith("encoder_norm.") else 0)
        nd = _no_decay(name, p, skip)
        g = groups.setdefault((None, layer, nd), {"params": [], "task": None, "name": f"encoder.{layer}",
                                                  "weight_decay": 0.0 if nd else o.weight_decay,
                                                  "lr_scale": o.encoder_lr_mult * o.layer_decay ** (depth + 1 - layer)})
        g["params"].append(p)
    for task, head in model.heads.items():
        for name, p in head.named_parameters():
            nd = _no_decay(name, p, set())
            g = groups.setdefault((task, 0, nd), {"params": [], "task": task, "name": f"head.{task}",
                                                  "weight_decay": 0.0 if nd else o.weight_decay, "lr_scale": 1.0})
            g["params"].append(p)
    seq = getattr(model, "sequence_decoder", None)
    for name, p in seq.named_parameters() if seq is not None else ():
        nd = _no_decay(name, p, {"pos", "logit_scale"})
        shared = tuple(model.sequence_tasks)
        g = groups.setdefault((shared, 0, nd), {"params": [], "task": shared, "name": "head.sequence_decoder",
                                                "weight_decay": 0.0 if nd else o.weight_decay, "lr_scale": 1.0})
        g["params"].append(p)
    return list(groups.values())


def deepspeed_config(cfg: MultitaskConfig, world: int, precision: str, gloo: bool) -> dict:
    """DeepSpeed's config for the multitask engine: one micro-batch per accumulation step as far as DeepSpeed knows
    (the trainer accumulates inside each task and sets the boundary itself), no clipping (MT-AdamW normalises),
    ZeRO ``train.zero_stage`` with the global gradient norm computed (MT-AdamW reads it), 5e7-element buckets (on
    gloo: all-reduced buckets, ``reduce_scatter: false``), ``torch_autocast`` bf16 for ``amp_bf16``."""
    zero: dict = {"stage": cfg.train.zero_stage}
    if cfg.train.zero_stage >= 1:
        zero.update(reduce_bucket_size=int(5e7), allgather_bucket_size=int(5e7), overlap_comm=False,
                    contiguous_gradients=True)
        if gloo:
            zero["reduce_scatter"] = False
    if cfg.train.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(5e7), stage3_param_persistence_threshold=int(1e4),
                    stage3_gather_16bit_weights_on_model_save=False)
    out = {"train_batch_size": world, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "steps_per_print": 2**31 - 1, "wall_clock_breakdown": False}
    if precision == "amp_bf16":
        out["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return out


def layout(cfg: MultitaskConfig, tasks: dict[str, Task], probs: list[float], readers: dict[str, int]) -> dict:
    """The data layout a checkpoint's marker records and a resume must match: per task micro-batch, global batch
    and canonical readers; the sampling probabilities and the seed."""
    return {"multitask": {"tasks": {n: {"micro_batch": t.cfg.micro_batch, "global_batch": t.cfg.global_batch,
                                        "readers": readers[n]} for n, t in tasks.items()},
                          "probs": probs, "seed": cfg.train.seed}}


def check_layout(saved: dict, now: dict, run: str) -> None:
    """Refuse to resume a run whose tasks, batch sizes, sampling probabilities or seed changed (the step's task and
    every stream's position are counted in them).

    Raises:
        ConfigError: naming the key (``tasks``, ``tasks.<name>.micro_batch|global_batch``, ``train.seed``).
    """
    old, new = saved.get("multitask"), now["multitask"]
    if not old:
        return
    if list(old["tasks"]) != list(new["tasks"]):
        raise ConfigError("tasks", f"the run in {run} has tasks {list(old['tasks'])}, this config {list(new['tasks'])}")
    for name, o in old["tasks"].items():
        for key in ("micro_batch", "global_batch"):
            if o[key] != new["tasks"][name][key]:
                raise ConfigError(f"tasks.{name}.{key}", f"the run in {run} was saved with {o[key]}; resume with it")
    if old["seed"] != new["seed"]:
        raise ConfigError("train.seed", f"the run in {run} was saved with seed {old['seed']}")
    if any(abs(a - b) > 1e-12 for a, b in zip(old["probs"], new["probs"])):
        raise ConfigError("tasks", f"sampling probabilities changed from {old['probs']} to {new['probs']} "
                          f"(sampling weights or dataset sizes): the task of every step would change")


class MultitaskTrainer:
    """Runs ``polymae multitask`` for one :class:`MultitaskConfig` on this rank (module docstring).

    Use: ``MultitaskTrainer(cfg).train()``; or :meth:`setup`, then :meth:`train_step` per step inside
    ``with trainer.process_settings():``.
    """

    def __init__(self, cfg: MultitaskConfig):
        self.cfg = cfg
        self.engine = self.optimizer = self.checkpointer = self.sampler = None
        self.tasks: dict[str, Task] = {}
        self.start_step = 0
        self.preempted = False
        self._stop = False
        self._flag_group = None
        self._iters: dict[str, Any] = {}
        self._streams: dict[str, Any] = {}
        self._sums: torch.Tensor | None = None
        self._interval = {"steps": 0, "seconds": 0.0, "samples": 0, "counts": {}}

    # -- set-up ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Process group, tasks (data sizes and label sets), sampler, model (encoder loaded from ``cfg.encoder``,
        heads seeded by ``train.seed``), MT-AdamW, DeepSpeed engine, checkpointer and resumed state, run files
        (rank 0) and every task's stream at its position. Idempotent.

        Raises:
            ConfigError: a task's labels are missing, the image size does not fit the encoder, or a resume does not
                match the run (:func:`check_layout`, :func:`~polymae.pipeline.train.checkpoint.resume_plan`).
        """
        if self.engine is not None:
            return
        import deepspeed

        from polymae.pipeline.train.distributed import init_deepspeed_distributed, use_cuda

        cfg = self.cfg
        init_deepspeed_distributed()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}") if use_cuda() else torch.device("cpu")
        self.precision = cfg.train.resolved_precision(use_cuda())
        if self.world > 1:
            self._flag_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        self.tasks = {n: build_task(n, t) for n, t in cfg.tasks.items()}
        for t in self.tasks.values():
            t.prepare()
        link_sequence_tasks(self.tasks)  # one vocabulary for the shared sequence decoder
        self.probs = sampling_probs([t.cfg.sampling_weight for t in self.tasks.values()],
                                    [t.size for t in self.tasks.values()])
        self.sampler = UnmixedSampler(list(self.tasks), self.probs, seed=cfg.train.seed)
        self.ga = {n: t.cfg.global_batch // (t.cfg.micro_batch * self.world) for n, t in self.tasks.items()}
        default_readers = cfg.train.readers or self.world * max(1, cfg.train.num_workers)
        self.readers = {n: default_readers for n in self.tasks}
        self.ds_config = deepspeed_config(cfg, self.world, self.precision, gloo=not use_cuda())
        plan = self._resume_plan() if cfg.resume else None
        model = self._build_model()
        self.optimizer = MTAdamW(param_groups(model, cfg), lr=lr_at(0, cfg), betas=tuple(cfg.optim.betas),
                                 eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=self.ds_config)
        if cfg.train.zero_stage > 0:  # ZeRO computes the global norm across partitions before the client step
            engine = self.engine
            self.optimizer.grad_norm = lambda: engine.optimizer._global_grad_norm
        self.checkpointer = Checkpointer(self.engine, cfg.output, keep_last=cfg.train.keep_last,
                                         data=layout(cfg, self.tasks, self.probs, self.readers))
        self.start_step = self.checkpointer.load(plan) if plan else 0
        if self.rank == 0:
            self._write_run_files(model)
        self._open_streams(self.start_step)

    def _resume_plan(self):
        """The resume plan, the run's canonical readers, the layout check, and a universal conversion for ZeRO 1-3
        on another world size (collective)."""
        cfg = self.cfg
        plan = resume_plan(cfg.output, self.world, cfg.train.zero_stage, None)
        saved = (plan.data or {}).get("multitask")
        if saved:
            self.readers = {n: int(saved["tasks"].get(n, {}).get("readers") or r) for n, r in self.readers.items()}
        check_layout(plan.data or {}, layout(cfg, self.tasks, self.probs, self.readers), cfg.output)
        if plan.universal:
            log.warning("%s was saved by %s ranks at ZeRO %s: resuming through a universal checkpoint", plan.tag,
                        plan.world_size, plan.zero_stage)
            prepare_universal(cfg.output, plan.tag)
            self.ds_config["checkpoint"] = {"load_universal": True}
        return plan

    def _build_model(self) -> torch.nn.Module:
        """The encoder of ``cfg.encoder`` (weights loaded) and one head per task, heads seeded by ``train.seed``."""
        from polymae.models.multitask import MultiTaskModel, load_encoder_state
        from polymae.patches import global_torch_seed

        cfg = self.cfg
        enc_kwargs, sd, mc = load_encoder(cfg.encoder)  # a pretrain/multitask run, a release or an official file
        patch = int(enc_kwargs.get("patch_size", 16))
        if cfg.img_size % patch:
            raise ConfigError("img_size", f"{cfg.img_size} is not a multiple of the encoder's patch size {patch}")
        seed = global_torch_seed(cfg.train.seed)
        try:
            model = MultiTaskModel(enc_kwargs, {n: t.head_spec(enc_kwargs) for n, t in self.tasks.items()})
        finally:
            seed.restore()
        load_encoder_state(model, sd)
        self.encoder_name = mc.get("name", "encoder")
        if cfg.train.zero_stage == 3:  # read by encode() without the encoder module's own forward running
            import deepspeed

            deepspeed.zero.register_external_parameter(model, model.encoder.global_tokens)
        return model

    def _write_run_files(self, model: torch.nn.Module) -> None:
        """Rank 0: ``config.yaml`` and ``model_config.json`` (encoder + heads + task info) in the run folder."""
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        save_config(cfg, os.path.join(cfg.output, "config.yaml"))
        tasks = {n: dict(t.info, loss_weight=t.cfg.loss_weight, sampling_prob=p, shards=t.cfg.shards,
                         split=t.cfg.split, folder=t.cfg.folder)
                 for (n, t), p in zip(self.tasks.items(), self.probs)}
        mc = {"name": f"multitask_{self.encoder_name}", "kind": "multitask", "init_kwargs": model.init_kwargs,
              "heads": model.head_specs, "multitask": {"img_size": cfg.img_size, "encoder": cfg.encoder,
                                                       "tasks": tasks},
              "pretrain": {"img_size": cfg.img_size}}
        with open(os.path.join(cfg.output, MODEL_CONFIG), "w") as fh:
            json.dump(mc, fh, indent=2)
        n = sum(p.numel() for p in model.parameters())
        log.info("multitask model: %.2f M parameters, tasks %s with s_k %s, accumulation %s; ZeRO %d; %s",
                 n / 1e6, list(self.tasks), [round(p, 4) for p in self.probs], self.ga, cfg.train.zero_stage,
                 self.precision)

    def _open_streams(self, step: int) -> None:
        """Every task's stream, after the micro-batches its draws in steps ``[0, step)`` consumed."""
        cfg = self.cfg
        drawn = self.sampler.counts(0, step)
        for n, t in self.tasks.items():
            stream, loader = t.build_stream(cfg.img_size, self.rank, self.world, cfg.train.seed,
                                            drawn[n] * self.ga[n], self.readers[n], cfg.train.num_workers,
                                            cfg.train.shuffle_buffer)
            self._streams[n], self._iters[n] = stream, iter(loader)
        self._drawn = drawn

    @contextlib.contextmanager
    def process_settings(self):
        """While inside: the handler of ``train.preempt_signal`` (finish the step, save, stop)."""
        from polymae.patches import signal_handlers

        handle = signal_handlers(self._on_preempt, (getattr(signal, self.cfg.train.preempt_signal),))
        try:
            yield
        finally:
            handle.restore()

    def _on_preempt(self, signum: int, frame: Any) -> None:
        log.warning("%s: will save a checkpoint and stop after this step", signal.Signals(signum).name)
        self._stop = True

    # -- one step -------------------------------------------------------------------------------
    def train_step(self, step: int, log_row: bool = True) -> tuple[dict | None, bool]:
        """Optimizer step ``step`` (0-based) of the task the sampler draws for it (module docstring). Collective.
        Returns ``(metrics row or None, stop agreed by all ranks)``.

        Raises:
            RuntimeError: MT-AdamW's gradient norm is not finite.
        """
        t0 = time.perf_counter()
        name = self.sampler.draw(step)
        k, task, ga = list(self.tasks).index(name), self.tasks[name], self.ga[name]
        lr = lr_at(step, self.cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        self.optimizer.set_task(name, self.probs[k], task.cfg.loss_weight)
        touch_all = self.cfg.train.zero_stage == 3
        if self._sums is None:
            self._sums = torch.zeros(len(self.tasks), dtype=torch.float32, device=self.device)
        for micro in range(ga):
            batch = next(self._iters[name])
            rgb, target, out_size = task.inputs(batch, self.device)
            self.engine.set_gradient_accumulation_boundary(micro == ga - 1)
            pred, zero = self.engine(rgb, name, out_size, touch_all=touch_all, **task.forward_kwargs(target))
            loss = task.loss(pred, target)
            self.engine.backward((loss + zero) / ga, scale_wrt_gas=False)
            self._sums[k] += loss.detach().float()
        self.engine.step()
        self._drawn[name] += 1
        iv = self._interval
        iv["steps"] += 1
        iv["seconds"] += time.perf_counter() - t0
        iv["samples"] += task.cfg.global_batch
        iv["counts"][name] = iv["counts"].get(name, 0) + 1
        return (self._metrics(step + 1, name, lr) if log_row else None), self._agree_stop()

    def _agree_stop(self) -> bool:
        """Whether any rank was asked to stop (a host all-reduce on the gloo flag group)."""
        if self._flag_group is None:
            return self._stop
        flag = torch.tensor([1 if self._stop else 0], dtype=torch.int32)
        dist.all_reduce(flag, group=self._flag_group)
        return bool(flag.numpy()[0])

    def _metrics(self, step: int, task: str, lr: float) -> dict:
        """The ``metrics.jsonl`` row of step ``step`` (1-based); resets the interval's sums."""
        sums = self._sums if self._sums is not None else torch.zeros(len(self.tasks), device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
        values, iv = sums.tolist(), self._interval
        losses = {n: values[i] / (iv["counts"][n] * self.ga[n] * self.world)
                  for i, n in enumerate(self.tasks) if iv["counts"].get(n)}
        steps, dt = max(1, iv["steps"]), iv["seconds"]
        row = {"step": step, "task": task, "loss": sum(losses.values()) / max(1, len(losses)), "losses": losses,
               "drawn": dict(self._drawn), "lr": lr, "grad_norm": self.optimizer.last_norm,
               "images_per_s": iv["samples"] / max(dt, 1e-9), "step_s": dt / steps}
        self._sums = None
        self._interval = {"steps": 0, "seconds": 0.0, "samples": 0, "counts": {}}
        return row

    # -- loop -----------------------------------------------------------------------------------
    def train(self) -> dict:
        """Run from the start (or resumed) step to ``train.steps``, saving every ``save_interval`` steps, at the
        end and after the preemption signal (then :attr:`preempted`). Returns the last logged row ({} elsewhere)."""
        cfg, last = self.cfg, {}
        self.setup()
        with self.process_settings(), MetricsLogger(cfg.output, total_steps=cfg.train.steps,
                                                    first_step=self.start_step, log_interval=cfg.train.log_interval,
                                                    enabled=self.rank == 0, desc="multitask") as logger, \
                background_publisher(cfg.output, cfg.train, self.rank) as publisher:  # train.publish_every, if set
            for step in range(self.start_step, cfg.train.steps):
                row, stop = self.train_step(step, log_row=logger.due(step + 1))
                if logger.record(step + 1, row):
                    last = row
                    if logger.tb is not None:
                        for n, c in row["drawn"].items():
                            logger.tb.add_scalar(f"drawn/{n}", c, step + 1)
                done = step + 1
                if stop or done % cfg.train.save_interval == 0 or done == cfg.train.steps:
                    self.checkpointer.save(done)
                publisher.step_done(done)
                if stop and done < cfg.train.steps:
                    self.preempted = True
                    publisher.interrupt()  # no wait for a publish in the grace period
                    log.warning("stopped at step %d (checkpoint saved)", done)
                    break
        return last


__all__ = ["MultitaskTrainer", "lr_at", "param_groups", "deepspeed_config", "layout", "check_layout"]
