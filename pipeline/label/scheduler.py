"""Ray for the label job: connecting to (or starting) Ray, sizing the pool of label actors, the checks a
cluster of several nodes needs (:func:`check_shared_paths`, :func:`storage_env`), and
:class:`ShardScheduler`, which places the actors (failing with the missing resource named when it
cannot), keeps every actor busy, grows the pool as nodes join, retries a failed shard on a fresh actor
and replaces a dead one.

Ray: embedded local Ray by default (``ray.init(address="local", ...)``); ``ray_address`` joins a cluster;
under ``ray job submit`` (``RAY_ADDRESS`` set) the job's cluster is joined.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from typing import Any, Callable, Iterable, Iterator

from polymae.datasets import storage
from polymae.patches import environment
from polymae.pipeline.config import ConfigError
from polymae.pipeline.label.worker import ShardJob

log = logging.getLogger("polymae.label")

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
EMBEDDED_OBJECT_STORE_BYTES = 256 * 2**20
TASKS_IN_FLIGHT_PER_WORKER = 2  # the next shard waits in the actor's queue, so it never idles on the driver
STORAGE_ENV_PREFIXES = ("AWS_", "HF_", "FSSPEC_")  # what a worker's storage and hub access need
POLL_S = 2.0  # the driver's wait for a result before it looks at placement and cluster growth
GROW_INTERVAL_S = 5.0  # how often the cluster's size is asked (workers follow it as nodes join)
PLACEMENT_GRACE_S = 5.0  # after the first worker is placed, how long to wait for the others to start together


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


def worker_cpus(device: str, cpus_per_worker: int, decode_threads: int, nodes: list[dict]) -> tuple[int, int]:
    """``(CPUs per actor, decode threads per actor)`` with ``0`` = auto resolved from the cluster's ``nodes``
    (``ray.nodes()`` entries: ``{"Alive", "Resources": {"CPU", "GPU"}}``): an actor on GPUs gets the node's CPUs
    per GPU (the smallest such ratio over the alive GPU nodes, at least 1), an actor on CPUs 1 CPU; decode threads
    are the actor's CPUs but one (the teacher's thread), at least 1. Explicit values are kept."""
    gpu_nodes = [n["Resources"] for n in nodes if n.get("Alive") and n.get("Resources", {}).get("GPU", 0) >= 1]
    use_cuda = device == "cuda" or (device == "auto" and bool(gpu_nodes))
    if cpus_per_worker == 0:
        ratios = [int(r.get("CPU", 0) // r["GPU"]) for r in gpu_nodes]
        cpus_per_worker = max(1, min(ratios)) if use_cuda and ratios else 1
    if decode_threads == 0:
        decode_threads = max(1, cpus_per_worker - 1)
    return cpus_per_worker, decode_threads


def alive_nodes() -> int:
    """Nodes of the connected Ray cluster that are alive (``ray.nodes()``)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared_paths(paths: dict[str, str], nodes: int, shared_fs: bool) -> None:
    """Refuse local paths on a cluster of several nodes: a worker on another node would read an input
    folder it does not have, or write its shards to its own disk, where the driver never finds them.

    Args:
        paths: ``{config key: path or URL}`` (``input``, ``output``).
        nodes: alive nodes of the cluster (:func:`alive_nodes`).
        shared_fs: the user's word that local paths are on a file system every node mounts at that path.
    Raises:
        ConfigError: naming the first key with a local path, when ``nodes > 1`` and not ``shared_fs``.
    """
    if nodes <= 1 or shared_fs:
        return
    for key, url in paths.items():
        if storage.is_local(url):
            raise ConfigError(key, f"{url} is a local path, but the Ray cluster has {nodes} nodes: workers on "
                                   "other nodes would use their own disks. Use a URL every node reaches "
                                   "(s3://...), or set shared_fs=true if every node mounts it at this path")


def storage_env(storage_options: dict[str, dict] | None = None, environ: dict[str, str] | None = None
                ) -> dict[str, str]:
    """The environment variables a label worker needs for storage and the hub, to send with its runtime
    environment (a worker on another node does not inherit the driver's environment): every variable of
    ``environ`` (default: this process's) starting with one of :data:`STORAGE_ENV_PREFIXES`, plus
    ``FSSPEC_<PROTOCOL>`` = the JSON of each protocol's ``storage_options`` (fsspec reads these at import).
    Never logged: it may hold credentials."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k.startswith(STORAGE_ENV_PREFIXES)}
    for proto, opts in (storage_options or {}).items():
        env[f"FSSPEC_{proto.upper()}"] = json.dumps(opts, sort_keys=True)
    return env


class PlacementError(RuntimeError):
    """The cluster did not place a label worker's resources within ``placement_timeout_s``."""


class ShardScheduler:
    """Labels :class:`ShardJob` s on a pool of Ray actors (``LabelWorker`` bodies; call :meth:`close`).

    Placement: every actor gets a placement group of one bundle (``num_cpus`` CPUs, ``num_gpus`` GPUs).
    The constructor waits up to ``placement_timeout_s`` for the first to be placed and raises
    :class:`PlacementError` naming the missing resource when none is (instead of waiting forever);
    those placed later (resources freed, nodes joined) start taking shards then. With ``target`` (a
    function of the shards left, giving the wanted number of actors), the pool grows as the cluster
    does: it is asked every :data:`GROW_INTERVAL_S` seconds and new actors are placed for the difference.

    Every actor has up to :data:`TASKS_IN_FLIGHT_PER_WORKER` shards queued. A shard whose actor died
    (``RayActorError``: process killed, OOM, node lost) is submitted again, at most ``retries`` times,
    and the dead actor is replaced in a new placement group (at most ``retries * workers`` replacements).
    A shard that returned an error (:class:`~polymae.pipeline.label.worker.ShardFailed`: a source that
    cannot be read, a teacher exception such as a CUDA error, a write error) is retried on a *fresh*
    actor: the one it failed on is killed and replaced in its placement group, and the shard is pinned to
    the new one (its other queued shard goes back to the queue without counting an attempt). An error
    that says it is not retryable (too many skipped images) fails the shard at once. Every retry is
    logged; Ray itself neither restarts actors nor retries tasks. Re-labelling a shard is safe: the tar
    is published by an atomic rename and its stats file (the done marker) after it, and a worker checks
    for the marker before it labels.

    Args:
        body: the actor class (``LabelWorker``: ``metadata()``, ``label(job)``); ``args``: its constructor's.
        workers: actors to place at the start; ``retries``: re-submissions per shard (``shard_retries``).
        num_cpus, num_gpus: resources of one actor (its placement bundle).
        placement_timeout_s: seconds to wait for placement before :class:`PlacementError`.
        target: ``shards left -> wanted actors`` (:func:`worker_target`), or None for a fixed pool.
        env_vars: environment of every actor (:func:`storage_env`), sent in its runtime environment.
    Raises:
        PlacementError: from the constructor, when no actor could be placed in time.

    Attributes:
        failed: ``{shard index: error}`` of the shards given up on; ``attempts``: submissions per shard;
        ``retries``: re-submissions; ``workers_replaced``: actors that died or failed and were replaced;
        ``peak_workers``: most actors alive at once.
    """

    def __init__(self, body: type, args: tuple, workers: int, retries: int, num_cpus: int, num_gpus: int,
                 placement_timeout_s: float = 300.0, target: Callable[[int], int] | None = None,
                 env_vars: dict[str, str] | None = None):
        import ray

        self._ray = ray
        opts: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_task_retries=0,
                                    max_concurrency=int(getattr(body, "MAX_CONCURRENCY", 1)))  # calls at once
        if env_vars:
            opts["runtime_env"] = {"env_vars": dict(env_vars)}
        self._actor_cls, self._opts, self._args = ray.remote(body), opts, args
        self._bundle = {k: float(v) for k, v in (("CPU", num_cpus), ("GPU", num_gpus)) if v}
        self.placement_timeout_s, self._target = placement_timeout_s, target
        self.max_retries = retries
        self.max_replacements = retries * workers
        self.slots: list[Any] = []  # actor per slot; None while placing or after giving up on it
        self._pgs: list[Any] = []  # placement group per slot
        self._gen: list[int] = []  # actor generation per slot: results of an older one are stale
        self._placing: dict[int, tuple[Any, float]] = {}  # slot -> (pg.ready() ref, since)
        self._retired: set[tuple[int, int]] = set()  # (slot, gen) of actors this scheduler killed
        self._pinned: dict[int, collections.deque] = collections.defaultdict(collections.deque)
        self.failed: dict[int, str] = {}
        self.attempts: collections.Counter = collections.Counter()
        self.retries = self.workers_replaced = self.peak_workers = 0
        self._abandoned = 0  # slots given up on (dead, replacement budget spent): growth does not refill them
        self._queue: collections.deque = collections.deque()
        self._inflight: dict[Any, tuple[ShardJob, int, int]] = {}  # ref -> (job, slot, gen)
        self._last_grow = time.monotonic()
        for _ in range(workers):
            self._add_slot()
        self._await_first_placement(workers)

    # ---------------------------------------------------------------------------------- placement
    def _add_slot(self) -> None:
        """A new slot whose placement group is being placed."""
        self.slots.append(None)
        self._gen.append(0)
        self._pgs.append(None)
        self._place(len(self.slots) - 1)

    def _place(self, slot: int) -> None:
        """Ask for a new placement group for ``slot`` (its actor starts once it is placed)."""
        from ray.util import placement_group

        self._pgs[slot] = placement_group([self._bundle])
        self._placing[slot] = (self._pgs[slot].ready(), time.monotonic())

    def _start(self, slot: int) -> None:
        """Start a new actor in ``slot``'s (placed) placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._placing.pop(slot, None)
        strategy = PlacementGroupSchedulingStrategy(placement_group=self._pgs[slot], placement_group_bundle_index=0)
        self._gen[slot] += 1
        self.slots[slot] = self._actor_cls.options(**self._opts, scheduling_strategy=strategy).remote(*self._args)
        self.peak_workers = max(self.peak_workers, sum(a is not None for a in self.slots))

    def _await_first_placement(self, workers: int) -> None:
        """Wait for the first actor's placement (``placement_timeout_s``), and briefly for the others.

        Raises:
            PlacementError: none was placed in time (naming the resource the cluster lacks).
        """
        refs = {ref: slot for slot, (ref, _) in self._placing.items()}
        ready, _ = self._ray.wait(list(refs), num_returns=1, timeout=self.placement_timeout_s)
        if not ready:
            message = self.placement_message()
            self.close()
            raise PlacementError(message)
        self._ray.wait(list(refs), num_returns=len(refs), timeout=PLACEMENT_GRACE_S)
        self._poll_placement()
        if self._placing:
            log.warning("%d of %d label workers placed; the other %d start when the cluster has room for them "
                        "(%s each)", workers - len(self._placing), workers, len(self._placing), self._bundle)

    def _poll_placement(self) -> None:
        """Start the actors of the slots whose placement groups are now placed."""
        if not self._placing:
            return
        refs = {ref: slot for slot, (ref, _) in self._placing.items()}
        ready, _ = self._ray.wait(list(refs), num_returns=len(refs), timeout=0)
        for ref in ready:
            self._start(refs[ref])

    def placement_message(self) -> str:
        """Why a worker of ``{CPU, GPU}`` per bundle is not placed: the resource no node has (or none has
        free), with the cluster's total and free resources."""
        ray = self._ray
        nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
        total, free = ray.cluster_resources(), ray.available_resources()
        lacking = [f"{k}={v:g}" for k, v in self._bundle.items() if not any(r.get(k, 0) >= v for r in nodes)]
        busy = [f"{k}={v:g}" for k, v in self._bundle.items() if free.get(k, 0) < v]
        why = (f"no node of the cluster has {', '.join(lacking)}" if lacking else
               f"no node has {', '.join(busy) or self._bundle} free (other jobs hold them)" if busy else
               "no single node has all of it free")
        brief = {k: total.get(k, 0) for k in ("CPU", "GPU")}
        return (f"no label worker could be placed within placement_timeout_s={self.placement_timeout_s:g} s: each "
                f"needs {{{', '.join(f'{k}: {v:g}' for k, v in self._bundle.items())}}} on one node, and {why} "
                f"(cluster: {len(nodes)} node(s), total {brief}, free {({k: free.get(k, 0) for k in brief})}). "
                "Add nodes with these resources, lower cpus_per_worker, or set device=cpu.")

    def _grow(self) -> None:
        """Place more actors when ``target`` (asked every :data:`GROW_INTERVAL_S`) wants more than there are."""
        if self._target is None or time.monotonic() - self._last_grow < GROW_INTERVAL_S:
            return
        self._last_grow = time.monotonic()
        left = len(self._queue) + len(self._inflight) + sum(len(q) for q in self._pinned.values())
        have = sum(a is not None for a in self.slots) + len(self._placing) + self._abandoned
        want = self._target(left) if left else 0
        if want > have:
            log.info("the cluster has room for %d label workers (%d now): placing %d more", want, have, want - have)
            for _ in range(want - have):
                self._add_slot()

    # ------------------------------------------------------------------------------------- running
    def metadata(self) -> list[dict]:
        """Every placed actor's ``metadata()``; returns once all of them have loaded their teachers."""
        return self._ray.get([a.metadata.remote() for a in self.slots if a is not None])

    @property
    def retried(self) -> dict[int, int]:
        """``{shard index: attempts}`` of the shards submitted more than once, by index."""
        return {i: n for i, n in sorted(self.attempts.items()) if n > 1}

    def run(self, jobs: Iterable[ShardJob], on_done: Callable[[ShardJob, dict], None]) -> None:
        """Label ``jobs``; calls ``on_done(job, stats)`` for each finished shard as it comes back and
        records the shards given up on in :attr:`failed`."""
        self._queue.extend(jobs)
        self._fill()
        while self._inflight or self._waiting():
            if not self._inflight and not self._await_placement():
                break
            ready, _ = self._ray.wait(list(self._inflight), num_returns=1, timeout=POLL_S) if self._inflight else ([], [])
            if ready:
                self._collect(ready[0], on_done)
            self._poll_placement()
            self._grow()
            self._fill()

    def _waiting(self) -> int:
        """Shards queued or pinned to a slot, not yet submitted."""
        return len(self._queue) + sum(len(q) for q in self._pinned.values())

    def _await_placement(self) -> bool:
        """Nothing in flight but shards wait: wait for a placing actor (until ``placement_timeout_s`` after
        the oldest began placing). Returns False after failing the waiting shards (none can be placed)."""
        if any(a is not None for a in self.slots):
            self._fill()
            if self._inflight:
                return True
        if not self._placing:
            self._fail_waiting("no live worker left (see the Ray logs)")
            return False
        deadline = min(since for _, since in self._placing.values()) + self.placement_timeout_s
        refs = [ref for ref, _ in self._placing.values()]
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            self._fail_waiting(self.placement_message())
            return False
        self._poll_placement()
        self._fill()
        return True

    def _fail_waiting(self, error: str) -> None:
        for q in (self._queue, *self._pinned.values()):
            while q:
                self.failed[q.popleft().index] = error

    def close(self) -> None:
        """Kill the live actors and remove the placement groups (idempotent)."""
        from ray.util import remove_placement_group

        for i, a in enumerate(self.slots):
            if a is not None:
                with contextlib.suppress(Exception):
                    self._ray.kill(a)
                self.slots[i] = None
        for i, pg in enumerate(self._pgs):
            if pg is not None:
                with contextlib.suppress(Exception):
                    remove_placement_group(pg)
                self._pgs[i] = None
        self._placing.clear()

    def _fill(self) -> None:
        for slot, actor in enumerate(self.slots):
            if actor is None:
                continue
            busy = sum(1 for _, s, _ in self._inflight.values() if s == slot)
            pinned = self._pinned.get(slot)
            while busy < TASKS_IN_FLIGHT_PER_WORKER and (pinned or self._queue):
                job = pinned.popleft() if pinned else self._queue.popleft()
                self.attempts[job.index] += 1
                self._inflight[actor.label.remote(job)] = (job, slot, self._gen[slot])
                busy += 1

    def _collect(self, ref: Any, on_done: Callable[[ShardJob, dict], None]) -> None:
        job, slot, gen = self._inflight.pop(ref)
        exceptions = self._ray.exceptions
        try:
            out = self._ray.get(ref)
        except exceptions.RayActorError as e:
            if (slot, gen) in self._retired:  # killed by us for another shard's failure: not this one's fault
                self.attempts[job.index] -= 1
                self._queue.appendleft(job)
                return
            self._replace_dead(slot, gen, e)
            self._retry_or_fail(job, f"the worker died: {type(e).__name__}: {e}")
        except exceptions.RayError as e:  # e.g. the task's result was lost
            self._retry_or_fail(job, f"{type(e).__name__}: {e}")
        else:
            if "error" not in out:
                on_done(job, out)
                return
            error = f"{out['error']} (worker {out.get('host', '?')} pid {out.get('pid', '?')})\n" \
                    f"{out.get('traceback', '')}".rstrip()
            if not out.get("retryable", True):
                self._give_up(job, error)
            elif self._retry_or_fail(job, error) and self._renew(slot, gen):
                self._pinned[slot].append(self._queue.popleft())  # retried on the fresh actor

    def _renew(self, slot: int, gen: int) -> bool:
        """Replace the (live) actor of ``slot`` that failed a shard with a fresh one in the same placement
        group: a CUDA error or a corrupted state does not outlive the process. Returns True when ``slot``
        has a fresh actor (started now, or already since that failure)."""
        if self._gen[slot] != gen or self.slots[slot] is None:
            return self.slots[slot] is not None
        self._retired.add((slot, gen))
        with contextlib.suppress(Exception):
            self._ray.kill(self.slots[slot], no_restart=True)
        log.warning("worker %d failed a shard; starting a fresh worker in its place", slot)
        self.workers_replaced += 1
        self._start(slot)
        return True

    def _replace_dead(self, slot: int, gen: int, error: Exception) -> None:
        """Replace a dead actor in a new placement group (once: only the first news of its death counts)
        while the budget lasts; its pinned shards go back to the queue."""
        if self._gen[slot] != gen or self.slots[slot] is None:
            return
        from ray.util import remove_placement_group

        with contextlib.suppress(Exception):
            self._ray.kill(self.slots[slot], no_restart=True)
        self.slots[slot] = None
        self._queue.extendleft(reversed(self._pinned.pop(slot, collections.deque())))
        with contextlib.suppress(Exception):
            remove_placement_group(self._pgs[slot])
        if self.workers_replaced < self.max_replacements:
            log.warning("worker %d died (%s); placing a replacement", slot, type(error).__name__)
            self.workers_replaced += 1
            self._place(slot)
        else:
            log.error("worker %d died and the replacement budget (%d) is spent", slot, self.max_replacements)
            self._pgs[slot] = None
            self._abandoned += 1

    def _retry_or_fail(self, job: ShardJob, error: str) -> bool:
        """Queue ``job`` again (at the front) while it has retries left; else give up on it. Returns True
        when it was queued again."""
        if self.attempts[job.index] <= self.max_retries:
            log.warning("shard %d: attempt %d of %d failed (%s); labelling it again", job.index,
                        self.attempts[job.index], self.max_retries + 1, error.splitlines()[0][:500])
            self.retries += 1
            self._queue.appendleft(job)
            return True
        self._give_up(job, error)
        return False

    def _give_up(self, job: ShardJob, error: str) -> None:
        self.failed[job.index] = error
        log.error("shard %d failed after %d attempt(s): %s", job.index, self.attempts[job.index], error)


def worker_target(use_cuda: bool, cpus_per_worker: int) -> Callable[[int], int]:
    """The ``target`` of :class:`ShardScheduler` for ``num_workers=0``: given the shards left, the actors the
    cluster has room for now (one per GPU, or per ``cpus_per_worker`` CPUs; at least one, at most one per
    shard), so the pool follows the cluster as nodes join."""
    def target(shards_left: int) -> int:
        import ray

        res = ray.cluster_resources()
        n = int(res.get("GPU", 0)) if use_cuda else int(res.get("CPU", 1)) // cpus_per_worker
        return max(1, min(n, shards_left))

    return target
