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
    """``deepspeed.init_distributed`` with gloo on CPU (skipping the shm-comm compile) or nccl on GPU."""
    fill_env()
    if not use_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    if not use_cuda():
        # The CPU shared-memory comm op compiles with g++ for ~45 s on first start; gloo is exact without it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    else:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)


def keep_freed_host_memory(trim_threshold: int = 2**31 - 1) -> bool:
    """Make glibc's ``malloc`` keep freed host memory in the process instead of handing it back to the OS.

    By default glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    returns it with ``munmap`` on free, so a buffer allocated and freed every step is page-faulted (and
    zero-filled by the kernel) again every step. DeepSpeed's ZeRO optimizers allocate such flat fp32
    buffers (gradient partitions, flattened groups) per step: for MultiMAE-tiny on one CPU rank ZeRO-2 took
    ~39,000 minor page faults (~150 MiB) per step and its step time fell from 229 ms to 164 ms with this
    setting (``benchmarks/RESULTS.md``). This calls ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the
    heap and are reused) and ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (bytes of free heap top kept
    before trimming), the runtime equivalents of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``.

    Cost: the process keeps its peak host footprint (RSS does not shrink after a peak). Applies to blocks
    allocated from now on. Returns True when both settings took effect, False (nothing changed) on a C
    library other than glibc or a non-Linux system. Raises nothing.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no mallopt semantics to match)
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, int(trim_threshold)) == 1


# Gloo moves one large message at a fraction of its bandwidth: on 2 CPU ranks, for MultiMAE-small's 114 MiB of
# fp32 parameters, DeepSpeed's one-message all-gather took 151-185 ms and the same bytes in these buckets 100-115 ms;
# per-owner gradient reduces took 98-114 ms and one all-reduce 81-87 ms (benchmarks/gloo_collectives.py,
# benchmarks/RESULTS.md). 4e6 fp32 elements = 16 MB per all-gather bucket.
GLOO_ALLGATHER_BUCKET = 4_000_000


def set_bucketed_all_gather(enabled: bool) -> bool:
    """Route ZeRO-1/2's all-gather of updated parameters through DeepSpeed's bucketed path.

    After each optimizer step ZeRO-1/2 all-gathers every rank's partition of the updated parameters
    (ZeRO paper, Rajbhandari et al. 2020, sec. 5). With a ``torch.distributed.all_gather_into_tensor``
    available DeepSpeed sends each parameter group as one message; gloo (CPU) takes 1.3-1.7x as long for such
    multi-MB messages as for the same bytes in ``allgather_bucket_size`` chunks, which is the path DeepSpeed
    takes (``deepspeed.runtime.utils.all_gather_dp_groups``) when its comm backend reports no
    ``all_gather_into_tensor``. ``enabled=True`` makes the backend report none (its ``all_gather_function``
    is set to ``None``); ``False`` restores the function. Process-wide: it affects every DeepSpeed engine
    in this process, so the Trainer sets it at the start of each ``train()``. Results are unchanged (the same
    bytes are gathered). Returns the backend's ``has_all_gather_into_tensor()`` after the change. Raises
    RuntimeError when DeepSpeed's comm backend is not initialised or has no such attribute (an untested
    DeepSpeed version).
    """
    import deepspeed.comm.comm as dcomm

    cdb = dcomm.cdb
    if cdb is None or not hasattr(cdb, "all_gather_function"):
        raise RuntimeError("DeepSpeed comm backend not initialised or without all_gather_function")
    if not hasattr(cdb, "_polymae_all_gather_function"):
        cdb._polymae_all_gather_function = cdb.all_gather_function
    cdb.all_gather_function = None if enabled else cdb._polymae_all_gather_function
    return cdb.has_all_gather_into_tensor()
