"""``polymae publish``: consolidate a run's newest DeepSpeed checkpoint and publish it; ``polymae publish --verify URL``
checks a release.

Writes ``model.safetensors``, ``encoder.safetensors`` (timm ViT), ``model_config.json``, ``config.yaml``,
``metrics.json``, the model card ``README.md`` and, last, ``manifest.json`` (size + sha256 per file, git commit) to
``dest``: a local folder, ``file://`` or ``s3://bucket/prefix`` (endpoint and credentials from the AWS_*
environment). No local absolute path is written; uploads are retried on transient storage errors.

``--verify URL`` re-hashes every file of the release at URL against its manifest, names every file that differs,
is missing or is not in the manifest, and exits 0 when the release is intact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from polymae.jobs.common import run_job, setup_logging
from polymae.pipeline.config import redact
from polymae.pipeline.publish import PublishConfig, publish, verify_release


def verify(argv: Sequence[str]) -> int:
    """``polymae publish --verify URL``: print each problem of the release (one line per file) and return 0 when
    it is intact, 1 otherwise (also when ``manifest.json`` is missing)."""
    parser = argparse.ArgumentParser(prog="polymae publish --verify",
                                     description="re-hash a release against its manifest.json")
    parser.add_argument("--verify", metavar="URL", required=True, help="release folder: local path or fsspec URL")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING")
    ns = parser.parse_args(list(argv))
    setup_logging(ns.log_level)
    where = redact(ns.verify)
    problems = verify_release(ns.verify)
    for p in problems:
        print(f"{where}: {p}")
    if problems:
        print(f"{where}: NOT intact ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"{where}: intact (every file in manifest.json has its size and sha256, and no other file is there)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``polymae publish``; returns the exit status (2 on a config error; with ``--verify``: 0 for an
    intact release, 1 otherwise)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a == "--verify" or a.startswith("--verify=") for a in args):
        return verify(args)
    return run_job(PublishConfig, publish, args, prog="polymae publish", doc=__doc__,
                   extra=lambda p: p.add_argument("--verify", metavar="URL", default=None,
                                                  help="check the release at URL against its manifest instead"))


if __name__ == "__main__":
    raise SystemExit(main())
