"""Process-group set-up for DeepSpeed on CPU (gloo) or GPU (nccl), launched by torchrun/deepspeed/srun or alone.

A plain ``python -m polymae.jobs.pretrain`` (no launcher) runs as a world of one: the rendezvous
variables are filled in with a free local port. Under Slurm ``srun`` the SLURM_* variables are
translated to the torch ones.
"""

from __future__ import annotations

import os
import socket


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill_env() -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from Slurm or for a single process."""
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        os.environ.setdefault("MASTER_ADDR", os.environ.get("POLYMAE_MASTER_ADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", os.environ.get("POLYMAE_MASTER_PORT", "29533"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def world_size() -> int:
    """World size from the launcher's environment (1 when launched alone), before any process group."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def use_cuda() -> bool:
    """True when CUDA is usable and ``DS_ACCELERATOR`` does not force the CPU."""
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_deepspeed_distributed() -> None:
    """``deepspeed.init_distributed`` with gloo on CPU (skipping the shm-comm compile) or nccl on GPU.

    On CPU, ``DS_ACCELERATOR=cpu`` is set when unset (DeepSpeed picks its accelerator from it on import) and the
    shared-memory comm op is skipped, both through ``polymae.patches`` and kept for the life of the process (as
    is the process group)."""
    from polymae.patches import environment, skip_deepspeed_shm_comm_build

    fill_env()
    if not use_cuda():
        environment({"DS_ACCELERATOR": "cpu"})
    import deepspeed

    if not use_cuda():
        # The CPU shared-memory comm op compiles with g++ for ~45 s on first start; gloo is exact without it.
        skip_deepspeed_shm_comm_build()
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)


# Gloo moves one large message at a fraction of its bandwidth: on 2 CPU ranks, for MultiMAE-small's 114 MiB of
# fp32 parameters, DeepSpeed's one-message all-gather took 151-185 ms and the same bytes in these buckets 100-115 ms;
# per-owner gradient reduces took 98-114 ms and one all-reduce 81-87 ms (benchmarks/gloo_collectives.py,
# benchmarks/RESULTS.md). 4e6 fp32 elements = 16 MB per all-gather bucket.
GLOO_ALLGATHER_BUCKET = 4_000_000
