"""``polymae evaluate``: score a checkpoint on held-out shards.

Reports per-modality reconstruction loss, RGB→depth δ1/AbsRel/RMSE and RGB→semseg mIoU against the
held-out pseudo-labels; writes ``results.json`` + ``results.md`` (default ``{checkpoint}/eval-{split}``).
"""

from __future__ import annotations

from typing import Sequence

from polymae.jobs.common import run_job
from polymae.pipeline.evaluate.reconstruction import EvaluateConfig, evaluate


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae evaluate``; returns the exit status (2 on a config error)."""
    return run_job(EvaluateConfig, evaluate, argv, prog="polymae evaluate", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
