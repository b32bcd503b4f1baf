"""Training/evaluation streams over polymae shards (WebDataset tars): balanced, deterministic, O(1) resumable.

**Order.** There are ``R = world x num_workers`` readers; reader ``r = rank x num_workers + worker``. Epoch ``e``
permutes the shards with a generator seeded by ``(seed, e)`` (:func:`epoch_shards`); the concatenation of their
samples (per-shard counts from the manifest's ``samples`` or the stats files' ``written``) is one sequence of
``N`` samples, and reader ``r`` takes the contiguous range ``[floor(r N / R), floor((r + 1) N / R))``
(:func:`reader_range`). Every sample is visited once per epoch, readers' counts differ by at most one, and a
reader opens only the shards its range overlaps.

**Shuffle.** A reader's range is cut into chunks of ``C`` consecutive samples, each permuted with a generator
seeded by ``(seed, epoch, reader, chunk)`` (:func:`chunk_order`). ``C`` is ``shuffle_buffer`` samples, further
bounded to ``shuffle_buffer_mb`` MiB of raw samples at the shards' mean sample size (at least 1). Only one
chunk of raw (undecoded) samples is held. ``shuffle_buffer=0``: no shuffle (shards and samples in order).

**Batches are positions.** A reader's ``k``-th micro-batch is positions ``[k mb, (k + 1) mb)`` of its shuffled
range; training epochs have ``floor(len / mb)`` batches per reader (the remainder is dropped; a reader with less
than one micro-batch raises ``RuntimeError``) and follow one another. Augmentation randomness is a function of
``(seed, key, epoch)``. A sample that fails to decode (or is missing from a truncated or unreadable shard) keeps
its position: in training it is replaced by a copy of the next good sample of its batch (cyclically) and a batch
without any good sample raises ``RuntimeError`` naming its keys; in a single pass (``infinite=False``,
evaluation) it is left out of its batch (a pass without any good sample raises). Either way it is counted in
``skipped_corrupt`` and logged. The stream is therefore a pure function of ``(shards and counts, seed, rank,
world, worker, num_workers)``.

**Resume.** ``skip_batches`` (this rank's micro-batches already consumed) becomes a per-worker count:
``DataLoader`` takes batch ``b`` from worker ``b % num_workers`` and a resumed one starts again at worker 0, so
worker ``w`` takes the role (the reader) of worker ``(w + skip_batches) % num_workers`` of the uninterrupted run
and :func:`worker_batches` of them are behind it. Division gives ``(epoch, batch in epoch)``, and the reader
goes straight to that batch's chunk: it opens only the shards holding the chunk's samples still to come, at their
sample offsets (:class:`polymae.datasets.shards.SampleCursor`: tar headers only, member data skipped with
``seek``), and reads only those samples. The cost is at most one chunk, whatever the progress.
"""

from __future__ import annotations

import collections
import logging
import random
import signal
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymae.datasets import shards
from polymae.datasets.transforms import MultiModalAugment, collate, sample_rng

log = logging.getLogger(__name__)

Span = tuple[str, int, int]  # (shard url, first sample, end sample) inside that shard
#: shard URLs a stream remembers in ``ShardStream.opened`` (the most recent ones)
OPENED_KEPT = 10_000


def epoch_shards(shard_counts: Sequence[tuple[str, int]], seed: int, epoch: int,
                 shuffle: bool = True) -> list[tuple[str, int]]:
    """The shards ``(url, samples)`` in epoch ``epoch``'s order: a permutation seeded by ``(seed, epoch)``, or
    the given order when ``shuffle`` is false."""
    order = list(shard_counts)
    if shuffle:
        random.Random(f"polymae-shards/{seed}/{epoch}").shuffle(order)
    return order


def reader_range(total: int, reader: int, readers: int) -> tuple[int, int]:
    """``[lo, hi)``: reader ``reader``'s contiguous part of an epoch's ``total`` samples out of ``readers``.

    Raises:
        ValueError: ``readers < 1`` or ``reader`` outside ``[0, readers)``.
    """
    if readers < 1 or not 0 <= reader < readers:
        raise ValueError(f"reader {reader} of {readers}")
    return reader * total // readers, (reader + 1) * total // readers


def range_spans(order: Sequence[tuple[str, int]], lo: int, hi: int) -> list[Span]:
    """The pieces ``(url, first, end)`` (sample offsets inside each shard) that global positions ``[lo, hi)`` of
    the concatenated shards ``order`` cover, in order; shards outside the range are not listed."""
    out, start = [], 0
    for url, n in order:
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append((url, a - start, b - start))
        start += n
        if start >= hi:
            break
    return out


def chunk_order(n: int, seed: int, epoch: int, reader: int, chunk: int) -> list[int]:
    """A permutation of ``range(n)``: the order of chunk ``chunk`` of reader ``reader`` in epoch ``epoch``,
    seeded by ``(seed, epoch, reader, chunk)`` (string-seeded, so the same in every process)."""
    idx = list(range(n))
    random.Random(f"polymae-chunk/{seed}/{epoch}/{reader}/{chunk}").shuffle(idx)
    return idx


def worker_batches(skip_batches: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first ``skip_batches`` micro-batches came from ``worker`` (``DataLoader`` takes batch
    ``b`` from worker ``b % num_workers``; ``num_workers`` 0 counts as one in-process reader)."""
    nw = max(1, num_workers)
    return max(0, -(-(skip_batches - worker) // nw))


def chunk_samples(shuffle_buffer: int, shuffle_buffer_mb: float | None, sample_bytes: float | None) -> int:
    """The shuffle chunk ``C`` in samples: ``shuffle_buffer``, at most ``shuffle_buffer_mb`` MiB of samples of
    ``sample_bytes`` bytes on average (no byte bound when either is None or 0), at least 1; 0 = no shuffle."""
    if shuffle_buffer <= 0:
        return 0
    c = shuffle_buffer
    if shuffle_buffer_mb and sample_bytes:
        c = min(c, int(shuffle_buffer_mb * 2**20 // sample_bytes))
    return max(1, c)


class _RangeReader:
    """Reads a reader's positions in order from its spans, starting at local position ``start``. A shard is
    opened only when a sample inside it is wanted, and skipped to that sample through its headers."""

    def __init__(self, spans: list[Span], start: int, stream: "ShardStream"):
        self.spans, self.stream = spans, stream
        self.span, self.offset = 0, start  # index into spans; position inside the current span
        while self.span < len(spans) and self.offset >= spans[self.span][2] - spans[self.span][1]:
            self.offset -= spans[self.span][2] - spans[self.span][1]
            self.span += 1
        self.cursor: shards.SampleCursor | None = None
        self.at = 0  # the open cursor's next sample index inside its shard
        self.ended = False  # the current shard ended early or could not be opened

    def _load(self, url: str, index: int) -> dict:
        """Sample ``index`` of shard ``url`` (the current span's), or a placeholder that decodes as corrupt."""
        if self.cursor is None and not self.ended:
            self.stream.opened.append(url)
            try:
                self.cursor, self.at = shards.SampleCursor(url), 0
            except Exception as e:  # a missing/unreadable shard: its positions count as corrupt samples
                log.warning("shard %s: cannot read (%s: %s)", url, type(e).__name__, e)
                self.ended = True
        if not self.ended and self.at < index:
            self.ended = self.cursor.skip(index - self.at) < index - self.at
            self.at = index
        raw = None if self.ended else self.cursor.next_sample(load=True)
        if raw is None:
            if not self.ended:
                log.warning("shard %s ended before sample %d", url, index)
            self.ended = True
            return {"__key__": f"{url}#{index}"}  # keeps its position, decodes as corrupt
        self.at += 1
        self.stream.payload_bytes += sum(len(v) for v in raw.values() if isinstance(v, bytes))
        return raw

    def read(self, n: int, wanted: set[int]) -> list[dict | None]:
        """The next ``n`` positions: raw samples for the indices in ``wanted``, None for the others (their data
        is never read; a shard none of whose wanted samples lie in it is not opened)."""
        out: list[dict | None] = []
        for i in range(n):
            url, first, stop = self.spans[self.span]
            out.append(self._load(url, first + self.offset) if i in wanted else None)
            self.offset += 1
            if self.offset == stop - first:
                self.close()
                self.span, self.offset, self.ended = self.span + 1, 0, False
        return out

    def close(self) -> None:
        """Close the open shard, if any."""
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None


class ShardStream(IterableDataset):
    """Micro-batches of augmented samples from shards, in the order the module docstring defines.

    Args:
        urls: shard URLs (``shards.trusted_shard_urls``; counts are then read from the manifest/stats beside
            them, or counted from tar headers), or ``(url, samples)`` pairs (``shards.trusted_shard_counts``).
        micro_batch: samples per yielded batch (per rank).
        augment: the shared multi-modal transform.
        rank, world: this process's data-parallel rank and world size.
        seed: base seed of the shard order, the chunk permutations and the augmentation.
        shuffle_buffer: shuffle chunk in samples (0 = no shuffle, e.g. evaluation).
        infinite: epochs one after another (training; the remainder of a reader's range is dropped) or one pass
            (evaluation; the remainder is a last, shorter batch unless ``drop_last``).
        skip_batches: micro-batches already consumed by this rank (resume).
        num_workers: the DataLoader's worker count (a worker reads it from ``get_worker_info``; kept for callers).
        drop_last: in a single pass, drop the last incomplete batch.
        shuffle_buffer_mb: bound on the shuffle chunk in MiB of raw samples (None or 0 = no bound).
        sample_bytes: mean bytes per sample for that bound (default: from the manifest sizes and counts).
    Yields:
        compact ``collate`` dicts (``rgb`` uint8 ``[B,3,S,S]``, ``depth`` uint16 codes ``[B,1,S,S]`` +
        ``depth_range [B]``, ``semseg [B,S/4,S/4]``, ``key``); ``transforms.to_model_inputs`` converts them
        on the training device.
    Raises:
        ValueError: no shard URLs, no samples in them, or ``micro_batch < 1`` (constructor).
        RuntimeError: (iterating) a training reader whose range holds less than one micro-batch, or a
            micro-batch without any decodable sample (its keys are named).
    Attributes (of the iterating process): ``skipped_corrupt`` (samples that failed to decode), ``opened``
    (the last :data:`OPENED_KEPT` shard URLs opened, in order), ``payload_bytes`` (member data bytes read).
    """

    def __init__(self, urls: Sequence[str] | Sequence[tuple[str, int]], micro_batch: int, augment: MultiModalAugment,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 256, infinite: bool = True,
                 skip_batches: int = 0, num_workers: int = 0, drop_last: bool = True,
                 shuffle_buffer_mb: float | None = None, sample_bytes: float | None = None):
        super().__init__()
        if not urls:
            raise ValueError("no shard URLs")
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        plain = all(isinstance(u, str) for u in urls)
        self.shards = shards.shard_sample_counts(list(urls)) if plain else [(u, int(n)) for u, n in urls]
        self.urls = [u for u, _ in self.shards]
        self.total = sum(n for _, n in self.shards)
        if self.total <= 0:
            raise ValueError(f"no samples in {len(self.shards)} shards")
        self.micro_batch, self.augment = micro_batch, augment
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle_buffer, self.infinite, self.drop_last = shuffle_buffer, infinite, drop_last
        self.skip_batches, self.num_workers = skip_batches, num_workers
        if shuffle_buffer > 0 and shuffle_buffer_mb and sample_bytes is None:
            sample_bytes = shards.mean_sample_bytes(self.shards)
        self.chunk = chunk_samples(shuffle_buffer, shuffle_buffer_mb, sample_bytes)
        self.skipped_corrupt = self._yielded = 0
        self.opened: collections.deque[str] = collections.deque(maxlen=OPENED_KEPT)
        self.payload_bytes = 0

    def _reader(self) -> tuple[int, int, int, int]:
        """``(reader, readers, role, workers)`` of the calling process (workers: 1 in-process). A resumed
        ``DataLoader`` again takes its first batch from worker 0, so worker ``w`` plays the role of worker
        ``(w + skip_batches) % workers`` of the uninterrupted run, whose reader it then is."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        role = (wid + self.skip_batches) % nw
        return self.rank * nw + role, self.world * nw, role, nw

    def plan(self, epoch: int, reader: int, readers: int) -> list[Span]:
        """The shard pieces ``(url, first sample, end sample)`` reader ``reader`` of ``readers`` reads in epoch
        ``epoch``, in order (only the shards its range overlaps)."""
        order = epoch_shards(self.shards, self.seed, epoch, self.shuffle_buffer > 0)
        return range_spans(order, *reader_range(self.total, reader, readers))

    def batches_per_epoch(self, reader: int, readers: int) -> int:
        """Micro-batches reader ``reader`` of ``readers`` yields per epoch (the last partial one counts only in a
        single pass without ``drop_last``)."""
        lo, hi = reader_range(self.total, reader, readers)
        full, rest = divmod(hi - lo, self.micro_batch)
        return full + int(bool(rest) and not self.infinite and not self.drop_last)

    def _batch(self, raws: list[dict], epoch: int) -> dict | None:
        """Augment and collate one micro-batch; corrupt samples are replaced (training) or left out (one pass,
        where a batch without a good sample is None).

        Raises:
            RuntimeError: (training) no sample of the batch decodes; its keys are named.
        """
        outs: list[dict | None] = []
        for raw in raws:
            try:
                outs.append(self.augment(raw, sample_rng(self.seed, raw["__key__"], epoch)))
            except Exception as e:
                outs.append(None)
                self.skipped_corrupt += 1
                log.warning("corrupt sample %s (%s: %s); %d so far", raw.get("__key__"), type(e).__name__, e,
                            self.skipped_corrupt)
        good = [i for i, o in enumerate(outs) if o is not None]
        if not self.infinite:
            return collate([outs[i] for i in good]) if good else None
        if not good:
            raise RuntimeError(f"no sample of a micro-batch decodes: {[r.get('__key__') for r in raws]}")
        n = len(outs)
        return collate([o if o is not None else outs[min(good, key=lambda g: (g - i) % n)]
                        for i, o in enumerate(outs)])

    def _epoch(self, epoch: int, reader: int, readers: int, first: int) -> Iterator[dict]:
        """Batches ``first, first + 1, ...`` of reader ``reader``'s epoch ``epoch``."""
        spans = self.plan(epoch, reader, readers)
        length = sum(b - a for _, a, b in spans)
        end = min(length, self.batches_per_epoch(reader, readers) * self.micro_batch)
        C = self.chunk or self.micro_batch
        pos = first * self.micro_batch
        j = pos // C
        rr = _RangeReader(spans, j * C, self)
        pending: list[dict] = []
        try:
            while pos < end:
                base, n = j * C, min(C, length - j * C)
                order = chunk_order(n, self.seed, epoch, reader, j) if self.chunk else list(range(n))
                stop = min(end, base + n)
                raws = rr.read(n, {order[p - base] for p in range(pos, stop)})
                for p in range(pos, stop):
                    pending.append(raws[order[p - base]])
                    if len(pending) == self.micro_batch:
                        yield from self._some(self._batch(pending, epoch))
                        pending = []
                pos, j = stop, j + 1
            if pending:
                yield from self._some(self._batch(pending, epoch))
        finally:
            rr.close()

    def _some(self, batch: dict | None) -> Iterator[dict]:
        """``batch`` unless it is None (a single pass's batch whose every sample was corrupt); counts yields."""
        if batch is not None:
            self._yielded += 1
            yield batch

    def __iter__(self) -> Iterator[dict]:
        """This process's micro-batches from ``skip_batches`` on (see the class and module docstrings)."""
        reader, readers, role, nw = self._reader()
        per_epoch = self.batches_per_epoch(reader, readers)
        skip = worker_batches(self.skip_batches, role, nw)
        if self.infinite and per_epoch == 0:
            lo, hi = reader_range(self.total, reader, readers)
            raise RuntimeError(f"reader {reader}/{readers} gets {hi - lo} of {self.total} samples per epoch, less "
                               f"than one micro-batch of {self.micro_batch}: use fewer readers (world x num_workers)")
        if not self.infinite:
            self._yielded = 0
            if skip < per_epoch:
                yield from self._epoch(0, reader, readers, skip)
                if not self._yielded:
                    raise RuntimeError(f"reader {reader}/{readers}: no sample of its {per_epoch} batches decodes")
            return
        epoch, first = divmod(skip, per_epoch)
        while True:
            yield from self._epoch(epoch, reader, readers, first)
            epoch, first = epoch + 1, 0


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of the training loaders: a data-loader worker ignores SIGTERM and SIGUSR1.

    Slurm's ``--signal`` (and ``scancel --signal``) reaches every process of the job step, the loader
    workers too; a worker killed by it makes the trainer fail with "DataLoader worker ... is killed by
    signal" before it can checkpoint. The trainer's own handler decides when to stop; the workers end
    with it. Kept for the worker process's life (``polymae.patches.signal_handlers``)."""
    from polymae.patches import signal_handlers

    signal_handlers(signal.SIG_IGN, PREEMPTION_SIGNALS)


_EXIT_HOOK = None


def make_loader(stream: ShardStream, num_workers: int) -> DataLoader:
    """A ``DataLoader`` over already-batched ``ShardStream`` output (``batch_size=None``); its workers ignore
    the preemption signals (:func:`ignore_preemption_signals`), so the process kills leftover workers at exit
    (``polymae.patches.kill_daemon_children_at_exit``, once per process) instead of waiting on them."""
    global _EXIT_HOOK
    if num_workers and _EXIT_HOOK is None:
        from polymae.patches import kill_daemon_children_at_exit

        _EXIT_HOOK = kill_daemon_children_at_exit()
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, prefetch_factor=4 if num_workers else None,
                      worker_init_fn=ignore_preemption_signals if num_workers else None)
