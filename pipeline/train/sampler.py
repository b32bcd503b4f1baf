"""Unmixed task sampling (Uni-Perceiver v2, arXiv 2211.09808, Sec. 4.4): every optimizer step trains one task on
every rank, drawn with probability ``s_k``.

The draw of step ``t`` is a pure function of ``(seed, t, s)``: a generator seeded by the string
``polymae-task/{seed}/{t}`` (the same in every process, without communication) gives ``u`` in [0, 1), and the
task is the first ``k`` whose cumulative probability exceeds ``u``. Nothing but the step has to be checkpointed,
and a resumed run (on any number of ranks) draws the same tasks. Each task keeps its own data stream and
micro-batch size; gradient accumulation stays inside the drawn task.
"""

from __future__ import annotations

import bisect
import random
from typing import Sequence


def sampling_probs(weights: Sequence[float | None], sizes: Sequence[int] | None = None) -> list[float]:
    """The sampling probabilities ``s_k`` of the tasks: explicit weights normalised to sum 1, or, where every
    weight is None, proportional to the datasets' sizes (samples).

    Raises:
        ValueError: an empty task list; a mix of None and numbers; a negative weight or size; all zero; None
            weights without sizes.
    """
    if not weights:
        raise ValueError("no tasks")
    if all(w is None for w in weights):
        if sizes is None or len(sizes) != len(weights):
            raise ValueError("sampling weights proportional to dataset size need every task's size")
        raw = [float(n) for n in sizes]
    elif any(w is None for w in weights):
        raise ValueError(f"give every task a sampling weight or none (proportional to size): {list(weights)}")
    else:
        raw = [float(w) for w in weights]
    if any(w < 0 for w in raw) or sum(raw) <= 0:
        raise ValueError(f"sampling weights must be >= 0 with a positive sum: {raw}")
    total = sum(raw)
    return [w / total for w in raw]


class UnmixedSampler:
    """Draws the task of each optimizer step (module docstring).

    Args:
        tasks: task names, in config order.
        probs: their sampling probabilities ``s_k`` (:func:`sampling_probs`; must sum to 1 within 1e-6).
        seed: the run's seed.
    Raises:
        ValueError: lengths differ, a probability is negative, or they do not sum to 1.
    """

    def __init__(self, tasks: Sequence[str], probs: Sequence[float], seed: int = 0):
        if len(tasks) != len(probs) or not tasks:
            raise ValueError(f"{len(tasks)} tasks and {len(probs)} probabilities")
        if any(p < 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            raise ValueError(f"task probabilities must be >= 0 and sum to 1: {list(probs)}")
        self.tasks, self.probs, self.seed = list(tasks), [float(p) for p in probs], seed
        self._cdf = []
        acc = 0.0
        for p in self.probs:
            acc += p
            self._cdf.append(acc)
        self._cdf[-1] = 1.0

    def index(self, step: int) -> int:
        """The index of the task drawn for optimizer step ``step`` (0-based); tasks with ``s_k = 0`` never."""
        u = random.Random(f"polymae-task/{self.seed}/{step}").random()
        return min(bisect.bisect_right(self._cdf, u), len(self.tasks) - 1)

    def draw(self, step: int) -> str:
        """The name of the task drawn for optimizer step ``step``."""
        return self.tasks[self.index(step)]

    def counts(self, start: int, stop: int) -> dict[str, int]:
        """How often each task was drawn over steps ``[start, stop)`` (for logging; O(stop - start))."""
        out = dict.fromkeys(self.tasks, 0)
        for step in range(start, stop):
            out[self.draw(step)] += 1
        return out


__all__ = ["sampling_probs", "UnmixedSampler"]
