"""Background publishing during training (``train.publish_every``, ``train.publish_to``).

After the checkpoint of a step that is a multiple of ``publish_every`` is saved and marked complete, rank 0 hands
its tag to :class:`BackgroundPublisher`, which runs ``python -m polymae.jobs.publish checkpoint=<run> tag=<tag>
dest=<publish_to>/<tag> update_latest=true`` as a separate **process** (at a lower CPU priority, without the GPUs):
consolidating ZeRO partitions is CPU- and memory-heavy and, in a thread, would hold the GIL against the training
loop. The release lands in ``{publish_to}/step-NNNNNNNN/`` (manifest last) and the child then replaces
``{publish_to}/latest`` with the tag, so ``latest`` only ever names a complete release. The children's output is
appended to ``{run}/publish.log``.

* At most one publish runs at a time. A tag due while one runs waits; a newer one due meanwhile replaces it (only
  the newest waits; the dropped tag is logged).
* While a tag is being (or waiting to be) published, its folder holds ``publishing``
  (``checkpoint.py`` ``PUBLISHING_FILE``), which :meth:`Checkpointer.prune` respects; the marker is removed when
  the publish ends. Markers left by a killed run are removed when the next run starts (rank 0), which then first
  publishes the newest due tag without a complete release (a preemption's checkpoint, say).
* At the end of training the trainer waits for the running publish and the waiting one. A publish that failed
  (non-zero exit status) is logged as an error when it ends, and the trainer then raises
  :class:`BackgroundPublishError`, so the job exits non-zero after training finished normally.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from typing import Any

from polymae.pipeline.config import redact
from polymae.pipeline.train.checkpoint import CHECKPOINTS_DIR, PUBLISHING_FILE, is_complete, step_tag

log = logging.getLogger(__name__)

#: the background publishes' output, appended, in the run folder
LOG_FILE = "publish.log"
#: launcher variables a publish child must not inherit (it is no rank of the training job)
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE")


class BackgroundPublishError(RuntimeError):
    """A background publish ended with a non-zero exit status (the message names the tag, the status and the log)."""


def clear_publishing_markers(run_dir: str) -> list[str]:
    """Remove the ``publishing`` markers a killed run left in its tag folders (call on rank 0 before training, when
    no publish of this run can be running); returns the tags they were in."""
    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not os.path.isdir(folder):
        return []
    cleared = []
    for tag in sorted(os.listdir(folder)):
        marker = os.path.join(folder, tag, PUBLISHING_FILE)
        if os.path.isfile(marker):
            os.remove(marker)
            cleared.append(tag)
    if cleared:
        log.warning("removed stale publishing markers of %s (a publish of an earlier run did not finish)", cleared)
    return cleared


def child_env() -> dict[str, str]:
    """The environment of a publish child: this one without the launcher's rank variables, with no GPU visible and
    DeepSpeed on its CPU accelerator (consolidation needs neither), one intra-op thread."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def _signal_name(num: int) -> str:
    import signal

    try:
        return signal.Signals(num).name
    except ValueError:
        return f"signal {num}"


class BackgroundPublisher:
    """Publishes tags of a run in a separate process, one at a time (module docstring). Rank 0 only; a context
    manager: on exit it waits for the running and the waiting publish, then (when the block raised nothing) raises
    :class:`BackgroundPublishError` if any publish failed.

    Args:
        run_dir: the run folder (``checkpoints/`` inside).
        every: publish the checkpoint of every step that is a multiple of this (0 = never: every call is a no-op).
        dest_root: ``publish_to``; tag ``t`` goes to ``{dest_root}/{t}``.
        python: the interpreter of the children (default: this one).

    Attributes:
        results: one dict per finished publish: ``tag``, ``dest``, ``pid``, ``status`` (exit status), ``seconds``.
    """

    def __init__(self, run_dir: str, every: int, dest_root: str, python: str | None = None):
        self.run_dir = run_dir
        self.every = int(every)
        self.dest_root = dest_root.rstrip("/")
        self.python = python or sys.executable
        self.results: list[dict] = []
        self._proc: subprocess.Popen | None = None
        self._running: dict[str, Any] = {}
        self._waiting: str | None = None

    # -- markers ----------------------------------------------------------------------------------
    def _marker(self, tag: str) -> str:
        return os.path.join(self.run_dir, CHECKPOINTS_DIR, tag, PUBLISHING_FILE)

    def _mark(self, tag: str) -> None:
        with open(self._marker(tag), "w") as fh:
            fh.write(f"{os.getpid()}\n")

    def _unmark(self, tag: str) -> None:
        try:
            os.remove(self._marker(tag))
        except FileNotFoundError:
            pass

    # -- the steps --------------------------------------------------------------------------------
    def step_done(self, step: int) -> None:
        """Call after each optimizer step ``step`` (1-based, after its checkpoint save if any): reaps a finished
        publish (starting the waiting one), then hands over ``step``'s tag when ``step`` is a multiple of ``every``
        and its checkpoint is complete. Never blocks on a publish."""
        if not self.every:
            return
        self.poll()
        tag = step_tag(step)
        if step % self.every == 0 and is_complete(os.path.join(self.run_dir, CHECKPOINTS_DIR, tag)):
            self.submit(tag)

    def submit(self, tag: str) -> None:
        """Publish ``tag`` now, or after the running publish (replacing a tag already waiting, which is logged)."""
        self._mark(tag)
        if self._proc is None:
            self._start(tag)
            return
        if self._waiting is not None:
            self._unmark(self._waiting)
            log.warning("background publish: %s is not published (superseded by %s while %s was publishing)",
                        self._waiting, tag, self._running["tag"])
        else:
            log.warning("background publish: %s still publishing; %s waits for it", self._running["tag"], tag)
        self._waiting = tag

    def _start(self, tag: str) -> None:
        """Start the child that publishes ``tag`` (its output appended to ``{run}/publish.log``)."""
        dest = f"{self.dest_root}/{tag}"
        cmd = [self.python, "-m", "polymae.jobs.publish", f"checkpoint={self.run_dir}", f"tag={tag}", f"dest={dest}",
               "update_latest=true"]
        if shutil.which("nice"):
            cmd = ["nice", "-n", "10"] + cmd  # below the training processes
        log_path = os.path.join(self.run_dir, LOG_FILE)
        t0 = time.time()
        try:
            with open(log_path, "a") as fh:
                fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} publish {tag} to {redact(dest)}\n")
                fh.flush()
                self._proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(),
                                              stdin=subprocess.DEVNULL)
        except OSError as e:  # could not even start: a failure like any other
            self._unmark(tag)
            self._record({"tag": tag, "dest": dest, "pid": None, "status": -1, "seconds": 0.0}, f"{e}")
            return
        self._running = {"tag": tag, "dest": dest, "t0": t0}
        log.info("background publish of %s to %s started (pid %d; log %s)", tag, redact(dest), self._proc.pid,
                 log_path)

    def poll(self) -> None:
        """If the running publish ended: record it, remove its marker and start the waiting tag, if any."""
        if self._proc is None or self._proc.poll() is None:
            return
        proc, run = self._proc, self._running
        self._proc, self._running = None, {}
        self._unmark(run["tag"])
        self._record({"tag": run["tag"], "dest": run["dest"], "pid": proc.pid, "status": proc.returncode,
                      "seconds": time.time() - run["t0"]})
        if self._waiting is not None:
            tag, self._waiting = self._waiting, None
            self._start(tag)

    def _record(self, result: dict, why: str = "") -> None:
        self.results.append(result)
        log_path = os.path.join(self.run_dir, LOG_FILE)
        if result["status"] == 0:
            log.info("background publish of %s done in %.1f s: %s", result["tag"], result["seconds"],
                     redact(result["dest"]))
        elif result["status"] is not None and result["status"] < 0:  # a signal: Slurm's preemption reaches it too
            log.warning("background publish of %s to %s stopped by %s; a failure unless the job is being preempted "
                        "(then it is published after the requeue); see %s", result["tag"], redact(result["dest"]),
                        _signal_name(-result["status"]), log_path)
        else:
            log.error("background publish of %s to %s FAILED (exit status %s%s); see %s", result["tag"],
                      redact(result["dest"]), result["status"], f": {why}" if why else "", log_path)

    # -- the end ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the running publish, then the waiting one (blocking)."""
        while self._proc is not None:
            log.info("waiting for the background publish of %s (pid %d)", self._running["tag"], self._proc.pid)
            self._proc.wait()
            self.poll()

    def interrupt(self) -> list[str]:
        """The job was preempted (it saved and exits to be requeued): stop the running publish (SIGTERM, SIGKILL
        after 10 s) and drop the waiting one. Neither is a failure, nor is a publish that the preemption signal
        itself killed (a negative exit status: Slurm signals every process of the job); their checkpoints stay on
        disk and can be published after the requeue (logged with the command). The publisher does nothing
        afterwards. Returns the tags left unpublished."""
        tags = [t for t in (self._running.get("tag"), self._waiting) if t]
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for tag in tags:
            self._unmark(tag)
        tags += [r["tag"] for r in self.results if r["status"] is not None and r["status"] < 0]
        self.results = [r for r in self.results if not (r["status"] is not None and r["status"] < 0)]
        self._proc, self._running, self._waiting, self.every = None, {}, None, 0
        for tag in tags:
            log.warning("preempted: %s was not published; after the requeue: polymae publish checkpoint=%s tag=%s "
                        "dest=%s/%s", tag, self.run_dir, tag, redact(self.dest_root), tag)
        return tags

    def failures(self) -> list[dict]:
        """The finished publishes with a non-zero exit status."""
        return [r for r in self.results if r["status"] != 0]

    def raise_failures(self) -> None:
        """Raises :class:`BackgroundPublishError` naming every failed publish (none: returns)."""
        bad = self.failures()
        if bad:
            detail = "; ".join(f"{r['tag']} (exit status {r['status']})" for r in bad)
            raise BackgroundPublishError(f"background publish failed: {detail}; see "
                                         f"{os.path.join(self.run_dir, LOG_FILE)}")

    def __enter__(self) -> "BackgroundPublisher":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
        if exc_type is None:
            self.raise_failures()


def unpublished_tag(run_dir: str, every: int, dest_root: str) -> str | None:
    """The newest complete tag of the run whose step is a multiple of ``every`` and whose release
    ``{dest_root}/{tag}`` has no ``manifest.json`` (a publish that a preemption or a crash interrupted), or None."""
    from polymae.datasets import storage
    from polymae.pipeline.train.checkpoint import scan_tags, tag_step

    folder = os.path.join(run_dir, CHECKPOINTS_DIR)
    if not every or not os.path.isdir(folder):
        return None
    due = [t for t in scan_tags(folder)[0] if (tag_step(t) or 0) % every == 0]
    if due and not storage.exists(f"{dest_root.rstrip('/')}/{due[-1]}/manifest.json"):
        return due[-1]
    return None


def background_publisher(run_dir: str, train_cfg: Any, rank: int, python: str | None = None) -> BackgroundPublisher:
    """The run's publisher: on rank 0, after removing stale markers (:func:`clear_publishing_markers`), one for
    ``train_cfg.publish_every`` / ``publish_to``, which first publishes the newest due tag an earlier start left
    unpublished (:func:`unpublished_tag`: e.g. the checkpoint a preemption made); elsewhere, or when
    ``publish_every`` is 0 (or the section has no such fields), one that does nothing. Use it as a context manager
    around the training loop. ``python``: the children's interpreter (default: this one)."""
    every = int(getattr(train_cfg, "publish_every", 0) or 0)
    if rank != 0:
        return BackgroundPublisher(run_dir, 0, "")
    clear_publishing_markers(run_dir)
    dest_root = str(getattr(train_cfg, "publish_to", "") or "")
    publisher = BackgroundPublisher(run_dir, every, dest_root, python=python)
    tag = unpublished_tag(run_dir, every, dest_root)
    if tag is not None:
        log.info("background publish: %s of an earlier start has no release yet; publishing it now", tag)
        publisher.submit(tag)
    return publisher


__all__ = ["BackgroundPublisher", "BackgroundPublishError", "background_publisher", "clear_publishing_markers",
           "child_env", "unpublished_tag", "LOG_FILE"]
