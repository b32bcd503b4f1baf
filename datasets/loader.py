"""Training/evaluation streams over polymae shards (WebDataset tars), deterministic and resumable.

Each reader (one per data-loader worker per rank) gets a disjoint part of the data: whole shards when
there are at least as many shards as readers, else every R-th sample of every shard. Each epoch
reshuffles shard order with ``seed + epoch`` and mixes samples through a seeded shuffle buffer of raw
(undecoded) samples; augmentation randomness is a function of ``(seed, key, epoch)``. The stream is
therefore a pure function of ``(urls, seed, rank, world, worker)``, and resuming at a data position
means skipping that many raw samples without decoding them.

A sample that fails to decode is skipped, counted and logged; the stream goes on.
"""

from __future__ import annotations

import logging
import random
import signal
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from polymae.datasets import shards
from polymae.datasets.transforms import MultiModalAugment, collate, sample_rng

log = logging.getLogger(__name__)


def _raw_stream(urls: list[str]) -> Iterator[dict]:
    """Raw samples of the given shards in order; a shard that cannot be read is logged and skipped."""
    for url in urls:
        try:
            yield from shards.iter_raw_samples([url])
        except Exception as e:  # a truncated/corrupt tar: keep what was read, go on
            log.warning("shard %s: read error (%s: %s); going on with the next shard", url, type(e).__name__, e)


class ShardStream(IterableDataset):
    """Micro-batches of augmented samples from shards.

    Args:
        urls: shard URLs (see ``shards.trusted_shard_urls``).
        micro_batch: samples per yielded batch (per rank).
        augment: the shared multi-modal transform.
        rank, world: this process's data-parallel rank and world size.
        seed: base seed; epochs reshuffle with ``seed + epoch``.
        shuffle_buffer: raw samples held for shuffling (0 = no shuffle, e.g. evaluation).
        infinite: loop over epochs forever (training) or stop after one pass (evaluation).
        skip_batches: micro-batches already consumed by this rank (resume); spread over workers the way
            ``DataLoader`` round-robins them.
        num_workers: the DataLoader's worker count (needed to split ``skip_batches``).
    Yields:
        compact ``collate`` dicts (``rgb`` uint8 ``[B,3,S,S]``, ``depth`` uint16 codes ``[B,1,S,S]`` +
        ``depth_range [B]``, ``semseg [B,S/4,S/4]``, ``key``); ``transforms.to_model_inputs`` converts them
        on the training device.
    """

    def __init__(self, urls: list[str], micro_batch: int, augment: MultiModalAugment, rank: int = 0,
                 world: int = 1, seed: int = 0, shuffle_buffer: int = 256, infinite: bool = True,
                 skip_batches: int = 0, num_workers: int = 0, drop_last: bool = True):
        super().__init__()
        if not urls:
            raise ValueError("no shard URLs")
        self.urls = list(urls)
        self.micro_batch = micro_batch
        self.augment = augment
        self.rank, self.world = rank, world
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.infinite = infinite
        self.skip_batches = skip_batches
        self.num_workers = num_workers
        self.drop_last = drop_last
        self.skipped_corrupt = 0

    def _reader(self) -> tuple[int, int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        return self.rank * nw + wid, self.world * nw, wid

    def _epoch_samples(self, epoch: int, reader: int, readers: int) -> Iterator[dict]:
        order = list(self.urls)
        if self.shuffle_buffer:
            random.Random(self.seed + epoch).shuffle(order)
        if len(order) >= readers:
            mine = order[reader::readers]
            stream = _raw_stream(mine)
        else:
            stream = (s for i, s in enumerate(_raw_stream(order)) if i % readers == reader)
        if not self.shuffle_buffer:
            yield from stream
            return
        rng = random.Random((self.seed + epoch) * 1_000_003 + reader)
        buf: list[dict] = []
        for s in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        reader, readers, wid = self._reader()
        nw = max(1, self.num_workers)
        # DataLoader takes batch b from worker b % nw: this worker already gave ceil((skip - wid) / nw).
        my_skip = max(0, -(-(self.skip_batches - wid) // nw)) * self.micro_batch
        epoch = 0
        pending: list[dict] = []
        while True:
            seen = tried = good = 0
            last_error = ""
            for raw in self._epoch_samples(epoch, reader, readers):
                seen += 1
                if my_skip > 0:
                    my_skip -= 1
                    continue
                tried += 1
                try:
                    pending.append(self.augment(raw, sample_rng(self.seed, raw["__key__"], epoch)))
                    good += 1
                except Exception as e:
                    self.skipped_corrupt += 1
                    last_error = f"{raw.get('__key__')}: {type(e).__name__}: {e}"
                    log.warning("skipping corrupt sample %s; %d skipped so far", last_error, self.skipped_corrupt)
                    continue
                if len(pending) == self.micro_batch:
                    yield collate(pending)
                    pending = []
            if seen == 0:
                raise RuntimeError(f"reader {reader}/{readers} got no samples from {len(self.urls)} shards")
            if tried and not good:  # every sample of a whole epoch failed: the data, not a sample, is bad
                raise RuntimeError(f"reader {reader}/{readers}: all {tried} samples of epoch {epoch} failed to decode "
                                   f"(last: {last_error})")
            epoch += 1
            if not self.infinite:
                break
        if pending and not self.drop_last:
            yield collate(pending)


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
