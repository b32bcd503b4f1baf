"""Publish a training run as a release: consolidated safetensors + configs + metrics + manifest.

Files (docs/ARCHITECTURE.md, "Run folder and release"), written to any fsspec URL:

* ``model.safetensors`` — the full fp32 model (consolidated from the DeepSpeed ZeRO checkpoint): a MultiMAE/MAE, or
  a multitask run's encoder + task heads (``model_config.json`` then has ``heads``, ``models/multitask.py``);
* ``encoder.safetensors`` — the encoder (of a multitask run: its shared encoder) as a timm ``VisionTransformer``
  state dict
  (``timm.create_model(name, pretrained_cfg_overlay=dict(file=...), **timm_kwargs)``);
* ``model_config.json`` (how to rebuild it; timm name and kwargs), ``config.yaml`` (the run's config),
  ``metrics.json`` (last training step + evaluation results when present);
* ``manifest.json`` — written **last**: every file with size and sha256, the git commit, the source
  checkpoint. Each file lands atomically; a release without a manifest is incomplete and is not to be
  trusted.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass

from polymae.pipeline.config import ConfigError, field_, redact

log = logging.getLogger(__name__)


@dataclass
class PublishConfig:
    """Everything ``polymae publish`` takes."""

    checkpoint: str = field_("work/runs/pretrain", help="training run folder (holds checkpoints/latest)")
    tag: str = field_("", help="checkpoint tag, e.g. step-00000040 (default: latest)")
    dest: str = field_("work/store/pretrain", help="release folder: local path, file:// or s3://bucket/prefix")

    def validate(self) -> None:
        """Pure value checks; raises :class:`ConfigError` naming the key."""
        if not self.dest:
            raise ConfigError("dest", "must not be empty")

    def preflight(self) -> None:
        """The run folder holds a checkpoint; raises :class:`ConfigError` naming the key."""
        if not os.path.exists(os.path.join(self.checkpoint, "checkpoints", "latest")) and not self.tag:
            raise ConfigError("checkpoint", f"{self.checkpoint!r} has no checkpoints/latest (not a training run)")


def git_commit() -> str | None:
    """The polymae source commit (``git rev-parse HEAD``), or None outside a git checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def publish(cfg: PublishConfig) -> dict:
    """Consolidate, write every file atomically to ``cfg.dest``, then the manifest. Returns the manifest."""
    import torch
    from safetensors.torch import save_file

    from polymae.models.interop import encoder_to_timm
    from polymae.models.multitask import build_from_model_config, is_multitask
    from polymae.datasets import storage
    from polymae.pipeline.train.checkpoint import ENCODER_FILE, MODEL_CONFIG, MODEL_FILE, consolidate, read_model_config
    from polymae.pipeline.train.metrics_log import read_metrics

    sd, tag = consolidate(cfg.checkpoint, cfg.tag or None)
    mc = read_model_config(cfg.checkpoint)
    model = build_from_model_config(mc)  # MultiMAE/MAE, or a multitask encoder + heads
    model.load_state_dict(sd, strict=True)
    enc_sd, timm_kwargs = encoder_to_timm(model.encoder if is_multitask(mc) else model)
    mc = dict(mc, timm=timm_kwargs, source={"checkpoint": os.path.abspath(cfg.checkpoint), "tag": tag})
    meta = {"format": "pt", "polymae_model": mc["name"], "tag": tag}
    metrics: dict = {}
    rows = read_metrics(cfg.checkpoint)
    if rows:
        metrics["train"] = {"first": rows[0], "last": rows[-1]}
    for name in sorted(os.listdir(cfg.checkpoint)):
        res = os.path.join(cfg.checkpoint, name, "results.json")
        if name.startswith("eval-") and os.path.exists(res):
            with open(res) as fh:
                metrics[name] = json.load(fh)
    files: list[dict] = []
    dest = cfg.dest.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="polymae-publish-") as stage:
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(stage, MODEL_FILE), metadata=meta)
        save_file({k: v.contiguous().to(torch.float32) for k, v in enc_sd.items()},
                  os.path.join(stage, ENCODER_FILE), metadata=meta)
        with open(os.path.join(stage, MODEL_CONFIG), "w") as fh:
            json.dump(redact(mc), fh, indent=2)
        with open(os.path.join(stage, "metrics.json"), "w") as fh:
            json.dump(metrics, fh, indent=2)
        names = [MODEL_FILE, ENCODER_FILE, MODEL_CONFIG, "metrics.json"]
        run_cfg = os.path.join(cfg.checkpoint, "config.yaml")
        if os.path.exists(run_cfg):
            names.append("config.yaml")
            with open(run_cfg, "rb") as fin, open(os.path.join(stage, "config.yaml"), "wb") as fout:
                fout.write(fin.read())
        storage.makedirs(dest)
        for name in names:
            digest, size = storage.copy_atomic(os.path.join(stage, name), f"{dest}/{name}")
            files.append({"path": name, "size": size, "sha256": digest})
            log.info("uploaded %s (%d bytes)", name, size)
    from polymae import __version__

    manifest = {
        "schema_version": 1, "kind": "polymae-release", "model": mc["name"],
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "polymae_version": __version__, "git_commit": git_commit(),
        "source": {"tag": tag, "run": os.path.basename(os.path.abspath(cfg.checkpoint))},
        "files": files,
    }
    from polymae.datasets.storage import write_json_atomic

    write_json_atomic(f"{dest}/manifest.json", manifest)
    log.info("published %s (%s) to %s", mc["name"], tag, redact(dest))
    return manifest


def verify_release(dest: str) -> list[str]:
    """Problems with a release (missing manifest, size or sha256 mismatch); empty when intact."""
    from polymae.datasets.storage import read_json
    from polymae.datasets import storage

    murl = f"{dest.rstrip('/')}/manifest.json"
    if not storage.exists(murl):
        return [f"{murl} missing: release incomplete"]
    problems = []
    for f in read_json(murl)["files"]:
        url = f"{dest.rstrip('/')}/{f['path']}"
        if not storage.exists(url):
            problems.append(f"{f['path']}: missing")
            continue
        digest, size = storage.sha256_of(url)
        if (digest, size) != (f["sha256"], f["size"]):
            problems.append(f"{f['path']}: sha256/size mismatch")
    return problems
