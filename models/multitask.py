"""A pre-trained ViT encoder with one decoder ("head") per task: the model of ``polymae multitask``.

The encoder is the RGB path of a pre-trained MultiMAE or MAE (:mod:`polymae.models.multimae`): its RGB input
adapter, global token(s), transformer blocks and final norm, kept as a :class:`~polymae.models.multimae.MultiMAE`
built with ``in_modalities=("rgb",)`` and no output adapters, so its parameter names are the pre-trained model's and
``models/interop.py`` exports it to timm unchanged. The heads are those of :mod:`polymae.models.heads`.

``model_config.json`` of a multitask run or release (docs/ARCHITECTURE.md, "Run folder and release")::

    {"name": "multitask_<preset>", "kind": "multitask",
     "init_kwargs": {...the encoder's MultiMAEConfig as a dict, rgb only, no outputs...},
     "heads": {"<task>": {"kind": "dpt_depth" | "convnext_seg" | "linear_cls" | "mad", "kwargs": {...}}, ...},
     "multitask": {"img_size": ..., "tasks": {"<task>": {"kind": "depth" | "semseg" | "cls" | "det" | ..., ...}}}}

Heads of kind ``"mad"`` (the sequence tasks det / seg / kpt / cap, issue 14) do not get a module each: they share
ONE :class:`~polymae.models.mad.MadDecoder`, ``sequence_decoder``, whose arguments every such spec repeats
(``kwargs`` = the decoder's arguments + ``"task"``, the MAD task it reads); its parameters appear once in the state
dict (``sequence_decoder.*``). Its "prediction" in training is the MAD loss of the batch (``mad_loss``), computed in
:meth:`MultiTaskModel.forward` so that it runs inside the engine's forward; at inference :meth:`MultiTaskModel.forward`
without a target returns the encoder's final tokens, the decoder's memory.

:func:`build_from_model_config` rebuilds either kind of model from such a dict.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from .heads import build_head
from .multimae import MultiMAE, build_from_init_kwargs

__all__ = ["MultiTaskModel", "encoder_init_kwargs", "is_multitask", "build_from_model_config",
           "load_encoder_state", "SEQUENCE_HEAD"]

#: the head kind of the sequence tasks that share one Masked AutoDecoder
SEQUENCE_HEAD = "mad"


def _sequence_decoder(heads: Mapping[str, Mapping[str, Any]]):
    """``(MadDecoder | None, {task: MAD task})`` of the ``"mad"`` head specs, which must agree on the decoder.

    Raises:
        ValueError: two specs with different decoder arguments.
    """
    from .mad import MadDecoder, MadVocab

    specs = {t: dict(h.get("kwargs", {})) for t, h in heads.items() if h["kind"] == SEQUENCE_HEAD}
    if not specs:
        return None, {}
    args = {t: {k: v for k, v in kw.items() if k != "task"} for t, kw in specs.items()}
    first = next(iter(args.values()))
    for t, a in args.items():
        if a != first:
            raise ValueError(f"sequence head {t!r} has decoder arguments {a}, another {first}: they share one decoder")
    a = dict(first)
    vocab = MadVocab(num_classes=int(a.pop("num_classes")), caption_vocab=int(a.pop("caption_vocab", 0)))
    return MadDecoder(vocab, **a), {t: kw["task"] for t, kw in specs.items()}


def encoder_init_kwargs(init_kwargs: Mapping[str, Any]) -> dict:
    """The ``init_kwargs`` of the RGB-only encoder of a pre-trained model's ``init_kwargs``: RGB input, no output
    adapters (so no decoder weights), no extra heads; everything else (size, width, depth, norm) unchanged."""
    out = dict(init_kwargs)
    out.update(in_modalities=["rgb"], out_modalities=[], loss_weights=None)
    out.pop("extra_norm_pix_loss", None)
    out.pop("fp32_output_adapters", None)
    return out


def is_multitask(model_config: Mapping[str, Any]) -> bool:
    """Whether a ``model_config.json`` dict describes a multitask model (encoder + heads)."""
    return model_config.get("kind") == "multitask" or "heads" in model_config


class MultiTaskModel(nn.Module):
    """Shared encoder + one head per task.

    Args:
        encoder_kwargs: the encoder's ``init_kwargs`` (:func:`encoder_init_kwargs`).
        heads: ``{task: {"kind": head kind, "kwargs": {...}}}`` (``models/heads.py``, :data:`~polymae.models.heads.HEADS`).
    Attributes:
        encoder: the RGB-only :class:`MultiMAE` / ``MAE``; heads: ``nn.ModuleDict`` by task name (not the sequence
        tasks); sequence_decoder: the shared :class:`~polymae.models.mad.MadDecoder` of the ``"mad"`` heads (or
        None); sequence_tasks: ``{task name: MAD task}``; init_kwargs: ``encoder_kwargs``; head_specs: ``heads``.
    Raises:
        ValueError: no heads, invalid encoder settings or head kinds, or sequence heads that disagree on the decoder.
    """

    def __init__(self, encoder_kwargs: Mapping[str, Any], heads: Mapping[str, Mapping[str, Any]]):
        super().__init__()
        if not heads:
            raise ValueError("a multitask model needs at least one head")
        self.encoder: MultiMAE = build_from_init_kwargs(encoder_kwargs)
        self.init_kwargs = dict(self.encoder.init_kwargs)
        self.head_specs = {t: {"kind": h["kind"], "kwargs": dict(h.get("kwargs", {}))} for t, h in heads.items()}
        self.heads = nn.ModuleDict({t: build_head(h["kind"], **h["kwargs"]) for t, h in self.head_specs.items()
                                    if h["kind"] != SEQUENCE_HEAD})
        self.sequence_decoder, self.sequence_tasks = _sequence_decoder(self.head_specs)

    def encode(self, rgb: torch.Tensor) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Every encoder block's output on the fully visible image.

        Args:
            rgb: ``[B, 3, H, W]`` ImageNet-normalised (``datasets/transforms.py`` ``to_model_inputs``).
        Returns:
            ``(feats, (h, w))``: ``depth`` tensors ``[B, G + h*w, D]`` (the last after the encoder's final norm) and
            the patch grid.
        """
        enc = self.encoder
        tokens = enc.input_adapters["rgb"](rgb)
        x = torch.cat([enc.global_tokens.expand(rgb.shape[0], -1, -1), tokens.to(enc.global_tokens.dtype)], dim=1)
        feats = []
        for block in enc.encoder:
            x = block(x)
            feats.append(x)
        feats[-1] = enc.encoder_norm(feats[-1])
        grid = (rgb.shape[-2] // enc.patch_size, rgb.shape[-1] // enc.patch_size)
        return feats, grid

    def forward(self, rgb: torch.Tensor, task: str, out_size: Sequence[int] | None = None,
                touch_all: bool = False, target: Mapping[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``task``'s prediction on ``rgb``.

        Args:
            rgb: ``[B, 3, H, W]``; task: a head name; out_size: ``(H', W')`` of a dense prediction (default
                ``(H, W)``).
            touch_all: also run every other head on the first sample's detached features and return their sum
                times 0 (DeepSpeed ZeRO-3 needs every parameter in every backward: ``pipeline/train/mt_adamw.py``).
            target: sequence tasks in training: ``{"tokens" [B', L], "image_index" [B'] (row of ``rgb`` of each
                sequence; default one per image), "loss_weight", "gt_boxes", "references" (``mad_loss``), "seed"
                (of the masking)}``.
        Returns:
            ``(prediction, zero)``: depth ``[B, 1, H', W']``, semseg logits ``[B, K, H', W']``, class logits
            ``[B, K]``; sequence tasks: the scalar MAD loss with a ``target``, else the decoder's memory (the
            encoder's final tokens ``[B, G + h*w, D]``); ``zero`` a scalar 0 to add to the loss (connected to the
            other heads when ``touch_all``).
        Raises:
            KeyError: unknown task.
        """
        if task not in self.heads and task not in self.sequence_tasks:
            raise KeyError(f"no head for task {task!r}; heads: {list(self.heads) + list(self.sequence_tasks)}")
        feats, grid = self.encode(rgb)
        size = tuple(out_size) if out_size is not None else tuple(rgb.shape[-2:])
        if task in self.sequence_tasks:
            pred = feats[-1] if target is None else self._sequence_loss(feats[-1], task, target)
        else:
            pred = self.heads[task](feats, grid, size)
        zero = pred.new_zeros((), dtype=torch.float32)
        if touch_all:
            few = [f[:1].detach() for f in feats]
            for name, head in self.heads.items():
                if name != task:
                    zero = zero + 0.0 * head(few, grid, size).float().sum()
            if self.sequence_decoder is not None and task not in self.sequence_tasks:
                mad_task = next(iter(self.sequence_tasks.values()))
                probe = torch.full((1, 2), self.sequence_decoder.vocab.MASK, dtype=torch.long, device=rgb.device)
                logits = self.sequence_decoder(probe, few[-1], mad_task)
                zero = zero + 0.0 * logits.masked_fill(torch.isinf(logits), 0).float().sum()
        return pred, zero

    def _sequence_loss(self, memory: torch.Tensor, task: str, target: Mapping[str, Any]) -> torch.Tensor:
        """The MAD loss (``models/mad.py`` ``mad_loss``) of a sequence task's batch on the memory ``[B, N, E]``."""
        from .mad import mad_loss

        idx = target.get("image_index")
        mem = memory if idx is None else memory[idx.to(memory.device)]
        gen = torch.Generator().manual_seed(int(target.get("seed", 0)))
        return mad_loss(self.sequence_decoder, mem, self.sequence_tasks[task], target["tokens"],
                        loss_weight=target.get("loss_weight"), gt_boxes=target.get("gt_boxes"),
                        references=target.get("references"), generator=gen)


def load_encoder_state(model: MultiTaskModel, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Copy a pre-trained MultiMAE/MAE state dict's encoder tensors (RGB input adapter, global tokens, blocks,
    final norm) into ``model.encoder``; returns the pre-trained keys left out (other modalities, decoders).

    Raises:
        KeyError: an encoder tensor missing from ``state_dict`` (names it).
        ValueError: a shape that differs (another preset or patch size).
    """
    own = model.encoder.state_dict()
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise KeyError(f"the pre-trained state dict lacks encoder tensors {missing[:5]}")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: pre-trained shape {tuple(state_dict[k].shape)} != encoder {tuple(v.shape)}")
    model.encoder.load_state_dict({k: state_dict[k] for k in own}, strict=True)
    return sorted(k for k in state_dict if k not in own)


def build_from_model_config(model_config: Mapping[str, Any]) -> nn.Module:
    """A freshly initialised model from a ``model_config.json`` dict: a :class:`MultiTaskModel` when it has
    ``heads`` (:func:`is_multitask`), else the MultiMAE/MAE of its ``init_kwargs``. Load the weights afterwards.

    Raises:
        ValueError: invalid ``init_kwargs`` or head kinds.
    """
    if is_multitask(model_config):
        return MultiTaskModel(model_config["init_kwargs"], model_config["heads"])
    return build_from_init_kwargs(model_config["init_kwargs"])
