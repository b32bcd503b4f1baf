"""The ``polymae`` command: ``polymae <job> [--config X.yaml] [key=value ...]``.

Jobs: label, pretrain, multitask, evaluate, publish, quickstart. ``polymae <job> --help`` lists every config key.
"""

from __future__ import annotations

import importlib
import sys

JOBS = {
    "label": "pseudo-label images into WebDataset shards with depth + semseg teachers (Ray)",
    "pretrain": "MultiMAE / MAE pre-training with DeepSpeed ZeRO",
    "multitask": "task decoders on a pre-trained encoder: unmixed sampling + MT-AdamW, DeepSpeed ZeRO",
    "evaluate": "score a checkpoint on held-out shards (reconstruction, δ1, mIoU)",
    "publish": "consolidate a checkpoint to safetensors and publish it with a manifest",
    "quickstart": "label → pretrain → evaluate → publish on the scikit-image photographs",
}


def usage() -> str:
    """The top-level usage text listing every job."""
    lines = ["usage: polymae <job> [--config X.yaml] [key=value ...]", "", "jobs:"]
    lines += [f"  {name:<11} {doc}" for name, doc in JOBS.items()]
    lines += ["", "`polymae <job> --help` shows every config key of that job."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``polymae <job> ...`` to ``polymae.jobs.<job>.main``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from polymae import __version__

        print(f"polymae {__version__}")
        return 0
    job = argv[0]
    if job not in JOBS:
        print(f"polymae: unknown job {job!r}\n\n{usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(f"polymae.jobs.{job}")
    return mod.main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
