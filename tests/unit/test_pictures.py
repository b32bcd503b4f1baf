"""Reconstruction pictures (pipeline/evaluate/pictures.py) on a tiny random MultiMAE and a real photograph: panel
shapes, visible patches of the masked input equal to the input and masked ones grey, the prediction pasted only into
the masked patches, the colour maps on hand-computed values, the composed grid and the PNGs saved through
EvalContext."""

import numpy as np
import pytest
import torch

from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from polymae.models.losses import norm_pix_target, patchify, unpatchify
from polymae.models.multimae import create_model
from polymae.pipeline.evaluate.pictures import (GAP, GREY, _rgb_rows, colorize_depth, colorize_semseg, compose_picture,
                                                denormalize_rgb, mask_pixels, reconstruction_panels,
                                                reconstruction_picture, save_reconstruction_pictures, semseg_palette)

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

S, P, K = 32, 8, 4  # image side, patch, semseg classes
N = (S // P) ** 2


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("multimae_tiny", img_size=S, patch_size=P, dim=32, depth=2, num_heads=2, decoder_dim=32,
                        decoder_depth=1, decoder_heads=2, semseg_num_classes=K).eval()


@pytest.fixture(scope="module")
def batch():
    """Two real photographs (astronaut, coffee) at 32 px: rgb normalised, depth = 1 - luminance, semseg = luminance
    quantised into 4 classes at stride 4."""
    import skimage.data
    from PIL import Image

    rgbs = [np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB").resize((S, S), Image.BILINEAR))
            for n in ("astronaut", "coffee")]
    x = torch.tensor(np.stack(rgbs), dtype=torch.float32).permute(0, 3, 1, 2) / 255.0
    lum = x.mean(1, keepdim=True)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    seg = torch.nn.functional.avg_pool2d(lum, 4)[:, 0]
    return {"rgb": (x - mean) / std, "depth": 1.05 - lum, "semseg": torch.clamp((seg * K).long(), 0, K - 1)}


def _masks():
    """Same masks for both images (equal visible counts): rgb first half masked, depth every other patch, semseg all
    but the last two."""
    idx = torch.arange(N)
    one = {"rgb": idx < N // 2, "depth": idx % 2 == 0, "semseg": idx < N - 2}
    return {m: v[None].expand(2, -1).clone() for m, v in one.items()}


@pytest.fixture(scope="module")
def panels(model, batch):
    return reconstruction_panels(model, batch, _masks())


def test_colour_maps_on_hand_computed_values():
    assert semseg_palette(4).tolist() == [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert colorize_semseg(np.array([[0, 3, 255, 7]]), 4, ignore=255).tolist() == [
        [[128, 0, 0], [0, 0, 128], [0, 0, 0], [0, 0, 0]]]
    assert colorize_depth(np.array([0.0, 0.5, 1.0, 2.0]), 0.0, 1.0).tolist() == [
        [68, 1, 84], [33, 144, 141], [253, 231, 37], [253, 231, 37]]
    x = torch.zeros(1, 3, 1, 1)  # normalised 0 = the ImageNet mean
    assert denormalize_rgb(x)[0, 0, 0].tolist() == [round(m * 255) for m in IMAGENET_MEAN]
    pix = mask_pixels(torch.tensor([[True, False, False, True]]), (2, 2), 3)
    assert pix.shape == (1, 6, 6) and pix[0, :3, :3].all() and not pix[0, :3, 3:].any() and pix[0, 3:, 3:].all()


def test_panels_masked_input_prediction_and_target(model, batch, panels):
    masks = _masks()
    assert list(panels) == ["rgb", "depth", "semseg"]
    for rows in panels.values():
        assert [r.shape for r in rows] == [(2, S, S, 3)] * 3 and all(r.dtype == np.uint8 for r in rows)
    rgb_in, rgb_pred, rgb_tgt = panels["rgb"]
    pix = mask_pixels(masks["rgb"], (S // P, S // P), P).numpy()
    assert pix.sum() == 2 * (N // 2) * P * P
    assert np.array_equal(rgb_tgt, denormalize_rgb(batch["rgb"]))
    assert (rgb_in[pix] == GREY).all() and np.array_equal(rgb_in[~pix], rgb_tgt[~pix])
    with torch.no_grad():
        pred = denormalize_rgb(model({k: v for k, v in batch.items()}, masks=masks).preds["rgb"])
    assert np.array_equal(rgb_pred[~pix], rgb_tgt[~pix]) and np.array_equal(rgb_pred[pix], pred[pix])
    assert not np.array_equal(rgb_pred[pix], rgb_tgt[pix])  # a random model does not reproduce the photograph
    for m, cell in (("depth", P), ("semseg", P)):  # semseg: stride-4 cells of P/4, shown x4
        m_in, m_pred, m_tgt = panels[m]
        pix = mask_pixels(masks[m], (S // P, S // P), cell).numpy()
        assert (m_in[pix] == GREY).all() and np.array_equal(m_in[~pix], m_tgt[~pix])
        assert np.array_equal(m_pred[~pix], m_tgt[~pix])
    seg_colours = {tuple(c) for c in panels["semseg"][2].reshape(-1, 3)}
    assert seg_colours <= {tuple(c) for c in semseg_palette(K)}


def test_norm_pix_prediction_is_mapped_back_with_the_target_patch_statistics():
    class _Model:
        patch_size, norm_pix_loss = P, True

    torch.manual_seed(1)
    target = torch.randn(1, 3, S, S)
    perfect = unpatchify(norm_pix_target(patchify(target, P)), (S // P, S // P), P, 3)
    pix = torch.ones(1, S, S, dtype=torch.bool)
    _, pred, tgt = _rgb_rows(_Model(), target, perfect, pix, (S // P, S // P))
    assert np.abs(pred.astype(int) - tgt.astype(int)).max() <= 1


def test_composed_picture_and_saved_pngs(model, batch, panels, tmp_path):
    from PIL import Image

    from polymae.pipeline.evaluate.results import EvalContext

    pic = compose_picture(panels, index=1)
    assert pic.shape == (3 * S + 4 * GAP, 3 * S + 4 * GAP, 3) and pic.dtype == np.uint8
    for c, m in enumerate(("rgb", "depth", "semseg")):
        for r in range(3):
            y, x = GAP + r * (S + GAP), GAP + c * (S + GAP)
            assert np.array_equal(pic[y:y + S, x:x + S], panels[m][r][1])
    assert (pic[:GAP] == 255).all() and (pic[:, S + GAP:S + 2 * GAP] == 255).all()
    drawn = reconstruction_picture(model, batch, None, index=0, num_visible=6,
                                   generator=torch.Generator().manual_seed(0))
    assert drawn.shape == pic.shape
    grey = (drawn[GAP:GAP + S, GAP:GAP + 3 * S + 2 * GAP] == GREY).all(-1)
    assert 0 < grey.mean() < 1  # some of the first row is masked, some visible
    ctx = EvalContext(checkpoint="tiny", output=str(tmp_path))
    urls = save_reconstruction_pictures(ctx, model, batch, _masks(), name="rec", max_images=1)
    ctx.close()
    assert urls == [str(tmp_path / "pictures" / "rec_0.png")] and ctx.pictures == ["pictures/rec_0.png"]
    assert np.array_equal(np.asarray(Image.open(urls[0])), compose_picture(panels, 0))
    with pytest.raises(IndexError):
        reconstruction_picture(model, batch, _masks(), index=2)


def test_mae_picture_from_its_own_masks(batch):
    torch.manual_seed(0)
    mae = create_model("mae_tiny", img_size=S, patch_size=P, dim=32, depth=2, num_heads=2, decoder_dim=32,
                       decoder_depth=1, decoder_heads=2).eval()
    pic = reconstruction_picture(mae, batch, index=1, generator=torch.Generator().manual_seed(0))
    assert pic.shape == (3 * S + 4 * GAP, S + 2 * GAP, 3)
    masked_in = pic[GAP:GAP + S, GAP:GAP + S]
    grey = (masked_in == GREY).all(-1).reshape(S // P, P, S // P, P).all(axis=(1, 3))
    assert grey.sum() == round(0.75 * N)  # MAE's mask ratio, whole patches
