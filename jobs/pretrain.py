"""``polymae pretrain``: MultiMAE / MAE pre-training on labelled shards with DeepSpeed ZeRO.

Runs as a single process (``python -m polymae.jobs.pretrain``) or under a launcher, e.g.
``torchrun --nproc_per_node=8 -m polymae.jobs.pretrain --config jobs/configs/multimae_vit_base.yaml``,
``deepspeed --num_gpus 8 -m polymae.jobs.pretrain ...`` or ``srun python -m polymae.jobs.pretrain ...``.

Exit status: 0 when the run finished, 2 on a config error, 75 (``PREEMPTED_EXIT_CODE``) when
``train.preempt_signal`` stopped it early after saving a checkpoint (requeue and continue with ``resume=true``;
``slurm/pretrain.sbatch`` does), anything else on a failure. Under ``torchrun`` the launcher reports a worker's
status 75 as its own failure (status 1): use ``srun`` (one task per rank) where the status matters.
"""

from __future__ import annotations

from typing import Sequence

from polymae.jobs.common import run_training_job
from polymae.pipeline.train.config import PretrainConfig
from polymae.pipeline.train.trainer import Trainer

DOC = __doc__


def run(cfg: PretrainConfig) -> dict:
    """Train with ``cfg`` on this rank; returns the last logged metrics."""
    return Trainer(cfg).train()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae pretrain``; returns the exit status (2 on a config error, ``PREEMPTED_EXIT_CODE``
    when stopped early by the preemption signal)."""
    return run_training_job(PretrainConfig, Trainer, argv, prog="polymae pretrain", doc=DOC)


if __name__ == "__main__":
    raise SystemExit(main())
