"""Masked AutoDecoder sequences, matching, decoder modes and a tiny fit, on real shapes from scikit-image."""

import itertools

import numpy as np
import pytest
import skimage.data
import torch

from polymae.datasets.captions import train_caption_tokenizer
from polymae.models import mad as M

pytestmark = pytest.mark.unit

VOCAB = M.MadVocab(num_classes=5, caption_vocab=50)


def test_box_tokens_round_trip_within_one_bin():
    g = torch.Generator().manual_seed(0)
    boxes = M.noise_boxes(40, g)
    classes = torch.randint(0, 5, (40,), generator=g)
    seq, assign = M.encode_detection(VOCAB, boxes, classes, g)
    assert seq.shape == (M.SEQ_LEN["det"],) == (501,) and seq[0] == VOCAB.prompt("det")
    assert sorted(assign[assign >= 0].tolist()) == list(range(40))
    got, cls, _ = M.decode_detection(VOCAB, seq)
    order = assign[assign >= 0]  # decode keeps slot order; slot s holds box assign[s]
    assert torch.equal(cls, classes[order])
    assert float((got - boxes[order]).abs().max()) <= 1.0 / M.NUM_BINS
    assert (seq[1:].reshape(100, 5)[assign < 0, 4] == VOCAB.no_object).all()


def test_mask_round_trip_on_a_real_silhouette():
    """skimage's horse silhouette (box 371 x 304 px): the 16 x 16 grid (cells of ~23 x 19 px, so the thin legs
    blur) maps back to a mask with IoU 0.81 against the original, and re-encoding the decoded mask is exact."""
    mask = ~skimage.data.horse().astype(bool)  # the horse is dark on white
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    box = torch.tensor([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
    seq = M.encode_segmentation(VOCAB, box, 3, mask)
    assert seq.shape == (262,) and int(seq[5]) == VOCAB.class_base + 3
    back = M.decode_segmentation(VOCAB, seq, box, h, w)
    iou = (back & mask).sum() / (back | mask).sum()
    assert 0.78 <= iou < 1.0, iou
    assert torch.equal(M.encode_segmentation(VOCAB, box, 3, back), seq)


def test_keypoints_round_trip_and_unlabelled_points_carry_no_loss():
    g = torch.Generator().manual_seed(1)
    kp = torch.cat([torch.rand(17, 2, generator=g), torch.randint(0, 3, (17, 1), generator=g).float()], dim=1)
    seq, weight = M.encode_keypoints(VOCAB, torch.tensor([0.1, 0.1, 0.9, 0.9]), 0, kp)
    assert seq.shape == weight.shape == (57,)
    back = M.decode_keypoints(VOCAB, seq)
    labelled = kp[:, 2] > 0
    assert float((back[labelled, :2] - kp[labelled, :2]).abs().max()) <= 1.0 / M.NUM_BINS
    assert torch.equal(back[:, 2] > 0, labelled)
    w = weight[6:].reshape(17, 3)
    assert torch.equal(w[:, 0], labelled) and w[:, 2].all() and not weight[:6].any()


def test_caption_tokenizer_round_trip():
    caps = ["A cat sits on a red chair.", "The rocket stands on the launch pad", "a cup of coffee on a table"]
    tok = train_caption_tokenizer(caps, vocab_size=100)
    vocab = M.MadVocab(num_classes=5, caption_vocab=tok.get_vocab_size())
    seq = M.encode_caption(vocab, tok, caps[0])
    assert seq.shape == (21,) and (seq[1:] >= vocab.caption_base).all()
    assert M.decode_caption(vocab, tok, seq) == "a cat sits on a red chair ."


@pytest.mark.parametrize("slots,boxes,seed", [(4, 2, 0), (5, 3, 1), (6, 4, 2), (5, 5, 3)])
def test_hungarian_matching_equals_brute_force(slots, boxes, seed):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.randn(slots, 5, VOCAB.size, generator=g).log_softmax(-1)
    gt = torch.randint(VOCAB.class_base, VOCAB.caption_base, (boxes, 5), generator=g)
    rows, cols = M.match_slots(logprobs, gt)
    assert len(set(rows)) == len(rows) == boxes and sorted(cols) == list(range(boxes))
    idx = gt.t().unsqueeze(0).expand(slots, -1, -1)
    cost = -torch.gather(logprobs, 2, idx).mean(1).double()
    total = sum(float(cost[r, c]) for r, c in zip(rows, cols))
    assert total == pytest.approx(M.match_slots_brute_force(logprobs, gt), abs=1e-9)


def test_decoder_masks_the_vocabulary_and_causal_mode_hides_the_future():
    torch.manual_seed(0)
    dec = M.MadDecoder(VOCAB, encoder_dim=12, dim=32, depth=2, heads=4, max_len=64).eval()
    mem = torch.randn(2, 7, 12)
    tokens = torch.randint(0, VOCAB.size, (2, 20))
    out = dec(tokens, mem, "kpt")
    assert out.shape == (2, 20, VOCAB.size)
    assert torch.isinf(out[..., ~VOCAB.task_mask("kpt")]).all() and torch.isfinite(out[..., VOCAB.task_mask("kpt")]).all()
    changed = tokens.clone()
    changed[:, 15] = VOCAB.MASK
    for causal, same in ((True, True), (False, False)):
        a, b = dec(tokens, mem, "kpt", causal=causal), dec(changed, mem, "kpt", causal=causal)
        assert torch.allclose(a[:, :15], b[:, :15]) == same
    assert len(dec(tokens, mem, "kpt", all_layers=True)) == 2


def test_a_tiny_decoder_learns_a_detection_sequence_and_decodes_it_in_one_pass():
    """One image, 3 boxes, fixed image tokens: the MAD loss (two masked copies, Hungarian targets, per-layer
    losses) falls, and one parallel pass then predicts the 3 boxes (within 2 bins) and no-object elsewhere."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    dec = M.MadDecoder(VOCAB, encoder_dim=8, dim=64, depth=1, heads=4, max_len=512)
    mem = torch.randn(1, 4, 8)
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.2, 0.6, 0.7, 0.95]])
    classes = torch.tensor([0, 2, 4])
    gt = torch.cat([VOCAB.coord(boxes), (VOCAB.class_base + classes)[:, None]], dim=1)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    losses = []
    for step in range(100):
        seq, _ = M.encode_detection(VOCAB, boxes, classes, g)
        loss = M.mad_loss(dec, mem, "det", seq[None], gt_boxes=[gt], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10]), (losses[:3], losses[-3:])
    pred, _ = M.decode_parallel(dec.eval(), mem, "det", torch.tensor([[VOCAB.prompt("det")]]))
    got, cls, _ = M.decode_detection(VOCAB, pred[0])
    assert sorted(cls.tolist()) == [0, 2, 4], cls
    for b, c in zip(boxes, classes):
        assert float((got[cls == c] - b).abs().max()) <= 2.0 / M.NUM_BINS


def test_iterative_and_autoregressive_decoding_fill_every_position():
    torch.manual_seed(0)
    dec = M.MadDecoder(VOCAB, encoder_dim=8, dim=32, depth=1, heads=4, max_len=64).eval()
    mem = torch.randn(3, 4, 8)
    prompt = torch.full((3, 1), VOCAB.prompt("cap"))
    for out in (M.decode_iterative(dec, mem, "cap", prompt), M.decode_autoregressive(dec, mem, "cap", prompt)):
        assert out.shape == (3, 21) and (out[:, 1:] >= VOCAB.caption_base).all() and (out[:, 0] == prompt[:, 0]).all()
