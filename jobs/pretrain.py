"""``polymae pretrain``: MultiMAE / MAE pre-training on labelled shards with DeepSpeed ZeRO.

Runs as a single process (``python -m polymae.jobs.pretrain``) or under a launcher, e.g.
``torchrun --nproc_per_node=8 -m polymae.jobs.pretrain --config jobs/configs/multimae_vit_base.yaml``,
``deepspeed --num_gpus 8 -m polymae.jobs.pretrain ...`` or ``srun python -m polymae.jobs.pretrain ...``.
"""

from __future__ import annotations

from typing import Sequence

from polymae.jobs.common import run_job
from polymae.pipeline.train.config import PretrainConfig
from polymae.pipeline.train.trainer import Trainer

DOC = __doc__


def run(cfg: PretrainConfig) -> dict:
    """Train with ``cfg`` on this rank; returns the last logged metrics."""
    return Trainer(cfg).train()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae pretrain``; returns the exit status (2 on a config error)."""
    return run_job(PretrainConfig, run, argv, prog="polymae pretrain", doc=DOC,
                   flag_map={"resume": "resume"},
                   extra=lambda p: p.add_argument("--resume", action="store_true", default=None,
                                                  help="continue from the newest checkpoint (same as resume=true)"))


if __name__ == "__main__":
    raise SystemExit(main())
