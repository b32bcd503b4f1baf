"""Checkpoints: write and resume them during training, find, consolidate and load them afterwards, without
unpickling untrusted bytes.

Two kinds exist (docs/ARCHITECTURE.md, "Run folder and release"):

* a training run folder ``{run}/checkpoints/step-XXXXXXXX/`` + ``{run}/checkpoints/latest`` written by DeepSpeed
  through :class:`Checkpointer` (the whole training state, for exact resume); it is this job's own state, read
  back by :meth:`Checkpointer.load` in the run that wrote it, or with DeepSpeed's ZeRO consolidation
  (``get_fp32_state_dict_from_zero_checkpoint``) in one process (:func:`consolidate`);
* a released folder with ``model.safetensors`` + ``model_config.json`` (from ``publish``), loaded with
  safetensors only.

:func:`load_model` accepts either and returns an eval-mode ``nn.Module`` on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from typing import Any

import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
MODEL_CONFIG = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"
TAG_PREFIX = "step-"


def step_tag(step: int) -> str:
    """The checkpoint tag (folder name) of optimizer step ``step``: ``step-00000042``."""
    return f"{TAG_PREFIX}{step:08d}"


def latest_tag(run_dir: str) -> str:
    """The tag named in ``{run}/checkpoints/latest``.

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    path = os.path.join(run_dir, CHECKPOINTS_DIR, "latest")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing checkpoints/latest)")
    with open(path) as fh:
        return fh.read().strip()


class Checkpointer:
    """Saves and restores a DeepSpeed engine's whole training state (module, optimizer and ZeRO partitions,
    arXiv 1910.02054, plus the step) as ``{run_dir}/checkpoints/step-XXXXXXXX/``, and keeps ``checkpoints/latest``
    naming the newest. Under ZeRO every rank writes and reads its own partitions, so :meth:`save` and :meth:`load`
    are collective: call them on every rank at the same step.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``.
        run_dir: the run folder (local path).
        keep_last: checkpoints kept after each save; older ``step-*`` folders are deleted by rank 0.
    """

    def __init__(self, engine: Any, run_dir: str, keep_last: int = 2):
        self.engine = engine
        self.run_dir = run_dir.rstrip("/")
        self.folder = f"{self.run_dir}/{CHECKPOINTS_DIR}"
        self.keep_last = keep_last

    def save(self, step: int) -> str:
        """Write the checkpoint of step ``step`` (optimizer steps done) on every rank, point ``latest`` at it,
        wait for all ranks, then (rank 0) delete all but the newest ``keep_last``. Returns the tag."""
        tag = step_tag(step)
        self.engine.save_checkpoint(self.folder, tag=tag, client_state={"step": step}, save_latest=True)
        if _barrier() == 0:
            self.prune()
            log.info("saved checkpoint %s/%s", self.folder, tag)
        return tag

    def prune(self) -> list[str]:
        """Delete the ``step-*`` folders older than the newest ``keep_last``; returns the deleted tags."""
        tags = sorted(d for d in os.listdir(self.folder) if d.startswith(TAG_PREFIX))
        old = tags[:-self.keep_last]
        for tag in old:
            shutil.rmtree(os.path.join(self.folder, tag), ignore_errors=True)
        return old

    def load(self) -> int:
        """Restore the newest checkpoint (``latest``) into the engine on every rank. Returns the step it was
        saved at, or 0 (with a warning, engine untouched) when the run has no checkpoint."""
        path, client = self.engine.load_checkpoint(self.folder)
        if path is None:
            log.warning("resume=true but no checkpoint in %s: starting from step 0", self.folder)
            return 0
        step = int(client["step"])
        log.info("resumed from %s at step %d", path, step)
        return step

    def latest_tag(self) -> str | None:
        """The tag ``checkpoints/latest`` names (e.g. ``step-00000042``), or None before the first save."""
        try:
            return latest_tag(self.run_dir)
        except FileNotFoundError:
            return None


def _barrier() -> int:
    """Wait for every rank of the default process group; returns this process's rank (0 without a group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0
    dist.barrier()
    return dist.get_rank()


def read_model_config(folder: str) -> dict:
    """``{"name": ..., "init_kwargs": {...}}`` of a run or released folder (any fsspec URL)."""
    import fsspec

    with fsspec.open(f"{folder.rstrip('/')}/{MODEL_CONFIG}", "r") as fh:
        return json.load(fh)


def consolidate(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 state dict of a DeepSpeed run checkpoint (any ZeRO stage), in one process.

    Returns:
        ``(state_dict, tag)`` with parameter names as in the model (``module.`` prefix removed).
    Raises:
        FileNotFoundError: no checkpoint / tag folder.
    """
    tag = tag or latest_tag(run_dir)
    ckpt = os.path.join(run_dir, CHECKPOINTS_DIR)
    folder = os.path.join(ckpt, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {folder} does not exist")
    zero_files = [f for f in os.listdir(folder) if "optim_states" in f and f.startswith(("zero_", "bf16_zero"))]
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
    else:  # ZeRO stage 0: the module state is stored whole by rank 0
        states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=True)
        sd = states["module"]
    sd = {k.removeprefix("module."): v.float().clone() for k, v in sd.items()}
    return sd, tag


def load_model(source: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a run folder or a released folder and load its weights strictly.

    Returns:
        ``(model in eval mode on CPU, model_config dict)``.
    Raises:
        FileNotFoundError: neither ``model.safetensors`` nor a DeepSpeed checkpoint is found.
    """
    from safetensors.torch import load_file

    from polymae.models.multimae import build_from_init_kwargs
    from polymae.datasets import storage

    mc = read_model_config(source)
    model = build_from_init_kwargs(mc["init_kwargs"])
    released = f"{source.rstrip('/')}/{MODEL_FILE}"
    if storage.exists(released):
        if storage.is_local(released):
            sd = load_file(released)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MODEL_FILE)
                storage.copy_atomic(released, local)
                sd = load_file(local)
        origin = released
    else:
        sd, tag = consolidate(source)
        origin = f"{source}/checkpoints/{tag}"
    model.load_state_dict(sd, strict=True)
    model.eval()
    log.info("loaded %s (%s)", mc.get("name"), origin)
    return model, mc
