"""Training metrics: :class:`MetricsLogger` writes them, :func:`read_metrics` reads them back.

A run folder holds (docs/ARCHITECTURE.md, "Run folder and release") ``metrics.jsonl``, one JSON object per
logged step, appended (a resumed run appends after the killed one's lines; :func:`read_metrics` keeps the newest
line of each step), and ``tb/`` (TensorBoard event files). A row has ``step`` (optimizer steps done, 1-based),
``loss`` and ``losses`` (per modality; means over all ranks and micro-batches), ``lr``, ``grad_norm`` (None
when DeepSpeed does not compute it), ``images_per_s`` and ``tokens_per_s`` (global), ``data_wait_pct`` (% of
the step spent waiting for batches), ``step_s`` (seconds), ``tflops_per_s`` and ``mfu`` (model FLOPs
utilisation, None without a known device peak), ``peak_memory_gib``.

This module is also read by ``pipeline/publish.py`` (``read_metrics`` only), so it imports nothing heavy at
module level.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
#: TensorBoard tag of each scalar of a metrics row (``losses`` become ``loss/<modality>``); None values are skipped
TB_TAGS = {"loss": "loss/total", "lr": "lr", "grad_norm": "grad_norm",
           "images_per_s": "throughput/images_per_s", "tokens_per_s": "throughput/tokens_per_s",
           "data_wait_pct": "throughput/data_wait_pct", "tflops_per_s": "throughput/tflops_per_s",
           "mfu": "throughput/mfu", "peak_memory_gib": "memory/peak_gib"}


def read_metrics(run_dir: str) -> list[dict]:
    """All logged steps of a run (``{run_dir}/metrics.jsonl``), ordered by step; where a step was logged more
    than once (a run killed after logging it and resumed from an earlier checkpoint) the last line wins.
    Returns ``[]`` when the file does not exist (yet)."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    r = json.loads(line)
                    rows[r["step"]] = r
    return [rows[k] for k in sorted(rows)]


def device_peak_flops(cfg_tflops: float) -> float | None:
    """Peak dense bf16 FLOP/s of one device, for MFU: ``cfg_tflops × 1e12`` when > 0, else a known GPU's
    (H100/H200 989 TFLOP/s, A100 312), else None (CPU, unknown GPU)."""
    import torch

    if cfg_tflops > 0:
        return cfg_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tf in (("H100", 989.0), ("H200", 989.0), ("A100", 312.0)):
            if key in name:
                return tf * 1e12
    return None


def peak_memory_gib(device) -> float:
    """Peak memory of ``device`` (a ``torch.device``) in GiB: the CUDA allocator's peak, or on CPU the process's
    peak resident set."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class MetricsLogger:
    """Writes one run's per-step metrics rows to ``metrics.jsonl``, TensorBoard, optionally Weights & Biases, and
    shows a tqdm progress bar; a context manager that closes its writers on exit.

    Call :meth:`record` once per optimizer step: it advances the bar and, on the steps :meth:`due` selects, writes
    the row everywhere (:meth:`write`). Only one process of a run should write (``enabled=False`` elsewhere
    makes every method a no-op).

    Args:
        run_dir: the run folder (local path); ``metrics.jsonl`` and ``tb/`` go there.
        total_steps: the run's last step (always logged; the bar's total).
        first_step: steps already done (the bar's start, on resume).
        log_interval: write every this many steps (and step 1 and the last step).
        enabled: False: write nothing, show no bar.
        wandb_project: also log to this W&B project (``wandb.init(project=..., config=wandb_config,
            resume="allow")``); empty: no W&B.
        wandb_config: the run config shown in W&B.
        progress: show the tqdm bar (on stderr); desc: its label (the job).
    Raises:
        ImportError: ``wandb_project`` set but wandb not installed (the config's preflight checks this first).
    """

    def __init__(self, run_dir: str, *, total_steps: int, first_step: int = 0, log_interval: int = 1,
                 enabled: bool = True, wandb_project: str = "", wandb_config: dict | None = None,
                 progress: bool = True, desc: str = "pretrain"):
        from tqdm import tqdm

        self.path = os.path.join(run_dir, METRICS_FILE)
        self.total_steps, self.log_interval, self.enabled = total_steps, log_interval, enabled
        self.tb = self._tensorboard(os.path.join(run_dir, TB_DIR)) if enabled else None
        self.wandb_run = None
        if enabled and wandb_project:
            import wandb

            self.wandb_run = wandb.init(project=wandb_project, config=wandb_config, resume="allow")
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not (enabled and progress), desc=desc,
                        unit="step", dynamic_ncols=True)

    @staticmethod
    def _tensorboard(folder: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard not installed: no TensorBoard logs")
            return None
        return SummaryWriter(folder)

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) is written: every ``log_interval`` steps, the first and the last."""
        return step % self.log_interval == 0 or step == self.total_steps or step == 1

    def record(self, step: int, metrics: dict[str, Any] | None) -> bool:
        """Optimizer step ``step`` (1-based) done: write ``metrics`` (its row, or None on a step that built none)
        if :meth:`due`, advance the bar. Returns whether the row was written (always False when disabled)."""
        written = self.enabled and metrics is not None and self.due(step)
        if written:
            self.write(metrics)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 img_s=f"{metrics['images_per_s']:.1f}")
        self.bar.update(1)
        return written

    def write(self, metrics: dict[str, Any]) -> None:
        """Append ``metrics`` to ``metrics.jsonl`` (one line, the file reopened so a killed run loses no logged
        line) and send its scalars to TensorBoard (:data:`TB_TAGS`) and W&B, at ``metrics["step"]``."""
        if not self.enabled:
            return
        step = metrics["step"]
        with open(self.path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        scalars = self._scalars(metrics)
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "losses"}
                               | {f"loss/{m}": v for m, v in metrics.get("losses", {}).items()}, step=step)

    @staticmethod
    def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, tag in TB_TAGS.items():
            if metrics.get(key) is not None:
                out[tag] = metrics[key]
            if key == "loss":
                out.update({f"loss/{m}": v for m, v in metrics.get("losses", {}).items()})
        return out

    def close(self) -> None:
        """Close the bar, flush and close TensorBoard, finish the W&B run (idempotent)."""
        self.bar.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["MetricsLogger", "read_metrics", "device_peak_flops", "peak_memory_gib", "METRICS_FILE", "TB_TAGS"]
