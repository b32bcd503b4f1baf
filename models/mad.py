"""Masked AutoDecoder (MAD; Qiu et al., "Masked AutoDecoder is Effective Multi-Task Vision Generalist", CVPR 2024,
arXiv 2403.07692): sparse vision tasks as token sequences that one shared transformer decoder fills in from masked
copies, reading the image encoder's tokens through cross-attention, and decodes in parallel at inference.

Written from the paper (Sec. 3: task sequences, masked sequence modelling, parallel decoding); the public MAD code
is under a non-commercial licence and was not used.

**Vocabulary** (:class:`MadVocab`, one for all tasks): ``[PAD]``, ``[MASK]``, four task prompts, foreground /
background, visible / invisible, ``num_classes`` class tokens and a no-object class, :data:`NUM_BINS` coordinate
bins (a normalised coordinate ``x`` in [0, 1] is bin ``floor(x * 500)``, read back as the bin centre), then the
caption tokenizer's tokens. Each task predicts only its own part (:meth:`MadVocab.task_mask`).

**Sequences** (prompt first; the decoder is trained to fill every position after the prompt):

* detection ``det``: ``[DET]`` + :data:`DET_SLOTS` slots of ``[x0 y0 x1 y1 class]`` (501 tokens); ground-truth
  boxes sit in random slots, the others hold noise boxes of class no-object; the loss matches slots to boxes with
  the Hungarian algorithm (:func:`match_slots`) and trains unmatched slots on no-object in their class token only;
* instance segmentation ``seg``: ``[SEG] x0 y0 x1 y1 class`` + a :data:`SEG_GRID` x :data:`SEG_GRID` grid of
  foreground / background tokens inside the box (262 tokens);
* keypoints ``kpt``: ``[KPT] x0 y0 x1 y1 class`` + :data:`NUM_KEYPOINTS` x ``[x y visibility]`` (57 tokens);
  keypoints that are not labelled (COCO ``v = 0``) carry no coordinate loss;
* captioning ``cap``: ``[CAP]`` + :data:`CAPTION_LEN` caption tokens (a Hugging Face ``tokenizers`` word-level
  tokenizer trained on the training captions, ``datasets.captions.train_caption_tokenizer``), padded with the
  tokenizer's pad (id 0).

**Training** (:func:`mad_loss`): each target appears twice, fully masked and with 70 % of its non-prompt tokens
masked; cross-entropy on masked tokens only, averaged over every decoder layer's output (auxiliary losses, the
shared head on each layer). Captions: the fully masked copy is scored against the reference with the lowest loss.
**Inference**: :func:`decode_parallel` (one pass), :func:`decode_iterative` (captions: passes at mask ratios 1.0,
0.8, 0.6, 0.4 re-masking the least confident tokens) and :func:`decode_autoregressive` (the same decoder with
causal self-attention, one token per pass, for comparison).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

NUM_BINS = 500
DET_SLOTS = 100
SEG_GRID = 16
NUM_KEYPOINTS = 17
CAPTION_LEN = 20
TASKS = ("det", "seg", "kpt", "cap")
#: tokens before the part the decoder fills: the task prompt (+ box and class for seg / kpt)
PROMPT_LEN = {"det": 1, "seg": 6, "kpt": 6, "cap": 1}
SEQ_LEN = {"det": 1 + 5 * DET_SLOTS, "seg": 6 + SEG_GRID * SEG_GRID, "kpt": 6 + 3 * NUM_KEYPOINTS,
           "cap": 1 + CAPTION_LEN}
IGNORE = -100


@dataclass(frozen=True)
class MadVocab:
    """The shared token vocabulary (module docstring). Token ids: ``0`` PAD, ``1`` MASK, ``2-5`` task prompts,
    ``6/7`` foreground/background, ``8/9`` visible/invisible, then classes, no-object, coordinate bins, caption."""

    num_classes: int
    caption_vocab: int = 0
    PAD: int = 0
    MASK: int = 1
    FG: int = 6
    BG: int = 7
    VIS: int = 8
    INVIS: int = 9

    @property
    def class_base(self) -> int:
        return 10

    @property
    def no_object(self) -> int:
        return self.class_base + self.num_classes

    @property
    def coord_base(self) -> int:
        return self.no_object + 1

    @property
    def caption_base(self) -> int:
        return self.coord_base + NUM_BINS

    @property
    def size(self) -> int:
        return self.caption_base + self.caption_vocab

    def prompt(self, task: str) -> int:
        """The task prompt token of ``task`` (one of :data:`TASKS`)."""
        return 2 + TASKS.index(task)

    def coord(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens of normalised coordinates ``x`` (any shape, values in [0, 1]): ``floor(x * 500)``, clamped."""
        return self.coord_base + (x * NUM_BINS).floor().clamp(0, NUM_BINS - 1).long()

    def coord_value(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised coordinates (bin centres) of coordinate tokens; other tokens give values outside [0, 1]."""
        return (tokens - self.coord_base).float().add(0.5) / NUM_BINS

    def task_mask(self, task: str) -> torch.Tensor:
        """``[size]`` bool: the tokens task ``task`` may predict."""
        m = torch.zeros(self.size, dtype=torch.bool)
        if task == "det":
            m[self.class_base:self.no_object + 1] = True
            m[self.coord_base:self.caption_base] = True
        elif task == "seg":
            m[[self.FG, self.BG]] = True
        elif task == "kpt":
            m[[self.VIS, self.INVIS]] = True
            m[self.coord_base:self.caption_base] = True
        elif task == "cap":
            m[self.caption_base:] = True
        else:
            raise ValueError(f"unknown task {task!r}; tasks: {TASKS}")
        return m


# -- sequences ----------------------------------------------------------------------------------------------------
def _box_tokens(vocab: MadVocab, box: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """``[..., 5]`` tokens of normalised xyxy boxes ``[..., 4]`` and class indices ``[...]``."""
    return torch.cat([vocab.coord(box), (vocab.class_base + cls.long()).unsqueeze(-1)], dim=-1)


def noise_boxes(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[n, 4]`` random normalised xyxy boxes (centre uniform, sides 5-50 % of the image), the slots' filler."""
    c = torch.rand(n, 2, generator=generator)
    wh = 0.05 + 0.45 * torch.rand(n, 2, generator=generator)
    return torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(0, 1)


def encode_detection(vocab: MadVocab, boxes: torch.Tensor, classes: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The detection sequence of one image: ``([501] tokens, [100] slot -> box index or -1)``.

    Args:
        boxes: ``[n, 4]`` normalised xyxy boxes (n <= 100); classes: ``[n]`` class indices.
    Raises:
        ValueError: more than :data:`DET_SLOTS` boxes.
    """
    n = len(boxes)
    if n > DET_SLOTS:
        raise ValueError(f"{n} boxes, at most {DET_SLOTS} slots")
    slots = torch.randperm(DET_SLOTS, generator=generator)[:n]
    assign = torch.full((DET_SLOTS,), -1, dtype=torch.long)
    assign[slots] = torch.arange(n)
    body = _box_tokens(vocab, noise_boxes(DET_SLOTS, generator), torch.full((DET_SLOTS,), vocab.num_classes))
    if n:
        body[slots] = _box_tokens(vocab, boxes, classes)
    return torch.cat([torch.tensor([vocab.prompt("det")]), body.reshape(-1)]), assign


def decode_detection(vocab: MadVocab, tokens: torch.Tensor, scores: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(boxes [m, 4], classes [m], scores [m])`` of the slots of a ``[501]`` sequence whose class token is an
    object (not no-object); ``scores``: ``[100]`` class-token probabilities (default 1)."""
    body = tokens[1:].reshape(DET_SLOTS, 5)
    cls = body[:, 4] - vocab.class_base
    keep = (cls >= 0) & (cls < vocab.num_classes)
    boxes = vocab.coord_value(body[:, :4]).clamp(0, 1)
    s = scores if scores is not None else torch.ones(DET_SLOTS)
    return boxes[keep], cls[keep], s[keep]


def encode_segmentation(vocab: MadVocab, box: torch.Tensor, cls: int, mask: np.ndarray) -> torch.Tensor:
    """``[262]`` tokens: ``[SEG]``, the box (normalised xyxy ``[4]``), the class, then the 16 x 16 grid of the
    instance ``mask`` (``[H, W]`` bool, the whole image) inside the box: a cell is foreground when at least half
    of its pixels are (area resampling)."""
    h, w = mask.shape
    x0, y0, x1, y1 = (box * torch.tensor([w, h, w, h])).tolist()
    x0, y0 = int(math.floor(x0)), int(math.floor(y0))
    x1, y1 = max(int(math.ceil(x1)), x0 + 1), max(int(math.ceil(y1)), y0 + 1)
    crop = torch.from_numpy(mask[y0:y1, x0:x1].astype(np.float32))[None, None]
    grid = F.interpolate(crop, size=(SEG_GRID, SEG_GRID), mode="area")[0, 0] >= 0.5
    body = torch.where(grid, vocab.FG, vocab.BG).reshape(-1)
    head = torch.cat([torch.tensor([vocab.prompt("seg")]), _box_tokens(vocab, box, torch.tensor(cls))])
    return torch.cat([head, body])


def decode_segmentation(vocab: MadVocab, tokens: torch.Tensor, box: torch.Tensor, height: int, width: int
                        ) -> np.ndarray:
    """The ``[height, width]`` bool mask of a segmentation sequence's grid pasted into ``box`` (normalised xyxy)."""
    grid = (tokens[PROMPT_LEN["seg"]:] == vocab.FG).reshape(SEG_GRID, SEG_GRID).float()
    x0, y0, x1, y1 = (box * torch.tensor([width, height, width, height])).tolist()
    x0, y0 = int(math.floor(x0)), int(math.floor(y0))
    x1, y1 = max(int(math.ceil(x1)), x0 + 1), max(int(math.ceil(y1)), y0 + 1)
    out = np.zeros((height, width), dtype=bool)
    up = F.interpolate(grid[None, None], size=(y1 - y0, x1 - x0), mode="nearest")[0, 0] >= 0.5
    out[y0:y1, x0:x1] = up.numpy()[: height - y0, : width - x0]
    return out


def encode_keypoints(vocab: MadVocab, box: torch.Tensor, cls: int, keypoints: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``([57] tokens, [57] bool: position carries a loss)``: ``[KPT]``, box, class, then 17 x ``[x y v]`` with
    ``keypoints`` ``[17, 3]`` = normalised x, y and COCO visibility (0 not labelled, 1 labelled hidden, 2
    visible); a labelled point (v > 0) gets the visible token, else invisible, whose coordinates carry no loss."""
    labelled = keypoints[:, 2] > 0
    xy = vocab.coord(keypoints[:, :2].clamp(0, 1))
    vis = torch.where(labelled, vocab.VIS, vocab.INVIS)
    body = torch.cat([xy, vis[:, None]], dim=1).reshape(-1)
    weight = torch.stack([labelled, labelled, torch.ones_like(labelled)], dim=1).reshape(-1)
    head = torch.cat([torch.tensor([vocab.prompt("kpt")]), _box_tokens(vocab, box, torch.tensor(cls))])
    return torch.cat([head, body]), torch.cat([torch.zeros(PROMPT_LEN["kpt"], dtype=torch.bool), weight])


def decode_keypoints(vocab: MadVocab, tokens: torch.Tensor) -> torch.Tensor:
    """``[17, 3]``: normalised x, y and visibility (2 for the visible token, else 0) of a keypoint sequence."""
    body = tokens[PROMPT_LEN["kpt"]:].reshape(NUM_KEYPOINTS, 3)
    xy = vocab.coord_value(body[:, :2]).clamp(0, 1)
    return torch.cat([xy, torch.where(body[:, 2:] == vocab.VIS, 2.0, 0.0)], dim=1)


def encode_caption(vocab: MadVocab, tokenizer, text: str) -> torch.Tensor:
    """``[21]`` tokens: ``[CAP]`` + the first 20 caption tokens of ``text``, padded with the tokenizer's pad."""
    ids = tokenizer.encode(text).ids[:CAPTION_LEN]
    ids = ids + [0] * (CAPTION_LEN - len(ids))
    return torch.tensor([vocab.prompt("cap")] + [vocab.caption_base + i for i in ids])


def decode_caption(vocab: MadVocab, tokenizer, tokens: torch.Tensor) -> str:
    """The text of a caption sequence (pad tokens dropped)."""
    ids = [int(t) - vocab.caption_base for t in tokens[1:]]
    return tokenizer.decode([i for i in ids if i > 0])


# -- the decoder --------------------------------------------------------------------------------------------------
class MadDecoder(nn.Module):
    """The shared sequence decoder: ``depth`` pre-norm transformer layers (``torch.nn.TransformerDecoderLayer``:
    self-attention over the task sequence, bidirectional or causal, cross-attention to the image tokens, MLP) and
    an output head tied to the input embeddings: cosine similarity between the normalised hidden state and the
    normalised token embeddings times a learnable scale, restricted to the task's vocabulary.

    Args:
        vocab: the token vocabulary; encoder_dim: width ``E`` of the image tokens; dim, depth, heads: decoder
            width (256), layers (6), attention heads (8); max_len: longest sequence (positions).
    """

    def __init__(self, vocab: MadVocab, encoder_dim: int, dim: int = 256, depth: int = 6, heads: int = 8,
                 mlp_ratio: float = 4.0, max_len: int = 512):
        super().__init__()
        self.vocab, self.dim = vocab, dim
        self.embed = nn.Embedding(vocab.size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_len, dim))
        self.memory_proj = nn.Sequential(nn.LayerNorm(encoder_dim), nn.Linear(encoder_dim, dim))
        self.layers = nn.ModuleList(nn.TransformerDecoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0,
                                                               activation="gelu", batch_first=True, norm_first=True)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.logit_scale = nn.Parameter(torch.tensor([math.log(10.0)]))  # [1]: DeepSpeed cannot broadcast 0-dim
        for t in TASKS:
            self.register_buffer(f"vocab_mask_{t}", vocab.task_mask(t), persistent=False)
        nn.init.trunc_normal_(self.pos, std=0.02)
        nn.init.trunc_normal_(self.embed.weight, std=0.02)

    def logits(self, hidden: torch.Tensor, task: str) -> torch.Tensor:
        """``[B, L, V]`` logits of hidden states ``[B, L, D]`` (tied cosine head, other tasks' tokens at -inf)."""
        h = F.normalize(self.norm(hidden), dim=-1)
        e = F.normalize(self.embed.weight, dim=-1)
        out = self.logit_scale.exp() * h @ e.t()
        return out.masked_fill(~getattr(self, f"vocab_mask_{task}"), float("-inf"))

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor, task: str, causal: bool = False,
                all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``[B, L, V]`` for ``tokens`` ``[B, L]`` (``[MASK]`` where unknown) given image tokens
        ``memory`` ``[B, N, E]``; ``causal``: each position sees only itself and earlier ones; ``all_layers``:
        the list of every layer's logits (auxiliary losses), the last one being the output."""
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        mem = self.memory_proj(memory)
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], device=tokens.device) if causal else None
        outs = []
        for layer in self.layers:
            x = layer(x, mem, tgt_mask=mask, tgt_is_causal=causal)
            if all_layers:
                outs.append(self.logits(x, task))
        return outs if all_layers else self.logits(x, task)


# -- training -----------------------------------------------------------------------------------------------------
def mask_tokens(tokens: torch.Tensor, task: str, ratio: float, mask_id: int,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, masked)`` for ``tokens`` ``[B, L]``: ``ratio`` of each sequence's non-prompt positions (rounded,
    at least one) replaced by ``[MASK]``; ``masked`` ``[B, L]`` bool. The prompt stays visible."""
    b, length = tokens.shape
    p = PROMPT_LEN[task]
    n = max(1, round(ratio * (length - p)))
    order = torch.rand(b, length - p, generator=generator).argsort(dim=1)  # drawn on the CPU generator
    masked = torch.zeros(b, length, dtype=torch.bool)
    masked[:, p:] = order < n
    masked = masked.to(tokens.device)
    return tokens.masked_fill(masked, mask_id), masked


def match_slots(logprobs: torch.Tensor, gt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Hungarian matching of detection slots to ground-truth boxes (``scipy.optimize.linear_sum_assignment``) on
    the mean cross-entropy of a box's 5 tokens. ``logprobs`` ``[100, 5, V]`` (one image's slots), ``gt``
    ``[n, 5]`` tokens. Returns ``(slot indices, box indices)``, each ``[min(n, 100)]``."""
    from scipy.optimize import linear_sum_assignment

    if len(gt) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    idx = gt.to(logprobs.device).t().unsqueeze(0).expand(logprobs.shape[0], -1, -1)  # [S, 5, n]
    cost = -torch.gather(logprobs, 2, idx).mean(1)  # [S, n]
    rows, cols = linear_sum_assignment(cost.detach().double().cpu().numpy())
    return rows, cols


def match_slots_brute_force(logprobs: torch.Tensor, gt: torch.Tensor) -> float:
    """The lowest total matching cost over every assignment (tests: tiny cases only)."""
    idx = gt.t().unsqueeze(0).expand(logprobs.shape[0], -1, -1)
    cost = (-torch.gather(logprobs, 2, idx).mean(1)).double()
    return min(sum(float(cost[s, j]) for j, s in enumerate(slots))
               for slots in itertools.permutations(range(cost.shape[0]), cost.shape[1]))


def detection_targets(vocab: MadVocab, logprobs: torch.Tensor, gt_tokens: list[torch.Tensor]) -> torch.Tensor:
    """``[B, 501]`` targets of the detection loss: each image's matched slots take their box's 5 tokens, the
    unmatched slots no-object in the class token only (coordinates :data:`IGNORE`); the prompt is ignored.
    ``logprobs`` ``[B, 501, V]``; ``gt_tokens``: per image ``[n, 5]``."""
    b = logprobs.shape[0]
    tgt = torch.full((b, DET_SLOTS, 5), IGNORE, dtype=torch.long)
    tgt[:, :, 4] = vocab.no_object
    slots = logprobs[:, 1:].reshape(b, DET_SLOTS, 5, -1)
    for i, gt in enumerate(gt_tokens):
        rows, cols = match_slots(slots[i], gt)
        tgt[i, torch.as_tensor(rows)] = gt.cpu()[torch.as_tensor(cols)]
    out = torch.cat([torch.full((b, 1), IGNORE, dtype=torch.long), tgt.reshape(b, -1)], dim=1)
    return out.to(logprobs.device)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not :data:`IGNORE` (0 when there are none)."""
    valid = targets != IGNORE
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], targets[valid])


def mad_loss(decoder: MadDecoder, memory: torch.Tensor, task: str, tokens: torch.Tensor,
             loss_weight: torch.Tensor | None = None, gt_boxes: list[torch.Tensor] | None = None,
             references: list[torch.Tensor] | None = None, partial_ratio: float = 0.7,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The MAD training loss of a batch of one task (module docstring).

    Args:
        memory: image tokens ``[B, N, E]``; tokens: target sequences ``[B, L]``.
        loss_weight: ``[B, L]`` bool, positions that may carry a loss (keypoints: unlabelled coordinates not).
        gt_boxes: detection: per image ``[n, 5]`` ground-truth box tokens (targets by :func:`detection_targets`).
        references: captions: per image ``[R, L]`` reference sequences; the fully masked copy is scored against
            the one with the lowest loss (``tokens`` holds the reference the 70 % copy shows).
    Returns:
        scalar: cross-entropy on masked positions, averaged over the two copies and over every layer's output.
    """
    b = tokens.shape[0]
    full_in, full_m = mask_tokens(tokens, task, 1.0, decoder.vocab.MASK, generator)
    part_in, part_m = mask_tokens(tokens, task, partial_ratio, decoder.vocab.MASK, generator)
    inputs, masked = torch.cat([full_in, part_in]), torch.cat([full_m, part_m])
    layers = decoder(inputs, torch.cat([memory, memory]), task, all_layers=True)
    if task == "det":
        targets = detection_targets(decoder.vocab, layers[-1].detach().log_softmax(-1), list(gt_boxes) * 2)
    else:
        targets = torch.cat([tokens, tokens])
    if loss_weight is not None:
        targets = targets.masked_fill(~torch.cat([loss_weight, loss_weight]), IGNORE)
    targets = targets.masked_fill(~masked, IGNORE)
    total = 0.0
    for logits in layers:
        if task == "cap" and references is not None:
            total = total + _caption_loss(logits, targets, references, full_m)
        else:
            total = total + _ce(logits, targets)
    return total / len(layers)


def _caption_loss(logits: torch.Tensor, targets: torch.Tensor, references: list[torch.Tensor],
                  full_masked: torch.Tensor) -> torch.Tensor:
    """Caption loss of one layer: the partially masked half against its own reference, the fully masked half
    against each image's best reference (lowest mean cross-entropy); the two halves' means averaged."""
    b = len(references)
    part = _ce(logits[b:], targets[b:])
    logp = logits[:b].log_softmax(-1)
    best = []
    for i, refs in enumerate(references):
        valid, refs = full_masked[i], refs.to(logp.device)
        nll = -torch.gather(logp[i, valid].unsqueeze(0).expand(len(refs), -1, -1), 2,
                            refs[:, valid].unsqueeze(-1)).squeeze(-1).mean(1)
        best.append(nll.min())
    return 0.5 * (part + torch.stack(best).mean())


# -- inference ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_parallel(decoder: MadDecoder, memory: torch.Tensor, task: str, prompt: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass: ``prompt`` ``[B, P]`` followed by ``[MASK]`` up to the task's length, every position predicted
    at once. Returns ``(tokens [B, L], confidence [B, L])`` (confidence 1 on the prompt)."""
    b, p = prompt.shape
    tokens = torch.full((b, SEQ_LEN[task]), decoder.vocab.MASK, dtype=torch.long, device=prompt.device)
    tokens[:, :p] = prompt
    probs = decoder(tokens, memory, task).softmax(-1)
    conf, pred = probs.max(-1)
    pred[:, :p], conf[:, :p] = prompt, 1.0
    return pred, conf


@torch.no_grad()
def decode_iterative(decoder: MadDecoder, memory: torch.Tensor, task: str, prompt: torch.Tensor,
                     ratios: Sequence[float] = (1.0, 0.8, 0.6, 0.4)) -> torch.Tensor:
    """Passes at decreasing mask ratios: after each pass the least confident ``ratios[i + 1]`` of the non-prompt
    positions are masked again and predicted anew with the others visible; returns ``[B, L]`` tokens."""
    b, p = prompt.shape
    length = SEQ_LEN[task]
    tokens = torch.full((b, length), decoder.vocab.MASK, dtype=torch.long, device=prompt.device)
    tokens[:, :p] = prompt
    for i, _ in enumerate(ratios):
        probs = decoder(tokens, memory, task).softmax(-1)
        conf, pred = probs.max(-1)
        still = tokens == decoder.vocab.MASK
        tokens = torch.where(still, pred, tokens)
        if i + 1 == len(ratios):
            break
        n = round(ratios[i + 1] * (length - p))
        conf = conf.masked_fill(~still, float("inf"))  # kept tokens stay
        conf[:, :p] = float("inf")
        remask = conf.argsort(dim=1)[:, :n]
        tokens = tokens.scatter(1, remask, decoder.vocab.MASK)
    return tokens


@torch.no_grad()
def decode_autoregressive(decoder: MadDecoder, memory: torch.Tensor, task: str, prompt: torch.Tensor
                          ) -> torch.Tensor:
    """The same decoder with causal self-attention, one token per pass, greedy: the next position is fed as
    ``[MASK]`` (as in training, a position predicts its own token) and sees only the tokens before it. No
    key/value cache: each pass re-reads the prefix. Returns ``[B, L]`` tokens."""
    tokens = prompt.clone()
    mask = torch.full((prompt.shape[0], 1), decoder.vocab.MASK, dtype=torch.long, device=prompt.device)
    while tokens.shape[1] < SEQ_LEN[task]:
        logits = decoder(torch.cat([tokens, mask], dim=1), memory, task, causal=True)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


__all__ = ["MadVocab", "MadDecoder", "NUM_BINS", "DET_SLOTS", "SEG_GRID", "NUM_KEYPOINTS", "CAPTION_LEN", "TASKS",
           "SEQ_LEN", "PROMPT_LEN", "encode_detection", "decode_detection", "encode_segmentation",
           "decode_segmentation", "encode_keypoints", "decode_keypoints",
           "encode_caption", "decode_caption", "mask_tokens", "match_slots", "detection_targets", "mad_loss",
           "decode_parallel", "decode_iterative", "decode_autoregressive", "noise_boxes"]
