"""Checkpoints: find, consolidate and load them, without unpickling untrusted bytes.

Two kinds exist (docs/ARCHITECTURE.md, "Run folder and release"):

* a training run folder ``{run}/checkpoints/step-XXXXXXXX/`` written by DeepSpeed (for exact resume);
  it is this job's own state, read back with DeepSpeed's ZeRO consolidation
  (``get_fp32_state_dict_from_zero_checkpoint``) in one process;
* a released folder with ``model.safetensors`` + ``model_config.json`` (from ``publish``), loaded with
  safetensors only.

:func:`load_model` accepts either and returns an eval-mode ``nn.Module`` on CPU.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
MODEL_CONFIG = "model_config.json"


def latest_tag(run_dir: str) -> str:
    """The tag named in ``{run}/checkpoints/latest``.

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing checkpoints/latest)")
    with open(path) as fh:
        return fh.read().strip()


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
    ckpt = os.path.join(run_dir, "checkpoints")
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
