"""The label job: pseudo-label a collection of images with a depth and a semantic-segmentation teacher
(MultiMAE, Bachmann et al. 2022, Sec. 3.2) and write WebDataset shards (format: ``datasets/shards.py``,
docs/ARCHITECTURE.md, "Shard format").

Flow of :func:`run_label`::

    source (datasets/sources.py) ──list──▶ plan.parquet (key → shard, seeded shuffle, reused on re-runs)
        │
        ▼  Ray: one LabelWorker actor per worker holds every teacher (loaded once); the driver keeps two
           shards queued per actor, retries a shard whose actor died on a replacement actor, and each
           shard is: read bytes (threads) → load_rgb + resize to the teachers' inputs (decode threads,
           batches ahead) → teachers in batches → ShardTarWriter
           → {split}-{index:06d}.stats.json (the done marker)
        ▼
    index.parquet (a row per sample) + manifest.json (teachers, label sets, counts, shards + sha256)

Modules: ``config.py`` (:class:`LabelConfig`, :class:`TeacherConfig`), ``plan.py`` (the plan),
``scheduler.py`` (Ray and the actor pool), ``worker.py`` (one shard), ``teachers.py`` (the models),
``outputs.py`` (index, manifest, summary), ``lease.py`` (one run per output split).

Exactly once: every key is in exactly one shard of the plan; a shard is published by an atomic rename
and then marked done by its stats file, so a run killed at any moment (driver or worker) leaves only
finished shards and hidden ``.{name}.tmp-*`` files (or, on S3, incomplete multipart uploads, aborted by
the next run) that readers ignore; a re-run (or the runner's retry of a shard whose worker died,
``shard_retries``) labels exactly the shards without a done marker, listed past fsspec's cache.

Failures fail: only an image's own problem (corrupt, not an image, too large, ...) is a counted skip,
and a shard with more than ``max_skip_fraction`` skips fails. A missing or unreadable source (after
``read_retries`` retries of transient errors), a teacher exception or a write error fails the shard: no
done marker, retried on a fresh worker, and after ``shard_retries`` the run raises naming every failed
shard and its error; the manifest says ``complete: true`` only when every planned shard is done.

Concurrency and clusters: a run holds a lease on ``{output}/{split}`` (``lease.py``), so a second driver
refuses it; on a Ray cluster of several nodes, local paths need ``shared_fs=true``; the storage
environment (``AWS_*``, ``HF_*``, ``storage_options``) reaches every worker through its runtime
environment; workers that cannot be placed within ``placement_timeout_s`` fail the run naming the
resource, and with ``num_workers=0`` the pool grows as nodes join.

Modes: ``resume`` (default) labels only shards without a stats file; ``overwrite`` deletes the split's
outputs and plans again; ``extend`` keeps every existing shard byte-identical and puts keys that are
new in the source into new shards after the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from typing import Callable, Iterator

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.datasets.sources import SourceEntry, open_source
from polymae.patches import fsspec_defaults
from polymae.pipeline.label.config import LabelConfig, save_label_config
from polymae.pipeline.label.outputs import PendingRun, make_summary, print_summary, write_index, write_manifest
from polymae.pipeline.label.plan import Plan, load_or_create_plan, plan_url
from polymae.pipeline.label.preview import write_preview_or_warn
from polymae.pipeline.label.lease import OutputLease
from polymae.pipeline.label.scheduler import (ShardScheduler, alive_nodes, check_shared_paths, pool_size, ray_session,
                                             worker_cpus,
                                              storage_env, worker_target)
from polymae.pipeline.label.teachers import FINGERPRINT_NAME, check_fingerprint, label_fingerprint
from polymae.pipeline.label.worker import LabelWorker, ShardJob

log = logging.getLogger("polymae.label")

CONFIG_NAME = "config.yaml"


def run_label(cfg: LabelConfig) -> dict:
    """Run the label job (see the module docstring).

    Relative local ``input``/``output`` paths are made absolute here, in the driver, so that every worker
    uses the same folder; ``storage_options`` apply to every storage call of the run (driver and workers).
    The run holds a lease on ``{output}/{split}`` (:class:`~polymae.pipeline.label.lease.OutputLease`)
    from before planning until the manifest is written.

    Returns:
        summary dict: ``output`` (split folder), ``split``, ``mode``, ``plan``/``manifest``/``index`` URLs;
        over all finished shards ``samples_in``, ``written``, ``skipped`` (int), ``skipped_by_reason``,
        ``shards``; ``shards_planned``, ``shards_done``, ``shards_labelled`` (this run), ``shards_reused``,
        ``shards_failed`` (indices), ``run`` and ``total`` counts (``samples_in``, ``written``, ``skipped``
        by reason), ``seconds`` (wall time of the call), ``ray_start_seconds`` (connecting to/starting
        Ray), ``teacher_load_seconds`` (until every worker has its teachers), ``label_seconds`` (from then
        to the last shard), ``images_per_s`` (images in this run / ``label_seconds``), ``stages``
        (:func:`~polymae.pipeline.label.outputs.stage_totals` of this run's shards),
        ``teacher_wait_seconds`` (summed over this run's shards: seconds the teacher stages waited for
        decoded batches), ``workers``, ``retries``, ``shards_retried`` (``{index: attempts}``),
        ``workers_replaced``, ``teachers`` (``{slot: {name, revision, random_init, kind | label_set}}``,
        ``slot`` as in :func:`~polymae.pipeline.label.config.teacher_slot`: every teacher of every task).

    Raises:
        ConfigError: a teacher's weights are missing (``cfg.preflight()``) or the teachers are invalid; a
        local input/output on a Ray cluster of several nodes without ``shared_fs=true``.
        SourceError: the input cannot be listed. ValueError: the output was planned from another input,
        or its shards were labelled by other teachers (use ``mode=overwrite``); ``FingerprintMismatch`` (a
        ValueError): resume/extend with other label settings (``teachers.check_fingerprint``, names each).
        LeaseHeld: another run is labelling the same output split.
        PlacementError: no label worker could be placed within ``placement_timeout_s``.
        RuntimeError: some shards failed after ``shard_retries`` retries, each named with its error (after
        the manifest of the finished ones is written, with ``complete: false``; a re-run resumes them).
    """
    t_start = time.time()
    cfg = absolute_paths(cfg)
    with fsspec_defaults(cfg.storage_options):
        cfg.preflight()
        split_url = S.split_dir(cfg.output, cfg.split)
        source = open_source(cfg.input, cfg.input_kind)
        storage.makedirs(split_url)
        with OutputLease(split_url, cfg.lease_ttl_s):
            return _run_leased(cfg, source, t_start)


def absolute_paths(cfg: LabelConfig) -> LabelConfig:
    """``cfg`` with relative local ``input``/``output`` paths made absolute against the driver's working
    folder (a Ray worker's working folder is not the driver's); URLs are kept."""
    changes = {k: os.path.abspath(getattr(cfg, k)) for k in ("input", "output") if "://" not in getattr(cfg, k)}
    return dataclasses.replace(cfg, **changes)


def _run_leased(cfg: LabelConfig, source, t_start: float) -> dict:
    """:func:`run_label` once the output's lease is held: plan, label the pending shards, write the index,
    the manifest and the summary."""
    split_url = S.split_dir(cfg.output, cfg.split)
    if cfg.mode == "overwrite":
        _clear_split(cfg.output, cfg.split)
    storage.makedirs(split_url)
    plan = load_or_create_plan(cfg, source)

    by_shard = plan.shards()
    _abort_stale_uploads(split_url)  # killed runs' unfinished multipart uploads (we hold the lease)
    markers = fresh_done_markers(cfg.output, cfg.split)
    done_before = {i: markers[i] for i in by_shard if i in markers}
    pending = [i for i in by_shard if i not in done_before]
    # label settings (teachers.label_fingerprint) must match the finished shards'; config.yaml is never overwritten
    check_fingerprint(f"{split_url}/{FINGERPRINT_NAME}", label_fingerprint(cfg.label_policy()),
                      finished=len(done_before), pending=len(pending), replace=cfg.mode == "overwrite")
    save_label_config(cfg, f"{split_url}/{CONFIG_NAME}", replace=cfg.mode == "overwrite")
    stats: dict[int, dict] = {i: storage.read_json(u) for i, u in done_before.items()}
    log.info("%s: %d images in %d shards; %d shards to label, %d already done", split_url, len(plan.keys),
             len(by_shard), len(pending), len(done_before))

    failed: dict[int, str] = {}
    run = PendingRun(teachers={}, retried={})
    if pending:
        _remove_stale_temporaries(cfg.output, cfg.split)
        run = _label_pending(cfg, plan, by_shard, pending, stats, failed)
    # nothing labelled now: describe the teachers from the finished shards' stats
    teachers = run.teachers or next((s.get("teachers", {}) for s in stats.values()), {})
    urls = {"output": split_url, "plan": plan_url(cfg.output, cfg.split), "index": write_index(cfg, plan, stats),
            "manifest": write_manifest(cfg, plan, stats, teachers, source.describe())}
    write_preview_or_warn(cfg.output, cfg.split)  # preview.png beside the manifest; never fails the split
    summary = make_summary(cfg, urls, len(by_shard), stats, pending, len(done_before), failed, run, teachers,
                           time.time() - t_start)
    print_summary(summary)
    if failed:
        lines = "\n".join(f"  shard {i}: {msg}" for i, msg in sorted(failed.items()))
        raise RuntimeError(f"{len(failed)} of {len(by_shard)} shard(s) failed after up to {cfg.shard_retries + 1} "
                           f"attempt(s) each; they have no done marker and the manifest says complete: false "
                           f"(fix the cause and re-run to label them):\n{lines}")
    return summary


def fresh_done_markers(output: str, split: str) -> dict[int, str]:
    """``{index: stats url}`` of the split's done markers as the store holds them now: fsspec's listing cache
    (s3fs keeps every listing for the life of the process) is dropped first, so markers that other
    processes wrote or removed since this process last listed the split are seen."""
    storage.invalidate_cache(S.split_dir(output, split))
    return S.list_done_markers(output, split)


def _label_pending(cfg: LabelConfig, plan: Plan, by_shard: dict[int, list[SourceEntry]], pending: list[int],
                   stats: dict[int, dict], failed: dict[int, str]) -> PendingRun:
    """Label ``pending`` shards on Ray actors (:class:`ShardScheduler`); fills ``stats`` (index → stats)
    and ``failed`` (index → error).

    Raises:
        RuntimeError: ``device=cuda`` on a cluster without GPUs. ValueError: teachers differ from the
        finished shards' (see :func:`_check_teachers`).
    """
    t0 = time.time()
    with ray_session(cfg.ray_address, cfg.worker_nice):
        run = PendingRun(teachers={}, ray_start_seconds=time.time() - t0, retried={})
        check_shared_paths({"input": cfg.input, "output": cfg.output}, alive_nodes(), cfg.shared_fs)
        import ray

        cpus, decode = worker_cpus(cfg.device, cfg.cpus_per_worker, cfg.decode_threads, ray.nodes())
        cfg = dataclasses.replace(cfg, cpus_per_worker=cpus, decode_threads=decode)
        use_cuda, n_workers = pool_size(cfg.device, cfg.num_workers, cpus, len(pending))
        log.info("%s: %d CPU(s) and %d decode thread(s) per actor", "CUDA" if use_cuda else "CPU", cpus, decode)
        specs = cfg.teacher_specs(device="cuda" if use_cuda else "cpu")
        t_load = time.time()
        pool = ShardScheduler(LabelWorker, (specs, cpus, cfg.worker_nice), n_workers,
                              cfg.shard_retries, num_cpus=cpus, num_gpus=1 if use_cuda else 0,
                              placement_timeout_s=cfg.placement_timeout_s,
                              target=None if cfg.num_workers else worker_target(use_cuda, cpus),
                              env_vars=storage_env(cfg.storage_options))
        try:
            run.teachers = pool.metadata()[0]  # every placed actor has loaded its teachers
            run.teacher_load_seconds = time.time() - t_load
            _check_teachers(run.teachers, stats)
            check_fingerprint(f"{S.split_dir(cfg.output, cfg.split)}/{FINGERPRINT_NAME}",
                              label_fingerprint(cfg.label_policy(), run.teachers), finished=len(stats),
                              pending=len(pending))
            jobs = [_shard_job(cfg, plan, i, by_shard[i]) for i in pending]
            t_ready = time.time()
            with _progress(cfg, jobs, stats) as on_done:
                pool.run(jobs, on_done)
            failed.update(pool.failed)
            for i in pending:
                if i not in stats and i not in failed:
                    failed[i] = "the shard was never labelled (see the Ray logs)"
            run.label_seconds = time.time() - t_ready
            run.retries, run.retried, run.workers_replaced = pool.retries, pool.retried, pool.workers_replaced
            run.workers = pool.peak_workers
            return run
        finally:
            pool.close()


def _shard_job(cfg: LabelConfig, plan: Plan, index: int, entries: list[SourceEntry]) -> ShardJob:
    """The :class:`ShardJob` of shard ``index`` of the plan."""
    return ShardJob(cfg.split, index, S.shard_url(cfg.output, cfg.split, index),
                    S.stats_url(cfg.output, cfg.split, index), entries, plan.meta.get("classes"), cfg.max_pixels,
                    cfg.batch_size, cfg.read_threads, cfg.decode_threads, max_skip_fraction=cfg.max_skip_fraction,
                    read_retries=cfg.read_retries, read_backoff_s=cfg.read_backoff_s, min_side=cfg.min_side,
                    max_aspect=cfg.max_aspect, output_short_side=cfg.output_short_side,
                    output_max_side=cfg.output_max_side, aspect_buckets=tuple(cfg.aspect_buckets))


@contextlib.contextmanager
def _progress(cfg: LabelConfig, jobs: list[ShardJob], stats: dict[int, dict]
              ) -> Iterator[Callable[[ShardJob, dict], None]]:
    """A progress bar (images, shards, skipped) over ``jobs``; yields the ``on_done(job, stats)`` callback
    that records a finished shard's stats in ``stats`` and advances the bar."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(j.entries) for j in jobs), unit="img", desc=f"label {cfg.split}",
               disable=not cfg.progress, dynamic_ncols=True, mininterval=0.5)
    done: set[int] = set()

    def on_done(job: ShardJob, out: dict) -> None:
        stats[job.index] = out
        done.add(job.index)
        bar.update(out["samples_in"])
        skipped = sum(stats[i]["samples_in"] - stats[i]["written"] for i in done)
        bar.set_postfix(shards=f"{len(done)}/{len(jobs)}", skipped=skipped, refresh=False)

    try:
        yield on_done
    finally:
        bar.close()


def _check_teachers(current: dict[str, dict], stats: dict[int, dict]) -> None:
    """Refuse to mix teachers: finished shards must have been labelled by the same teachers/revisions.

    Raises:
        ValueError: naming the shard and both teachers.
    """
    want = {t: (m["name"], m["revision"]) for t, m in current.items()}
    for i, s in sorted(stats.items()):
        have = {t: (m.get("name"), m.get("revision")) for t, m in s.get("teachers", {}).items()}
        if have != want:
            raise ValueError(f"shard {i} was labelled by {have}, the configured teachers are {want}; "
                             "use mode=overwrite to relabel everything or another output/split")


def _clear_split(output: str, split: str) -> None:
    """Delete a split's labelling outputs: manifest and index first (so readers stop trusting them), then
    the done markers, the shard tars and the plan."""
    if not storage.exists(S.split_dir(output, split)):
        return
    for url in (S.manifest_url(output, split), S.index_url(output, split),
                *S.list_done_markers(output, split).values(), *S.list_shard_tars(output, split).values(),
                plan_url(output, split)):
        storage.remove(url)


def _abort_stale_uploads(split_url: str) -> list[str]:
    """Abort the incomplete multipart uploads under the split (``storage.abort_incomplete_uploads``): what a
    killed run left on S3, invisible to readers but billed. Best effort: without the permission to list
    them, a warning is logged and the run goes on (they hold no data anyone reads)."""
    try:
        return storage.abort_incomplete_uploads(split_url)
    except Exception as e:  # noqa: BLE001 - cleanup only; the labelling itself does not depend on it
        log.warning("could not abort incomplete uploads under %s (%s: %s); they stay until the bucket's "
                    "lifecycle rule or a later run removes them", split_url, type(e).__name__, e)
        return []


def _remove_stale_temporaries(output: str, split: str) -> list[str]:
    """Delete the hidden temporaries of shard tars and stats files (``S.list_temporaries``) that a killed
    run left behind (local outputs; object stores never show an unfinished upload). Readers ignore them
    anyway; this only frees the space. Call it only when no other run writes to the split.

    Returns:
        the removed URLs.
    """
    if not storage.is_local(S.split_dir(output, split)):
        return []
    removed = []
    for url in S.list_temporaries(output, split):
        with contextlib.suppress(FileNotFoundError):
            storage.remove(url)
            removed.append(url)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run (e.g. %s)", len(removed), removed[0])
    return removed
