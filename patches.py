"""Every change polymae makes to third-party or process-global state, in one place.

Each function here changes one thing that outlives the call that made it (a library's module attribute,
the environment, a signal handler, the C allocator, the global RNG) and returns an :class:`Applied`
handle whose ``restore()`` undoes it; the handle is also a context manager. Each one:

* is named after what it changes and says why in its docstring;
* states the library version it was written for (:data:`WRITTEN_FOR`; a warning is logged once when the
  installed version differs, since a moved attribute is the usual way such a patch breaks);
* checks that the attribute it changes is where it expects and raises :class:`PatchError` otherwise,
  instead of silently setting an attribute nobody reads.

Nothing else in polymae assigns to another library's attributes, ``os.environ`` entries it does not own,
signal handlers or the global torch seed (docs/ARCHITECTURE.md, "Where each concern lives"). The module
sits at the package root, below every layer, because ``datasets`` (webdataset's URL schemes) and
``pipeline`` both need it; it imports no polymae module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)

# library -> the version each patch on it was written and tested for
WRITTEN_FOR = {"deepspeed": "0.19.8", "webdataset": "1.0.2", "transformers": "5.24.0", "glibc": "2.36",
               "torch": "2.14.1", "torchvision": "0.29.1", "ray": "2.60.0", "fsspec": "2026.9.0"}
_warned: set[str] = set()


class PatchError(RuntimeError):
    """A patched attribute is not where the patch expects it (an untested library version)."""


class Applied:
    """A change made to global state. ``restore()`` undoes it (once; later calls do nothing); as a context
    manager it restores on exit. ``name`` says what was changed."""

    def __init__(self, name: str, restore: Callable[[], None]):
        self.name = name
        self._restore: Callable[[], None] | None = restore

    @property
    def active(self) -> bool:
        """True until :meth:`restore` has run."""
        return self._restore is not None

    def restore(self) -> None:
        """Undo the change (idempotent)."""
        fn, self._restore = self._restore, None
        if fn is not None:
            fn()

    def __enter__(self) -> "Applied":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"Applied({self.name!r}, active={self.active})"


def _check_version(lib: str, installed: str) -> None:
    want = WRITTEN_FOR[lib]
    if installed.split("+")[0] != want and lib not in _warned:
        _warned.add(lib)
        log.warning("polymae's patches of %s were written for %s; %s is installed (patches.py checks each "
                    "attribute and fails loudly if one moved)", lib, want, installed)


def _require(obj: Any, attr: str, what: str) -> Any:
    if not hasattr(obj, attr):
        raise PatchError(f"{what}: {obj!r} has no attribute {attr!r} (written for the versions in "
                         f"polymae.patches.WRITTEN_FOR)")
    return getattr(obj, attr)


# ------------------------------------------------------------------------------------------- DeepSpeed
def skip_deepspeed_shm_comm_build() -> Applied:
    """Mark DeepSpeed's CPU shared-memory communication op as incompatible, so ``init_distributed`` on CPU
    does not compile it with g++ (~45 s on the first start of every fresh environment); gloo collectives are
    exact without it. Changes ``deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"]`` (DeepSpeed 0.19.8).

    Raises:
        PatchError: the table or its ``deepspeed_shm_comm`` entry is missing.
    """
    import deepspeed
    import deepspeed.ops

    _check_version("deepspeed", deepspeed.__version__)
    table = _require(deepspeed.ops, "__compatible_ops__", "skip_deepspeed_shm_comm_build")
    if "deepspeed_shm_comm" not in table:
        raise PatchError("skip_deepspeed_shm_comm_build: deepspeed.ops.__compatible_ops__ has no "
                         "'deepspeed_shm_comm' entry")
    before = table["deepspeed_shm_comm"]
    table["deepspeed_shm_comm"] = False

    def restore() -> None:
        table["deepspeed_shm_comm"] = before

    return Applied("deepspeed.ops.__compatible_ops__['deepspeed_shm_comm']", restore)


def bucketed_all_gather(enabled: bool) -> Applied:
    """Route ZeRO-1/2's all-gather of updated parameters through DeepSpeed's bucketed path (or back).

    After each optimizer step ZeRO-1/2 all-gathers every rank's partition of the updated parameters (ZeRO,
    Rajbhandari et al. 2020, Sec. 5). When its comm backend has ``all_gather_into_tensor`` DeepSpeed sends
    each parameter group as one message; gloo (CPU) takes 1.3-1.7x as long for such multi-MB messages as for
    the same bytes in ``allgather_bucket_size`` chunks (benchmarks/gloo_collectives.py), which DeepSpeed sends
    when the backend reports no ``all_gather_into_tensor`` (``deepspeed.runtime.utils.all_gather_dp_groups``).
    ``enabled=True`` makes the backend report none by setting ``deepspeed.comm.comm.cdb.all_gather_function``
    to ``None``; ``False`` puts the original function back. The same bytes are gathered either way.
    Process-wide: it affects every DeepSpeed engine in this process. Written for DeepSpeed 0.19.8.

    Raises:
        PatchError: DeepSpeed's comm backend is not initialised or has no ``all_gather_function``.
    """
    import deepspeed
    import deepspeed.comm.comm as dcomm

    _check_version("deepspeed", deepspeed.__version__)
    cdb = dcomm.cdb
    if cdb is None:
        raise PatchError("bucketed_all_gather: DeepSpeed's comm backend is not initialised")
    _require(cdb, "all_gather_function", "bucketed_all_gather")
    if not hasattr(cdb, "_polymae_all_gather_function"):  # the library's own function, kept once
        cdb._polymae_all_gather_function = cdb.all_gather_function
    before = cdb.all_gather_function
    cdb.all_gather_function = None if enabled else cdb._polymae_all_gather_function

    def restore() -> None:
        cdb.all_gather_function = before

    return Applied(f"deepspeed cdb.all_gather_function (bucketed={enabled})", restore)


def skip_backward_allreduce(engine: Any) -> Applied:
    """Turn off a DeepSpeed engine's gradient all-reduce in ``backward`` (``engine.enable_backward_allreduce``).

    For a world of one at ZeRO-0 there is nothing to average, and DeepSpeed would still flatten, all-reduce
    and unflatten every gradient each step. Written for DeepSpeed 0.19.8.

    Raises:
        PatchError: the engine has no ``enable_backward_allreduce`` attribute.
    """
    before = _require(engine, "enable_backward_allreduce", "skip_backward_allreduce")
    engine.enable_backward_allreduce = False

    def restore() -> None:
        engine.enable_backward_allreduce = before

    return Applied("engine.enable_backward_allreduce", restore)


# ------------------------------------------------------------------------------------------ webdataset
FSSPEC_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "memory", "hf")


def _fsspec_gopen(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    import fsspec

    return fsspec.open(url, mode).open()


def webdataset_fsspec_schemes(schemes: Iterable[str] = FSSPEC_SCHEMES) -> Applied:
    """Let webdataset open ``s3://``, ``gcs://``, ``az://``, ``memory://`` ... URLs through fsspec.

    webdataset's ``gopen`` dispatches on ``webdataset.gopen.gopen_schemes`` and has no fsspec handler; this
    adds one for each scheme it does not already handle (its own handlers, e.g. ``gs`` through ``gsutil``
    or ``hf``, are kept). Idempotent. Written for webdataset 1.0.2.

    Raises:
        PatchError: ``webdataset.gopen`` has no ``gopen_schemes`` table.
    """
    import importlib

    import webdataset

    _check_version("webdataset", webdataset.__version__)
    # `import webdataset.gopen as wg` yields the *function* webdataset.gopen (re-exported by the package)
    wg = importlib.import_module("webdataset.gopen")
    table = _require(wg, "gopen_schemes", "webdataset_fsspec_schemes")
    added = [s for s in schemes if s not in table]
    for s in added:
        table[s] = _fsspec_gopen

    def restore() -> None:
        for s in added:
            if table.get(s) is _fsspec_gopen:
                del table[s]

    return Applied(f"webdataset.gopen.gopen_schemes {added}", restore)


# ---------------------------------------------------------------------------------------- torchvision
TORCHVISION_IO_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision are deprecated"


def silence_torchvision_io_deprecation() -> Applied:
    """Hide the ``DeprecationWarning`` torchvision 0.29 emits on every ``torchvision.io.decode_jpeg`` /
    ``decode_png`` call (it points to TorchCodec). The loader decodes with them because libjpeg-turbo through
    torchvision decodes a 500x375 JPEG in ~0.75 ms against ~1.2 ms through PIL (benchmarks/loader_speed.py),
    and warning once per sample floods the logs. Adds one filter for that message to ``warnings.filters``;
    ``restore()`` removes it. Written for torchvision 0.29.1.

    Raises:
        PatchError: ``torchvision.io`` has no ``decode_jpeg`` (the API this filter is for moved).
    """
    import warnings

    import torchvision
    import torchvision.io

    _check_version("torchvision", torchvision.__version__)
    _require(torchvision.io, "decode_jpeg", "silence_torchvision_io_deprecation")
    warnings.filterwarnings("ignore", message=TORCHVISION_IO_DEPRECATION, category=DeprecationWarning)
    entry = warnings.filters[0]

    def restore() -> None:
        with contextlib.suppress(ValueError):
            warnings.filters.remove(entry)
        warnings._filters_mutated()  # invalidate the per-module "already warned" caches, as filterwarnings does

    return Applied("warnings filter for torchvision.io's deprecation", restore)


# ----------------------------------------------------------------------------------------------- glibc
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # <malloc.h>
_GLIBC_DEFAULT_TRIM_THRESHOLD, _GLIBC_DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        version = libc.gnu_get_libc_version  # glibc only (musl has no mallopt semantics to match)
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    _check_version("glibc", version().decode())
    return libc


def keep_freed_host_memory(trim_threshold: int = 2**31 - 1) -> Applied | None:
    """Make glibc's ``malloc`` keep freed host memory in the process instead of handing it back to the OS.

    By default glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
    returns it with ``munmap`` on free, so a buffer allocated and freed every step is page-faulted (and
    zero-filled by the kernel) again every step. DeepSpeed's ZeRO optimizers allocate such flat fp32
    buffers per step: for MultiMAE-tiny on one CPU rank ZeRO-2 took ~39,000 minor page faults (~150 MiB) per
    step and its step time fell from 229 ms to 164 ms with this setting (benchmarks/RESULTS.md). This calls
    ``mallopt(M_MMAP_MAX, 0)`` (large blocks come from the heap and are reused) and
    ``mallopt(M_TRIM_THRESHOLD, trim_threshold)`` (bytes of free heap top kept before trimming), the runtime
    equivalents of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``. Cost: the process keeps its peak host
    footprint. Applies to blocks allocated from then on. Written for glibc 2.36.

    ``restore()`` sets glibc's documented defaults back (``M_MMAP_MAX`` 65536, ``M_TRIM_THRESHOLD`` 128 KiB) and
    returns the kept free memory to the OS (``malloc_trim(0)``); glibc's dynamic mmap threshold stays off once
    either was set (mallopt(3)).

    Returns:
        the handle, or None (nothing changed) on a C library other than glibc or a non-Linux system.
    Raises:
        PatchError: glibc rejected a setting.
    """
    libc = _glibc()
    if libc is None:
        return None
    if libc.mallopt(_M_MMAP_MAX, 0) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) != 1:
        raise PatchError("keep_freed_host_memory: glibc mallopt rejected M_MMAP_MAX/M_TRIM_THRESHOLD")

    def restore() -> None:
        libc.mallopt(_M_MMAP_MAX, _GLIBC_DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _GLIBC_DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)  # hand back what was kept, so large blocks are mapped afresh as by default

    return Applied("glibc mallopt(M_MMAP_MAX, M_TRIM_THRESHOLD)", restore)


# ------------------------------------------------------------------------------------- process globals
def signal_handlers(handler: Callable[[int, Any], None], signals: Iterable[int] = (signal.SIGTERM,)) -> Applied:
    """Install ``handler(signum, frame)`` for ``signals`` (Slurm preemption: SIGTERM before the time limit);
    ``restore()`` puts the previous handlers back, so a job run inside a larger program (a test, a notebook)
    does not leave its handler behind. Main thread only (Python's rule).

    Raises:
        ValueError: called from a thread other than the main thread (from ``signal.signal``).
    """
    previous = {s: signal.signal(s, handler) for s in signals}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)

    return Applied(f"signal handlers {[signal.Signals(s).name for s in previous]}", restore)


def kill_daemon_children_at_exit() -> Applied:
    """Register an ``atexit`` hook that SIGKILLs this process's remaining daemonic ``multiprocessing``
    children (data-loader workers) before ``multiprocessing``'s own exit hook joins them.

    Loader workers ignore SIGTERM (Slurm signals every process of a job step; see
    ``polymae.datasets.loader.ignore_preemption_signals``), and ``multiprocessing`` ends daemonic children at
    interpreter exit with SIGTERM and then waits for them: without this hook a process whose loader iterator
    was not shut down before exit would wait forever. ``atexit`` runs hooks last-registered first, and
    ``multiprocessing`` registers its hook at import, so this one runs before it. ``restore()`` unregisters it.
    """
    import atexit
    import multiprocessing

    def kill_children() -> None:
        for child in multiprocessing.active_children():
            if child.daemon:
                child.kill()

    atexit.register(kill_children)
    return Applied("atexit: SIGKILL daemonic children", lambda: atexit.unregister(kill_children))


def global_torch_seed(seed: int) -> Applied:
    """Seed torch's global generators (``torch.manual_seed``: CPU and every CUDA device) so that model
    initialisation is reproducible; ``restore()`` puts the previous CPU and CUDA generator states back.
    Written for torch 2.14.1."""
    import torch

    _check_version("torch", torch.__version__)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    torch.manual_seed(seed)

    def restore() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return Applied(f"torch global seed {seed}", restore)


def global_rngs_seed(seed: int) -> Applied:
    """Seed Python's ``random``, numpy's global generator and torch's default CPU generator from ``seed`` (a
    non-negative int; numpy gets ``seed mod 2**32``); ``restore()`` puts the three previous states back. For
    libraries that draw from them (timm's RandAugment and RandomErasing) run per sample from a derived seed."""
    import random

    import numpy as np
    import torch

    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)

    def restore() -> None:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])

    return Applied(f"python/numpy/torch CPU global seed {seed}", restore)


def numpy_global_state(state: dict) -> Applied:
    """Put numpy's global generator into ``state["state"]`` (seeded from ``state["seed"]`` the first time); on
    ``restore()`` save its state back into ``state["state"]`` and put the caller's back. A private numpy stream
    for a library that draws from ``np.random`` (timm's ``Mixup``) across calls."""
    import numpy as np

    saved = np.random.get_state()
    if "state" not in state:
        np.random.seed(state["seed"])
    else:
        np.random.set_state(state["state"])

    def restore() -> None:
        state["state"] = np.random.get_state()
        np.random.set_state(saved)

    return Applied("numpy global generator (private stream)", restore)


def environment(values: Mapping[str, str], only_unset: bool = True) -> Applied:
    """Set environment variables (``only_unset``: only those not already set, so the user's exported value
    wins); ``restore()`` removes the ones it added and puts back the ones it changed. Used for the ``RAY_*``
    variables the label driver needs to start an embedded Ray on the reference machine."""
    before: dict[str, str | None] = {}
    for k, v in values.items():
        if only_unset and k in os.environ:
            continue
        before[k] = os.environ.get(k)
        os.environ[k] = str(v)

    def restore() -> None:
        for k, old in before.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old

    return Applied(f"environment {sorted(before)}", restore)


def fsspec_defaults(options: Mapping[str, Mapping[str, Any]]) -> Applied:
    """Default filesystem options per protocol (``{"s3": {"endpoint_url": ...}}``) in fsspec's global config
    ``fsspec.config.conf``, which fsspec merges under the explicit arguments of every filesystem it creates
    (a process's workers get the same through ``FSSPEC_<PROTOCOL>`` variables, which fsspec reads at
    import). Used for the label job's ``storage_options``, so that every storage call of the driver
    (listing, plan, shards, manifest) sees them without each caller passing them. ``restore()`` puts back
    each protocol's previous entry."""
    import fsspec
    import fsspec.config

    _check_version("fsspec", fsspec.__version__)
    conf = _require(fsspec.config, "conf", "fsspec's global filesystem config")
    before = {proto: (proto in conf, dict(conf.get(proto, {}))) for proto in options}
    for proto, opts in options.items():
        conf[proto] = {**conf.get(proto, {}), **dict(opts)}

    def restore() -> None:
        for proto, (had, old) in before.items():
            if had:
                conf[proto] = old
            else:
                conf.pop(proto, None)

    return Applied(f"fsspec defaults for {sorted(options)}", restore)


# -------------------------------------------------------------------------------------- transformers
HF_EXTRA_PREFIX = "polymae_"


def hf_config_extras(config: Any, **attrs: Any) -> Applied:
    """Add polymae's own attributes to a Hugging Face ``PretrainedConfig`` (saved into ``config.json`` by
    ``save_pretrained`` and read back by teachers: ``polymae_random_init``, ``polymae_label_set``,
    ``polymae_depth_kind``, ``polymae_output_calibration``, ``polymae_task_token_ids``). Names must start
    with ``polymae_`` so they can never shadow a field transformers reads; ``restore()`` deletes the new
    attributes and puts back previous values. Written for transformers 5.24.0.

    Raises:
        ValueError: a name without the ``polymae_`` prefix.
        PatchError: ``config`` has no ``to_dict`` (not a ``PretrainedConfig``).
    """
    import transformers

    _check_version("transformers", transformers.__version__)
    _require(config, "to_dict", "hf_config_extras")
    bad = [k for k in attrs if not k.startswith(HF_EXTRA_PREFIX)]
    if bad:
        raise ValueError(f"hf_config_extras: {bad} must start with {HF_EXTRA_PREFIX!r}")
    missing = object()
    before = {k: getattr(config, k, missing) for k in attrs}
    for k, v in attrs.items():
        setattr(config, k, v)

    def restore() -> None:
        for k, old in before.items():
            if old is missing:
                with contextlib.suppress(AttributeError):
                    delattr(config, k)
            else:
                setattr(config, k, old)

    return Applied(f"transformers config extras {sorted(attrs)}", restore)


def quiet_transformers() -> Applied:
    """Silence transformers' info logs and progress bars (weight loading/saving); ``restore()`` (or leaving
    the ``with`` block) puts back its previous verbosity and progress-bar setting. Written for
    transformers 5.24.0.

    Raises:
        PatchError: ``transformers.utils.logging`` lacks the verbosity/progress-bar functions.
    """
    import transformers
    from transformers.utils import logging as tlog

    _check_version("transformers", transformers.__version__)
    for attr in ("get_verbosity", "set_verbosity", "set_verbosity_error", "is_progress_bar_enabled",
                 "enable_progress_bar", "disable_progress_bar"):
        _require(tlog, attr, "quiet_transformers")
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()

    def restore() -> None:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()

    return Applied("transformers verbosity + progress bars", restore)
