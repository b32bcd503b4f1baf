"""What one label worker does: decode a shard's images ahead of the teachers, run every teacher in
batches, and write the shard tar + its done marker (``label_shard``); ``LabelWorker`` is the Ray actor
that holds the teachers (loaded once per worker) and labels the shards the driver sends it.

The driver is ``pipeline/label/driver.py``, the config ``pipeline/label/config.py``, the actor pool
``pipeline/label/scheduler.py``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.datasets.sources import SourceEntry, iter_bytes, read_uri
from polymae.patches import environment
from polymae.pipeline.label.config import slot_task

log = logging.getLogger("polymae.label")


@dataclass
class ShardJob:
    """One shard to label: ``index``, output ``url`` and ``stats_url``, its ``entries`` in order, the source
    ``classes`` (names by class index, or ``None``), and the per-image limits."""

    split: str
    index: int
    url: str
    stats_url: str
    entries: list[SourceEntry]
    classes: list[str] | None = None
    max_pixels: int = 40_000_000
    batch_size: int = 16
    read_threads: int = 8
    decode_threads: int = 1
    max_skip_fraction: float = 0.01
    read_retries: int = 4
    read_backoff_s: float = 1.0
    min_side: int = 1  # images with a shorter side (pixels) skip as too_small
    max_aspect: float | None = None  # long side / short side above this skips as too_elongated; None = any


PREFETCH_BATCHES = 2  # decoded batches waiting for the teacher stage (bounds the worker's memory)


class ShardFailed(RuntimeError):
    """A shard that cannot be labelled as planned; it gets no done marker and its tar is not published.

    Only an image's own problem (corrupt, not an image, too large, ...: ``BadImage``) is a per-image skip;
    everything else is a failure of the system and fails the whole shard: a source that cannot be read
    (missing, denied, or a transient error that outlasted the retries), a teacher exception (e.g. a CUDA
    error), an output write error. ``retryable``: labelling the shard again, on a fresh worker, may succeed
    (False for :class:`TooManySkips`, whose images would skip again)."""

    retryable = True


class SourceReadFailed(ShardFailed):
    """A source image of the shard could not be read (named in the message)."""


class TeacherFailed(ShardFailed):
    """A teacher raised (or returned the wrong number of maps) on a batch of the shard."""


class TooManySkips(ShardFailed):
    """More of the shard's images were skipped than ``max_skip_fraction`` allows: a sign of a broken source
    or decoder rather than a few bad files. Not retried."""

    retryable = False


def teacher_brief(meta: dict) -> dict:
    """The part of a teacher's metadata stored in every sample's ``json``: name, revision, random-init
    flag, depth kind or label set."""
    keep = ("name", "revision", "random_init", "kind", "label_set")
    return {k: meta[k] for k in keep if k in meta}


def _predict(teacher, slot: str, images: list[np.ndarray], resized: list | None, keys: list[str]) -> list[np.ndarray]:
    """The teacher's maps of a batch (``images``: uint8 ``[H, W, 3]`` each; ``resized``: their teacher
    inputs or None), one per image.

    Raises:
        TeacherFailed: the teacher raised (a CUDA error, out of memory, a bug) or returned another number of
            maps; naming the slot and the batch's keys. A teacher failure is never a per-image skip: it
            fails the shard, which is retried on a fresh worker.
    """
    try:
        out = teacher.predict(images, resized=resized)
    except Exception as e:  # noqa: BLE001 - re-raised as the shard's failure
        raise TeacherFailed(f"teacher {slot} failed on a batch of {len(images)} image(s) ({', '.join(keys[:4])}"
                            f"{', ...' if len(keys) > 4 else ''}): {type(e).__name__}: {e}") from e
    if len(out) != len(images):
        raise TeacherFailed(f"teacher {slot} returned {len(out)} maps for {len(images)} images")
    return list(out)


def _read_again(job: ShardJob, e: SourceEntry, error: BaseException) -> bytes:
    """The bytes of ``e`` after its first read failed with ``error``: a transient error (timeout, reset
    connection, HTTP 429/5xx, S3 SlowDown; ``storage.is_transient``) is retried ``job.read_retries`` times
    with exponential backoff from ``job.read_backoff_s`` seconds.

    Raises:
        SourceReadFailed: naming the key, the URI and the error, for a non-transient error (a missing file
            is a failure of the source, never a skip) or when the retries are spent.
    """
    try:
        return storage.retry_transient(lambda: read_uri(e.uri), attempts=job.read_retries + 1,
                                       backoff_s=job.read_backoff_s, what=f"reading {e.uri}", first_error=error)
    except Exception as last:  # noqa: BLE001 - re-raised as the shard's failure
        if storage.is_transient(last):
            raise SourceReadFailed(f"reading {e.key} ({e.uri}) failed {job.read_retries + 1} times; last error "
                                   f"{type(last).__name__}: {last}") from last
        what = "is missing" if isinstance(last, FileNotFoundError) else "cannot be read"
        raise SourceReadFailed(f"source {e.key} ({e.uri}) {what}: {type(last).__name__}: {last}") from last


@dataclass
class _Decoded:
    """One entry after the CPU stage: ``rgb``/``jpeg``/``data`` and ``resized`` (slot → teacher input,
    see ``Teacher.resize_input``), or ``skip`` = ``(reason, detail)``; seconds spent decoding/resizing."""

    entry: SourceEntry
    rgb: np.ndarray | None = None
    jpeg: bytes | None = None
    data: bytes | None = None
    resized: dict | None = None
    skip: tuple[str, str] | None = None
    decode_s: float = 0.0
    resize_s: float = 0.0


def _decode_entry(e: SourceEntry, data: bytes, max_pixels: int, teachers: dict[str, Any], min_side: int = 1,
                  max_aspect: float | None = None) -> _Decoded:
    """The CPU stage of one image (runs in a decode thread): ``load_rgb`` then one resize per distinct
    teacher input size. Only ``BadImage`` (the image's own problem) becomes a skip; a resize that fails is
    left to ``predict``, which raises it as the shard's :class:`TeacherFailed`."""
    t0 = time.perf_counter()
    try:
        rgb, jpeg = S.load_rgb(data, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect)
    except S.BadImage as bad:
        return _Decoded(e, skip=(bad.reason, str(bad)), decode_s=time.perf_counter() - t0)
    t1 = time.perf_counter()
    by_size: dict[tuple[int, int], Any] = {}
    resized: dict[str, Any] = {}
    for slot, teacher in teachers.items():
        try:
            size = tuple(teacher.input_size(rgb.shape[0], rgb.shape[1]))
            if size not in by_size:
                by_size[size] = teacher.resize_input(rgb)
            resized[slot] = by_size[size]
        except Exception:  # noqa: BLE001 - predict resizes itself and reports the error per sample
            resized[slot] = None
    return _Decoded(e, rgb=rgb, jpeg=jpeg, data=data, resized=resized, decode_s=t1 - t0,
                    resize_s=time.perf_counter() - t1)


class _Prefetcher:
    """The CPU stages of a shard, ahead of the teacher stage: a feeder thread reads each batch's bytes in
    order (``iter_bytes``) and submits every image to a pool of ``decode_threads`` threads
    (:func:`_decode_entry`); the batch (a list of futures, in entry order) goes into a queue of at most
    :data:`PREFETCH_BATCHES`. :meth:`batches` yields the decoded batches in order and measures ``wait``,
    the seconds the consumer (the teacher stage) spent waiting for them. Use as a context manager."""

    _END = object()

    def __init__(self, job: ShardJob, teachers: dict[str, Any]):
        import queue
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.job, self.teachers = job, teachers
        self.read_s = self.wait = 0.0
        self._queue: Any = queue.Queue(maxsize=PREFETCH_BATCHES)
        self._full = queue.Full
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, job.decode_threads), thread_name_prefix="label-decode")
        self._thread = threading.Thread(target=self._feed, name="label-feed", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except self._full:
                continue
        return False

    def _feed(self) -> None:
        job = self.job
        reader = None
        try:
            reader = iter_bytes([e.uri for e in job.entries], threads=job.read_threads)
            for b0 in range(0, len(job.entries), job.batch_size):
                items = []
                for e in job.entries[b0:b0 + job.batch_size]:
                    t0 = time.perf_counter()
                    _, data = next(reader)
                    self.read_s += time.perf_counter() - t0
                    if isinstance(data, BaseException):  # retried when transient, else the shard fails
                        t0 = time.perf_counter()
                        data = _read_again(job, e, data)
                        self.read_s += time.perf_counter() - t0
                    items.append(self._pool.submit(_decode_entry, e, data, job.max_pixels, self.teachers,
                                                   job.min_side, job.max_aspect))
                if not self._put(items):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(exc)
        finally:
            if reader is not None:
                reader.close()

    def batches(self) -> Iterable[list[_Decoded]]:
        """Decoded batches in entry order. Raises what the feeder or a decode thread raised."""
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            if item is self._END:
                self.wait += time.perf_counter() - t0
                return
            if isinstance(item, BaseException):
                raise item
            decoded = [f.result() for f in item]
            self.wait += time.perf_counter() - t0
            yield decoded

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


def label_shard(job: ShardJob, teachers: dict[str, Any]) -> dict:
    """Label one shard and write ``{split}-{index:06d}.tar`` then its stats file (the done marker).

    Stages: each entry's bytes are read (``read_threads`` ahead), decoded by ``load_rgb`` (EXIF rotation,
    CMYK, 16-bit, palette and alpha handled) and resized to every teacher's input size in
    ``decode_threads`` threads, up to :data:`PREFETCH_BATCHES` batches ahead of the teacher stage (so the
    teachers, e.g. on a GPU, do not wait on JPEG decoding); then every teacher labels the batch
    (``batch_size`` images) and the samples are written in entry order with
    :class:`~polymae.datasets.shards.ShardTarWriter`. The tar is the same for any ``decode_threads``.

    Failures: only an image's own problem (``BadImage``: ``empty``, ``undecodable``, ``too_large``, and
    whatever reasons ``load_rgb`` gives) is a counted *skip* and the shard goes on; if more than
    ``job.max_skip_fraction`` of the shard's images skip, the shard fails (:class:`TooManySkips`). A
    transient read error is retried (``read_retries``, backoff from ``read_backoff_s``); a source that
    stays unreadable or is missing, a teacher exception and an output write error fail the shard
    (:class:`ShardFailed`). A failed shard's tar is discarded and it gets no done marker.

    A shard that already has its done marker (a retry of a shard whose first attempt finished but whose
    result was lost) is not labelled again: its stats file is read and returned, nothing is written.

    The primary teacher of a task writes ``depth.png``/``semseg.png`` and its metadata in the sample
    ``json`` as with one teacher; a further teacher (slot ``{task}.{name}``) writes
    ``depth.<name>.png``/``semseg.<name>.png`` and ``json["extra_teachers"][member]`` = its name,
    revision, random_init, ``label_resolution`` and ``kind`` + ``depth_range`` (depth) or ``label_set``
    + ``num_classes`` + ``ignore_index`` (semseg).

    Args:
        job: the shard.
        teachers: ``{slot: Teacher}`` (see :func:`~polymae.pipeline.label.config.teacher_slot`):
            ``depth``/``semseg`` for the primary
            teachers (either may be absent), ``depth.<name>``/``semseg.<name>`` for further ones.
    Returns:
        the stats dict written to ``job.stats_url``: ``samples_in``, ``written``, ``skipped`` (by reason),
        ``seconds``, ``started``/``finished`` (unix seconds), ``cpu_seconds`` (CPU time of the worker
        process meanwhile; well below ``seconds`` means the worker did not get its CPU),
        ``busy_seconds`` per stage (read, decode, resize, one per teacher slot, encode, write; seconds of
        this worker; read/decode/resize are measured in their own threads and overlap the others),
        ``teacher_wait_seconds`` (seconds the teacher stage waited for a decoded batch; near 0 when the
        CPU stages keep up), ``teachers``, ``size``/``sha256`` of the tar, ``host``/``pid``/``nice`` of
        the worker, and ``samples`` (a row per entry: key, cls, width, height, skipped, detail).
    Raises:
        ShardFailed: :class:`SourceReadFailed`, :class:`TeacherFailed`, :class:`TooManySkips`; and whatever
        the writer raises (an output write error). The tar is then discarded and no stats file is written.
    """
    if storage.exists_fresh(job.stats_url):  # the listing cache would hide another attempt's marker
        log.warning("shard %d already has its done marker %s; not labelling it again", job.index, job.stats_url)
        return storage.read_json(job.stats_url)
    labeller = _ShardLabeller(job, teachers)
    writer = S.ShardTarWriter(job.url)
    try:
        with _Prefetcher(job, teachers) as prefetch:
            for decoded in prefetch.batches():  # the teacher stage
                labeller.label_batch(decoded, writer)
        labeller.busy["read"] = prefetch.read_s  # the feeder has stopped
        labeller.wait = prefetch.wait
        labeller.check_skips()
        with labeller.timed("write"):
            writer.close()
    except BaseException:
        writer.abort()
        raise
    stats = labeller.stats(writer)
    storage.write_json_atomic(job.stats_url, stats)
    return stats


class _ShardLabeller:
    """The teacher stage of one shard and its bookkeeping: every teacher labels a decoded batch, the samples
    are encoded and written in entry order, and a row per entry (written, or skipped with a reason) and
    the busy seconds per stage are recorded for the stats file (see :func:`label_shard`)."""

    def __init__(self, job: ShardJob, teachers: dict[str, Any]):
        self.job, self.teachers = job, teachers
        self.t_start, self.cpu_start = time.time(), time.process_time()
        self.busy: dict[str, float] = {k: 0.0 for k in ("read", "decode", "resize", *teachers, "encode", "write")}
        self.wait = 0.0  # seconds the teacher stage waited for decoded batches
        self.rows: dict[str, dict] = {}
        self.metas = {slot: t.metadata() for slot, t in teachers.items()}
        self.briefs = {slot: teacher_brief(m) for slot, m in self.metas.items()}
        self.primary_briefs = {slot: b for slot, b in self.briefs.items() if slot == slot_task(slot)}

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the seconds the ``with`` block takes to ``busy[stage]``."""
        t0 = time.perf_counter()
        yield
        self.busy[stage] += time.perf_counter() - t0

    def skip(self, e: SourceEntry, reason: str, detail: str, size: tuple[int, int] | None = None) -> None:
        """Record entry ``e`` as skipped for its own problem (``reason``: a ``BadImage`` reason; ``size``:
        ``(height, width)`` when it decoded). Never used for failures of the system (see :func:`label_shard`)."""
        self.rows[e.key] = {"key": e.key, "cls": e.cls, "width": size[1] if size else None,
                            "height": size[0] if size else None, "skipped": reason, "detail": detail[:300]}

    def skipped(self) -> collections.Counter:
        """``{reason: count}`` of the entries skipped so far."""
        return collections.Counter(r["skipped"] for r in self.rows.values() if r["skipped"])

    def check_skips(self) -> None:
        """Fail the shard when its skipped fraction exceeds ``job.max_skip_fraction``.

        Raises:
            TooManySkips: naming the counts by reason and the first skipped keys with their details.
        """
        skipped, n = self.skipped(), len(self.job.entries)
        if n and sum(skipped.values()) > self.job.max_skip_fraction * n:
            rows = [r for r in self.rows.values() if r["skipped"]][:3]
            examples = "; ".join(f"{r['key']}: {r['detail']}" for r in rows)
            raise TooManySkips(f"shard {self.job.index}: {sum(skipped.values())} of {n} images skipped "
                               f"({dict(sorted(skipped.items()))}), more than max_skip_fraction="
                               f"{self.job.max_skip_fraction}; e.g. {examples}")

    def label_batch(self, decoded: list[_Decoded], writer: S.ShardTarWriter) -> None:
        """Run every teacher on the batch's decoded images and write their samples in entry order."""
        good: list[_Decoded] = []
        for d in decoded:
            self.busy["decode"] += d.decode_s
            self.busy["resize"] += d.resize_s
            if d.skip is not None:
                self.skip(d.entry, *d.skip)
            else:
                good.append(d)
        if not good:
            return
        images, keys = [g.rgb for g in good], [g.entry.key for g in good]
        preds: dict[str, list] = {}
        for slot, teacher in self.teachers.items():
            with self.timed(slot):
                preds[slot] = _predict(teacher, slot, images, [g.resized.get(slot) for g in good], keys)
        for j, g in enumerate(good):
            self.write_sample(g, {slot: p[j] for slot, p in preds.items()}, writer)

    def write_sample(self, g: _Decoded, preds: dict[str, np.ndarray], writer: S.ShardTarWriter) -> None:
        """Encode and write one decoded entry with its maps ``preds`` (``{slot: map}``).

        Raises:
            TeacherFailed: a map cannot be encoded (e.g. NaN depth: the teacher's output is broken).
            OSError (or the store's error): the write failed.
        """
        e = g.entry
        h, w = g.rgb.shape[:2]
        with self.timed("encode"):
            try:
                encoded = self._sample(g, preds).encode()
            except ValueError as err:
                raise TeacherFailed(f"the teachers' maps of {e.key} cannot be encoded: {err}") from err
        with self.timed("write"):
            writer.write(encoded)
        self.rows[e.key] = {"key": e.key, "cls": e.cls, "width": w, "height": h, "skipped": None, "detail": None}

    def _sample(self, g: _Decoded, preds: dict[str, np.ndarray]) -> S.LabelledSample:
        """The :class:`~polymae.datasets.shards.LabelledSample` of a decoded entry and its maps."""
        e, metas = g.entry, self.metas
        h, w = g.rgb.shape[:2]
        meta: dict[str, Any] = {
            "schema_version": S.SCHEMA_VERSION, "key": e.key,
            "source": {"uri": e.uri, "bytes": len(g.data), "reencoded": g.jpeg is not g.data},
            "width": w, "height": h, "teachers": self.primary_briefs,
            "label_resolution": {slot: list(t.input_size(h, w)) for slot, t in self.teachers.items()
                                 if slot in self.primary_briefs},
        }
        sample = S.LabelledSample(key=e.key, rgb_jpeg=g.jpeg, meta=meta, cls=e.cls)
        if "depth" in self.teachers:
            sample.depth = preds["depth"]
            meta["depth"] = {"kind": metas["depth"]["kind"], "teacher": metas["depth"]["name"]}
        if "semseg" in self.teachers:
            sample.semseg = preds["semseg"]
            sample.num_classes = metas["semseg"]["num_classes"]
            meta["label_set"] = metas["semseg"]["label_set"]
            meta["semseg"] = {"label_set": metas["semseg"]["label_set"], "teacher": metas["semseg"]["name"]}
        sample.extra, extra_meta = self._extra_members(h, w, preds)
        if extra_meta:
            meta["extra_teachers"] = extra_meta
        if e.cls is not None:
            meta["cls"] = int(e.cls)
            if self.job.classes is not None and 0 <= e.cls < len(self.job.classes):
                meta["class_name"] = self.job.classes[e.cls]
        return sample

    def _extra_members(self, h: int, w: int, preds: dict[str, np.ndarray]) -> tuple[dict[str, bytes], dict]:
        """``({member: png bytes}, {member: info})`` of the further (non-primary) teachers of an image of
        ``h x w`` pixels; ``info``: brief, ``label_resolution`` and ``depth_range`` (depth) or
        ``num_classes`` + ``ignore_index`` (semseg)."""
        members: dict[str, bytes] = {}
        infos: dict[str, dict] = {}
        for slot, teacher in self.teachers.items():
            if slot in self.primary_briefs:
                continue
            task, m = slot_task(slot), self.metas[slot]
            name = S.member(task, m["name"])
            info = {**self.briefs[slot], "label_resolution": list(teacher.input_size(h, w))}
            if task == "depth":
                png, rng = S.encode_depth(preds[slot])
                info["depth_range"] = rng
            else:
                png = S.encode_semseg(preds[slot], m["num_classes"])
                info.update(num_classes=m["num_classes"], ignore_index=m["ignore_index"])
            members[name] = png
            infos[name] = info
        return members, infos

    def stats(self, writer: S.ShardTarWriter) -> dict:
        """The shard's stats dict (see :func:`label_shard`) once ``writer`` is closed."""
        job = self.job
        samples = [self.rows[e.key] for e in job.entries]
        skipped = self.skipped()
        return {
            "schema_version": S.SCHEMA_VERSION, "split": job.split, "index": job.index,
            "name": S.shard_name(job.split, job.index), "url": job.url,
            "samples_in": len(job.entries), "written": writer.count, "skipped": dict(sorted(skipped.items())),
            "max_skip_fraction": job.max_skip_fraction,
            "seconds": round(time.time() - self.t_start, 4),
            "started": round(self.t_start, 6), "finished": round(time.time(), 6),
            "cpu_seconds": round(time.process_time() - self.cpu_start, 4),
            "busy_seconds": {k: round(v, 4) for k, v in sorted(self.busy.items())},
            "teacher_wait_seconds": round(self.wait, 4), "decode_threads": job.decode_threads,
            "teachers": {slot: {k: v for k, v in m.items() if k != "class_names"} for slot, m in self.metas.items()},
            "size": writer.bytes_written, "sha256": writer.sha256,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(), "pid": os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "samples": samples,
        }


class LabelWorker:
    """Ray actor body: loads the teachers once (``teacher_specs``: ``{slot: load_teacher kwargs}``, see
    ``LabelConfig.teacher_specs``) and labels shards with :func:`label_shard`. ``threads``: torch intra-op
    threads. ``nice``: niceness to run at (``None`` keeps the one Ray gave, 15 by default); lowering it may
    need privileges (``CAP_SYS_NICE``), without which the worker keeps its niceness and logs a warning."""

    def __init__(self, teacher_specs: dict[str, dict], threads: int = 1, nice: int | None = None):
        # Teachers load from local folders only. The change is kept for the life of the worker process,
        # which Ray owns and ends with the actor; the handle is kept so that it could be restored.
        self._offline = environment({"HF_HUB_OFFLINE": "1"})
        import torch

        from polymae.pipeline.label.teachers import load_teacher

        if nice is not None and os.getpriority(os.PRIO_PROCESS, 0) != nice:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, nice)
            except OSError as e:
                log.warning("label worker keeps niceness %d (could not set %d: %s)",
                            os.getpriority(os.PRIO_PROCESS, 0), nice, e)
        torch.set_num_threads(max(1, int(threads)))
        self.teachers = {slot: load_teacher(**spec) for slot, spec in teacher_specs.items()}

    def metadata(self) -> dict[str, dict]:
        """``{slot: teacher.metadata()}``."""
        return {slot: t.metadata() for slot, t in self.teachers.items()}

    def label(self, job: ShardJob) -> dict:
        """:func:`label_shard`; an exception becomes ``{"index", "error", "traceback", "retryable"}`` so the
        driver knows the shard and whether labelling it again may help (False for :class:`TooManySkips`)."""
        try:
            return label_shard(job, self.teachers)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which retries or fails the run
            return {"index": job.index, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "retryable": getattr(e, "retryable", True), "host": socket.gethostname(), "pid": os.getpid()}
