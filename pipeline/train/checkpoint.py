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

**World-size changes.** The marker also records the run's data layout (``data``: canonical readers, micro-batch,
global batch; ``datasets/loader.py``). :func:`resume_plan` compares the newest complete tag's marker with this run:
the same world size and ZeRO stage resume natively; ZeRO-0 on another world size resumes natively too (every rank
reads the whole model and optimizer state); ZeRO 1-3 on another world size (or another stage among 1-3) resume
through DeepSpeed's *universal checkpoint*: :func:`prepare_universal` (rank 0) converts the tag once with
``deepspeed.checkpoint.ds_to_universal`` into ``checkpoints/universal/step-XXXXXXXX/`` (written under a temporary
name and renamed, so a killed conversion is redone), and the engine, built with ``checkpoint.load_universal``,
loads it and re-partitions parameters and optimizer moments for the new world. The data position is kept: the
global micro-batch sequence does not depend on the world size. Combinations that cannot work (ZeRO-0 to 1-3 or
back, another micro-batch or global batch) raise :class:`~polymae.pipeline.config.ConfigError` before any step,
naming both settings and the fix.

Pruning (:meth:`Checkpointer.prune`, after every save) keeps the newest ``keep_last`` complete tags and deletes
older complete ones and every incomplete tag older than the newest complete one; it never deletes the newest
complete tag, nor a tag holding :data:`PUBLISHING_FILE` (a background publish is reading it). An incomplete tag
newer than that one (a save killed half-way) is left until the run saves that step again, which first deletes the
leftover folder.
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
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
ENCODER_FILE = "encoder.safetensors"
MODEL_CONFIG = "model_config.json"
CHECKPOINTS_DIR = "checkpoints"
TAG_PREFIX = "step-"
LATEST_FILE = "latest"
#: under ``checkpoints/``: tags converted to DeepSpeed's universal format for a resume on another world size
UNIVERSAL_DIR = "universal"
#: written by rank 0 into a tag folder once every rank's files are in place: the tag is complete
MARKER_FILE = "complete.json"
#: put into a tag folder while a background publish reads it (``pipeline/train/publisher.py``): prune skips the tag
PUBLISHING_FILE = "publishing"
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
        data: the run's data layout recorded in every marker (``{"readers", "micro_batch", "global_batch"}``),
            which :func:`resume_plan` checks on resume.
    """

    def __init__(self, engine: Any, run_dir: str, keep_last: int = 2, data: dict | None = None):
        self.engine = engine
        self.data = dict(data or {})
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
        tag_dir = os.path.join(self.folder, tag)
        if _rank() == 0 and os.path.isdir(tag_dir):
            log.warning("replacing the existing checkpoint folder %s", tag_dir)
            shutil.rmtree(tag_dir)
        _barrier()
        fault_point("before_save", step, self._peers)  # after the barrier: every rank is done with the step
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
        """The completion marker's content: tag, step, world size, ZeRO stage, data layout and time (UTC, ISO 8601)."""
        stage = None
        with contextlib.suppress(AttributeError, TypeError):  # a stand-in engine
            stage = int(self.engine.zero_optimization_stage())
        return {"tag": tag, "step": step, "world_size": _world(), "zero_stage": stage, "data": self.data,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def prune(self) -> list[str]:
        """Delete complete tags older than the newest ``keep_last`` complete ones, incomplete tags older than the
        newest complete one (never the newest complete tag) and the universal conversions (``checkpoints/
        universal``: a save of this run's own makes them unnecessary); returns the deleted tags, oldest first.
        Does nothing in a run without any marker (written before markers existed)."""
        complete, incomplete = scan_tags(self.folder)
        if not complete:
            return []
        newest = tag_step(complete[-1])
        old = complete[:-max(1, self.keep_last)] + [t for t in incomplete if tag_step(t) < newest]
        old = [t for t in old if not os.path.exists(os.path.join(self.folder, t, PUBLISHING_FILE))]  # being published
        old.sort(key=tag_step)
        for tag in old:
            shutil.rmtree(os.path.join(self.folder, tag), ignore_errors=True)
        universal = os.path.join(self.folder, UNIVERSAL_DIR)
        if os.path.isdir(universal):  # conversions are needed only until the run saved a tag of its own
            shutil.rmtree(universal, ignore_errors=True)
        return old

    def load(self, plan: "ResumePlan | None" = None) -> int:
        """Restore the newest complete checkpoint into the engine on every rank: ``plan`` (default
        :func:`resume_plan` for this world size, native load) names the tag, passed to DeepSpeed explicitly, and
        whether to read its universal conversion (:func:`prepare_universal` done, engine built with
        ``checkpoint.load_universal``); logs the incomplete tags it skipped. Returns this rank's step (the caller
        checks that all ranks agree: :func:`agreed_step`), or 0 (with a warning, engine untouched) when the run
        has no checkpoint.

        Raises:
            RuntimeError: DeepSpeed could not load the chosen tag.
        """
        plan = plan or resume_plan(self.run_dir, _world(), None)
        if plan.skipped:
            log.warning("skipping incomplete checkpoint(s) %s (no %s: a save was interrupted)", plan.skipped,
                        MARKER_FILE)
        if plan.tag is None:
            log.warning("resume=true but no complete checkpoint in %s: starting from step 0", self.folder)
            return 0
        folder = os.path.join(self.folder, UNIVERSAL_DIR) if plan.universal else self.folder
        path, client = self.engine.load_checkpoint(folder, tag=plan.tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {folder}/{plan.tag}")
        step = int(client["step"])
        how = f" (saved by {plan.world_size} ranks, now {_world()}: universal checkpoint)" if plan.universal else ""
        log.info("resumed from %s at step %d%s", path, step, how)
        return step

    def latest_tag(self) -> str | None:
        """The tag ``checkpoints/latest`` names (e.g. ``step-00000042``), or None before the first save."""
        try:
            return latest_tag(self.run_dir)
        except FileNotFoundError:
            return None


@dataclass
class ResumePlan:
    """How to resume a run (:func:`resume_plan`): the tag (None: nothing to resume), the incomplete tags newer than
    it that are skipped, what its marker recorded (world size, ZeRO stage, data layout; None/empty for runs from
    before markers held them) and whether it must be read through a universal conversion."""

    tag: str | None
    skipped: list[str] = field(default_factory=list)
    world_size: int | None = None
    zero_stage: int | None = None
    data: dict = field(default_factory=dict)
    universal: bool = False


def read_marker(run_dir: str, tag: str) -> dict:
    """The completion marker of ``tag`` (``{}`` when the tag has none: a run from before markers)."""
    path = os.path.join(run_dir, CHECKPOINTS_DIR, tag, MARKER_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as fh:
        return json.load(fh)


def resume_plan(run_dir: str, world: int, zero_stage: int | None, data: dict | None = None) -> ResumePlan:
    """Which tag to resume from (:func:`resume_tag`) and how, for a run of ``world`` ranks at ZeRO stage
    ``zero_stage`` (None: do not check the stage) whose data layout is ``data`` (``{"micro_batch",
    "global_batch"}``, checked against the marker's; None: not checked). See the module docstring.

    Raises:
        ConfigError: a combination that cannot resume: ZeRO-0 to 1-3 or back (``train.zero_stage``), another
            ``train.micro_batch`` or ``train.global_batch`` than the run's (the data order and the step are
            counted in them); the message names both values and the fix.
    """
    from polymae.pipeline.config import ConfigError

    tag, skipped = resume_tag(run_dir)
    if tag is None:
        return ResumePlan(None, skipped)
    marker = read_marker(run_dir, tag)
    plan = ResumePlan(tag, skipped, marker.get("world_size"), marker.get("zero_stage"), dict(marker.get("data") or {}))
    saved = plan.data
    for key in ("micro_batch", "global_batch"):
        if data and saved.get(key) is not None and data.get(key) is not None and saved[key] != data[key]:
            raise ConfigError(f"train.{key}", f"the run in {run_dir} was saved with {key}={saved[key]} "
                              f"({plan.world_size} ranks) and resumes with {data[key]} ({world} ranks): the data "
                              f"order and steps are counted in micro-batches and global batches; resume with "
                              f"train.{key}={saved[key]} (another world size changes the gradient accumulation)")
    if zero_stage is None or plan.zero_stage is None or plan.world_size is None:
        return plan
    if (plan.zero_stage == 0) != (zero_stage == 0):
        raise ConfigError("train.zero_stage", f"{tag} of {run_dir} was saved at ZeRO stage {plan.zero_stage} by "
                          f"{plan.world_size} ranks and this run has stage {zero_stage} on {world} ranks: a ZeRO-0 "
                          f"checkpoint holds no ZeRO partitions and a ZeRO 1-3 one no whole optimizer state; resume "
                          f"with train.zero_stage={plan.zero_stage} (any world size)")
    plan.universal = zero_stage > 0 and (plan.world_size != world or plan.zero_stage != zero_stage)
    return plan


def prepare_universal(run_dir: str, tag: str) -> str:
    """Convert ``tag`` of ``run_dir`` to DeepSpeed's universal checkpoint format (``deepspeed.checkpoint.
    ds_to_universal``) as ``checkpoints/universal/{tag}`` on rank 0, unless a finished conversion is there;
    every rank then waits at a barrier (collective). The conversion is written to ``{tag}.partial`` and renamed,
    so a conversion killed half-way is redone. Returns the converted folder. The input is this run's own
    checkpoint, which DeepSpeed's converter reads with ``torch.load``.

    Raises:
        FileNotFoundError: the tag folder does not exist.
    """
    ckpt = os.path.join(run_dir, CHECKPOINTS_DIR)
    src, dst = os.path.join(ckpt, tag), os.path.join(ckpt, UNIVERSAL_DIR, tag)
    if _rank() == 0 and not os.path.isdir(dst):
        if not os.path.isdir(src):
            raise FileNotFoundError(f"checkpoint {src} does not exist")
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        partial = dst + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.dirname(partial), exist_ok=True)
        t0 = time.perf_counter()
        args = argparse.Namespace(input_folder=src, output_folder=partial, num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(sys.stderr):  # the converter prints its progress
            ds_to_universal.main(args)
        os.replace(partial, dst)
        log.info("converted %s to a universal checkpoint in %.1f s: %s", tag, time.perf_counter() - t0, dst)
    _barrier()
    return dst


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


OFFICIAL_SUFFIXES = (".pth", ".pt", ".safetensors")


def read_state_dict(url: str) -> dict:
    """A checkpoint file's state dict, without unpickling untrusted objects: ``.safetensors`` with safetensors,
    ``.pth``/``.pt`` with ``torch.load(weights_only=True)`` (``argparse.Namespace``, which the official MultiMAE
    and MAE checkpoints carry as ``args``, allowed). Any fsspec URL (remote files are copied to a temporary
    folder first).

    Raises:
        FileNotFoundError: no such file; ValueError: another suffix than :data:`OFFICIAL_SUFFIXES`.
    """
    import argparse

    from safetensors.torch import load_file

    from polymae.datasets import storage

    if not url.endswith(OFFICIAL_SUFFIXES):
        raise ValueError(f"{url}: a checkpoint file ends with one of {OFFICIAL_SUFFIXES}")
    if not storage.exists(url):
        raise FileNotFoundError(url)
    with tempfile.TemporaryDirectory() as tmp:
        local = url
        if not storage.is_local(url):
            local = os.path.join(tmp, os.path.basename(url))
            storage.copy_atomic(url, local)
        if local.endswith(".safetensors"):
            return load_file(local)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(local, map_location="cpu", weights_only=True)


def from_official(url: str) -> tuple[torch.nn.Module, dict]:
    """The model of an official MultiMAE or MAE checkpoint file (or one in their key layouts), its architecture
    inferred from the checkpoint itself (``models.interop.from_official``). Returns ``(model in eval mode on CPU,
    model_config dict {"name", "init_kwargs", "source"})``.

    Raises:
        FileNotFoundError / ValueError: as :func:`read_state_dict`; ValueError: an unrecognised layout.
    """
    from polymae.models.interop import from_official as build

    model, kwargs = build(read_state_dict(url))
    log.info("loaded official %s checkpoint %s (%d blocks, %d-d)", kwargs["arch"], url, kwargs["depth"], kwargs["dim"])
    return model, {"name": f"{kwargs['arch']}_official", "init_kwargs": kwargs, "source": url}


def load_model(source: str) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model from a run folder, a released folder or an official checkpoint file (``.pth``, ``.pt``,
    ``.safetensors``: :func:`from_official`) and load its weights strictly.

    Returns:
        ``(model in eval mode on CPU, model_config dict)``.
    Raises:
        FileNotFoundError: neither ``model.safetensors`` nor a DeepSpeed checkpoint is found.
    """
    from safetensors.torch import load_file

    from polymae.models.multitask import build_from_model_config
    from polymae.datasets import storage

    if source.endswith(OFFICIAL_SUFFIXES):
        return from_official(source)
    mc = read_model_config(source)
    model = build_from_model_config(mc)  # a MultiMAE/MAE, or encoder + task heads (polymae multitask)
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


def load_encoder(source: str) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """The RGB encoder of any checkpoint, for heads to be put on it (multitask training, downstream protocols).

    Args:
        source: a pretrain or multitask run folder, a release folder or URL, or an official MultiMAE/MAE file
            (:func:`load_model`).
    Returns:
        ``(encoder_kwargs, state_dict, model_config)``: the ``init_kwargs`` of an RGB-only encoder
        (``models/multitask.py`` ``encoder_init_kwargs``; a multitask checkpoint's own), the checkpoint's state dict
        in the encoder's key names (a multitask model's ``encoder.`` prefix removed; the pre-trained model's other
        tensors kept, ``load_encoder_state`` picks the encoder's), and the checkpoint's model_config.
    Raises:
        FileNotFoundError / ValueError: as :func:`load_model`.
    """
    from polymae.models.multitask import encoder_init_kwargs, is_multitask

    model, mc = load_model(source)
    if is_multitask(mc):
        sd = {k.removeprefix("encoder."): v for k, v in model.state_dict().items() if k.startswith("encoder.")}
        return dict(mc["init_kwargs"]), sd, mc
    return encoder_init_kwargs(mc["init_kwargs"]), model.state_dict(), mc


def weights_digest(source: str, tag: str | None = None) -> str:
    """sha256 identifying a checkpoint's weights, for results tables: a release's ``model.safetensors`` digest from
    its manifest (or of the file), an official file's own digest, or for a run folder the sha256 of
    ``"{tag}:{sha256 of the tag's complete.json}"`` of its newest complete tag (a run folder's weights live in
    DeepSpeed shards; the marker is written once per tag and names the step); ``tag`` picks another tag of a run
    folder than the newest.

    Raises:
        FileNotFoundError: neither a release file nor a complete checkpoint (or no marker in ``tag``).
    """
    import hashlib

    from polymae.datasets import storage

    src = source.rstrip("/")
    if src.endswith(OFFICIAL_SUFFIXES):
        return storage.sha256_of(src)[0]
    manifest = f"{src}/manifest.json"
    if storage.exists(manifest):
        for f in storage.read_json(manifest).get("files", []):
            if f["path"] == MODEL_FILE:
                return f["sha256"]
    if storage.exists(f"{src}/{MODEL_FILE}"):
        return storage.sha256_of(f"{src}/{MODEL_FILE}")[0]
    if tag is None:
        tag, _ = resume_tag(src)
    if tag is None or not storage.exists(os.path.join(src, CHECKPOINTS_DIR, tag, MARKER_FILE)):
        raise FileNotFoundError(f"{source}: no release file and no complete checkpoint {tag or ''}".rstrip())
    digest = storage.sha256_of(os.path.join(src, CHECKPOINTS_DIR, tag, MARKER_FILE))[0]
    return hashlib.sha256(f"{tag}:{digest}".encode()).hexdigest()
