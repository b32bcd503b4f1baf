"""Shared by the multi-rank benchmarks: start a script under ``torchrun`` on this machine, on the CPU (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_cmd(script: str, nproc: int, args: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` with ``nproc`` ranks on one node, a free port, ``args``."""
    from polymae.pipeline.train.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", os.path.abspath(script), *args]


def cpu_env(**extra: str) -> dict:
    """This process's environment + ``DS_ACCELERATOR=cpu`` and ``OMP_NUM_THREADS`` (default 1) + ``extra``."""
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), **extra)


def relaunch(script: str, nproc: int, argv: list[str] | None) -> int:
    """Run ``script`` again under torchrun with the same command-line arguments; returns its exit status."""
    args = argv if argv is not None else sys.argv[1:]
    return subprocess.run(torchrun_cmd(script, nproc, args), env=cpu_env()).returncode
