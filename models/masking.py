"""Token masking: MultiMAE's multi-modal Dirichlet sampling and MAE's random masking.

Mask convention everywhere in ``polymae.models``: a bool tensor ``[B, N_m]`` per modality, **True =
masked (hidden from the encoder, to be reconstructed), False = visible** (encoded).

* :func:`sample_dirichlet_masks` -- MultiMAE (arXiv 2204.01678) Sec. 3.2 "Multi-modal masking": a fixed
  number of visible tokens (98 by default) is split across modalities with proportions
  ``lambda ~ Dir(alpha)`` drawn per sample; optionally a random non-empty subset of modalities is chosen
  first ("sample_tasks_uniformly" in the reference code) and the others get zero visible tokens.
* :func:`random_masking` -- MAE (arXiv 2111.06377) Sec. 3 "Masking": uniform random subset without
  replacement, mask ratio 0.75.

Randomness comes from an optional ``torch.Generator`` (or the global torch RNG when None), so
``torch.manual_seed`` / a seeded generator make every mask reproducible.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["allocate_visible_counts", "sample_dirichlet_masks", "random_masking", "visible_indices",
           "check_masks"]


def allocate_visible_counts(shares: Sequence[float], capacities: Sequence[int], total: int) -> list[int]:
    """Integer split of ``total`` visible tokens over modalities, proportional to ``shares``, capped.

    Water-filling: modalities whose proportional target reaches their capacity (token count) are
    saturated and the remainder is re-split over the others in proportion to their shares; the final
    real-valued targets are rounded by the largest-remainder method, so the counts sum to ``total``
    exactly and never exceed a capacity. If every modality with a positive share is saturated and tokens
    are still left (e.g. a uniformly drawn subset too small for ``total``), the rest is spread over the
    remaining modalities in proportion to their spare capacity.

    Args:
        shares: non-negative weights ``lambda_m`` (need not sum to 1), one per modality.
        capacities: token count ``N_m`` per modality.
        total: number of visible tokens to place (``0 <= total <= sum(capacities)``).

    Returns:
        visible token count per modality (list of ints summing to ``total``).

    Raises:
        ValueError: on length mismatch, negative shares/capacities, or ``total`` outside
            ``[0, sum(capacities)]``.
    """
    if len(shares) != len(capacities):
        raise ValueError(f"{len(shares)} shares for {len(capacities)} modalities")
    if any(s < 0 for s in shares) or any(c < 0 for c in capacities):
        raise ValueError("shares and capacities must be non-negative")
    if total < 0 or total > sum(capacities):
        raise ValueError(f"cannot place {total} visible tokens in {sum(capacities)} tokens")
    m = len(capacities)
    counts = [0] * m
    weights = [float(s) for s in shares]
    active = [i for i in range(m) if weights[i] > 0 and capacities[i] > 0]
    remaining = total
    while remaining > 0:
        if not active:  # everything with a positive share is full: use spare capacity as weights
            active = [i for i in range(m) if capacities[i] > counts[i]]
            weights = [float(capacities[i] - counts[i]) for i in range(m)]
        wsum = sum(weights[i] for i in active)
        target = {i: weights[i] / wsum * remaining for i in active}
        full = [i for i in active if target[i] >= capacities[i] - counts[i]]
        if full:
            for i in full:
                remaining -= capacities[i] - counts[i]
                counts[i] = capacities[i]
            active = [i for i in active if i not in full]
            continue
        floors = {i: int(math.floor(target[i])) for i in active}
        left = remaining - sum(floors.values())
        by_remainder = sorted(active, key=lambda i: target[i] - floors[i], reverse=True)
        for i in by_remainder[:left]:
            floors[i] += 1
        for i in active:
            counts[i] += floors[i]
        remaining = 0
    return counts


def _seed_from(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from ``generator`` (or the global torch RNG) to drive numpy's Dirichlet."""
    dev = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=dev).item())


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _select_per_row(counts: torch.Tensor, n: int, generator: torch.Generator | None,
                    device: torch.device) -> torch.Tensor:
    """Mask ``[B, n]`` (True = masked) with ``counts[b]`` uniformly chosen visible positions in row b."""
    b = counts.shape[0]
    order = _rand((b, n), generator, device).argsort(dim=1)  # a uniform random permutation per row
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=device).expand(b, n))
    return rank >= counts.to(device)[:, None]


def sample_dirichlet_masks(num_tokens: Mapping[str, int], batch_size: int, num_visible: int,
                           alphas: float | Mapping[str, float] = 1.0, sample_tasks_uniform: bool = False,
                           generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """MultiMAE multi-modal masking (arXiv 2204.01678, Sec. 3.2).

    Per sample: ``lambda ~ Dir(alpha_1..alpha_M)`` over the modalities, visible counts
    ``round(lambda_m * num_visible)`` made exact and capped by :func:`allocate_visible_counts`, then that
    many positions of each modality are drawn uniformly without replacement. With
    ``sample_tasks_uniform`` a non-empty subset of modalities is first drawn uniformly among the
    ``2^M - 1`` subsets and the Dirichlet is taken over the subset only (the others get zero visible
    tokens unless the subset cannot hold ``num_visible`` tokens, see :func:`allocate_visible_counts`).

    Args:
        num_tokens: ordered ``{modality: N_m}`` token counts.
        batch_size: ``B``.
        num_visible: visible tokens per sample (same for every sample), ``0 <= num_visible <= sum N_m``.
        alphas: Dirichlet concentration, one float for all modalities or ``{modality: alpha}`` (missing
            modalities default to 1.0); every alpha must be > 0.
        sample_tasks_uniform: draw a random non-empty modality subset per sample first.
        generator: optional ``torch.Generator`` for reproducibility (CPU or device generator).
        device: device of the returned masks (default: CPU).

    Returns:
        ``{modality: bool [B, N_m]}``, True = masked; each row has exactly ``num_visible`` False entries
        summed over modalities.

    Raises:
        ValueError: if ``num_visible`` is out of range, ``num_tokens`` is empty, an alpha is not > 0 or
            ``alphas`` names an unknown modality.
    """
    names = list(num_tokens)
    if not names:
        raise ValueError("no modalities to mask")
    caps = [int(num_tokens[k]) for k in names]
    if not 0 <= num_visible <= sum(caps):
        raise ValueError(f"num_visible={num_visible} must be in [0, {sum(caps)}] (total tokens of {names})")
    if isinstance(alphas, Mapping):
        unknown = set(alphas) - set(names)
        if unknown:
            raise ValueError(f"alphas given for modalities that are not encoded: {sorted(unknown)}")
        alpha = np.array([float(alphas.get(k, 1.0)) for k in names], dtype=np.float64)
    else:
        alpha = np.full(len(names), float(alphas), dtype=np.float64)
    if not np.all(alpha > 0):
        raise ValueError(f"Dirichlet alphas must be > 0, got {alpha.tolist()}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    m = len(names)
    rng = np.random.default_rng(_seed_from(generator))
    shares = np.zeros((batch_size, m), dtype=np.float64)
    if sample_tasks_uniform and m > 1:
        # subset id s in [1, 2^M - 1]; bit i set = modality i selected
        subset = rng.integers(1, 2**m, size=batch_size)
        for s in np.unique(subset):
            rows = np.nonzero(subset == s)[0]
            cols = [i for i in range(m) if (int(s) >> i) & 1]
            shares[np.ix_(rows, cols)] = rng.dirichlet(alpha[cols], size=len(rows))
    else:
        shares[:] = rng.dirichlet(alpha, size=batch_size)
    counts = torch.tensor([allocate_visible_counts(row.tolist(), caps, num_visible) for row in shares],
                          dtype=torch.long).reshape(batch_size, m)
    return {k: _select_per_row(counts[:, i], caps[i], generator, device) for i, k in enumerate(names)}


def random_masking(batch_size: int, num_tokens: int, mask_ratio: float = 0.75,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """MAE random masking (arXiv 2111.06377, Sec. 3): keep ``round(N * (1 - mask_ratio))`` tokens per sample,
    chosen uniformly without replacement (MAE's ``int()`` and this ``round()`` agree on every
    ``N`` divisible by 4, e.g. 196 -> 49).

    Args:
        batch_size: ``B``.
        num_tokens: ``N``.
        mask_ratio: fraction of masked tokens, in ``[0, 1)``.
        generator: optional ``torch.Generator``.
        device: device of the returned mask (default CPU).

    Returns:
        bool ``[B, N]``, True = masked.

    Raises:
        ValueError: if ``mask_ratio`` is not in ``[0, 1)``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    keep = int(round(num_tokens * (1.0 - mask_ratio)))
    counts = torch.full((batch_size,), keep, dtype=torch.long)
    return _select_per_row(counts, num_tokens, generator, device)


def check_masks(masks: Mapping[str, torch.Tensor], num_tokens: Mapping[str, int], batch_size: int) -> int:
    """Validate caller-supplied masks and return the common visible-token count per sample.

    Args:
        masks: ``{modality: bool [B, N_m]}`` (True = masked); must cover every modality of ``num_tokens``.
        num_tokens: ``{modality: N_m}`` of the encoded modalities.
        batch_size: ``B``.

    Returns:
        number of visible tokens per sample (identical for all samples).

    Raises:
        ValueError: missing modality, wrong shape or dtype, or samples with different visible counts
            (the encoder batches a fixed number of tokens per sample).
    """
    total = None
    for k, n in num_tokens.items():
        if k not in masks:
            raise ValueError(f"masks must cover every encoded modality; missing {k!r}")
        mk = masks[k]
        if mk.dtype != torch.bool:
            raise ValueError(f"mask {k!r} must be a bool tensor (True = masked), got {mk.dtype}")
        if tuple(mk.shape) != (batch_size, n):
            raise ValueError(f"mask {k!r} must have shape {(batch_size, n)}, got {tuple(mk.shape)}")
        vis = (~mk).sum(dim=1)
        total = vis if total is None else total + vis
    if total is None:
        raise ValueError("no modalities to mask")
    if not bool((total == total[0]).all()):
        raise ValueError(f"every sample must have the same number of visible tokens, got {total.tolist()}")
    return int(total[0].item())


def visible_indices(mask_all: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Positions of the visible tokens in the concatenated sequence, in increasing order.

    Args:
        mask_all: bool ``[B, N]`` (True = masked), same visible count in every row.
        num_visible: that count ``K``.

    Returns:
        int64 ``[B, K]`` indices (used with ``torch.gather`` on ``[B, N, D]`` tokens).
    """
    order = torch.argsort(mask_all.to(torch.uint8), dim=1, stable=True)
    return order[:, :num_visible]
