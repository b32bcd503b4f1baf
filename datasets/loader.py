"""Training/evaluation streams over polymae shards (WebDataset tars): balanced, deterministic, O(1) resumable.

**Order.** The data order is defined by ``V`` *canonical readers* (``readers``; by default ``world x
num_workers`` at the run's first start, then kept by the checkpoint so the order survives a change of world size
or worker count: the idea of MosaicML Streaming's "canonical nodes"). Epoch ``e`` of the shards is a permutation
seeded by ``(seed, e)`` (:func:`epoch_shards`); the concatenation of their samples (per-shard counts from the
manifest's ``samples`` or the stats files' ``written``) is one sequence of ``N`` samples, and canonical reader
``c`` takes the contiguous range ``[floor(c N / V), floor((c + 1) N / V))`` (:func:`reader_range`). Every sample
is visited once per epoch, readers' counts differ by at most one, and a reader opens only the shards its range
overlaps.

**Shuffle.** A reader's range is cut into chunks of ``C`` consecutive samples, each permuted with a generator
seeded by ``(seed, epoch, reader, chunk)`` (:func:`chunk_order`). ``C`` is ``shuffle_buffer`` samples, further
bounded to ``shuffle_buffer_mb`` MiB of raw samples at the shards' mean sample size (at least 1). Only one
chunk of raw (undecoded) samples is held per canonical reader a process reads. ``shuffle_buffer=0``: no shuffle.

**Batches are positions.** Canonical reader ``c``'s ``k``-th micro-batch is positions ``[k mb, (k + 1) mb)`` of
its shuffled range; training epochs have ``floor(len / mb)`` batches per reader (the remainder is dropped; a
reader with less than one micro-batch raises ``RuntimeError``) and follow one another. The run's **global
micro-batch** ``g`` is batch ``g // V`` of canonical reader ``g % V``; rank ``r`` of ``W`` takes its ``b``-th
micro-batch as ``g = b W + r``. A training step takes ``M = global_batch / micro_batch`` consecutive global
micro-batches whatever ``W`` is, so the sequence of global micro-batches (and of optimizer steps' data) does not
depend on the world size (:func:`global_batch_of`). With ``W x num_workers = V`` (the run as started) each
loader worker reads exactly one canonical reader; otherwise a worker reads its share of several, interleaved.
Augmentation randomness is a function of ``(seed, key, epoch)``. A sample that fails to decode (or is missing
from a truncated or unreadable shard) keeps its position: in training it is replaced by a copy of the next good
sample of its batch (cyclically) and a batch without any good sample raises ``RuntimeError`` naming its keys; in
a single pass (``infinite=False``, evaluation) it is left out of its batch (a pass without any good sample
raises). Either way it is counted in ``skipped_corrupt`` and logged. The stream is therefore a pure function of
``(shards and counts, seed, V, micro_batch)`` and the rank's position ``(rank, world, worker, num_workers)``.

**Resume.** ``skip_batches`` is the rank's micro-batches already consumed (``step x accumulation``). A resumed
``DataLoader`` takes its first batch from worker 0, so worker ``w`` yields the rank's batches ``skip + w + t nw``
(``t = 0, 1, ...``); each maps to a canonical reader and a batch index by arithmetic, and the reader goes
straight to that batch's chunk: it opens only the shards holding the chunk's samples still to come, at their
sample offsets (:class:`polymae.datasets.shards.SampleCursor`: tar headers only, member data skipped with
``seek``), and reads only the samples it yields. The cost is at most one chunk per canonical reader, whatever
the progress, the world size or the worker count.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
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


def global_batch_of(batch: int, rank: int, world: int) -> int:
    """The global micro-batch index of rank ``rank``'s ``batch``-th micro-batch (of ``world`` ranks): ``b W + r``.
    A step of ``M = global_batch / micro_batch`` micro-batches covers ``[step M, (step + 1) M)`` for any ``W``."""
    return batch * world + rank


def canonical_batch(g: int, readers: int) -> tuple[int, int]:
    """``(canonical reader, batch index in that reader's stream)`` of global micro-batch ``g``: ``(g % V, g // V)``."""
    return g % readers, g // readers


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
        readers: canonical readers ``V`` that define the order (default ``world x max(1, num_workers)``); a
            resumed run passes the value it started with (kept in its checkpoint), whatever its world size.
    Yields:
        compact ``collate`` dicts (``rgb`` uint8 ``[B,3,S,S]``, ``depth`` uint16 codes ``[B,1,S,S]`` +
        ``depth_range [B]``, ``semseg [B,S/4,S/4]``, ``key``); ``transforms.to_model_inputs`` converts them
        on the training device.
    Raises:
        ValueError: no shard URLs, no samples in them, ``micro_batch < 1`` or ``readers < 1`` (constructor).
        RuntimeError: (iterating) a training reader whose range holds less than one micro-batch, or a
            micro-batch without any decodable sample (its keys are named).
    Attributes (of the iterating process): ``skipped_corrupt`` (samples that failed to decode), ``opened``
    (the last :data:`OPENED_KEPT` shard URLs opened, in order), ``payload_bytes`` (member data bytes read).
    """

    def __init__(self, urls: Sequence[str] | Sequence[tuple[str, int]], micro_batch: int, augment: MultiModalAugment,
                 rank: int = 0, world: int = 1, seed: int = 0, shuffle_buffer: int = 256, infinite: bool = True,
                 skip_batches: int = 0, num_workers: int = 0, drop_last: bool = True,
                 shuffle_buffer_mb: float | None = None, sample_bytes: float | None = None,
                 readers: int | None = None):
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
        self.readers = world * max(1, num_workers) if readers is None else int(readers)
        if self.readers < 1:
            raise ValueError(f"readers must be >= 1, got {readers}")
        if shuffle_buffer > 0 and shuffle_buffer_mb and sample_bytes is None:
            sample_bytes = shards.mean_sample_bytes(self.shards)
        self.chunk = chunk_samples(shuffle_buffer, shuffle_buffer_mb, sample_bytes)
        self.skipped_corrupt = self._yielded = self._requested = 0
        self.opened: collections.deque[str] = collections.deque(maxlen=OPENED_KEPT)
        self.payload_bytes = 0

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

    def _epoch(self, epoch: int, reader: int, readers: int, batches: range) -> Iterator[dict]:
        """Batches ``batches`` (indices in epoch ``epoch`` of reader ``reader`` of ``readers``, increasing), reading
        each chunk once and only the samples of those batches."""
        spans = self.plan(epoch, reader, readers)
        length = sum(b - a for _, a, b in spans)
        end = min(length, self.batches_per_epoch(reader, readers) * self.micro_batch)
        C, mb = self.chunk or self.micro_batch, self.micro_batch
        if not batches:
            return
        j = batches[0] * mb // C  # the chunk of the first wanted position
        rr = _RangeReader(spans, j * C, self)
        held: dict[int, dict] = {}  # position -> raw sample, the current chunk's wanted positions still to yield
        chunk_end = j * C
        try:
            for k in batches:
                pending = []
                for p in range(k * mb, min((k + 1) * mb, end)):
                    while p >= chunk_end:  # load the chunk holding p; chunks without a wanted position: skipped
                        base, n = j * C, min(C, length - j * C)
                        want = [q for q in range(max(base, p), min(base + n, end)) if q // mb in batches]
                        order = chunk_order(n, self.seed, epoch, reader, j) if self.chunk and want else range(n)
                        raws = rr.read(n, {order[q - base] for q in want})
                        held = {q: raws[order[q - base]] for q in want}
                        j, chunk_end = j + 1, base + n
                    pending.append(held.pop(p))
                self._requested += 1
                yield from self._some(self._batch(pending, epoch))
        finally:
            rr.close()

    def _reader_stream(self, reader: int, first: int, every: int) -> Iterator[dict]:
        """Canonical reader ``reader``'s batches ``first, first + every, ...`` (indices over its epochs one after
        another; only epoch 0 in a single pass).

        Raises:
            RuntimeError: a training reader with less than one micro-batch per epoch.
        """
        per_epoch = self.batches_per_epoch(reader, self.readers)
        if self.infinite and per_epoch == 0:
            lo, hi = reader_range(self.total, reader, self.readers)
            raise RuntimeError(f"reader {reader}/{self.readers} gets {hi - lo} of {self.total} samples per epoch, "
                               f"less than one micro-batch of {self.micro_batch}: use fewer readers (data.readers, "
                               f"or world x num_workers)")
        k = first
        while per_epoch:
            epoch, j = divmod(k, per_epoch)
            if epoch > 0 and not self.infinite:
                return
            wanted = range(j, per_epoch, every)
            yield from self._epoch(epoch, reader, self.readers, wanted)
            k = epoch * per_epoch + j + len(wanted) * every

    def _some(self, batch: dict | None) -> Iterator[dict]:
        """``batch`` unless it is None (a single pass's batch whose every sample was corrupt); counts yields."""
        if batch is not None:
            self._yielded += 1
            yield batch

    def __iter__(self) -> Iterator[dict]:
        """This process's micro-batches from ``skip_batches`` on (see the class and module docstrings): worker
        ``w`` of ``nw`` yields the rank's batches ``b = skip + w + t nw``, i.e. global micro-batches
        ``g = g0 + t P`` (``P = nw W``), which cycle through ``T = V / gcd(V, P)`` canonical readers, each read
        every ``P / gcd(V, P)``-th batch."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        V, P = self.readers, nw * self.world
        g0 = global_batch_of(self.skip_batches + wid, self.rank, self.world)
        T, every = V // math.gcd(V, P), P // math.gcd(V, P)
        streams = [self._reader_stream(*canonical_batch(g0 + t * P, V), every) for t in range(T)]
        self._yielded = self._requested = 0
        if self.infinite:
            for t in itertools.count():
                yield next(streams[t % T])
        for stream in streams:  # a single pass: readers one after another (order is irrelevant to evaluation)
            yield from stream
        if not self._yielded:
            raise RuntimeError(f"rank {self.rank}/{self.world}: no sample of its {self._requested} batches decodes")


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
