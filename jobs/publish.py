"""``polymae publish``: consolidate a run's newest DeepSpeed checkpoint and publish it.

Writes ``model.safetensors``, ``encoder.safetensors`` (timm ViT), ``model_config.json``, ``config.yaml``,
``metrics.json`` and, last, ``manifest.json`` (size + sha256 per file, git commit) to ``dest``: a local
folder, ``file://`` or ``s3://bucket/prefix`` (endpoint and credentials from the AWS_* environment).
"""

from __future__ import annotations

from typing import Sequence

from polymae.jobs.common import run_job
from polymae.pipeline.publish import PublishConfig, publish


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae publish``; returns the exit status (2 on a config error)."""
    return run_job(PublishConfig, publish, argv, prog="polymae publish", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
