"""The architecture of a MultiMAE (arXiv 2204.01678) or MAE (arXiv 2111.06377) model as one dataclass.

:class:`MultiMAEConfig` lists every constructor argument of :class:`~polymae.models.multimae.MultiMAE` once,
with its default. ``config.to_dict()`` (``dataclasses.asdict`` made JSON-ready) is what training and
releases store as ``model_config.json["init_kwargs"]``, and :meth:`MultiMAEConfig.from_dict` reads such a
dict back, including the ones written before this class existed (same keys, same values).

Fields added after the first ``init_kwargs`` format (:data:`ADDED_FIELDS`) are written by ``to_dict()``
only when they differ from their default, so a model that does not use them writes exactly the file it
wrote before (and older polymae versions, whose ``from_dict`` rejects unknown keys, can still read it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = ["MultiMAEConfig", "ARCHS", "INPUT_MODALITIES", "OUTPUT_MODALITIES", "ADDED_FIELDS"]

#: per model family, the defaults that differ from the fields' own: none for ``"multimae"``
#: (:class:`~polymae.models.multimae.MultiMAE`), these for ``"mae"`` (:class:`~polymae.models.multimae.MAE`,
#: see :meth:`MultiMAEConfig.mae`)
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "multimae": {},
    "mae": dict(dim=768, depth=12, num_heads=12, in_modalities=("rgb",), out_modalities=("rgb",), decoder="mae",
                decoder_dim=512, decoder_depth=8, decoder_heads=16, num_global_tokens=1, encoder_norm=True,
                mask_ratio=0.75, norm_pix_loss=True),
}
#: model families: ``"multimae"`` and ``"mae"``
ARCHS = tuple(_ARCH_DEFAULTS)
#: modalities an input adapter exists for
INPUT_MODALITIES = ("rgb", "depth", "semseg")
#: modalities an output adapter exists for; ``norm_rgb`` is the reference's extra per-patch-normalised
#: RGB head (``extra_norm_pix_loss``), reconstructed from the rgb input and rgb mask
OUTPUT_MODALITIES = ("rgb", "depth", "semseg", "norm_rgb")
#: semseg targets are given at 1/4 of the image resolution, so the patch size must be divisible by 4
SEMSEG_STRIDE = 4
#: fields added after the first ``init_kwargs`` format, with the default that reproduces the earlier
#: behaviour; ``to_dict()`` leaves them out while they hold that default
ADDED_FIELDS: dict[str, Any] = {"extra_norm_pix_loss": False, "fp32_output_adapters": ()}


@dataclass(frozen=True)
class MultiMAEConfig:
    """Architecture, masking and loss settings of a :class:`~polymae.models.multimae.MultiMAE` / ``MAE``.

    Fields are normalised on creation, so that ``to_dict()`` equals the ``init_kwargs`` dict that models
    have always stored: ``img_size`` becomes an ``int`` when square and ``(H, W)`` otherwise (a list in
    ``to_dict()``), modality lists become tuples (lists in ``to_dict()``), ``out_modalities=None`` becomes
    ``in_modalities``, and ``mlp_ratio``, ``drop_path_rate``, ``mask_ratio`` and the ``loss_weights``
    values become ``float``, ``fp32_output_adapters`` a tuple, and ``extra_norm_pix_loss=True`` appends
    ``"norm_rgb"`` to ``out_modalities`` when it is not there. The object is frozen; use
    ``dataclasses.replace(cfg, **changes)`` (already resolved fields such as ``out_modalities`` are kept
    unless changed: turning ``extra_norm_pix_loss`` off that way keeps ``"norm_rgb"``; drop it from
    ``out_modalities`` too).

    ``MultiMAEConfig(**kw)`` starts from the MultiMAE defaults (ViT-Ti encoder, three modalities,
    cross-attention decoders, Dirichlet masking; MultiMAE Sec. 3); :meth:`mae` starts from the MAE ones;
    :meth:`from_dict` picks the defaults of ``d["arch"]``.

    Raises:
        ValueError: unknown arch, modality or decoder type; empty or repeated modalities; ``img_size``
            not an int or a pair, or not divisible by ``patch_size``; ``patch_size`` not divisible by 4 with
            a semseg output; ``num_global_tokens < 1``; ``mask_ratio`` outside ``[0, 1)``; a loss weight or
            an ``fp32_output_adapters`` entry for a modality that is not an output.
    """

    #: ``"multimae"`` or ``"mae"``: which model class (and set of defaults) the settings belong to
    arch: str = "multimae"
    #: image size in pixels (int, or ``(H, W)``) the fixed positional grids are built for; other input
    #: sizes are interpolated
    img_size: int | tuple[int, int] = 224
    #: patch side in pixels
    patch_size: int = 16
    #: encoder width D (default ViT-Ti)
    dim: int = 192
    #: number of encoder transformer blocks
    depth: int = 12
    #: attention heads per encoder block
    num_heads: int = 3
    #: MLP hidden width / D, in encoder and decoder blocks
    mlp_ratio: float = 4.0
    #: bias on the attention q, k, v projections
    qkv_bias: bool = True
    #: stochastic-depth rate of the encoder and decoder blocks
    drop_path_rate: float = 0.0
    #: encoded modalities, a non-empty subset of ``INPUT_MODALITIES`` (order = token order)
    in_modalities: tuple[str, ...] = ("rgb", "depth", "semseg")
    #: decoded modalities, a subset of ``OUTPUT_MODALITIES``; None = ``in_modalities``
    out_modalities: tuple[str, ...] | None = None
    #: number of semantic classes K of the semseg input and output
    semseg_num_classes: int = 151
    #: semseg label ignored in the input embedding and the loss
    semseg_ignore_index: int = 255
    #: class-embedding width of the semseg input adapter
    semseg_class_dim: int = 64
    #: ``"xattn"`` (MultiMAE cross-attention output adapters, Sec. 3.1) or ``"mae"`` (MAE self-attention
    #: decoder over all tokens); also selects the reference init and sin-cos channel order
    decoder: str = "xattn"
    #: decoder width
    decoder_dim: int = 256
    #: transformer blocks per decoder
    decoder_depth: int = 2
    #: attention heads per decoder block
    decoder_heads: int = 8
    #: add learned task (modality) embeddings to the cross-attention decoder's queries
    decoder_use_task_queries: bool = True
    #: learned global tokens prepended to the encoder sequence (MAE: the class token)
    num_global_tokens: int = 1
    #: final LayerNorm after the encoder (MAE has one, MultiMAE none)
    encoder_norm: bool = False
    #: visible tokens per sample for Dirichlet masking (Sec. 3.2), unless ``forward`` is told otherwise
    num_visible: int = 98
    #: when set, MAE per-modality random masking with this ratio (MAE Sec. 3) replaces Dirichlet masking
    mask_ratio: float | None = None
    #: rgb target normalised per patch (MAE Sec. 3, "normalized pixels") instead of normalised RGB
    norm_pix_loss: bool = False
    #: ``{modality: weight}`` of the per-modality losses (Sec. 3.3); missing modalities weigh 1.0
    loss_weights: Mapping[str, float] | None = None
    #: standardise the depth input and target per sample (:func:`~polymae.models.losses.standardize_depth`)
    standardize_depth: bool = True
    #: add a learned per-modality embedding to the input tokens
    modality_embed: bool = False
    #: the official MultiMAE pre-training recipe's extra head (``extra_norm_pix_loss``): a fourth output
    #: adapter ``norm_rgb``, built like the rgb one with its own weights, reconstructing the rgb input's
    #: per-patch-normalised pixels (MAE Sec. 3 "normalized pixels") on the rgb mask, beside the plain rgb
    #: loss; its loss weight is ``loss_weights["norm_rgb"]`` (default 1). True appends ``"norm_rgb"`` to
    #: ``out_modalities`` (listing ``"norm_rgb"`` there, the older spelling, builds the same model)
    extra_norm_pix_loss: bool = False
    #: output modalities whose adapters run in float32 with autocast off (inputs cast to float32), e.g.
    #: ``("semseg",)`` for a 151-way softmax under bf16 autocast; losses are always float32 regardless.
    #: Needs float32 weights (autocast mixed precision): in a model converted to bf16 the adapter runs in
    #: its weights' dtype
    fp32_output_adapters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__  # the dataclass is frozen: normalise once, here
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        h, w = _pair(self.img_size)
        setattr_(self, "img_size", h if h == w else (h, w))
        ins = tuple(self.in_modalities)
        outs = ins if self.out_modalities is None else tuple(self.out_modalities)
        setattr_(self, "extra_norm_pix_loss", bool(self.extra_norm_pix_loss))
        if self.extra_norm_pix_loss and "norm_rgb" not in outs:
            outs = outs + ("norm_rgb",)
        setattr_(self, "in_modalities", ins)
        setattr_(self, "out_modalities", outs)
        setattr_(self, "fp32_output_adapters", tuple(self.fp32_output_adapters))
        setattr_(self, "mlp_ratio", float(self.mlp_ratio))
        setattr_(self, "drop_path_rate", float(self.drop_path_rate))
        if self.mask_ratio is not None:
            setattr_(self, "mask_ratio", float(self.mask_ratio))
        if self.loss_weights is not None:
            setattr_(self, "loss_weights", {k: float(v) for k, v in self.loss_weights.items()})
        self._validate()

    def _validate(self) -> None:
        ins, outs = self.in_modalities, self.out_modalities
        for m in ins:
            if m not in INPUT_MODALITIES:
                raise ValueError(f"unknown input modality {m!r}; supported: {INPUT_MODALITIES}")
        for m in outs:
            if m not in OUTPUT_MODALITIES:
                raise ValueError(f"unknown output modality {m!r}; supported: {OUTPUT_MODALITIES}")
        if not ins or len(set(ins)) != len(ins) or len(set(outs)) != len(outs):
            raise ValueError("in_modalities must be non-empty; modalities must not repeat")
        if self.decoder not in ("xattn", "mae"):
            raise ValueError(f"decoder must be 'xattn' or 'mae', got {self.decoder!r}")
        if self.num_global_tokens < 1:
            raise ValueError("num_global_tokens must be >= 1")
        if self.mask_ratio is not None and not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        for m in self.loss_weights or {}:
            if m not in outs:
                raise ValueError(f"loss weight for {m!r}, which is not an output modality {list(outs)}")
        for m in self.fp32_output_adapters:
            if m not in outs:
                raise ValueError(f"fp32_output_adapters names {m!r}, which is not an output modality {list(outs)}")
        h, w = self.img_hw
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"img_size {(h, w)} is not divisible by patch_size {self.patch_size}")
        if "semseg" in outs and self.patch_size % SEMSEG_STRIDE:
            raise ValueError(f"patch_size {self.patch_size} must be divisible by {SEMSEG_STRIDE} for semseg")

    @property
    def img_hw(self) -> tuple[int, int]:
        """``(H, W)`` of ``img_size`` in pixels."""
        return _pair(self.img_size)

    @classmethod
    def for_arch(cls, arch: str, /, **overrides: Any) -> MultiMAEConfig:
        """The defaults of ``arch`` (``"multimae"``: the field defaults; ``"mae"``: see :meth:`mae`) with
        ``overrides`` (field names) applied; an ``arch`` among them sets the result's ``arch`` only.

        Raises:
            ValueError: unknown ``arch``, invalid values. TypeError: an override is not a field.
        """
        return cls(**{**_ARCH_DEFAULTS.get(arch, {}), "arch": arch, **overrides})

    @classmethod
    def mae(cls, **overrides: Any) -> MultiMAEConfig:
        """MAE (arXiv 2111.06377) settings with ``overrides`` applied.

        Defaults (Sec. 3, Table 1 and the reference ``mae_vit_*_dec512d8b``): ViT-B encoder (768-d, 12
        blocks, 12 heads) with a final LayerNorm and one class token, RGB in and out, random masking with
        ratio 0.75, self-attention decoder 512-d x 8 blocks x 16 heads over class + all patch tokens
        (``decoder="mae"``, also selecting MAE init and sin-cos order), normalised-pixel MSE loss.

        Raises:
            ValueError: invalid values. TypeError: an override is not a field.
        """
        return cls.for_arch("mae", **overrides)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MultiMAEConfig:
        """Read back a ``to_dict()`` / ``model.init_kwargs`` dict (e.g. ``model_config.json["init_kwargs"]``).

        Missing keys take the defaults of ``d["arch"]`` (``"multimae"`` when absent); JSON lists are
        accepted where tuples are stored.

        Raises:
            ValueError: a key that is not a field (named in the message), unknown ``arch``, invalid values.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in names]
        if unknown:
            raise ValueError(f"unknown MultiMAEConfig key(s) {', '.join(map(repr, unknown))}; "
                             f"known: {sorted(names)}")
        rest = dict(d)
        return cls.for_arch(rest.pop("arch", "multimae"), **rest)

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict(self)`` made JSON-ready (tuples -> lists), in field order, without the
        :data:`ADDED_FIELDS` that hold their default: the ``init_kwargs`` stored in ``model_config.json``
        (for settings that existed before, the same dict as earlier versions wrote)."""
        return {k: _jsonable(v) for k, v in dataclasses.asdict(self).items()
                if not (k in ADDED_FIELDS and v == ADDED_FIELDS[k])}


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(x) for x in v)
    if len(t) != 2:
        raise ValueError(f"expected an int or (height, width), got {v!r}")
    return t  # type: ignore[return-value]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v
