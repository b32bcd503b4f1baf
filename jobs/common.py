"""Shared command-line plumbing for every job: ``--config X.yaml key=value ...`` → typed config → run.

Each job module defines ``main(argv=None)`` as ``return run_job(Config, run, argv, prog=..., doc=...)``;
the same module then works under ``polymae <job>``, ``python -m polymae.jobs.<job>``, ``torchrun``,
``deepspeed``, ``srun`` and ``ray job submit``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable, Sequence

from polymae.pipeline.config import ConfigError, help_text, load_config

log = logging.getLogger("polymae")


def setup_logging(level: str | None = None) -> None:
    """Plain timestamped logs on stderr; rank-aware (only rank 0 logs INFO under torchrun)."""
    rank = int(os.environ.get("RANK", "0"))
    lvl = level or os.environ.get("POLYMAE_LOG_LEVEL", "INFO" if rank == 0 else "WARNING")
    fmt = "%(asctime)s %(levelname).1s %(name)s" + (f" [rank {rank}]" if "RANK" in os.environ else "") + ": %(message)s"
    logging.basicConfig(level=lvl, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("urllib3", "botocore", "s3fs", "aiobotocore", "fsspec", "PIL", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_parser(config_cls: type, prog: str, doc: str, extra: Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> argparse.ArgumentParser:
    """An argparse parser: ``--config``, ``--log-level``, extra flags, ``key=value`` overrides; the epilog lists every config key."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, epilog=help_text(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", "-c", default=None, help="YAML config (local path or fsspec URL); key=value overrides it")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING (default INFO on rank 0)")
    if extra is not None:
        extra(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")
    return parser


def parse_config(config_cls: type, argv: Sequence[str] | None, prog: str, doc: str,
                 flag_map: dict[str, str] | None = None,
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[Any, argparse.Namespace]:
    """Parse argv into ``(config, namespace)``; exits with status 2 and the key's name on a config error.

    ``flag_map`` maps an extra flag's dest (e.g. ``address``) to a config key (e.g. ``ray_address``),
    so ``--address X`` is the same as ``ray_address=X``.
    """
    parser = build_parser(config_cls, prog, doc, extra)
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    overrides = list(ns.overrides)
    for dest, key in (flag_map or {}).items():
        v = getattr(ns, dest, None)
        if v is not None and v is not False:
            overrides.append(f"{key}={'true' if v is True else v}")
    setup_logging(ns.log_level)
    try:
        cfg = load_config(config_cls, ns.config, overrides)
    except ConfigError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    return cfg, ns


def run_job(config_cls: type, fn: Callable[[Any], Any], argv: Sequence[str] | None, prog: str, doc: str,
            flag_map: dict[str, str] | None = None,
            extra: Callable[[argparse.ArgumentParser], None] | None = None) -> int:
    """Parse, validate, run ``fn(cfg)``; returns the process exit status."""
    cfg, _ = parse_config(config_cls, argv, prog, doc, flag_map, extra)
    fn(cfg)
    return 0


def run_training_job(config_cls: type, trainer_cls: type, argv: Sequence[str] | None, prog: str, doc: str) -> int:
    """Entry point of a training job (``pretrain``, ``multitask``): parse the config (``--resume`` = ``resume=true``),
    run ``trainer_cls(cfg).train()`` on this rank. Returns the exit status: 2 on a config error,
    ``PREEMPTED_EXIT_CODE`` (75) when the trainer stopped early on the preemption signal (``trainer.preempted``),
    else 0."""
    from polymae.pipeline.train.trainer import PREEMPTED_EXIT_CODE

    preempted = []

    def train(cfg: Any) -> dict:
        trainer = trainer_cls(cfg)
        out = trainer.train()
        preempted.append(trainer.preempted)
        return out

    status = run_job(config_cls, train, argv, prog=prog, doc=doc, flag_map={"resume": "resume"},
                     extra=lambda p: p.add_argument("--resume", action="store_true", default=None,
                                                    help="continue from the newest checkpoint (same as resume=true)"))
    return PREEMPTED_EXIT_CODE if status == 0 and any(preempted) else status
