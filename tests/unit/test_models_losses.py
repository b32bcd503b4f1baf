"""Loss numerics: each modality's loss equals an independent re-computation from the formulas
(MultiMAE Sec. 3.3 / reference criterion; MAE norm-pix loss), with fixed weights and fixed masks."""

import math

import pytest
import torch

from polymae.models.losses import (masked_cross_entropy_loss, masked_l1_loss, masked_mse_loss, patchify,
                                   standardize_depth, unpatchify)
from polymae.models.multimae import MAE, MultiMAE

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


P, IMG, K = 8, 32, 5          # patch, image side, semseg classes
NH = NW = IMG // P            # 4 x 4 grid, 16 tokens per modality
IGN = 255


def _tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(img_size=IMG, patch_size=P, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
               decoder_heads=2, semseg_num_classes=K, semseg_ignore_index=IGN)
    cfg.update(kw)
    return MultiMAE(**cfg).eval()


def _batch(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randn(b, 3, IMG, IMG, generator=g)
    depth = torch.rand(b, 1, IMG, IMG, generator=g) * 20 + 0.5
    sem = torch.randint(0, K, (b, IMG // 4, IMG // 4), generator=g)
    sem[0, :2, :] = IGN                      # a fully ignored token row (tokens 0..3) + partial ones
    sem[1, 3, 1] = IGN
    sem[2] = IGN                             # sample 2: every pixel ignored
    return {"rgb": rgb, "depth": depth, "semseg": sem}


def _mask(visible_ids):
    m = torch.ones(NH * NW, dtype=torch.bool)
    m[list(visible_ids)] = False
    return m


def _fixed_masks():
    # 20 visible tokens per sample; sample 1 has NO masked depth token (all 16 depth tokens visible)
    rgb = torch.stack([_mask(range(6)), _mask([3, 9]), _mask(range(5, 15))])
    depth = torch.stack([_mask(range(2, 9)), _mask(range(16)), _mask([])])
    sem = torch.stack([_mask(range(9, 16)), _mask([0, 7]), _mask(range(10))])
    return {"rgb": rgb, "depth": depth, "semseg": sem}


# ---------------------------------------------------------------- independent reference computations
def _patch(x, i, j, p):
    """Pixels of token (i, j): [C, p, p] (or [p, p] for 2-D maps)."""
    return x[..., i * p:(i + 1) * p, j * p:(j + 1) * p]


def _per_sample_then_batch(per_sample):
    """per_sample: list of (sum, count) -> mean over samples with count > 0 of sum / count."""
    vals = [s / c for s, c in per_sample if c > 0]
    return sum(vals) / len(vals) if vals else 0.0


def _ref_mse(pred, target, mask, norm_pix):
    out = []
    for b in range(pred.shape[0]):
        s, c = 0.0, 0
        for t in range(NH * NW):
            if not mask[b, t]:
                continue
            i, j = divmod(t, NW)
            pp = _patch(pred[b].double(), i, j, P)
            tt = _patch(target[b].double(), i, j, P)
            if norm_pix:
                flat = tt.reshape(-1)
                mu = flat.mean()
                var = ((flat - mu) ** 2).sum() / (flat.numel() - 1)
                tt = (tt - mu) / math.sqrt(var + 1e-6)
            s += ((pp - tt) ** 2).mean().item()
            c += 1
        out.append((s, c))
    return _per_sample_then_batch(out)


def _ref_standardize(depth):
    out = torch.empty_like(depth, dtype=torch.float64)
    for b in range(depth.shape[0]):
        v = depth[b].double().reshape(-1)
        n = v.numel()
        kept = torch.sort(v).values[int(0.1 * n):int(0.9 * n)]
        mu = kept.mean()
        var = ((kept - mu) ** 2).sum() / (kept.numel() - 1)
        out[b] = (depth[b].double() - mu) / math.sqrt(var + 1e-6)
    return out


def _ref_l1(pred, target_std, mask):
    out = []
    for b in range(pred.shape[0]):
        s, c = 0.0, 0
        for t in range(NH * NW):
            if mask[b, t]:
                i, j = divmod(t, NW)
                s += (_patch(pred[b].double(), i, j, P) - _patch(target_std[b], i, j, P)).abs().mean().item()
                c += 1
        out.append((s, c))
    return _per_sample_then_batch(out)


def _ref_ce(logits, target, mask):
    p4 = P // 4
    out = []
    for b in range(logits.shape[0]):
        logp = logits[b].double() - torch.logsumexp(logits[b].double(), dim=0, keepdim=True)  # [K, h, w]
        s, c = 0.0, 0
        for t in range(NH * NW):
            if not mask[b, t]:
                continue
            i, j = divmod(t, NW)
            for y in range(i * p4, (i + 1) * p4):
                for x in range(j * p4, (j + 1) * p4):
                    lbl = int(target[b, y, x])
                    if lbl == IGN:
                        continue
                    s += -logp[lbl, y, x].item()
                    c += 1
        out.append((s, c))
    return _per_sample_then_batch(out)


# ----------------------------------------------------------------------------------------- tests
def test_multimae_losses_match_independent_formulas():
    weights = {"rgb": 1.0, "depth": 0.5, "semseg": 2.0, "norm_rgb": 0.25}
    model = _tiny(out_modalities=("rgb", "depth", "semseg", "norm_rgb"), loss_weights=weights)
    batch, masks = _batch(), _fixed_masks()
    with torch.no_grad():
        out = model(batch, masks=masks)
    for k in masks:
        assert torch.equal(out.masks[k], masks[k])
    ref = {
        "rgb": _ref_mse(out.preds["rgb"], batch["rgb"], masks["rgb"], norm_pix=False),
        "norm_rgb": _ref_mse(out.preds["norm_rgb"], batch["rgb"], masks["rgb"], norm_pix=True),
        "depth": _ref_l1(out.preds["depth"], _ref_standardize(batch["depth"]), masks["depth"]),
        "semseg": _ref_ce(out.preds["semseg"], batch["semseg"], masks["semseg"]),
    }
    for k, v in ref.items():
        assert out.losses[k].item() == pytest.approx(v, abs=1e-6), k
    total = sum(weights[k] * ref[k] for k in ref)
    assert out.loss.item() == pytest.approx(total, abs=1e-5)


def test_sample_without_masked_tokens_is_excluded():
    model = _tiny()
    batch, masks = _batch(), _fixed_masks()
    with torch.no_grad():
        out = model(batch, masks=masks)
    tgt = _ref_standardize(batch["depth"])
    per = []
    for b in (0, 2):  # sample 1 has no masked depth token
        mb = masks["depth"][b:b + 1]
        per.append(_ref_l1(out.preds["depth"][b:b + 1], tgt[b:b + 1], mb))
    assert out.losses["depth"].item() == pytest.approx(sum(per) / 2, abs=1e-6)
    # semseg: sample 2 has only ignored pixels -> excluded as well
    per = [_ref_ce(out.preds["semseg"][b:b + 1], batch["semseg"][b:b + 1], masks["semseg"][b:b + 1])
           for b in (0, 1)]
    assert out.losses["semseg"].item() == pytest.approx(sum(per) / 2, abs=1e-6)


def test_norm_pix_rgb_loss():
    model = _tiny(in_modalities=("rgb", "depth"), out_modalities=("rgb",), norm_pix_loss=True)
    batch, masks = _batch(), _fixed_masks()
    masks = {"rgb": torch.stack([_mask(range(13)), _mask(range(4)), _mask(range(10, 16))]),
             "depth": torch.stack([_mask(range(7)), _mask(range(16)), _mask(range(14))])}  # 20 visible each
    with torch.no_grad():
        out = model({"rgb": batch["rgb"], "depth": batch["depth"]}, masks=masks)
    ref = _ref_mse(out.preds["rgb"], batch["rgb"], masks["rgb"], norm_pix=True)
    assert out.losses["rgb"].item() == pytest.approx(ref, abs=1e-6)


def test_mae_loss_is_norm_pix_mse_on_masked_tokens():
    torch.manual_seed(0)
    model = MAE(img_size=IMG, patch_size=P, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
                decoder_heads=2).eval()
    rgb = _batch()["rgb"]
    with torch.no_grad():
        out = model({"rgb": rgb}, generator=torch.Generator().manual_seed(0))
    m = out.masks["rgb"]
    assert bool(((~m).sum(1) == 4).all())
    ref = _ref_mse(out.preds["rgb"], rgb, m, norm_pix=True)
    assert out.losses["rgb"].item() == pytest.approx(ref, abs=1e-6)
    # equals MAE's global (loss * mask).sum() / mask.sum() since every sample masks 12 tokens
    t = patchify(rgb, P, channel_last=True)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_tok = ((patchify(out.preds["rgb"], P, channel_last=True) - t) ** 2).mean(-1)
    assert out.loss.item() == pytest.approx(((per_tok * m).sum() / m.sum()).item(), abs=1e-6)


def test_no_masked_tokens_anywhere_gives_zero_with_grad():
    pred = torch.randn(2, 1, 16, 16, requires_grad=True)
    loss = masked_l1_loss(pred, torch.zeros(2, 1, 16, 16), torch.zeros(2, 4, dtype=torch.bool), 8)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and bool((pred.grad == 0).all())
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    ce = masked_cross_entropy_loss(logits, torch.full((1, 4, 4), 255), torch.ones(1, 4, dtype=torch.bool), 2)
    assert ce.item() == 0.0 and ce.requires_grad
    mse = masked_mse_loss(pred, torch.zeros(2, 1, 16, 16), torch.zeros(2, 4, dtype=torch.bool), 8, norm_pix=True)
    assert mse.item() == 0.0


def test_standardize_depth_known_values():
    d = torch.arange(100, dtype=torch.float32).reshape(1, 1, 10, 10)
    out = standardize_depth(d)
    # kept: 10..89 -> mean 49.5, unbiased var of 80 consecutive ints = 80*81/12 = 540
    expect = (d - 49.5) / math.sqrt(540 + 1e-6)
    assert torch.allclose(out, expect, atol=1e-6)
    two = torch.stack([d[0], 3 * d[0] + 7])
    out2 = standardize_depth(two)
    assert torch.allclose(out2[0], out2[1], atol=1e-5)  # invariant to per-image affine rescaling
    with pytest.raises(ValueError):
        standardize_depth(torch.zeros(1, 3, 4, 4))


@pytest.mark.parametrize("channel_last", [False, True])
def test_patchify_roundtrip(channel_last):
    x = torch.randn(2, 3, 16, 24)
    t = patchify(x, 8, channel_last)
    assert t.shape == (2, 6, 192)
    assert torch.equal(unpatchify(t, (2, 3), 8, 3, channel_last), x)
    # token 4 = grid row 1, col 1
    tok = t[0, 4].reshape(8, 8, 3).permute(2, 0, 1) if channel_last else t[0, 4].reshape(3, 8, 8)
    assert torch.equal(tok, x[0, :, 8:16, 8:16])


def _ref_norm_pix_mse(pred, rgb, mask):
    """MAE norm-pix target written out: each patch's 3*P*P values standardised by their own mean and
    unbiased variance (eps 1e-6), squared error averaged per patch, per sample over masked patches, then
    over samples."""
    per_sample = []
    for b in range(pred.shape[0]):
        errs = []
        for t in torch.nonzero(mask[b]).flatten().tolist():
            i, j = divmod(t, NW)
            tgt = rgb[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].double()
            tgt = (tgt - tgt.mean()) / torch.sqrt(tgt.var(unbiased=True) + 1e-6)
            errs.append(((pred[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P].double() - tgt) ** 2).mean().item())
        if errs:
            per_sample.append(sum(errs) / len(errs))
    return sum(per_sample) / len(per_sample)


def test_extra_norm_pix_loss_adds_a_norm_rgb_head_and_leaves_the_rest_alone():
    weights = {"rgb": 1.0, "depth": 0.5, "semseg": 2.0}
    plain = _tiny(loss_weights=weights)
    extra = _tiny(loss_weights=dict(weights, norm_rgb=0.25), extra_norm_pix_loss=True)
    assert list(extra.output_adapters) == ["rgb", "depth", "semseg", "norm_rgb"] and extra.extra_norm_pix_loss
    assert not plain.extra_norm_pix_loss and "norm_rgb" not in plain.output_adapters
    # same architecture as the rgb adapter, its own parameters
    rgb_sd, norm_sd = extra.output_adapters["rgb"].state_dict(), extra.output_adapters["norm_rgb"].state_dict()
    assert {k: v.shape for k, v in rgb_sd.items()} == {k: v.shape for k, v in norm_sd.items()}
    assert extra.output_adapters["rgb"].out_proj.weight is not extra.output_adapters["norm_rgb"].out_proj.weight
    missing, unexpected = extra.load_state_dict(plain.state_dict(), strict=False)  # shared weights equal
    assert not unexpected and missing and all(k.startswith("output_adapters.norm_rgb.") for k in missing)
    batch, masks = _batch(), _fixed_masks()
    with torch.no_grad():
        a = plain(batch, masks=masks)
        b = extra(batch, masks=masks)
    assert set(b.losses) == set(b.preds) == {"rgb", "depth", "semseg", "norm_rgb"}
    assert b.preds["norm_rgb"].shape == batch["rgb"].shape
    for m in ("rgb", "depth", "semseg"):  # the other heads and losses are untouched
        assert torch.equal(a.losses[m], b.losses[m]) and torch.equal(a.preds[m], b.preds[m]), m
    ref = _ref_norm_pix_mse(b.preds["norm_rgb"], batch["rgb"], masks["rgb"])
    assert b.losses["norm_rgb"].dtype == torch.float32
    assert b.losses["norm_rgb"].item() == pytest.approx(ref, abs=1e-6)
    assert b.loss.item() == pytest.approx(a.loss.item() + 0.25 * ref, abs=1e-5)
    # default weight 1
    one = _tiny(extra_norm_pix_loss=True)
    with torch.no_grad():
        c = one(batch, masks=masks)
    assert c.loss.item() == pytest.approx(sum(v.item() for v in c.losses.values()), abs=1e-5)


def test_masked_mean_without_any_masked_token_is_zero_with_a_gradient_path():
    from polymae.models.losses import masked_mean

    pred = torch.randn(2, 3, IMG, IMG, requires_grad=True)
    none = torch.zeros(2, NH * NW, dtype=torch.bool)
    loss = masked_mse_loss(pred, torch.randn(2, 3, IMG, IMG), none, P)
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert pred.grad is not None and torch.count_nonzero(pred.grad) == 0
    value = torch.tensor([[1.0, float("nan"), 3.0], [2.0, 2.0, 2.0]])
    count = torch.tensor([[1.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True], [True, True, False]])  # sample 1: count 0 -> excluded
    assert masked_mean(value, count, mask).item() == pytest.approx(4.0 / 3.0)
