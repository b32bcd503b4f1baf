"""Checkpoints: write and resume them during training, find, consolidate and load them afterwards, without
unpickling untrusted bytes.

Two kinds exist (docs/ARCHITECTURE.md, "Run folder and release"):

* a training run folder ``{run}/checkpoints/step-XXXXXXXX/`` + ``{run}/checkpoints/latest`` written by DeepSpeed
  through :class:`Checkpointer` (the whole training state, for exact resume); it is this job's own state, read
  back by :meth:`Checkpointer.load` in the run that wrote it, or with DeepSpeed's ZeRO consolidation
  (``get_fp32_state_dict_from_zero_checkpoint``) in one process (:func:`consolidate`);
* a released folder with ``model.safetensors`` + ``model_config.json`` (from ``publish``), loaded with
  safetensors only.

:func:`load_model` accepts either and returns an eval-mode ``nn.Module`` on CPU.

**Atomic checkpoints.** A tag counts only once it is *complete*: every rank has written its files (DeepSpeed
``save_checkpoint(..., save_latest=False)``), all ranks passed a barrier, and rank 0 then wrote the completion
marker ``step-XXXXXXXX/complete.json`` (:data:`MARKER_FILE`: ``{"tag", "step", "world_size", "zero_stage",
"time"}``, written to a temporary name, fsynced and renamed). Only after the marker does rank 0 replace
``checkpoints/latest`` (same way), then prune. A process killed at any moment of a save (even ``kill -9``) thus
leaves either a complete tag or one without a marker, and :func:`resume_tag` (used by :meth:`Checkpointer.load`
and :func:`consolidate`) takes the newest complete tag by step, whatever ``latest`` says: ``latest`` is kept for
people and older tools, and a ``latest`` naming an incomplete tag is ignored. **Runs written before markers
existed** (no ``complete.json`` in any tag folder) are read as before, from ``latest``, with a warning; once one
tag of a run has a marker, tags without one count as incomplete.

Pruning (:meth:`Checkpointer.prune`, after every save) keeps the newest ``keep_last`` complete tags and deletes
older complete ones and every incomplete tag older than the newest complete one; it never deletes the newest
complete tag. An incomplete tag newer than that one (a save killed half-way) is left until the run saves that
step again, which first deletes the leftover folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
MODEL_CONFIG = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"
TAG_PREFIX = "step-"
LATEST_FILE = "latest"
#: written by rank 0 into a tag folder once every rank's files are in place: the tag is complete
MARKER_FILE = "complete.json"
#: test-only fault injection (see :func:`fault_point`): ``POINT:STEP``, e.g. ``before_marker:4``
KILL_ENV = "POLYMAE_TEST_KILL_AT"
#: the moments of :meth:`Checkpointer.save` where :data:`KILL_ENV` can kill the process
KILL_POINTS = ("before_save", "before_marker", "before_latest")


def step_tag(step: int) -> str:
    """The checkpoint tag (folder name) of optimizer step ``step``: ``step-00000042``."""
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a tag named by :func:`step_tag` (``step-00000042`` -> 42), None for any other name."""
    rest = tag[len(TAG_PREFIX):] if tag.startswith(TAG_PREFIX) else ""
    return int(rest) if rest.isdigit() else None


def latest_tag(run_dir: str) -> str:
    """The tag named in ``{run}/checkpoints/latest`` (which may name an incomplete tag: see :func:`resume_tag`).

    Raises:
        FileNotFoundError: the run has no checkpoint.
    """
    path = os.path.join(run_dir, CHECKPOINTS_DIR, LATEST_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint in {run_dir} (missing checkpoints/latest)")
    with open(path) as fh:
        return fh.read().strip()


def is_complete(tag_dir: str) -> bool:
    """Whether a tag folder holds the completion marker (:data:`MARKER_FILE`)."""
    return os.path.isfile(os.path.join(tag_dir, MARKER_FILE))


def scan_tags(folder: str) -> tuple[list[str], list[str]]:
    """``(complete, incomplete)`` tags (``step-*`` folders) of a ``checkpoints`` folder, each sorted by step;
    ``([], [])`` when the folder does not exist."""
    if not os.path.isdir(folder):
        return [], []
    tags = sorted((d for d in os.listdir(folder) if tag_step(d) is not None and os.path.isdir(os.path.join(folder, d))),
                  key=tag_step)
    complete = [t for t in tags if is_complete(os.path.join(folder, t))]
    return complete, [t for t in tags if t not in complete]


def resume_tag(run_dir: str) -> tuple[str | None, list[str]]:
    """The tag to resume (or consolidate) a run from, and the incomplete tags newer than it that were skipped.

    The newest complete tag by step; ``latest`` is not trusted (it may lag behind a complete tag or, written by
    hand or by an older version, name an incomplete one). A run folder without any marker at all (written
    before markers existed) falls back to ``latest``, with a warning. ``(None, skipped)`` when there is nothing
    to resume from.
    """
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    complete, incomplete = scan_tags(folder)
    if not complete:
        if os.path.exists(os.path.join(folder, LATEST_FILE)):
            tag = latest_tag(run_dir)
            log.warning("no tag in %s has a completion marker (%s): a run from before atomic checkpoints; "
                        "trusting checkpoints/latest = %s", folder, MARKER_FILE, tag)
            return tag, []
        return None, incomplete
    tag = complete[-1]
    return tag, [t for t in incomplete if tag_step(t) > tag_step(tag)]


def agreed_step(steps: Sequence[int]) -> int:
    """The step every rank resumed from, given each rank's (``steps[rank]``).

    Raises:
        RuntimeError: the ranks disagree; the message names each rank's step (e.g. ranks that saw different
            checkpoint folders).
    """
    if len(set(steps)) > 1:
        by_step: dict[int, list[int]] = {}
        for rank, s in enumerate(steps):
            by_step.setdefault(int(s), []).append(rank)
        detail = "; ".join(f"step {s} on rank(s) {', '.join(map(str, r))}" for s, r in sorted(by_step.items()))
        raise RuntimeError(f"ranks resumed from different steps: {detail} (do all ranks see the same "
                           f"checkpoints folder?)")
    return int(steps[0]) if steps else 0


def write_durable(path: str, text: str) -> None:
    """Write ``text`` to a local ``path`` atomically and durably: a temporary file beside it, fsync, ``os.replace``,
    then fsync of the folder (so the rename itself survives a crash)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def fault_point(point: str, step: int, peers: Sequence[tuple[int, int]] = ()) -> None:
    """**Test-only fault injection hook** (a simulated ``kill -9`` of the whole job in the middle of a save).

    When the environment variable :data:`KILL_ENV` (``POLYMAE_TEST_KILL_AT``) is ``"{point}:{step}"``, the
    first rank that reaches ``point`` of the save of ``step`` SIGKILLs the other ranks (``peers``: every rank's
    ``(pid, process group)``, gathered by :class:`Checkpointer` only when the variable is set; same host only),
    then itself. A process that leads its process group (torchrun starts each rank in its own session; a test
    starts a single process with ``start_new_session=True``) is killed with its whole group, i.e. with its
    data-loader workers. Points: :data:`KILL_POINTS`. Never set it outside tests.
    """
    spec = os.environ.get(KILL_ENV)
    if not spec or spec != f"{point}:{step}":
        return
    log.warning("fault injection %s=%s: SIGKILL now", KILL_ENV, spec)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    me = os.getpid()
    for pid, pgid in [p for p in peers if p[0] != me] + [(me, os.getpgrp())]:
        with contextlib.suppress(ProcessLookupError):
            if pgid == pid:
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)


class Checkpointer:
    """Saves and restores a DeepSpeed engine's whole training state (module, optimizer and ZeRO partitions,
    arXiv 1910.02054, plus the step) as ``{run_dir}/checkpoints/step-XXXXXXXX/``, atomically (a tag counts once
    its :data:`MARKER_FILE` exists; see the module docstring), and keeps ``checkpoints/latest`` naming the
    newest. Under ZeRO every rank writes and reads its own partitions, so :meth:`save` and :meth:`load` are
    collective: call them on every rank at the same step.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine``.
        run_dir: the run folder (local path, shared by all ranks).
        keep_last: complete checkpoints kept after each save; older ``step-*`` folders are deleted by rank 0.
    """

    def __init__(self, engine: Any, run_dir: str, keep_last: int = 2):
        self.engine = engine
        self.run_dir = run_dir.rstrip("/")
        self.folder = f"{self.run_dir}/{CHECKPOINTS_DIR}"
        self.keep_last = keep_last
        self._peers = _gather_pids() if os.environ.get(KILL_ENV) else []  # fault_point only: test runs

    def save(self, step: int) -> str:
        """Write the checkpoint of step ``step`` (optimizer steps done) and make it count: (rank 0) delete a
        leftover folder of the same tag; every rank writes its files; barrier; (rank 0) write the completion
        marker, replace ``latest``, prune; barrier, so no rank leaves before the tag is complete. Returns the
        tag. :func:`fault_point` is checked before the save, the marker and ``latest``."""
        tag = step_tag(step)
        fault_point("before_save", step, self._peers)
        tag_dir = os.path.join(self.folder, tag)
        if _rank() == 0 and os.path.isdir(tag_dir):
            log.warning("replacing the existing checkpoint folder %s", tag_dir)
            shutil.rmtree(tag_dir)
        _barrier()
        self.engine.save_checkpoint(self.folder, tag=tag, client_state={"step": step}, save_latest=False)
        rank = _barrier()
        fault_point("before_marker", step, self._peers)
        if rank == 0:
            write_durable(os.path.join(tag_dir, MARKER_FILE), json.dumps(self._marker(tag, step), indent=2) + "\n")
            fault_point("before_latest", step, self._peers)
            write_durable(os.path.join(self.folder, LATEST_FILE), tag)
            self.prune()
            log.info("saved checkpoint %s/%s", self.folder, tag)
        _barrier()
        return tag

    def _marker(self, tag: str, step: int) -> dict:
        """The completion marker's content: tag, step, world size, ZeRO stage and time (UTC, ISO 8601)."""
        stage = None
        with contextlib.suppress(AttributeError, TypeError):  # a stand-in engine
            stage = int(self.engine.zero_optimization_stage())
        return {"tag": tag, "step": step, "world_size": _world(), "zero_stage": stage,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def prune(self) -> list[str]:
        """Delete complete tags older than the newest ``keep_last`` complete ones and incomplete tags older than
        the newest complete one (never the newest complete tag); returns the deleted tags, oldest first. Does
        nothing in a run without any marker (written before markers existed)."""
        complete, incomplete = scan_tags(self.folder)
        if not complete:
            return []
        newest = tag_step(complete[-1])
        old = complete[:-max(1, self.keep_last)] + [t for t in incomplete if tag_step(t) < newest]
        old.sort(key=tag_step)
        for tag in old:
            shutil.rmtree(os.path.join(self.folder, tag), ignore_errors=True)
        return old

    def load(self) -> int:
        """Restore the newest complete checkpoint (:func:`resume_tag`) into the engine on every rank, passing the
        tag to DeepSpeed explicitly; logs the incomplete tags it skipped. Returns this rank's step (the caller
        checks that all ranks agree: :func:`agreed_step`), or 0 (with a warning, engine untouched) when the run
        has no checkpoint.

        Raises:
            RuntimeError: DeepSpeed could not load the chosen tag.
        """
        tag, skipped = resume_tag(self.run_dir)
        if skipped:
            log.warning("skipping incomplete checkpoint(s) %s (no %s: a save was interrupted)", skipped, MARKER_FILE)
        if tag is None:
            log.warning("resume=true but no complete checkpoint in %s: starting from step 0", self.folder)
            return 0
        self._check_marker(tag)
        path, client = self.engine.load_checkpoint(self.folder, tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.folder}/{tag}")
        step = int(client["step"])
        log.info("resumed from %s at step %d", path, step)
        return step

    def _check_marker(self, tag: str) -> None:
        """Warn when the tag was saved by another number of ranks than this run has (ZeRO partitions differ)."""
        marker = os.path.join(self.folder, tag, MARKER_FILE)
        if not os.path.isfile(marker):
            return
        with open(marker) as fh:
            saved = json.load(fh).get("world_size")
        if saved is not None and saved != _world():
            log.warning("checkpoint %s was saved by %s ranks, this run has %d: DeepSpeed may refuse its ZeRO "
                        "partitions", tag, saved, _world())

    def latest_tag(self) -> str | None:
        """The tag ``checkpoints/latest`` names (e.g. ``step-00000042``), or None before the first save."""
        try:
            return latest_tag(self.run_dir)
        except FileNotFoundError:
            return None


def _dist():
    """``torch.distributed`` when a default process group is initialised, else None."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    """This process's rank in the default group (0 without one)."""
    dist = _dist()
    return dist.get_rank() if dist else 0


def _world() -> int:
    """Ranks in the default group (1 without one)."""
    dist = _dist()
    return dist.get_world_size() if dist else 1


def _gather_pids() -> list[tuple[int, int]]:
    """Every rank's ``(pid, process group id)``, in rank order (collective; only this process's without a group)."""
    mine = (os.getpid(), os.getpgrp())
    dist = _dist()
    if dist is None:
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [tuple(p) for p in out]


def _barrier() -> int:
    """Wait for every rank of the default process group; returns this process's rank (0 without a group)."""
    dist = _dist()
    if dist is None:
        return 0
    dist.barrier()
    return dist.get_rank()


def read_model_config(folder: str) -> dict:
    """``{"name": ..., "init_kwargs": {...}}`` of a run or released folder (any fsspec URL)."""
    import fsspec

    with fsspec.open(f"{folder.rstrip('/')}/{MODEL_CONFIG}", "r") as fh:
        return json.load(fh)


def consolidate(run_dir: str, tag: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Full fp32 state dict of a DeepSpeed run checkpoint (any ZeRO stage; default tag: the newest complete one,
    :func:`resume_tag`), in one process.

    Returns:
        ``(state_dict, tag)`` with parameter names as in the model (``module.`` prefix removed).
    Raises:
        FileNotFoundError: no checkpoint / tag folder.
    """
    if not tag:
        tag, _ = resume_tag(run_dir)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {run_dir}/{CHECKPOINTS_DIR}")
    ckpt = os.path.join(run_dir, CHECKPOINTS_DIR)
    folder = os.path.join(ckpt, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint {folder} does not exist")
    zero_files = [f for f in os.listdir(folder) if "optim_states" in f and f.startswith(("zero_", "bf16_zero"))]
    if zero_files:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag=tag)
    else:  # ZeRO stage 0: the module state is stored whole by rank 0
        states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu",
                            weights_only=True)
        sd = states["module"]
    sd = {k.removeprefix("module."): v.float().clone() for k, v in sd.items()}
    return sd, tag


def load_model(source: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a run folder or a released folder and load its weights strictly.

    Returns:
        ``(model in eval mode on CPU, model_config dict)``.
    Raises:
        FileNotFoundError: neither ``model.safetensors`` nor a DeepSpeed checkpoint is found.
    """
    from safetensors.torch import load_file

    from polymae.models.multimae import build_from_init_kwargs
    from polymae.datasets import storage

    mc = read_model_config(source)
    model = build_from_init_kwargs(mc["init_kwargs"])
    released = f"{source.rstrip('/')}/{MODEL_FILE}"
    if storage.exists(released):
        if storage.is_local(released):
            sd = load_file(released)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, MODEL_FILE)
                storage.copy_atomic(released, local)
                sd = load_file(local)
        origin = released
    else:
        sd, tag = consolidate(source)
        origin = f"{source}/checkpoints/{tag}"
    model.load_state_dict(sd, strict=True)
    model.eval()
    log.info("loaded %s (%s)", mc.get("name"), origin)
    return model, mc
