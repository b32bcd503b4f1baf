"""Ray for the label job: connecting to (or starting) Ray, sizing the pool of label actors, and
:class:`ShardScheduler`, which keeps every actor busy, retries a failed shard and replaces a dead actor.

Ray: embedded local Ray by default (``ray.init(address="local", ...)``); ``ray_address`` joins a cluster;
under ``ray job submit`` (``RAY_ADDRESS`` set) the job's cluster is joined.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
from typing import Any, Callable, Iterable, Iterator

from polymae.patches import environment
from polymae.pipeline.label.worker import ShardJob

log = logging.getLogger("polymae.label")

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20
TASKS_IN_FLIGHT_PER_WORKER = 2  # the next shard waits in the actor's queue, so it never idles on the driver


@contextlib.contextmanager
def ray_session(address: str | None, worker_nice: int | None = None) -> Iterator[bool]:
    """Connect to Ray for the ``with`` block; yields True when this call started Ray (it is then shut down
    on exit), False when Ray was already initialised in this process.

    ``address``: a cluster to join; ``None`` joins ``RAY_ADDRESS`` (set under ``ray job submit``) or
    starts an embedded local Ray whose workers get niceness ``worker_nice`` (when >= 0; Ray's own
    default is 15, and an exported ``RAY_worker_niceness`` wins). The ``RAY_*`` variables this needs
    (:data:`RAY_ENV`, each only where not exported) are set with :func:`polymae.patches.environment` for
    the block and restored when it ends, after ``ray.shutdown()``.
    """
    embedded = not address and not os.environ.get("RAY_ADDRESS")
    values = dict(RAY_ENV)
    if embedded and worker_nice is not None and worker_nice >= 0:
        # The label workers are this job's compute: run them at the driver's priority rather than Ray's
        # niceness 15, which lets any other process on the machine starve them.
        values["RAY_worker_niceness"] = str(worker_nice)
    with environment(values):
        import ray

        started = not ray.is_initialized()
        if started and address:
            ray.init(address=address, logging_level=logging.WARNING)
        elif started and not embedded:  # inside `ray job submit`
            ray.init(logging_level=logging.WARNING)
        elif started:
            ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
                     object_store_memory=EMBEDDED_OBJECT_STORE_BYTES, logging_level=logging.WARNING)
        try:
            yield started
        finally:
            if started:
                ray.shutdown()


def pool_size(device: str, num_workers: int, cpus_per_worker: int, shards: int) -> tuple[bool, int]:
    """``(use_cuda, actors)`` for the connected Ray cluster: ``device`` ``auto`` uses CUDA when the cluster
    has GPUs; ``num_workers=0`` means one actor per GPU (CUDA) or per ``cpus_per_worker`` CPUs; never more
    actors than ``shards``, at least one.

    Raises:
        RuntimeError: ``device=cuda`` on a cluster without GPUs.
    """
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_cuda = device == "cuda" or (device == "auto" and gpus > 0)
    if use_cuda and gpus == 0:
        raise RuntimeError("device=cuda but the Ray cluster has no GPUs")
    auto = gpus if use_cuda else max(1, int(res.get("CPU", 1)) // cpus_per_worker)
    return use_cuda, max(1, min(num_workers or auto, shards))


class ShardScheduler:
    """Labels :class:`ShardJob` s on a pool of Ray actors (``LabelWorker`` bodies; call :meth:`close`).

    Every actor has up to :data:`TASKS_IN_FLIGHT_PER_WORKER` shards queued. A shard whose actor died
    (``RayActorError``: process killed, OOM, node lost) or that returned an error is submitted again, at
    most ``retries`` times, and each retry is logged; a dead actor is replaced by a new one (at most
    ``retries * workers`` replacements). Ray itself neither restarts actors nor retries tasks. Re-labelling
    a shard is safe: the tar is published by an atomic rename and its stats file (the done marker) is
    written after it, so a half-written attempt leaves only a hidden temporary file.

    Attributes:
        failed: ``{shard index: error}`` of the shards given up on; ``attempts``: submissions per shard;
        ``retries``: re-submissions; ``workers_replaced``: actors that died and were replaced.
    """

    def __init__(self, body: type, args: tuple, workers: int, retries: int, num_cpus: int, num_gpus: int):
        import ray

        self._ray = ray
        self._actor_cls = ray.remote(body).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                                   max_task_retries=0)
        self._args = args
        self.max_retries = retries
        self.max_replacements = retries * workers
        self.slots: list[Any] = [self._actor_cls.remote(*args) for _ in range(workers)]
        self.failed: dict[int, str] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.retries = 0
        self.workers_replaced = 0
        self._queue: collections.deque = collections.deque()
        self._inflight: dict[Any, tuple[ShardJob, int, Any]] = {}  # ref -> (job, slot, actor)

    def metadata(self) -> list[dict]:
        """Every actor's ``metadata()``; returns once all of them have loaded their teachers."""
        return self._ray.get([a.metadata.remote() for a in self.slots])

    @property
    def retried(self) -> dict[int, int]:
        """``{shard index: attempts}`` of the shards submitted more than once, by index."""
        return {i: n for i, n in sorted(self.attempts.items()) if n > 1}

    def run(self, jobs: Iterable[ShardJob], on_done: Callable[[ShardJob, dict], None]) -> None:
        """Label ``jobs``; calls ``on_done(job, stats)`` for each finished shard as it comes back and
        records the shards given up on in :attr:`failed`."""
        self._queue.extend(jobs)
        self._fill()
        while self._inflight:
            ready, _ = self._ray.wait(list(self._inflight), num_returns=1)
            self._collect(ready[0], on_done)
            if self._queue and not any(a is not None for a in self.slots):
                while self._queue:
                    self.failed[self._queue.popleft().index] = "no live worker left (see the Ray logs)"
            self._fill()

    def close(self) -> None:
        """Kill the live actors (idempotent)."""
        for i, a in enumerate(self.slots):
            if a is not None:
                with contextlib.suppress(Exception):
                    self._ray.kill(a)
                self.slots[i] = None

    def _fill(self) -> None:
        for slot, actor in enumerate(self.slots):
            if actor is None:
                continue
            busy = sum(1 for _, s, _ in self._inflight.values() if s == slot)
            while busy < TASKS_IN_FLIGHT_PER_WORKER and self._queue:
                job = self._queue.popleft()
                self.attempts[job.index] += 1
                self._inflight[actor.label.remote(job)] = (job, slot, actor)
                busy += 1

    def _collect(self, ref: Any, on_done: Callable[[ShardJob, dict], None]) -> None:
        job, slot, actor = self._inflight.pop(ref)
        exceptions = self._ray.exceptions
        try:
            out = self._ray.get(ref)
        except exceptions.RayActorError as e:
            self._replace(slot, actor, e)
            self._retry_or_fail(job, f"the worker died: {type(e).__name__}: {e}")
        except exceptions.RayError as e:  # e.g. the task's result was lost
            self._retry_or_fail(job, f"{type(e).__name__}: {e}")
        else:
            if "error" in out:
                self._retry_or_fail(job, f"{out['error']}\n{out.get('traceback', '')}".rstrip())
            else:
                on_done(job, out)

    def _replace(self, slot: int, actor: Any, error: Exception) -> None:
        """Replace a dead actor (once: only the first news of its death counts) while the budget lasts."""
        if self.slots[slot] is not actor:
            return
        with contextlib.suppress(Exception):
            self._ray.kill(actor, no_restart=True)
        if self.workers_replaced < self.max_replacements:
            log.warning("worker %d died (%s); starting a replacement", slot, type(error).__name__)
            self.slots[slot] = self._actor_cls.remote(*self._args)
            self.workers_replaced += 1
        else:
            log.error("worker %d died and the replacement budget (%d) is spent", slot, self.max_replacements)
            self.slots[slot] = None

    def _retry_or_fail(self, job: ShardJob, error: str) -> None:
        if self.attempts[job.index] <= self.max_retries:
            log.warning("shard %d: attempt %d of %d failed (%s); labelling it again", job.index,
                        self.attempts[job.index], self.max_retries + 1, error.splitlines()[0][:500])
            self.retries += 1
            self._queue.appendleft(job)
        else:
            self.failed[job.index] = error
            log.error("shard %d failed after %d attempts: %s", job.index, self.attempts[job.index], error)
