"""What the image-folder streams (``datasets/class_folder.py``, ``datasets/coco_stream.py``) share: the run's
global micro-batch ``g`` holds positions ``[g mb, (g + 1) mb)`` of one deterministic order; rank ``r`` of ``W``
takes ``g = b W + r`` for its ``b``-th micro-batch (as ``datasets/loader.py``), a resumed rank starts at
``b = skip_batches``, and ``DataLoader`` worker ``w`` of ``nw`` takes ``b = skip + w + t nw``. A position whose
image fails to decode is replaced by the next good one of its batch in training, or left out in a single pass."""

from __future__ import annotations

from typing import Any, Iterator

from torch.utils.data import IterableDataset, get_worker_info


def fill_failed(outs: list[Any | None], infinite: bool, g: int, lo: int, hi: int) -> list[Any] | None:
    """The decoded items of global micro-batch ``g`` (positions ``[lo, hi)``), ``None`` where an image failed:
    in training each failure takes a copy of the next good item (cyclically); in a single pass failures are left
    out (``None`` when nothing is left).

    Raises:
        RuntimeError: (training) no image of the batch decodes; its positions are named.
    """
    good = [o for o in outs if o is not None]
    if not good:
        if infinite:
            raise RuntimeError(f"no image of micro-batch {g} (positions {lo}-{hi - 1}) decodes")
        return None
    if not infinite:
        return good
    n = len(outs)
    return [o if o is not None else next(outs[(i + j) % n] for j in range(1, n) if outs[(i + j) % n])
            for i, o in enumerate(outs)]


class PositionStream(IterableDataset):
    """Base of a stream whose :meth:`batch` builds global micro-batch ``g``; subclasses set ``micro_batch``,
    ``rank``, ``world``, ``skip_batches``, ``infinite`` and ``__len__`` (positions in one pass)."""

    micro_batch: int
    rank: int
    world: int
    skip_batches: int
    infinite: bool

    def batch(self, g: int) -> dict | None:  # pragma: no cover - abstract
        """Global micro-batch ``g`` (None: a single pass's batch with nothing left)."""
        raise NotImplementedError

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        """This process's micro-batches (module docstring); a single pass ends after the last position."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        b = self.skip_batches + wid
        while True:
            g = b * self.world + self.rank
            if not self.infinite and g * self.micro_batch >= len(self):
                return
            out = self.batch(g)
            if out is not None:
                yield out
            b += nw


__all__ = ["fill_failed", "PositionStream"]
