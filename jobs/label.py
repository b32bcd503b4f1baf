"""``polymae label``: pseudo-label images with depth + semseg teachers on Ray and write WebDataset shards.

Examples::

    python -m polymae.jobs.label input=photos/ output=work/shards samples_per_shard=2000
    python -m polymae.jobs.label --config my_label.yaml --address auto mode=extend
    ray job submit -- python -m polymae.jobs.label input=s3://bucket/imagenet/train output=s3://bucket/shards

See ``pipeline/label/driver.py`` for the flow and ``datasets/shards.py`` for the output format.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from polymae.jobs.common import run_job
from polymae.pipeline.label.config import LabelConfig
from polymae.pipeline.label.driver import run_label


def _flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (same as ray_address=...); default: embedded local Ray")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--overwrite", dest="mode_flag", action="store_const", const="overwrite",
                      help="relabel everything (same as mode=overwrite)")
    mode.add_argument("--extend", dest="mode_flag", action="store_const", const="extend",
                      help="keep existing shards, add shards for new images (same as mode=extend)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 on success; a failed shard raises)."""
    return run_job(LabelConfig, run_label, argv, prog="polymae label", doc="pseudo-label images with depth + semseg teachers on Ray and write WebDataset shards",
                   flag_map={"address": "ray_address", "mode_flag": "mode"}, extra=_flags)


if __name__ == "__main__":
    raise SystemExit(main())
