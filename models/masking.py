"""Token masking: MultiMAE's multi-modal Dirichlet sampling and MAE's random masking.

Mask convention everywhere in ``polymae.models``: a bool tensor ``[B, N_m]`` per modality, **True =
masked (hidden from the encoder, to be reconstructed), False = visible** (encoded).

* :func:`sample_dirichlet_masks` -- MultiMAE (arXiv 2204.01678) Sec. 3.2 "Multi-modal masking": a fixed
  number of visible tokens (98 by default) is split across modalities with proportions
  ``lambda ~ Dir(alpha)`` drawn per sample; optionally a random non-empty subset of modalities is chosen
  first ("sample_tasks_uniformly" in the reference code) and the others get zero visible tokens.
* :func:`random_masking` -- MAE (arXiv 2111.06377) Sec. 3 "Masking": uniform random subset without
  replacement of ``int(N * (1 - mask_ratio))`` kept tokens, mask ratio 0.75.

Randomness comes from an optional ``torch.Generator`` (or the global torch RNG of the output device when
None), so ``torch.manual_seed`` / a seeded generator make every mask reproducible.

**No host synchronisation.** Sampling is tensor arithmetic only (no ``.item()``, ``.tolist()``, numpy, or
branch on a tensor's value): the Dirichlet draw uses a fixed-size vectorised Gamma sampler
(:func:`sample_gamma`), the visible counts a fixed number of vectorised water-filling rounds
(:func:`batched_visible_counts`). Masks are drawn on the generator's device (the trainer's generators
live on the CPU) and then moved to the requested device with a non-blocking copy from pinned memory
(:func:`to_device_async`), so a training step never waits for the accelerator. Only
:func:`check_masks`, which validates masks a caller supplies, reads values on the host.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

__all__ = ["allocate_visible_counts", "batched_visible_counts", "sample_gamma", "sample_dirichlet_shares",
           "sample_dirichlet_masks", "num_kept", "random_masking", "visible_indices", "check_masks",
           "to_device_async"]

#: candidates per Gamma variate in :func:`sample_gamma`; each is accepted with probability >= 0.95, so
#: all of them are rejected with probability < 0.05**16 ~ 1.5e-21 (then ``d``, the proposal at x = 0, is used)
GAMMA_TRIES = 16


def allocate_visible_counts(shares: Sequence[float], capacities: Sequence[int], total: int) -> list[int]:
    """Integer split of ``total`` visible tokens over modalities, proportional to ``shares``, capped (one
    sample, in Python; the definition that :func:`batched_visible_counts` computes for a batch on tensors).

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


def batched_visible_counts(shares: torch.Tensor, capacities: Sequence[int], total: int) -> torch.Tensor:
    """:func:`allocate_visible_counts` for a batch of share vectors, in tensor arithmetic (no host reads):
    the per-modality visible-token counts of MultiMAE's multi-modal masking (arXiv 2204.01678, Sec. 3.2).

    The same water-filling and largest-remainder rounding, run as ``M + 1`` masked rounds over all rows
    at once (each round of a row either saturates at least one modality or finishes it, so ``M + 1``
    rounds finish every row); ties between equal remainders go to the lower modality index, as in
    :func:`allocate_visible_counts`. Computed in float64 on ``shares.device``.

    Args:
        shares: ``[B, M]`` non-negative weights per sample (need not sum to 1; not validated, to avoid a
            host read).
        capacities: ``N_m`` tokens per modality (``M`` Python ints).
        total: visible tokens per sample, ``0 <= total <= sum(capacities)``.

    Returns:
        int64 ``[B, M]`` counts; every row sums to ``total`` and never exceeds ``capacities``.

    Raises:
        ValueError: ``shares`` is not ``[B, M]``, a capacity is negative, or ``total`` is out of range.
    """
    m = len(capacities)
    if shares.ndim != 2 or shares.shape[1] != m:
        raise ValueError(f"shares must be [B, {m}], got {tuple(shares.shape)}")
    if any(c < 0 for c in capacities):
        raise ValueError("capacities must be non-negative")
    if total < 0 or total > sum(capacities):
        raise ValueError(f"cannot place {total} visible tokens in {sum(capacities)} tokens")
    f64 = torch.float64
    w = shares.to(f64)
    b = w.shape[0]
    if m == 0:
        return torch.zeros(b, 0, dtype=torch.long, device=w.device)
    caps = _columns([float(c) for c in capacities], b, w.device)
    counts = torch.zeros(b, m, dtype=f64, device=w.device)
    active = (w > 0) & (caps > 0)
    remaining = torch.full((b,), float(total), dtype=f64, device=w.device)
    done = remaining <= 0
    slots = torch.arange(m, device=w.device).expand(b, m)
    for _ in range(m + 1):
        # every modality with a positive share is full but tokens are left: weigh by spare capacity
        spill = ~done & ~active.any(dim=1)
        active = torch.where(spill[:, None], caps > counts, active)
        w = torch.where(spill[:, None], caps - counts, w)
        wa = torch.where(active, w, 0.0)
        target = wa / wa.sum(dim=1, keepdim=True).clamp_min(1e-300) * remaining[:, None]
        spare = caps - counts
        full = active & (target >= spare) & ~done[:, None]
        saturate = full.any(dim=1)
        remaining = remaining - torch.where(full, spare, 0.0).sum(dim=1)
        counts = torch.where(full, caps, counts)
        active = active & ~full
        # rows where nothing saturated: floors, then +1 to the largest remainders
        finish = ~done & ~saturate
        floors = torch.floor(target)
        left = remaining - torch.where(active, floors, 0.0).sum(dim=1)
        frac = torch.where(active, target - floors, -1.0)
        order = torch.argsort(-frac, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, slots)
        add = floors + (active & (rank < left[:, None])).to(f64)
        counts = torch.where(finish[:, None] & active, counts + add, counts)
        remaining = torch.where(finish, 0.0, remaining)
        done = done | finish | (remaining <= 0)
    return counts.round().to(torch.long)


def _columns(values: Sequence[float], rows: int, device: torch.device) -> torch.Tensor:
    """float64 ``[rows, len(values)]`` with column i = ``values[i]``, made by fill kernels on ``device``
    (``torch.tensor(list, device=cuda)`` would be a blocking host-to-device copy)."""
    return torch.stack([torch.full((rows,), v, dtype=torch.float64, device=device) for v in values], dim=1)


def _sample_device(generator: torch.Generator | None, device: torch.device) -> torch.device:
    """Where random numbers are drawn: the generator's device, or ``device`` for the global RNG."""
    return generator.device if generator is not None else device


def to_device_async(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device`` without blocking the host: a no-op when already there; a CPU tensor bound for a
    CUDA device is copied into pinned memory first, so the copy is truly asynchronous (a copy from
    pageable memory may synchronise the stream); any other pair is a ``non_blocking`` copy.

    Args:
        x: any tensor (e.g. a bool ``[B, N]`` mask drawn on a CPU generator).
        device: target device.

    Returns:
        ``x`` or its copy on ``device`` (same shape and dtype); the copy is ordered on the current stream
        of ``device`` before every kernel queued after it.
    """
    device = torch.device(device)
    if x.device == device:
        return x
    if x.device.type == "cpu" and device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


def sample_gamma(alpha: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None, log: bool = False) -> torch.Tensor:
    """Gamma(``alpha``, 1) variates drawn from ``generator`` with a fixed amount of work (no host reads).

    Marsaglia & Tsang (2000), "A simple method for generating gamma variables": for ``a >= 1``, with
    ``d = a - 1/3``, ``c = 1 / sqrt(9 d)``, ``x ~ N(0, 1)``, ``v = (1 + c x)^3`` and ``u ~ U(0, 1)``, the
    proposal ``d v`` is accepted when ``v > 0`` and ``log u < x^2 / 2 + d - d v + d log v``; for ``a < 1``
    a Gamma(``a + 1``) variate is multiplied by ``u^(1/a)``. Instead of a data-dependent rejection loop,
    :data:`GAMMA_TRIES` proposals are drawn per variate and the first accepted one is kept (see
    :data:`GAMMA_TRIES` for the negligible failure probability). Computed in float64.

    Args:
        alpha: concentration(s) ``> 0``, broadcastable to ``shape`` (e.g. ``[M]`` for ``shape = (B, M)``);
            not validated (that would read values on the host).
        shape: output shape.
        generator: optional ``torch.Generator``; numbers are drawn on its device.
        device: device when ``generator`` is None (default CPU).
        log: return ``log`` of the variates (exact for tiny ``alpha``, where ``u^(1/a)`` underflows).

    Returns:
        float64 tensor of ``shape`` on the generator's device (or ``device``): Gamma variates, or their
        logarithms when ``log``.
    """
    dev = _sample_device(generator, torch.device(device) if device is not None else torch.device("cpu"))
    f64 = torch.float64
    a = to_device_async(torch.as_tensor(alpha, dtype=f64), dev).expand(shape)
    boost = a < 1.0
    a1 = torch.where(boost, a + 1.0, a)
    d = a1 - 1.0 / 3.0
    c = torch.rsqrt(9.0 * d)
    x = torch.randn((GAMMA_TRIES,) + tuple(shape), generator=generator, device=dev, dtype=f64)
    u = torch.rand((GAMMA_TRIES,) + tuple(shape), generator=generator, device=dev, dtype=f64)
    v = (1.0 + c * x) ** 3
    log_v = torch.log(v.clamp_min(1e-300))
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * log_v)
    first = ok.to(torch.uint8).argmax(dim=0, keepdim=True)  # first accepted proposal (0 when none)
    log_g = torch.log(d) + torch.where(ok.any(dim=0), log_v.gather(0, first).squeeze(0), 0.0)
    ub = torch.rand(tuple(shape), generator=generator, device=dev, dtype=f64)
    log_g = torch.where(boost, log_g + torch.log(ub) / a, log_g)
    return log_g if log else torch.exp(log_g)


def sample_dirichlet_shares(alpha: Sequence[float], batch_size: int, sample_tasks_uniform: bool = False,
                            generator: torch.Generator | None = None,
                            device: torch.device | str | None = None) -> torch.Tensor:
    """Per-sample modality proportions ``lambda ~ Dir(alpha)`` (MultiMAE Sec. 3.2), as normalised Gamma
    variates (computed from their logarithms, so tiny ``alpha`` cannot underflow to 0/0).

    With ``sample_tasks_uniform`` a non-empty subset of the ``M`` modalities is first drawn uniformly
    among the ``2^M - 1`` subsets per sample (reference "sample_tasks_uniformly"); modalities outside it
    get share 0 and the others ``Dir(alpha_subset)`` (the normalised Gammas of the subset).

    Args:
        alpha: ``M`` concentrations ``> 0`` (Python floats).
        batch_size: ``B``.
        sample_tasks_uniform: draw the subset first (only when ``M > 1``).
        generator: optional ``torch.Generator``; numbers are drawn on its device.
        device: device when ``generator`` is None (default CPU).

    Returns:
        float64 ``[B, M]``, rows summing to 1, on the generator's device (or ``device``).

    Raises:
        ValueError: empty ``alpha`` or an alpha that is not > 0.
    """
    m = len(alpha)
    if m == 0 or not all(float(a) > 0 for a in alpha):
        raise ValueError(f"Dirichlet alphas must be > 0 (and at least one), got {list(alpha)}")
    dev = _sample_device(generator, torch.device(device) if device is not None else torch.device("cpu"))
    conc = _columns([float(a) for a in alpha], 1, dev)[0]
    if sample_tasks_uniform and m > 1:
        # subset id s in [1, 2^M - 1]; bit i set = modality i selected
        subset = torch.randint(1, 2 ** m, (batch_size, 1), generator=generator, device=dev)
        selected = (subset >> torch.arange(m, device=dev)) & 1 == 1
    else:
        selected = torch.ones(batch_size, m, dtype=torch.bool, device=dev)
    log_g = sample_gamma(conc, (batch_size, m), generator, dev, log=True)
    return torch.softmax(log_g.masked_fill(~selected, -math.inf), dim=1)


def _select_per_row(counts: torch.Tensor, n: int, generator: torch.Generator | None,
                    device: torch.device) -> torch.Tensor:
    """Mask ``[B, n]`` (True = masked) with ``counts[b]`` uniformly chosen visible positions in row b, drawn
    on ``counts.device`` (the generator's) and moved to ``device`` asynchronously."""
    b = counts.shape[0]
    dev = counts.device
    noise = torch.rand((b, n), generator=generator, device=dev)
    order = noise.argsort(dim=1)  # a uniform random permutation per row
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n))
    return to_device_async(rank >= counts[:, None], device)


def sample_dirichlet_masks(num_tokens: Mapping[str, int], batch_size: int, num_visible: int,
                           alphas: float | Mapping[str, float] = 1.0, sample_tasks_uniform: bool = False,
                           generator: torch.Generator | None = None,
                           device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """MultiMAE multi-modal masking (arXiv 2204.01678, Sec. 3.2).

    Per sample: ``lambda ~ Dir(alpha_1..alpha_M)`` over the modalities (:func:`sample_dirichlet_shares`),
    visible counts ``lambda_m * num_visible`` made integer, exact and capped (:func:`batched_visible_counts`,
    the tensor form of :func:`allocate_visible_counts`), then that many positions of each modality are
    drawn uniformly without replacement. With ``sample_tasks_uniform`` a non-empty subset of modalities is
    first drawn uniformly among the ``2^M - 1`` subsets and the Dirichlet is taken over the subset only
    (the others get zero visible tokens unless the subset cannot hold ``num_visible`` tokens, see
    :func:`allocate_visible_counts`). Everything is drawn on the generator's device and the masks are
    then moved to ``device`` (:func:`to_device_async`); no value is read on the host.

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
        alpha = [float(alphas.get(k, 1.0)) for k in names]
    else:
        alpha = [float(alphas)] * len(names)
    if not all(a > 0 for a in alpha):
        raise ValueError(f"Dirichlet alphas must be > 0, got {alpha}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    shares = sample_dirichlet_shares(alpha, batch_size, sample_tasks_uniform, generator,
                                     _sample_device(generator, device))
    counts = batched_visible_counts(shares, caps, num_visible)
    return {k: _select_per_row(counts[:, i], caps[i], generator, device) for i, k in enumerate(names)}


def num_kept(num_tokens: int, mask_ratio: float) -> int:
    """Visible (kept) tokens of MAE random masking: ``int(N * (1 - mask_ratio))``, the floor, as the MAE
    reference's ``len_keep = int(L * (1 - mask_ratio))`` (arXiv 2111.06377, Sec. 3 "Masking"); e.g.
    N = 196: ratio 0.75 -> 49, 0.7 -> 58, 0.4 -> 117, 0.9 -> 19.

    Raises:
        ValueError: if ``mask_ratio`` is not in ``[0, 1)``.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_tokens * (1.0 - mask_ratio))


def random_masking(batch_size: int, num_tokens: int, mask_ratio: float = 0.75,
                   generator: torch.Generator | None = None,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """MAE random masking (arXiv 2111.06377, Sec. 3 "Masking"): keep :func:`num_kept` ``= int(N * (1 -
    mask_ratio))`` tokens per sample (the reference's floor), chosen uniformly without replacement; drawn
    on the generator's device and moved to ``device`` without a host synchronisation.

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
    keep = num_kept(num_tokens, mask_ratio)
    device = torch.device(device) if device is not None else torch.device("cpu")
    counts = torch.full((batch_size,), keep, dtype=torch.long, device=_sample_device(generator, device))
    return _select_per_row(counts, num_tokens, generator, device)


def check_masks(masks: Mapping[str, torch.Tensor], num_tokens: Mapping[str, int], batch_size: int) -> int:
    """Validate caller-supplied masks and return the common visible-token count per sample.

    This is the one function here that reads tensor values on the host (a synchronisation on an
    accelerator): the encoder needs the visible count as a Python int. Sampled masks never pass here.

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
        total = vis if total is None else total + vis.to(total.device)
    if total is None:
        raise ValueError("no modalities to mask")
    if not bool((total == total[0]).all()):
        raise ValueError(f"every sample must have the same number of visible tokens, got {total.tolist()}")
    return int(total[0].item())


def visible_indices(mask_all: torch.Tensor, num_visible: int) -> torch.Tensor:
    """Positions of the visible tokens in the concatenated sequence, in increasing order (MultiMAE
    Sec. 3.1: the encoder sees only the visible tokens).

    Args:
        mask_all: bool ``[B, N]`` (True = masked), same visible count in every row (not checked).
        num_visible: that count ``K``.

    Returns:
        int64 ``[B, K]`` indices (used with ``torch.gather`` on ``[B, N, D]`` tokens).
    """
    order = torch.argsort(mask_all.to(torch.uint8), dim=1, stable=True)
    return order[:, :num_visible]
