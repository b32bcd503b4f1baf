"""``polymae evaluate``: score a checkpoint with one protocol, or compare checkpoints.

``polymae evaluate [--config jobs/configs/eval/X.yaml] checkpoint=... protocol=...`` runs one protocol
(pretrain: reconstruction + RGB→X on held-out shards; linear_probe; finetune; semseg; depth; coco) on any
checkpoint (run folder, release folder or URL, official MultiMAE/MAE file) and writes ``results.json``, pictures
and rows of the results table (``results_table``, default ``work/results``).

``polymae evaluate --compare [CKPT ...] [results_table=DIR]`` prints the checkpoints of the results table side
by side (all of them without CKPT) and writes nothing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from polymae.jobs.common import run_job
from polymae.pipeline.evaluate.job import EvaluateConfig, evaluate


def compare_main(args: Sequence[str]) -> int:
    """``--compare [CKPT ...] [results_table=DIR]``: print the results table's checkpoints side by side.
    Returns 0, or 1 with a message when the table or a checkpoint's rows are missing."""
    from polymae.jobs.common import setup_logging
    from polymae.pipeline.evaluate.results import compare

    setup_logging()
    table = EvaluateConfig().results_table
    ckpts = []
    for a in args:
        if a.startswith("results_table="):
            table = a.split("=", 1)[1]
        else:
            ckpts.append(a)
    try:
        compare(table, ckpts)
    except (FileNotFoundError, KeyError) as e:
        print(f"polymae evaluate --compare: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae evaluate``; returns the exit status (2 on a config error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--compare":
        return compare_main(args[1:])
    return run_job(EvaluateConfig, evaluate, args, prog="polymae evaluate", doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
