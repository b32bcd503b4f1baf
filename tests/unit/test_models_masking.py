"""Masking: MultiMAE Dirichlet multi-modal masking (Sec. 3.2) and MAE random masking."""

import pytest
import torch

from polymae.models.masking import (allocate_visible_counts, batched_visible_counts, check_masks, num_kept,
                                    random_masking, sample_dirichlet_masks, sample_dirichlet_shares, sample_gamma,
                                    to_device_async, visible_indices)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _visible(masks):
    return {k: (~v).sum(dim=1) for k, v in masks.items()}


@pytest.mark.parametrize("num_visible,alpha,sizes", [
    (98, 1.0, {"rgb": 196, "depth": 196, "semseg": 196}),
    (60, 0.2, {"rgb": 16, "depth": 49, "semseg": 4}),     # num_visible > tokens of rgb and semseg
    (10, 5.0, {"rgb": 4, "depth": 4, "semseg": 4}),
    (12, 1.0, {"rgb": 4, "depth": 4, "semseg": 4}),        # everything visible
    (30, {"rgb": 0.5, "depth": 2.0}, {"rgb": 8, "depth": 64}),
    (0, 1.0, {"rgb": 4, "depth": 4}),
])
@pytest.mark.parametrize("uniform", [False, True])
def test_exact_visible_count(num_visible, alpha, sizes, uniform):
    g = torch.Generator().manual_seed(1)
    masks = sample_dirichlet_masks(sizes, 64, num_visible, alpha, uniform, generator=g)
    assert list(masks) == list(sizes)
    vis = _visible(masks)
    for k, n in sizes.items():
        assert masks[k].dtype == torch.bool and masks[k].shape == (64, n)
        assert bool((vis[k] <= n).all()) and bool((vis[k] >= 0).all())
    total = sum(vis.values())
    assert bool((total == num_visible).all())
    assert check_masks(masks, sizes, 64) == num_visible


def test_dirichlet_shares_vary_across_samples():
    sizes = {"rgb": 196, "depth": 196, "semseg": 196}
    masks = sample_dirichlet_masks(sizes, 64, 98, 1.0, generator=torch.Generator().manual_seed(0))
    vis = torch.stack([v for v in _visible(masks).values()], dim=1).float()  # [B, M]
    assert vis.std(dim=0).min() > 10  # Dir(1,1,1) shares: std ~ 0.24 * 98 ~ 23 tokens
    assert len({tuple(r) for r in vis.tolist()}) > 50


def test_large_alpha_splits_evenly_and_small_alpha_is_peaked():
    sizes = {"rgb": 196, "depth": 196, "semseg": 196}
    even = sample_dirichlet_masks(sizes, 32, 99, 1e4, generator=torch.Generator().manual_seed(0))
    for v in _visible(even).values():
        assert bool(((v - 33).abs() <= 3).all())
    peaked = sample_dirichlet_masks(sizes, 64, 99, 0.05, generator=torch.Generator().manual_seed(0))
    mx = torch.stack(list(_visible(peaked).values()), 1).max(dim=1).values
    assert (mx >= 90).float().mean() > 0.5 and mx.float().mean() / 99 > 0.85  # Dir(1,1,1): E[max] ~ 0.61


def test_per_modality_alpha():
    sizes = {"rgb": 196, "depth": 196}
    masks = sample_dirichlet_masks(sizes, 256, 98, {"rgb": 20.0, "depth": 1.0},
                                   generator=torch.Generator().manual_seed(0))
    vis = _visible(masks)
    # E[lambda_rgb] = 20/21
    assert abs(vis["rgb"].float().mean().item() / 98 - 20 / 21) < 0.03
    with pytest.raises(ValueError):
        sample_dirichlet_masks(sizes, 2, 10, {"normals": 1.0})
    with pytest.raises(ValueError):
        sample_dirichlet_masks(sizes, 2, 10, 0.0)
    with pytest.raises(ValueError):
        sample_dirichlet_masks(sizes, 2, 393, 1.0)


def test_uniform_subset_leaves_modalities_fully_masked():
    sizes = {"rgb": 196, "depth": 196, "semseg": 196}
    masks = sample_dirichlet_masks(sizes, 128, 98, 1.0, sample_tasks_uniform=True,
                                   generator=torch.Generator().manual_seed(3))
    vis = torch.stack(list(_visible(masks).values()), dim=1)  # [B, 3]
    assert bool(((vis > 0).sum(dim=1) >= 1).all())
    fully_masked_any = (vis == 0).any(dim=1)
    assert fully_masked_any.float().mean() > 0.6  # 6 of 7 subsets leave a modality out
    # every modality is sometimes chosen alone
    alone = (vis > 0).sum(dim=1) == 1
    for i in range(3):
        assert bool((alone & (vis[:, i] == 98)).any())


def test_generator_reproducible():
    sizes = {"rgb": 16, "depth": 16, "semseg": 16}
    a = sample_dirichlet_masks(sizes, 8, 20, 1.0, True, generator=torch.Generator().manual_seed(7))
    b = sample_dirichlet_masks(sizes, 8, 20, 1.0, True, generator=torch.Generator().manual_seed(7))
    c = sample_dirichlet_masks(sizes, 8, 20, 1.0, True, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in sizes)
    assert not all(torch.equal(a[k], c[k]) for k in sizes)
    torch.manual_seed(5)
    d = sample_dirichlet_masks(sizes, 8, 20)
    torch.manual_seed(5)
    e = sample_dirichlet_masks(sizes, 8, 20)
    assert all(torch.equal(d[k], e[k]) for k in sizes)


@pytest.mark.parametrize("n", [196, 16, 64, 10])
def test_mae_random_masking(n):
    g = torch.Generator().manual_seed(0)
    m = random_masking(32, n, 0.75, generator=g)
    assert m.dtype == torch.bool and m.shape == (32, n)
    assert bool(((~m).sum(dim=1) == int(n * 0.25)).all())
    m2 = random_masking(32, n, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)
    assert len({tuple(r) for r in m.tolist()}) > 1  # per-sample shuffles
    with pytest.raises(ValueError):
        random_masking(2, n, 1.0)


def test_allocate_visible_counts():
    assert allocate_visible_counts([0.9, 0.05, 0.05], [4, 100, 100], 50) == [4, 23, 23]
    assert allocate_visible_counts([1.0, 0.0, 0.0], [4, 10, 10], 10) == [4, 3, 3]  # spill-over
    assert allocate_visible_counts([1 / 3] * 3, [10, 10, 10], 10) in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert allocate_visible_counts([0.5, 0.5], [4, 4], 8) == [4, 4]
    with pytest.raises(ValueError):
        allocate_visible_counts([0.5, 0.5], [4, 4], 9)


def test_check_masks_and_visible_indices():
    sizes = {"rgb": 4, "depth": 4}
    masks = {"rgb": torch.tensor([[False, True, True, True], [True, True, True, False]]),
             "depth": torch.tensor([[True, False, True, True], [True, True, False, True]])}
    assert check_masks(masks, sizes, 2) == 2
    ids = visible_indices(torch.cat([masks["rgb"], masks["depth"]], 1), 2)
    assert ids.tolist() == [[0, 5], [3, 6]]
    bad = dict(masks, depth=torch.tensor([[True] * 4, [True, True, False, True]]))
    with pytest.raises(ValueError):
        check_masks(bad, sizes, 2)
    with pytest.raises(ValueError):
        check_masks({"rgb": masks["rgb"]}, sizes, 2)
    with pytest.raises(ValueError):
        check_masks(dict(masks, rgb=masks["rgb"].long()), sizes, 2)


@pytest.mark.parametrize("n,ratio,kept", [(196, 0.75, 49), (196, 0.7, 58), (196, 0.4, 117), (196, 0.9, 19),
                                          (196, 0.0, 196), (49, 0.75, 12), (16, 0.75, 4), (10, 0.75, 2),
                                          (256, 0.6, 102), (64, 0.9, 6), (1, 0.5, 0)])
def test_mae_keeps_the_floor_of_n_times_one_minus_ratio(n, ratio, kept):
    # MAE reference: len_keep = int(L * (1 - mask_ratio)); round() would keep one more at 0.4, 0.7, 0.9
    assert num_kept(n, ratio) == kept == int(n * (1 - ratio))
    m = random_masking(3, n, ratio, generator=torch.Generator().manual_seed(0))
    assert bool(((~m).sum(dim=1) == kept).all())
    with pytest.raises(ValueError):
        num_kept(n, 1.0)


def test_batched_visible_counts_equal_the_reference_allocation():
    g = torch.Generator().manual_seed(0)
    cases = [([4, 100, 100], 50), ([4, 10, 10], 10), ([10, 10, 10], 10), ([4, 4], 8), ([196] * 3, 98),
             ([16, 49, 4], 60), ([0, 8, 8], 9), ([1, 1, 1, 196], 150), ([196], 49)]
    for caps, total in cases:
        shares = torch.rand(64, len(caps), generator=g, dtype=torch.float64)
        shares[torch.rand(64, len(caps), generator=g) < 0.3] = 0.0       # empty subsets, saturation, spill-over
        shares[0] = 0.0
        if len(caps) == 3:
            shares[1] = torch.tensor([1 / 3] * 3, dtype=torch.float64)  # exact ties
        got = batched_visible_counts(shares, caps, total)
        assert got.dtype == torch.long and got.shape == (64, len(caps))
        for row, counts in zip(shares.tolist(), got.tolist()):
            assert counts == allocate_visible_counts(row, caps, total), (caps, total, row)
    with pytest.raises(ValueError):
        batched_visible_counts(torch.ones(2, 2), [4, 4], 9)
    with pytest.raises(ValueError):
        batched_visible_counts(torch.ones(2, 3), [4, 4], 2)


@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0, 3.0, 1e4])
def test_gamma_sampler_moments(alpha):
    x = sample_gamma(torch.tensor(alpha), (40000,), torch.Generator().manual_seed(0))
    assert x.dtype == torch.float64 and bool((x > 0).all())
    # Gamma(a, 1): mean = var = a; the standard error of the mean is sqrt(a / n); the sample variance is
    # noisier for small a (heavy relative tails), hence the wider tolerance there
    assert abs(x.mean().item() - alpha) < 5 * (alpha / 40000) ** 0.5
    assert abs(x.var().item() / alpha - 1) < (0.08 if alpha >= 0.5 else 0.25)
    log_x = sample_gamma(torch.tensor(alpha), (10,), torch.Generator().manual_seed(1), log=True)
    assert torch.allclose(log_x.exp(), sample_gamma(torch.tensor(alpha), (10,), torch.Generator().manual_seed(1)))


def test_dirichlet_shares_moments_and_uniform_subsets():
    alpha = [0.5, 1.0, 2.0]
    s = sample_dirichlet_shares(alpha, 40000, generator=torch.Generator().manual_seed(0))
    a0 = sum(alpha)
    assert torch.allclose(s.sum(1), torch.ones(40000, dtype=torch.float64))
    for i, a in enumerate(alpha):
        mean, var = a / a0, a / a0 * (1 - a / a0) / (a0 + 1)
        assert abs(s[:, i].mean().item() - mean) < 5 * (var / 40000) ** 0.5
        assert abs(s[:, i].var().item() / var - 1) < 0.05
    u = sample_dirichlet_shares([1.0] * 3, 14000, True, generator=torch.Generator().manual_seed(0))
    subset = ((u > 0).long() * torch.tensor([1, 2, 4])).sum(1)
    freq = torch.bincount(subset, minlength=8).double() / 14000
    assert freq[0] == 0 and bool(((freq[1:] - 1 / 7).abs() < 0.015).all())  # 7 subsets, uniform
    tiny = sample_dirichlet_shares([1e-3] * 3, 200, generator=torch.Generator().manual_seed(0))
    assert bool(torch.isfinite(tiny).all()) and torch.allclose(tiny.sum(1), torch.ones(200, dtype=torch.float64))
    with pytest.raises(ValueError):
        sample_dirichlet_shares([1.0, 0.0], 2)


def test_masks_come_back_on_the_requested_device_and_match_the_generator_draw():
    sizes = {"rgb": 16, "depth": 16}
    a = sample_dirichlet_masks(sizes, 4, 10, generator=torch.Generator().manual_seed(3), device="cpu")
    b = sample_dirichlet_masks(sizes, 4, 10, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[k], b[k]) for k in sizes)
    x = torch.ones(3)
    assert to_device_async(x, "cpu") is x
    if torch.cuda.is_available():  # CPU generator, accelerator output: the same masks, copied asynchronously
        c = sample_dirichlet_masks(sizes, 4, 10, generator=torch.Generator().manual_seed(3), device="cuda")
        assert all(c[k].device.type == "cuda" and torch.equal(c[k].cpu(), a[k]) for k in sizes)
        r = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0), device="cuda")
        assert torch.equal(r.cpu(), random_masking(4, 16, 0.75, torch.Generator().manual_seed(0)))
