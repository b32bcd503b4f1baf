"""What one label worker does: decode a shard's images ahead of the teachers, bucket them by aspect ratio
into a few fixed teacher input sizes so that batches are full, run every teacher on each batch, and encode
and write the samples on their own threads into the shard tar + its done marker (``label_shard``);
``LabelWorker`` is the Ray actor that holds the teachers (loaded once per worker) and labels the shards the
driver sends it.

Pipeline of one shard (threads)::

    feeder: read bytes (read_threads ahead) ─► decode pool (decode_threads): decode, shrink to the output
    size, resize to each teacher's bucket ─► queue ─► teacher thread: bucket, batch, predict ─► encode pool
    (encode_threads): PNG/JPEG ─► writer thread: tar, in batch order

Output policy (``output_short_side``/``output_max_side``, docs/ARCHITECTURE.md "Shard format"): the stored rgb
is the source shrunk once (antialiased bicubic) to the output size; each teacher sees the image resized to its
bucket's input size, and its map is resized from the teacher's resolution to the output size (depth bilinear,
antialiased when shrinking; semseg: class scores upsampled bilinearly and arg-maxed, so every stored id is one
of the teacher's classes). A worker holds at most one source-sized image per decode thread; everything queued
is at the output size.

The driver is ``pipeline/label/driver.py``, the config ``pipeline/label/config.py``, the actor pool
``pipeline/label/scheduler.py``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.datasets.sources import SourceEntry, iter_bytes, read_uri
from polymae.patches import environment
from polymae.pipeline.label.config import ASPECT_BUCKETS, MAX_BUCKET_DISTORTION, slot_task

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
    output_short_side: int | None = None  # stored short side cap (pixels); None = the source size
    output_max_side: int | None = None  # stored long side cap (pixels); None = no cap
    aspect_buckets: tuple[float, ...] = ASPECT_BUCKETS  # teacher input aspects (w / h); () = each its own
    max_bucket_distortion: float = MAX_BUCKET_DISTORTION
    encode_threads: int = 2  # threads encoding PNG/JPEG off the teacher thread (one more writes the tar)


PREFETCH_BATCHES = 2  # decoded batches waiting for the teacher stage (bounds the worker's memory)
MAX_PENDING_BATCHES = 4  # decoded images waiting in partly filled buckets, in batches; beyond, the fullest
# bucket goes to the teachers as a partial batch (bounds memory on shards whose aspects spread over many buckets)
WRITE_QUEUE_BATCHES = 2  # labelled batches waiting for the encode/write threads


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


def _predict(teacher, slot: str, images: list[np.ndarray], resized: list | None, keys: list[str],
             input_sizes: list[tuple[int, int]] | None = None) -> list[np.ndarray]:
    """The teacher's maps of a batch, one per image at its size (``images``: uint8 ``[h, w, 3]`` each, the
    stored pixels; ``resized``: their teacher inputs or None; ``input_sizes``: their teacher input sizes,
    ``None`` = the teacher's own per image).

    Raises:
        TeacherFailed: the teacher raised (a CUDA error, out of memory, a bug) or returned another number of
            maps; naming the slot and the batch's keys. A teacher failure is never a per-image skip: it
            fails the shard, which is retried on a fresh worker.
    """
    try:
        out = teacher.predict(images, resized=resized, input_sizes=input_sizes)
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


def bucket_input_size(teacher: Any, height: int, width: int, buckets: tuple[float, ...] = ASPECT_BUCKETS,
                      max_distortion: float = MAX_BUCKET_DISTORTION) -> tuple[int, int]:
    """The teacher input ``(h, w)`` in pixels of a ``height x width`` image under aspect bucketing.

    The image's aspect ``width / height`` goes to the nearest (in log ratio) of ``buckets``; the input is the
    teacher's own size (``teacher.input_size``: its short side, multiple, long-side cap; square teachers stay
    square) for an image of that bucket's aspect, so every image of a bucket gets the same input size and a
    shard's images fill whole batches. The image is then stretched by at most ``max_distortion`` (its maps
    are resized back to its own aspect); an image further than that from every bucket, or any image when
    ``buckets`` is empty, gets ``teacher.input_size(height, width)``, its own aspect.

    Raises:
        ValueError: non-positive sizes (from ``teacher.input_size``).
    """
    if not buckets or height <= 0 or width <= 0:
        return tuple(teacher.input_size(height, width))
    aspect = width / height
    best = min(buckets, key=lambda b: abs(math.log(aspect / b)))
    if max(aspect / best, best / aspect) > max_distortion:
        return tuple(teacher.input_size(height, width))
    ref = 4096  # a large reference image of the bucket's aspect: the teacher's rounding decides the input
    h, w = (ref, max(1, round(ref * best))) if best >= 1 else (max(1, round(ref / best)), ref)
    return tuple(teacher.input_size(h, w))


@dataclass
class _Decoded:
    """One entry after the CPU stage: ``rgb`` (uint8 ``[h, w, 3]`` at the output size) and its ``jpeg``
    (``rgb.jpg`` bytes), ``source_size`` ``(H, W)`` and ``source_bytes``, per teacher slot its input size
    ``sizes`` and input ``resized`` (float32 ``[1, 3, h, w]``, see ``Teacher.resize_input``); or ``skip`` =
    ``(reason, detail)``; seconds spent decoding / resizing."""

    entry: SourceEntry
    rgb: np.ndarray | None = None
    jpeg: bytes | None = None
    source_bytes: int = 0
    reencoded: bool = False
    source_size: tuple[int, int] | None = None
    sizes: dict | None = None
    resized: dict | None = None
    skip: tuple[str, str] | None = None
    decode_s: float = 0.0
    resize_s: float = 0.0

    @property
    def bucket(self) -> tuple:
        """The images of a bucket share every teacher's input size: ``((slot, (h, w)), ...)``."""
        return tuple(sorted(self.sizes.items()))


def _decode_entry(e: SourceEntry, data: bytes, job: ShardJob, teachers: dict[str, Any]) -> _Decoded:
    """The CPU stage of one image (runs in a decode thread): ``load_rgb`` (only ``BadImage``, the image's
    own problem, becomes a skip), the output policy (shrunk once to :func:`~polymae.datasets.shards.output_size`,
    re-encoded), then one resize per distinct teacher input size (:func:`bucket_input_size`), from the stored
    pixels when they are at least that large, else from the source.

    Raises:
        TeacherFailed: a teacher cannot size or resize the image (a teacher's fault, never a skip).
    """
    t0 = time.perf_counter()
    try:
        rgb, jpeg = S.load_rgb(data, max_pixels=job.max_pixels, min_side=job.min_side, max_aspect=job.max_aspect)
    except S.BadImage as bad:
        return _Decoded(e, skip=(bad.reason, str(bad)), decode_s=time.perf_counter() - t0)
    H, W = rgb.shape[:2]
    stored = S.resize_rgb(rgb, S.output_size(H, W, job.output_short_side, job.output_max_side))
    if stored is not rgb:
        jpeg = S.encode_rgb(stored)
    t1 = time.perf_counter()
    by_size: dict[tuple[int, int], Any] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for slot, teacher in teachers.items():
        try:
            size = bucket_input_size(teacher, H, W, tuple(job.aspect_buckets), job.max_bucket_distortion)
            if size not in by_size:
                src = stored if stored.shape[0] >= size[0] and stored.shape[1] >= size[1] else rgb
                by_size[size] = teacher.resize_input(src, size=size)
        except Exception as err:  # noqa: BLE001 - the teacher's failure, not the image's
            raise TeacherFailed(f"teacher {slot} cannot resize {e.key} ({H}x{W}): {type(err).__name__}: {err}") from err
        sizes[slot] = size
    return _Decoded(e, rgb=stored, jpeg=jpeg, source_bytes=len(data), reencoded=jpeg is not data,
                    source_size=(H, W), sizes=sizes, resized={slot: by_size[s] for slot, s in sizes.items()},
                    decode_s=t1 - t0, resize_s=time.perf_counter() - t1)


class _Prefetcher:
    """The CPU stages of a shard, ahead of the teacher stage: a feeder thread reads the entries' bytes in
    order (``iter_bytes``) and submits every image to a pool of ``decode_threads`` threads
    (:func:`_decode_entry`); the futures go, in entry order, into a queue of at most
    :data:`PREFETCH_BATCHES` batches. :meth:`items` yields the decoded entries in order and measures
    ``wait``, the seconds the consumer (the teacher stage) spent waiting for them. Use as a context manager."""

    _END = object()

    def __init__(self, job: ShardJob, teachers: dict[str, Any]):
        from concurrent.futures import ThreadPoolExecutor

        self.job, self.teachers = job, teachers
        self.read_s = self.wait = 0.0
        self._queue: Any = queue.Queue(maxsize=PREFETCH_BATCHES * max(1, job.batch_size))
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=max(1, job.decode_threads), thread_name_prefix="label-decode")
        self._thread = threading.Thread(target=self._feed, name="label-feed", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _feed(self) -> None:
        job = self.job
        reader = None
        try:
            reader = iter_bytes([e.uri for e in job.entries], threads=job.read_threads)
            for e in job.entries:
                t0 = time.perf_counter()
                _, data = next(reader)
                if isinstance(data, BaseException):  # retried when transient, else the shard fails
                    data = _read_again(job, e, data)
                self.read_s += time.perf_counter() - t0
                if not self._put(self._pool.submit(_decode_entry, e, data, job, self.teachers)):
                    return
            self._put(self._END)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            self._put(exc)
        finally:
            if reader is not None:
                reader.close()

    def items(self) -> Iterator[_Decoded]:
        """Decoded entries in entry order. Raises what the feeder or a decode thread raised."""
        while True:
            t0 = time.perf_counter()
            item = self._queue.get()
            if item is self._END:
                self.wait += time.perf_counter() - t0
                return
            if isinstance(item, BaseException):
                raise item
            decoded = item.result()
            self.wait += time.perf_counter() - t0
            yield decoded

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Bucketer:
    """Groups a shard's decoded images by their teacher input sizes (:attr:`_Decoded.bucket`) into batches
    of ``batch_size``: :meth:`add` returns a bucket's batch as soon as it is full, so the teachers get full
    batches whatever order the sizes come in; :meth:`flush` returns the partly filled buckets at the end of
    the shard (at most one per bucket). When more than ``max_pending`` images wait, the fullest bucket is
    returned early (bounds memory). The batches depend only on the entries, not on timing."""

    def __init__(self, batch_size: int, max_pending: int):
        self.batch_size, self.max_pending = max(1, batch_size), max(1, max_pending)
        self.pending: dict[tuple, list[_Decoded]] = {}  # in order of each bucket's first image
        self.count = 0

    def add(self, d: _Decoded) -> list[list[_Decoded]]:
        """Add a decoded image; returns the batches now ready (0 or 1)."""
        self.pending.setdefault(d.bucket, []).append(d)
        self.count += 1
        if len(self.pending[d.bucket]) >= self.batch_size:
            return [self._pop(d.bucket)]
        if self.count > self.max_pending:
            return [self._pop(max(self.pending, key=lambda k: len(self.pending[k])))]
        return []

    def _pop(self, key: tuple) -> list[_Decoded]:
        group = self.pending.pop(key)
        self.count -= len(group)
        return group

    def flush(self) -> list[list[_Decoded]]:
        """The partly filled buckets, in order of their first image; empties the bucketer."""
        out = list(self.pending.values())
        self.pending.clear()
        self.count = 0
        return out


class _WriteStage:
    """Encoding and writing, off the teacher thread: :meth:`submit` hands a labelled sample to a pool of
    ``threads`` encoder threads (PNG/JSON, ``_ShardLabeller.encode``) and its future to one writer thread,
    which writes the samples into the tar in submission order. At most ``max_queued`` samples wait (the
    teacher thread blocks beyond, counted in ``wait``). The first error (an encode or write error) stops the
    writing and is raised by the next :meth:`submit` or by :meth:`close`."""

    _END = object()

    def __init__(self, labeller: "_ShardLabeller", writer: S.ShardTarWriter, threads: int, max_queued: int):
        from concurrent.futures import ThreadPoolExecutor

        self.labeller, self.writer = labeller, writer
        self.error: BaseException | None = None
        self.wait = 0.0
        self._aborted = False
        self._queue: Any = queue.Queue(maxsize=max(1, max_queued))
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="label-encode")
        self._thread = threading.Thread(target=self._write_loop, name="label-write", daemon=True)
        self._thread.start()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._END:
                return
            if self.error is not None or self._aborted:
                continue  # drain, so that the teacher thread never blocks on a dead writer
            try:
                g, encoded = item.result()
                with self.labeller.timed("write"):
                    self.writer.write(encoded)
                self.labeller.written(g)
            except BaseException as e:  # noqa: BLE001 - raised in the teacher thread
                self.error = e

    def submit(self, g: _Decoded, preds: dict[str, np.ndarray]) -> None:
        """Queue one labelled sample for encoding and writing. Raises the stage's first error."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self._queue.put(self._pool.submit(self.labeller.encode, g, preds))
        self.wait += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until every queued sample is written. Raises the stage's first error."""
        self._queue.put(self._END)
        self._thread.join()
        self._pool.shutdown(wait=True)
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop without writing what is queued (the shard failed)."""
        self._aborted = True
        self._queue.put(self._END)
        self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)


def label_shard(job: ShardJob, teachers: dict[str, Any], teacher_lock: Any = None) -> dict:
    """Label one shard and write ``{split}-{index:06d}.tar`` then its stats file (the done marker).

    Stages (see the module docstring): each entry's bytes are read (``read_threads`` ahead), decoded by
    ``load_rgb`` (EXIF rotation, CMYK, 16-bit, palette and alpha handled), shrunk to the output size and
    resized to every teacher's input size in ``decode_threads`` threads, ahead of the teacher stage; the
    teacher thread groups the images by input size across the shard (:func:`bucket_input_size`,
    :class:`_Bucketer`) and runs every teacher on each full batch (``batch_size`` images; one partial batch
    per bucket at the end); the samples are encoded in ``encode_threads`` threads and written by one writer
    thread with :class:`~polymae.datasets.shards.ShardTarWriter`, in batch order. The tar depends only on
    the entries and the settings, not on the numbers of threads. With ``teacher_lock`` (a worker that
    labels two shards at once, :class:`LabelWorker`) only the teacher stage is serialised: the next shard's
    reads and decoding run while this one is labelled, and this one's last samples are encoded and written
    while the next one is labelled.

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
        teacher_lock: held while the teachers run (a ``threading.Lock``); ``None`` = no other shard runs.
    Returns:
        the stats dict written to ``job.stats_url``: ``samples_in``, ``written``, ``skipped`` (by reason),
        ``seconds``, ``started``/``finished`` (unix seconds), ``cpu_seconds`` (CPU time of the worker
        process meanwhile; well below ``seconds`` means the worker did not get its CPU),
        ``busy_seconds`` per stage (read, decode, resize, one per teacher slot, encode, write; seconds of
        this worker; all but the teachers' are measured in their own threads and overlap the teachers),
        ``teacher_wait_seconds`` (seconds the teacher thread waited for a decoded image; near 0 when the
        CPU stages keep up), ``write_wait_seconds`` (seconds it waited for room in the encode/write queue),
        ``teacher_batches`` (images per teacher batch, in order), ``teachers``, ``size``/``sha256`` of the
        tar, ``host``/``pid``/``nice`` of the worker, and ``samples`` (a row per entry: key, cls, width,
        height (stored size), skipped, detail).
    Raises:
        ShardFailed: :class:`SourceReadFailed`, :class:`TeacherFailed`, :class:`TooManySkips`; and whatever
        the writer raises (an output write error). The tar is then discarded and no stats file is written.
    """
    if storage.exists_fresh(job.stats_url):  # the listing cache would hide another attempt's marker
        log.warning("shard %d already has its done marker %s; not labelling it again", job.index, job.stats_url)
        return storage.read_json(job.stats_url)
    labeller = _ShardLabeller(job, teachers)
    writer = S.ShardTarWriter(job.url)
    stage = _WriteStage(labeller, writer, job.encode_threads, WRITE_QUEUE_BATCHES * job.batch_size)
    try:
        with _Prefetcher(job, teachers) as prefetch, teacher_lock or contextlib.nullcontext():
            bucketer = _Bucketer(job.batch_size, MAX_PENDING_BATCHES * job.batch_size)
            for d in prefetch.items():  # the teacher stage
                for batch in labeller.accept(d, bucketer):
                    labeller.label_batch(batch, stage)
            for batch in bucketer.flush():
                labeller.label_batch(batch, stage)
        stage.close()
        labeller.busy["read"] = prefetch.read_s  # the feeder has stopped
        labeller.wait, labeller.write_wait = prefetch.wait, stage.wait
        labeller.check_skips()
        with labeller.timed("write"):
            writer.close()
    except BaseException:
        stage.abort()
        writer.abort()
        raise
    stats = labeller.stats(writer)
    storage.write_json_atomic(job.stats_url, stats)
    return stats


class _ShardLabeller:
    """The teacher stage of one shard and its bookkeeping: every teacher labels a batch of decoded images,
    the samples are encoded (in the encode threads, :meth:`encode`), and a row per entry (written, or skipped
    with a reason) and the busy seconds per stage are recorded for the stats file (see :func:`label_shard`)."""

    def __init__(self, job: ShardJob, teachers: dict[str, Any]):
        self.job, self.teachers = job, teachers
        self.t_start, self.cpu_start = time.time(), time.process_time()
        self.busy: dict[str, float] = {k: 0.0 for k in ("read", "decode", "resize", *teachers, "encode", "write")}
        self.wait = 0.0  # seconds the teacher stage waited for decoded images
        self.write_wait = 0.0  # seconds the teacher stage waited for room in the encode/write queue
        self.batches: list[int] = []
        self.rows: dict[str, dict] = {}
        self.metas = {slot: t.metadata() for slot, t in teachers.items()}
        self.briefs = {slot: teacher_brief(m) for slot, m in self.metas.items()}
        self.primary_briefs = {slot: b for slot, b in self.briefs.items() if slot == slot_task(slot)}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Add the seconds the ``with`` block takes to ``busy[stage]`` (from any thread)."""
        t0 = time.perf_counter()
        yield
        with self._lock:
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

    def accept(self, d: _Decoded, bucketer: _Bucketer) -> list[list[_Decoded]]:
        """Record a decoded entry (its CPU seconds; a skip) and put it in its bucket; returns the batches
        now ready for the teachers."""
        with self._lock:
            self.busy["decode"] += d.decode_s
            self.busy["resize"] += d.resize_s
        if d.skip is not None:
            self.skip(d.entry, *d.skip)
            return []
        return bucketer.add(d)

    def label_batch(self, batch: list[_Decoded], stage: _WriteStage) -> None:
        """Run every teacher on a batch of decoded images of one bucket (the same input size per teacher)
        and hand the samples to the encode/write stage."""
        images, keys = [g.rgb for g in batch], [g.entry.key for g in batch]
        preds: dict[str, list] = {}
        for slot, teacher in self.teachers.items():
            with self.timed(slot):
                preds[slot] = _predict(teacher, slot, images, [g.resized[slot] for g in batch], keys,
                                       [g.sizes[slot] for g in batch])
        self.batches.append(len(batch))
        for j, g in enumerate(batch):
            g.resized = None  # the teacher inputs are no longer needed
            stage.submit(g, {slot: p[j] for slot, p in preds.items()})

    def encode(self, g: _Decoded, preds: dict[str, np.ndarray]) -> tuple[_Decoded, dict]:
        """``(g, the WebDataset sample dict)`` of a decoded entry and its maps ``preds`` (``{slot: map}``,
        each ``[h, w]`` at the stored size); runs in an encode thread.

        Raises:
            TeacherFailed: a map cannot be encoded (e.g. NaN depth: the teacher's output is broken).
        """
        with self.timed("encode"):
            try:
                return g, self._sample(g, preds).encode()
            except ValueError as err:
                raise TeacherFailed(f"the teachers' maps of {g.entry.key} cannot be encoded: {err}") from err

    def written(self, g: _Decoded) -> None:
        """Record entry ``g`` as written (called by the writer thread once its sample is in the tar)."""
        e, (h, w) = g.entry, g.rgb.shape[:2]
        self.rows[e.key] = {"key": e.key, "cls": e.cls, "width": w, "height": h, "skipped": None, "detail": None}

    def _sample(self, g: _Decoded, preds: dict[str, np.ndarray]) -> S.LabelledSample:
        """The :class:`~polymae.datasets.shards.LabelledSample` of a decoded entry and its maps."""
        e, metas = g.entry, self.metas
        h, w = g.rgb.shape[:2]
        meta: dict[str, Any] = {
            "schema_version": S.SCHEMA_VERSION, "key": e.key,
            "source": {"uri": e.uri, "bytes": g.source_bytes, "reencoded": g.reencoded,
                       "width": g.source_size[1], "height": g.source_size[0]},
            "width": w, "height": h, "teachers": self.primary_briefs,
            "label_resolution": {slot: list(g.sizes[slot]) for slot in self.teachers if slot in self.primary_briefs},
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
        sample.extra, extra_meta = self._extra_members(g, preds)
        if extra_meta:
            meta["extra_teachers"] = extra_meta
        if e.cls is not None:
            meta["cls"] = int(e.cls)
            if self.job.classes is not None and 0 <= e.cls < len(self.job.classes):
                meta["class_name"] = self.job.classes[e.cls]
        return sample

    def _extra_members(self, g: _Decoded, preds: dict[str, np.ndarray]) -> tuple[dict[str, bytes], dict]:
        """``({member: png bytes}, {member: info})`` of the further (non-primary) teachers of a decoded
        entry; ``info``: brief, ``label_resolution`` (the teacher's input size) and ``depth_range`` (depth)
        or ``num_classes`` + ``ignore_index`` (semseg)."""
        members: dict[str, bytes] = {}
        infos: dict[str, dict] = {}
        for slot in self.teachers:
            if slot in self.primary_briefs:
                continue
            task, m = slot_task(slot), self.metas[slot]
            name = S.member(task, m["name"])
            info = {**self.briefs[slot], "label_resolution": list(g.sizes[slot])}
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
            "teacher_wait_seconds": round(self.wait, 4), "write_wait_seconds": round(self.write_wait, 4),
            "teacher_batches": list(self.batches), "decode_threads": job.decode_threads,
            "encode_threads": job.encode_threads,
            "teachers": {slot: {k: v for k, v in m.items() if k != "class_names"} for slot, m in self.metas.items()},
            "size": writer.bytes_written, "sha256": writer.sha256,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "host": socket.gethostname(), "pid": os.getpid(), "nice": os.getpriority(os.PRIO_PROCESS, 0),
            "samples": samples,
        }


class LabelWorker:
    """Ray actor body: loads the teachers once (``teacher_specs``: ``{slot: load_teacher kwargs}``, see
    ``LabelConfig.teacher_specs``) and labels shards with :func:`label_shard`, up to :attr:`MAX_CONCURRENCY`
    at once (the scheduler keeps two in flight per worker): their teacher stages take turns on one lock, so
    the next shard is read and decoded while the current one is labelled. ``threads``: torch intra-op
    threads. ``nice``: niceness to run at (``None`` keeps the one Ray gave, 15 by default); lowering it may
    need privileges (``CAP_SYS_NICE``), without which the worker keeps its niceness and logs a warning."""

    MAX_CONCURRENCY = 2  # shards labelled at once by one actor (Ray's max_concurrency; see the scheduler)

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
        self._teacher_lock = threading.Lock()

    def metadata(self) -> dict[str, dict]:
        """``{slot: teacher.metadata()}``."""
        return {slot: t.metadata() for slot, t in self.teachers.items()}

    def label(self, job: ShardJob) -> dict:
        """:func:`label_shard`; an exception becomes ``{"index", "error", "traceback", "retryable"}`` so the
        driver knows the shard and whether labelling it again may help (False for :class:`TooManySkips`)."""
        try:
            return label_shard(job, self.teachers, self._teacher_lock)
        except Exception as e:  # noqa: BLE001 - reported to the driver, which retries or fails the run
            return {"index": job.index, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                    "retryable": getattr(e, "retryable", True), "host": socket.gethostname(), "pid": os.getpid()}
