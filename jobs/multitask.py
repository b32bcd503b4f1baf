"""``polymae multitask``: train task decoders (depth, semseg, classification) on a pre-trained MultiMAE/MAE encoder,
one task per step drawn by unmixed sampling, with MT-AdamW under DeepSpeed ZeRO 0-3 (Uni-Perceiver v2, Sec. 4.4).

Runs as a single process (``python -m polymae.jobs.multitask``) or under a launcher, e.g.
``torchrun --nproc_per_node=8 -m polymae.jobs.multitask --config jobs/configs/multitask_vit_base.yaml``.

Exit status: 0 when the run finished, 2 on a config error, 75 when ``train.preempt_signal`` stopped it early after
saving a checkpoint (continue with ``resume=true``).
"""

from __future__ import annotations

from typing import Sequence

from polymae.jobs.common import run_training_job
from polymae.pipeline.train.multitask import MultitaskTrainer
from polymae.pipeline.train.multitask_config import MultitaskConfig

DOC = __doc__


def run(cfg: MultitaskConfig) -> dict:
    """Train with ``cfg`` on this rank; returns the last logged metrics row."""
    return MultitaskTrainer(cfg).train()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae multitask``; returns the exit status (2 on a config error, ``PREEMPTED_EXIT_CODE``
    when stopped early by the preemption signal)."""
    return run_training_job(MultitaskConfig, MultitaskTrainer, argv, prog="polymae multitask", doc=DOC)


if __name__ == "__main__":
    raise SystemExit(main())
