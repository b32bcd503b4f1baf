"""Pseudo-label teachers: Hugging Face ``transformers`` depth and semantic-segmentation models behind one
interface (MultiMAE, Bachmann et al. 2022, Sec. 3.2: pseudo labels from off-the-shelf networks).

A :class:`Teacher` maps RGB images of any size to dense maps at each image's *original* size::

    predict(list of uint8 [H, W, 3]) -> list of float32 [H, W]   (depth)
                                     -> list of int64   [H, W]   (semseg class ids in [0, num_classes))

Registry (:data:`REGISTRY`, names used by the label job):

==================  =======  ====================================  ==========================
name                task     transformers class                    input sides
==================  =======  ====================================  ==========================
``dpt``             depth    ``DPTForDepthEstimation``             multiple of 32 (square for
                                                                   the plain-ViT DPT)
``depth_anything``  depth    ``DepthAnythingForDepthEstimation``   multiple of 14
``segformer``       semseg   ``SegformerForSemanticSegmentation``  multiple of 32
``mask2former``     semseg   ``Mask2FormerForUniversalSegmentation`` multiple of 32
``oneformer``       semseg   ``OneFormerForUniversalSegmentation``  multiple of 32 (task
                                                                   ``semantic``)
==================  =======  ====================================  ==========================

Resolution policy (:func:`native_input`, :func:`fit_size`): by default a teacher runs at the *native* input
size its image processor declares (``size``: ``height``/``width`` or ``shortest_edge``/``longest_edge``;
``ensure_multiple_of``; e.g. 384 for DPT, 518 for Depth Anything, 512 for SegFormer), resized with the
processor's own ``resample`` (bicubic for DPT and Depth Anything, bilinear for SegFormer and the
Mask2Former/OneFormer processors; antialiased when shrinking). ``short_side`` overrides the native short side
(rounded to the model's ``multiple``). The image is resized so that its short side is ``short_side`` and both
sides are multiples of ``multiple``, keeping the aspect ratio; a processor's ``longest_edge`` (else
``MAX_ASPECT x short_side``) caps the long side by shrinking both sides, never by squashing. The plain-ViT DPT
reassembles its tokens into a square grid, so it gets a ``short_side x short_side`` square like its own image
processor does. (Depth Anything's HF processor scales as little as possible, which for images smaller than
518 px makes the *long* side 518; we follow its reference inference, ``resize_method="lower_bound"``: short side
518.) The prediction is resized back to the original size: bilinear for depth; for semseg the class scores from
the image processor's ``post_process_semantic_segmentation`` are upsampled bilinearly and arg-maxed
(:func:`upsample_argmax`, in row chunks so large images do not need ``C x H x W`` floats at once).

Precision (:func:`resolve_precision`): ``fp32`` runs everything in float32; ``bf16`` runs the trunk under
bfloat16 autocast but the modules that produce the outputs (:attr:`TeacherSpec.fp32_modules`: the DPT
decoder of the depth teachers, SegFormer's decode head, the Mask2Former/OneFormer transformer decoder) in
float32, so depth is computed from a float32 head (a bf16 head output has an 8-bit mantissa: ~150 distinct
depths in a 384x384 map, which a 16-bit PNG then stores as 8-bit depth); ``bf16_full`` autocasts everything,
head included (not recommended; kept to measure the difference); ``auto`` = ``bf16`` on CUDA, ``fp32``
elsewhere. Outputs are float32 in every mode but ``bf16_full``.

Fingerprint (:func:`label_fingerprint`): every setting that changes a label (teacher, architecture, revision
= weights hash, input size and multiple, interpolation, precision, and the job's output policy) hashed into
``sha256:<hex>`` and kept beside the shards (:data:`FINGERPRINT_NAME`); :func:`check_fingerprint` refuses to
resume or extend a split with different settings, naming each one that changed.

Weights come only from a folder written by ``save_pretrained`` (``from_pretrained(path,
local_files_only=True)``) or an fsspec URL of such a folder (copied to a local cache first); nothing is
downloaded from a hub. Without weights, :func:`build_tiny` builds the same architecture from a tiny
config with seeded random weights, and the metadata says ``random_init: true``.

Extra keys a teacher reads from ``config.json`` (all optional): ``polymae_random_init`` (bool),
``polymae_label_set`` (label-set id, e.g. ``"ade20k-150"``), ``polymae_depth_kind``
(``"relative_inverse"`` or ``"metric"``; Depth Anything's ``depth_estimation_type`` is used otherwise).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from polymae.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD
from polymae.patches import global_torch_seed, hf_config_extras, quiet_transformers

log = logging.getLogger("polymae.teachers")

DEPTH_KINDS = ("relative_inverse", "metric")
PRECISIONS = ("auto", "fp32", "bf16", "bf16_full")
INTERPOLATIONS = ("auto", "bilinear", "bicubic")
MAX_ASPECT = 4.0  # long-side cap (x short side) for processors that declare no longest_edge
# Pillow's resample codes (what image processors store) -> the torch mode that resizes the same way
_RESAMPLE_MODES = {0: "nearest", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "bilinear", 5: "bilinear"}
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")


# ----------------------------------------------------------------------------- resolution policy
def round_to_multiple(x: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``x`` (at least ``multiple``)."""
    return max(multiple, int(round(x / multiple)) * multiple)


def fit_size(height: int, width: int, short_side: int, multiple: int, square: bool = False,
             max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """Model input size ``(h, w)`` in pixels for an image of ``height x width`` pixels.

    The short side becomes ~``short_side`` with the aspect ratio kept, unless the long side would then
    exceed ``max_aspect * short_side``: then the long side becomes that and the short side shrinks (both
    scaled alike, as image processors do with ``longest_edge``; nothing is squashed). Both sides are rounded
    to multiples of ``multiple`` (at least one multiple). With ``square=True`` the result is ``(s, s)``,
    ``s = round_to_multiple(short_side)``.

    Raises:
        ValueError: non-positive sizes.
    """
    if height <= 0 or width <= 0 or short_side <= 0 or multiple <= 0 or max_aspect <= 0:
        raise ValueError(f"sizes must be positive: {height}x{width}, short_side={short_side}, multiple={multiple}, "
                         f"max_aspect={max_aspect}")
    if square:
        s = round_to_multiple(short_side, multiple)
        return s, s
    scale = min(short_side / min(height, width), short_side * max_aspect / max(height, width))
    return round_to_multiple(height * scale, multiple), round_to_multiple(width * scale, multiple)


def upsample_argmax(scores: torch.Tensor, size: tuple[int, int], max_elements: int = 2**26) -> torch.Tensor:
    """Arg-max over classes of bilinearly upsampled scores (``align_corners=False``).

    Args:
        scores: ``[C, h, w]`` class scores or logits.
        size: ``(H, W)`` output size in pixels.
        max_elements: above ``C*H*W`` elements the upsampling is done separably (width for all rows,
            then height in row chunks), with the same sampling positions as ``F.interpolate``.
    Returns:
        int64 ``[H, W]`` class ids.
    """
    C, h, w = scores.shape
    H, W = int(size[0]), int(size[1])
    scores = scores.float()
    if C * H * W <= max_elements:
        # channels-last: the class scores of a pixel are adjacent, so the arg-max reads memory in order
        # (2-5x faster on CPU than over the [C, H, W] layout, same results). Built as [1, h, w, C] then
        # permuted: `scores[None].contiguous(memory_format=channels_last)` keeps the odd batch stride of
        # an HWC-strided input (what batched post-processing returns) and falls back to a slow path.
        x = scores.permute(1, 2, 0).contiguous()[None].permute(0, 3, 1, 2)
        return F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)[0].argmax(0)
    rows = F.interpolate(scores[None], size=(h, W), mode="bilinear", align_corners=False)[0]  # [C, h, W]
    out = torch.empty((H, W), dtype=torch.int64, device=scores.device)
    scale = h / H
    chunk = max(1, max_elements // max(1, C * W))
    for r0 in range(0, H, chunk):
        y = torch.arange(r0, min(H, r0 + chunk), device=scores.device, dtype=torch.float32)
        src = ((y + 0.5) * scale - 0.5).clamp(min=0.0)
        y0 = src.floor().long().clamp(max=h - 1)
        y1 = (y0 + 1).clamp(max=h - 1)
        a = (src - y0.float())[None, :, None]
        band = rows[:, y0] * (1 - a) + rows[:, y1] * a  # [C, rows, W]
        out[r0:r0 + len(y)] = band.argmax(0)
    return out


# ---------------------------------------------------------------------------------- the teachers
class Teacher:
    """A loaded teacher (see the module docstring).

    Attributes:
        name: registry name; ``task``: ``"depth"`` or ``"semseg"``; ``revision``: ``sha256:<hex>`` of the
        weight files (loaded) or of the state dict (tiny builds); ``random_init``: weights are random;
        the resolution policy (see the module docstring): ``native_short_side`` (pixels, from the image
        processor), ``short_side`` (pixels, the override or the native one, a multiple of ``multiple``),
        ``multiple``, ``square``, ``max_aspect`` (long-side cap / short side), ``interpolation`` (torch
        mode: ``bilinear``/``bicubic``); ``device``: torch device; ``precision``: resolved (``fp32``,
        ``bf16`` or ``bf16_full``, see :func:`resolve_precision`); ``autocast_dtype``: the trunk's autocast
        dtype, ``None`` = float32.
    """

    task = ""

    def __init__(self, spec: "TeacherSpec", model: torch.nn.Module, processor: Any, *, revision: str,
                 random_init: bool, source: str, short_side: int | None = None, device: str = "cpu",
                 batch_size: int = 8, precision: str = "auto", interpolation: str | None = None):
        self.spec = spec
        self.name = spec.name
        self.model = model.eval()
        self.processor = processor
        self.revision = revision
        self.random_init = bool(random_init)
        self.source = source
        native = native_input(spec, processor)
        self.native_short_side, self.multiple, self.max_aspect = native.short_side, native.multiple, native.max_aspect
        self.short_side = round_to_multiple(short_side or native.short_side, self.multiple)
        self.interpolation = resolve_interpolation(interpolation, native.interpolation)
        self.square = spec.square(model.config)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(resolve_device(device))
        self.precision = resolve_precision(precision, self.device.type)
        self.autocast_dtype = autocast_dtype(self.precision, self.device.type)
        if self.precision == "bf16":
            keep_fp32(self.model, spec.fp32_modules, self.device.type)
        self.model.to(self.device)
        mean = torch.tensor(list(getattr(processor, "image_mean", (0.5, 0.5, 0.5))), dtype=torch.float32)
        std = torch.tensor(list(getattr(processor, "image_std", (0.5, 0.5, 0.5))), dtype=torch.float32)
        self._mean = (mean * 255.0).view(1, 3, 1, 1).to(self.device)
        self._std = (std * 255.0).view(1, 3, 1, 1).to(self.device)

    # -- policy -----------------------------------------------------------------------------
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Model input ``(h, w)`` in pixels for an image of ``height x width`` (see :func:`fit_size`)."""
        return fit_size(height, width, self.short_side, self.multiple, square=self.square, max_aspect=self.max_aspect)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def resize_input(self, image: np.ndarray, device: str | torch.device = "cpu",
                     size: tuple[int, int] | None = None) -> torch.Tensor:
        """The image resized to this teacher's input size, before normalisation.

        This is the CPU half of :meth:`predict`: the label job calls it in decode threads ahead of the
        teacher stage and hands the result to ``predict(images, resized=...)``; the maps are the same as
        without it when ``device`` is the teacher's device.

        Args:
            image: uint8 ``[H, W, 3]`` RGB.
            device: where to resize (default CPU).
            size: ``(h, w)`` input size in pixels (e.g. the label job's aspect bucket); ``None`` = :meth:`input_size`.
        Returns:
            float32 ``[1, 3, h, w]`` with values in ``[0, 255]``.
        Raises:
            ValueError: an input that is not uint8 ``[H, W, 3]``.
        """
        self._check([image])
        size = tuple(size) if size is not None else self.input_size(image.shape[0], image.shape[1])
        return self._resize(image, size, torch.device(device))

    def _resize(self, img: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        """float32 ``[1, 3, h, w]`` in ``[0, 255]``: ``img`` resized to ``size`` with :attr:`interpolation`
        (antialiased when shrinking, as Pillow resamples in the image processors)."""
        t = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)[None].float()
        if tuple(t.shape[-2:]) != tuple(size):
            if self.interpolation == "nearest":
                t = F.interpolate(t, size=size, mode="nearest")
            else:
                t = F.interpolate(t, size=size, mode=self.interpolation, align_corners=False, antialias=True)
        return t.clamp_(0.0, 255.0)

    def _pixel_values(self, images: Sequence[np.ndarray], size: tuple[int, int],
                      resized: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Normalised ``[B, 3, h, w]`` float32 input of the images resized to ``size`` (``resized``: the
        images already resized by :meth:`resize_input`, or ``None`` per image to resize here)."""
        out = []
        for i, img in enumerate(images):
            pre = resized[i] if resized is not None else None
            if pre is not None and tuple(pre.shape[-2:]) == tuple(size):
                out.append(pre.to(self.device))
            else:
                out.append(self._resize(img, size, self.device))
        x = torch.cat(out)
        return (x - self._mean) / self._std

    def _check(self, images: Sequence[np.ndarray]) -> None:
        for i, img in enumerate(images):
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"image {i}: expected uint8 [H, W, 3], got "
                                 f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")

    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], resized: Sequence[torch.Tensor | None] | None = None,
                input_sizes: Sequence[tuple[int, int]] | None = None) -> list[np.ndarray]:
        """Dense maps at each image's original size.

        Images are grouped by model input size and run in batches of up to ``batch_size``.

        Args:
            images: uint8 ``[H, W, 3]`` RGB arrays (sizes may differ).
            resized: optional, one per image: :meth:`resize_input` of it (done ahead, e.g. in another
                thread), or ``None`` to resize here; a tensor of the wrong size is ignored.
            input_sizes: optional ``(h, w)`` model input per image (e.g. the label job's aspect buckets);
                ``None`` = :meth:`input_size` of each image.
        Returns:
            depth teachers: float32 ``[H, W]`` per image; semseg teachers: int64 ``[H, W]`` class ids.
        Raises:
            ValueError: an input that is not uint8 ``[H, W, 3]``.
        """
        self._check(images)
        results: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            size = tuple(input_sizes[i]) if input_sizes is not None else self.input_size(img.shape[0], img.shape[1])
            groups.setdefault(size, []).append(i)
        for size, idx in groups.items():
            for s in range(0, len(idx), self.batch_size):
                part = idx[s:s + self.batch_size]
                x = self._pixel_values([images[i] for i in part], size,
                                       None if resized is None else [resized[i] for i in part])
                with self._autocast():
                    outputs = self._forward(x)
                maps = self._postprocess(outputs, [images[i].shape[:2] for i in part])
                for i, m in zip(part, maps):
                    results[i] = m
        return results  # type: ignore[return-value]

    def _forward(self, pixel_values: torch.Tensor) -> Any:
        return self.model(pixel_values=pixel_values)

    def _postprocess(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        raise NotImplementedError

    # -- identity ---------------------------------------------------------------------------
    def metadata(self) -> dict:
        """JSON-able description: name, task, architecture, revision, random_init, source, resolution
        policy (``short_side``, ``native_short_side``, ``multiple``, ``square``, ``max_aspect``,
        ``interpolation``), ``precision`` (resolved), ``device``, ``dtype`` (the trunk's compute dtype),
        ``output_dtype`` (of the maps the model returns), the task's keys, and ``fingerprint``
        (:func:`teacher_fingerprint` of the label-affecting keys)."""
        meta = {
            "name": self.name, "task": self.task, "architecture": type(self.model).__name__,
            "revision": self.revision, "random_init": self.random_init, "source": self.source,
            "short_side": self.short_side, "native_short_side": self.native_short_side, "multiple": self.multiple,
            "square": self.square, "max_aspect": self.max_aspect, "interpolation": self.interpolation,
            "precision": self.precision, "device": self.device.type,
            "dtype": "bfloat16" if self.autocast_dtype is torch.bfloat16 else "float32",
            "output_dtype": "bfloat16" if self.precision == "bf16_full" else "float32",
        }
        meta.update(self._task_metadata())
        meta["fingerprint"] = teacher_fingerprint(meta)
        return meta

    def _task_metadata(self) -> dict:
        """The task's own metadata keys (see the subclasses)."""
        return {}

    def save_pretrained(self, path: str) -> None:
        """Write the model and its image processor to the local folder ``path`` (``save_pretrained``)."""
        with quiet_transformers():
            self.model.save_pretrained(path)
            if self.processor is not None and hasattr(self.processor, "save_pretrained"):
                self.processor.save_pretrained(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, revision={self.revision!r}, random_init={self.random_init})"


class DepthTeacher(Teacher):
    """Monocular depth teacher. ``kind``: ``"relative_inverse"`` (relative inverse depth, larger =
    nearer, no unit) or ``"metric"`` (metres)."""

    task = "depth"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        cfg = self.model.config
        kind = getattr(cfg, "polymae_depth_kind", None)
        if kind is None:
            kind = "metric" if getattr(cfg, "depth_estimation_type", "relative") == "metric" else "relative_inverse"
        if kind not in DEPTH_KINDS:
            raise ValueError(f"teacher {self.name}: polymae_depth_kind must be one of {DEPTH_KINDS}, got {kind!r}")
        self.kind = kind

    def _postprocess(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        depth = outputs.predicted_depth.float()  # [B, h, w]
        out = []
        for d, (H, W) in zip(depth, sizes):
            shrink = H < d.shape[-2] or W < d.shape[-1]  # antialiased when the map is shrunk to a small output
            up = F.interpolate(d[None, None], size=(int(H), int(W)), mode="bilinear", align_corners=False,
                               antialias=shrink)[0, 0]
            out.append(up.cpu().numpy().astype(np.float32, copy=False))
        return out

    def _task_metadata(self) -> dict:
        """``kind``, ``unit`` and, for calibrated random models, ``output_calibration`` (see
        :func:`calibrate_depth_output`)."""
        meta = {"kind": self.kind, "unit": "metre" if self.kind == "metric" else "relative inverse depth"}
        calib = getattr(self.model.config, "polymae_output_calibration", None)
        if calib is not None:
            meta["output_calibration"] = dict(calib)
        return meta


class SemsegTeacher(Teacher):
    """Semantic-segmentation teacher. ``label_set``: label-set id; ``num_classes``; ``class_names``
    (index = class id)."""

    task = "semseg"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        cfg = self.model.config
        n = int(cfg.num_labels)
        id2label = {int(k): str(v) for k, v in (cfg.id2label or {}).items()}
        self.num_classes = n
        self.class_names = [id2label.get(i, f"class_{i}") for i in range(n)]
        label_set = getattr(cfg, "polymae_label_set", None)
        if not label_set:
            digest = hashlib.sha256("\n".join(self.class_names).encode()).hexdigest()[:8]
            label_set = f"labels{n}-{digest}"
        self.label_set = str(label_set)

    def _postprocess(self, outputs: Any, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
        for k in ("logits", "class_queries_logits", "masks_queries_logits"):
            if getattr(outputs, k, None) is not None:
                outputs[k] = outputs[k].float()
        scored = self.processor.post_process_semantic_segmentation(
            outputs, target_sizes=None, return_segmentation_scores=True)
        out = []
        for item, (H, W) in zip(scored, sizes):
            ids = upsample_argmax(item.segmentation_scores, (int(H), int(W)))
            out.append(ids.cpu().numpy().astype(np.int64, copy=False))
        return out

    def _task_metadata(self) -> dict:
        """``label_set``, ``num_classes``, ``class_names`` and ``ignore_index`` (the stored ignore id)."""
        from polymae.datasets.shards import semseg_ignore_value

        return {"label_set": self.label_set, "num_classes": self.num_classes,
                "class_names": list(self.class_names), "ignore_index": semseg_ignore_value(self.num_classes)}


class OneFormerTeacher(SemsegTeacher):
    """OneFormer run on its ``semantic`` task: the task prompt ``"the task is semantic"`` is tokenised once
    (``task_seq_len`` ids) by the checkpoint's own tokenizer, or taken from ``config.polymae_task_token_ids``
    (tiny builds, which have no tokenizer), and given to every forward pass as ``task_inputs``."""

    TASK_PROMPT = "the task is semantic"

    def __init__(self, *args, task_token_ids: Sequence[int] | None = None, **kw):
        super().__init__(*args, **kw)
        ids = task_token_ids if task_token_ids is not None else getattr(self.model.config, "polymae_task_token_ids", None)
        if ids is None:
            raise ValueError("oneformer needs its tokenizer files (or config.polymae_task_token_ids) for task inputs")
        self._task_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)

    def _forward(self, pixel_values: torch.Tensor) -> Any:
        task = self._task_ids.expand(pixel_values.shape[0], -1)
        return self.model(pixel_values=pixel_values, task_inputs=task)


# ---------------------------------------------------------------------------------- the registry
@dataclass(frozen=True)
class TeacherSpec:
    """A registry entry: ``name``, ``task``, the transformers model/processor class names, the input
    ``multiple`` the model needs and ``default_short_side`` (pixels; used only when the image processor
    declares no size), ``square(config)`` (square inputs needed), ``tiny(num_labels)`` building ``(config,
    processor)`` for a tiny random model, and ``fp32_modules``: dotted names of the sub-modules that produce
    the outputs, run in float32 under ``precision=bf16``."""

    name: str
    task: str
    model_class: str
    processor_class: str
    multiple: int
    default_short_side: int
    tiny: Callable[[int], tuple[Any, Any]]
    square: Callable[[Any], bool] = lambda cfg: False
    description: str = ""
    # Build the processor from these keys of preprocessor_config.json instead of from_pretrained (OneFormer's
    # from_pretrained may fetch class metadata from a hub repo).
    processor_keys: tuple[str, ...] | None = None
    fp32_modules: tuple[str, ...] = ()

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def processor_cls(self):
        import transformers

        return getattr(transformers, self.processor_class)


def _tiny_dpt(num_labels: int):
    from transformers import DPTConfig, DPTImageProcessor

    cfg = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                    image_size=64, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                    neck_hidden_sizes=[16, 32, 48, 64], fusion_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5])
    return cfg, DPTImageProcessor(size={"height": 384, "width": 384}, ensure_multiple_of=32)


def _tiny_depth_anything(num_labels: int):
    from transformers import DepthAnythingConfig, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            patch_size=14, image_size=70, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[16, 32, 48, 64],
                              fusion_hidden_size=32, head_hidden_size=16, patch_size=14)
    proc = DPTImageProcessor(size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
                             image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    return cfg, proc


def _labels(num_labels: int) -> dict:
    id2label = {i: f"class_{i:03d}" for i in range(num_labels)}
    return {"num_labels": num_labels, "id2label": id2label, "label2id": {v: k for k, v in id2label.items()}}


def _tiny_segformer(num_labels: int):
    from transformers import SegformerConfig, SegformerImageProcessor

    cfg = SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], num_attention_heads=[1, 1, 2, 2],
                          decoder_hidden_size=64, **_labels(num_labels))
    return cfg, SegformerImageProcessor()


def _tiny_mask2former(num_labels: int):
    from transformers import Mask2FormerConfig, Mask2FormerImageProcessor, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64, window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                            encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=10,
                            encoder_feedforward_dim=64, dim_feedforward=64, **_labels(num_labels))
    return cfg, Mask2FormerImageProcessor()


def _tiny_oneformer(num_labels: int):
    from transformers import OneFormerConfig, OneFormerImageProcessor, SwinConfig

    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], image_size=64, window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = OneFormerConfig(backbone_config=backbone, num_queries=10, conv_dim=32, mask_dim=32, hidden_dim=32,
                          encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                          num_attention_heads=2, text_encoder_width=32, text_encoder_num_layers=1,
                          text_encoder_vocab_size=100, is_training=False, **_labels(num_labels))
    # stand-in ids for "<start> the task is semantic <end>" padded to task_seq_len (no tokenizer in tiny builds)
    ids = [49406, 518, 2008, 533, 10549, 49407]
    hf_config_extras(cfg, polymae_task_token_ids=ids + [0] * (cfg.task_seq_len - len(ids)))
    return cfg, OneFormerImageProcessor()


def _dpt_square(cfg) -> bool:
    # The plain-ViT DPT reshapes tokens to a sqrt(N) x sqrt(N) grid; DPT on a backbone (e.g. DINOv2,
    # BEiT) gets the patch grid's height and width and keeps the aspect ratio.
    return getattr(cfg, "backbone_config", None) is None or bool(getattr(cfg, "is_hybrid", False))


_DPT_DECODER = ("neck", "head")  # reassemble + fusion + depth head of DPT and Depth Anything

REGISTRY: dict[str, TeacherSpec] = {
    "dpt": TeacherSpec("dpt", "depth", "DPTForDepthEstimation", "DPTImageProcessor", 32, 384, _tiny_dpt,
                       square=_dpt_square, description="DPT (Ranftl et al. 2021), relative inverse depth",
                       fp32_modules=_DPT_DECODER),
    "depth_anything": TeacherSpec("depth_anything", "depth", "DepthAnythingForDepthEstimation", "DPTImageProcessor",
                                  14, 518, _tiny_depth_anything,
                                  description="Depth Anything (Yang et al. 2024), relative or metric depth",
                                  fp32_modules=_DPT_DECODER),
    "segformer": TeacherSpec("segformer", "semseg", "SegformerForSemanticSegmentation", "SegformerImageProcessor",
                             32, 512, _tiny_segformer, description="SegFormer (Xie et al. 2021)",
                             fp32_modules=("decode_head",)),
    "mask2former": TeacherSpec("mask2former", "semseg", "Mask2FormerForUniversalSegmentation",
                               "Mask2FormerImageProcessor", 32, 384, _tiny_mask2former,
                               description="Mask2Former (Cheng et al. 2022), semantic post-processing",
                               fp32_modules=("model.transformer_module", "class_predictor")),
    "oneformer": TeacherSpec("oneformer", "semseg", "OneFormerForUniversalSegmentation", "OneFormerImageProcessor",
                             32, 384, _tiny_oneformer, description="OneFormer (Jain et al. 2023), semantic task",
                             processor_keys=("image_mean", "image_std", "rescale_factor", "size", "resample"),
                             fp32_modules=("model.transformer_module",)),
}


def get_spec(name: str) -> TeacherSpec:
    """Registry entry for ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown teacher {name!r}; known: {sorted(REGISTRY)}") from None


def names(task: str | None = None) -> list[str]:
    """Registered teacher names, optionally only those of ``task`` (``"depth"``/``"semseg"``)."""
    return sorted(n for n, s in REGISTRY.items() if task is None or s.task == task)


# ---------------------------------------------------------------------------------------- loading
def resolve_device(device: str = "auto") -> str:
    """``"cuda"`` when ``device`` is ``auto`` and CUDA is available, else ``device`` (``"cpu"``)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision a teacher runs at: ``"auto"`` = ``"bf16"`` on CUDA, ``"fp32"`` elsewhere; the others
    as given (``"fp32"``: all float32; ``"bf16"``: bfloat16 autocast for the trunk, the output modules
    (:attr:`TeacherSpec.fp32_modules`) in float32; ``"bf16_full"``: bfloat16 autocast for everything).

    Raises:
        ValueError: ``precision`` not in :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a teacher's forward pass (its trunk): bfloat16 for ``bf16``/``bf16_full`` (and
    ``auto`` on CUDA), ``None`` (no autocast, float32) for ``fp32`` (see :func:`resolve_precision`).

    Raises:
        ValueError: ``precision`` not in :data:`PRECISIONS`.
    """
    return torch.bfloat16 if resolve_precision(precision, device_type) != "fp32" else None


def _float32(x: Any) -> Any:
    """``x`` with every bfloat16/float16 tensor in it (also inside lists, tuples and dicts) cast to float32."""
    if isinstance(x, torch.Tensor):
        return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_float32(v) for v in x)
    if isinstance(x, dict):
        return {k: _float32(v) for k, v in x.items()}
    return x


def keep_fp32(model: torch.nn.Module, names: Sequence[str], device_type: str) -> list[str]:
    """Run the sub-modules ``names`` (dotted, e.g. ``"neck"``, ``"model.transformer_module"``) of ``model``
    in float32 even inside an autocast region: each one's forward disables autocast and casts its
    bfloat16/float16 tensor inputs to float32, so its outputs (e.g. the depth head's) are float32 computed in
    float32. Changes only this model object (its modules' ``forward`` attributes).

    Returns:
        the names wrapped.
    Raises:
        AttributeError: ``model`` has no sub-module of a given name.
    """
    import functools

    for name in names:
        module = model.get_submodule(name)
        inner = module.forward

        @functools.wraps(inner)
        def forward(*args, _inner=inner, **kwargs):
            with torch.autocast(device_type=device_type, enabled=False):
                return _inner(*_float32(args), **_float32(kwargs))

        module.forward = forward
    return list(names)


def resolve_interpolation(interpolation: str | None, native: str) -> str:
    """The torch resize mode of a teacher: ``native`` (its image processor's, see :func:`native_input`) for
    ``None``/``"auto"``, else the override (``"bilinear"``/``"bicubic"``).

    Raises:
        ValueError: an override not in :data:`INTERPOLATIONS`.
    """
    if interpolation is None or interpolation == "auto":
        return native
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {list(INTERPOLATIONS)}, got {interpolation!r}")
    return interpolation


@dataclass(frozen=True)
class NativeInput:
    """The input policy an image processor declares: ``short_side`` (pixels), ``max_aspect`` (its
    ``longest_edge / shortest_edge``, else :data:`MAX_ASPECT`), ``multiple`` (pixels) and ``interpolation``
    (torch mode of its ``resample``)."""

    short_side: int
    max_aspect: float
    multiple: int
    interpolation: str


def _size_value(size: Any, key: str) -> int | None:
    """``size[key]`` of a processor's ``size``/``crop_size`` (a dict, a ``SizeDict`` or ``None``)."""
    if size is None or isinstance(size, (int, float)):
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def native_input(spec: "TeacherSpec", processor: Any) -> NativeInput:
    """The native input policy of a teacher, read from its image processor: the short side from ``size``
    (``shortest_edge``, or the smaller of ``height``/``width``, or a plain int; ``crop_size`` when the
    processor center-crops), the long-side cap from ``longest_edge``, the multiple from
    ``ensure_multiple_of`` (when it is a multiple of the model's own ``spec.multiple``), the interpolation
    from ``resample``. ``spec.default_short_side`` and bilinear where the processor declares nothing."""
    size = getattr(processor, "size", None)
    short = int(size) if isinstance(size, (int, float)) and not isinstance(size, bool) else None
    short = short or _size_value(size, "shortest_edge")
    hw = [v for v in (_size_value(size, "height"), _size_value(size, "width")) if v]
    short = short or (min(hw) if hw else None)
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and _size_value(crop, "height") and _size_value(crop, "width"):
        short = min(_size_value(crop, "height"), _size_value(crop, "width"))
    short = short or spec.default_short_side
    longest = _size_value(size, "longest_edge")
    max_aspect = max(1.0, longest / short) if longest and _size_value(size, "shortest_edge") else MAX_ASPECT
    ensure = getattr(processor, "ensure_multiple_of", None)
    multiple = int(ensure) if isinstance(ensure, int) and ensure > spec.multiple and ensure % spec.multiple == 0 \
        else spec.multiple
    resample = getattr(processor, "resample", None)
    interpolation = _RESAMPLE_MODES.get(int(resample), "bilinear") if resample is not None else "bilinear"
    return NativeInput(int(short), float(max_aspect), multiple, interpolation)


def check_revision(name: str, source: str, expected: str | None, actual: str) -> None:
    """Refuse weights whose revision (``sha256:<hex>``, see :func:`weights_sha256`) is not the expected one;
    ``expected=None`` accepts any.

    Raises:
        ValueError: naming the teacher, the weights and both revisions.
    """
    if expected is not None and expected != actual:
        raise ValueError(f"teacher {name!r}: expected revision {expected}, but {source} has revision {actual}")


def state_dict_sha256(model: torch.nn.Module) -> str:
    """``sha256:<hex>`` over the model's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def weights_sha256(folder: str) -> str:
    """``sha256:<hex>`` of a ``save_pretrained`` folder's weight file (one file: its own sha256, as a hub
    shows it; several shards: sha256 over their names and sha256s).

    Raises:
        FileNotFoundError: no ``*.safetensors``/``*.bin`` file in ``folder``.
    """
    files = sorted(f for f in os.listdir(folder) if f.endswith(WEIGHT_FILE_SUFFIXES) and not f.startswith("."))
    safes = [f for f in files if f.endswith(".safetensors")]
    files = safes or files
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {folder}")

    def file_sha(p: str) -> str:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(8 * 2**20), b""):
                h.update(chunk)
        return h.hexdigest()

    if len(files) == 1:
        return "sha256:" + file_sha(os.path.join(folder, files[0]))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f}:{file_sha(os.path.join(folder, f))}\n".encode())
    return "sha256:" + h.hexdigest()


def cache_root() -> str:
    """Local folder for teachers copied from URLs: ``$POLYMAE_CACHE/teachers`` (default
    ``~/.cache/polymae/teachers``)."""
    return os.path.join(os.environ.get("POLYMAE_CACHE", os.path.expanduser("~/.cache/polymae")), "teachers")


def materialise(url: str, cache_dir: str | None = None) -> str:
    """Local folder holding the teacher at ``url``: ``url`` itself when it is a local folder, else a copy
    of every file under it in ``cache_dir`` (reused when complete; copied to a temporary folder and
    renamed, so a half copy is never used).

    Raises:
        FileNotFoundError: ``url`` does not exist or is empty.
    """
    from fsspec.core import url_to_fs

    from polymae.datasets.storage import protocol

    fs, path = url_to_fs(url)
    if protocol(fs) in ("file", "local"):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"teacher folder {url} does not exist")
        return path
    root = cache_dir or cache_root()
    dest = os.path.join(root, hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    files = [p for p in fs.find(path) if not posixpath.basename(p).startswith(".")]
    if not files:
        raise FileNotFoundError(f"teacher URL {url} holds no files")
    os.makedirs(root, exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    base = path.rstrip("/")
    for p in files:
        rel = p[len(base) + 1:] if p.startswith(base + "/") else posixpath.basename(p)
        local = os.path.join(tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(p, local)
    with open(os.path.join(tmp, ".complete"), "w") as fh:
        fh.write(url + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("copied teacher %s to %s", url, dest)
    return dest


def _make(spec: TeacherSpec, model, processor, **kw) -> Teacher:
    if spec.name == "oneformer":
        return OneFormerTeacher(spec, model, processor, **kw)
    cls = DepthTeacher if spec.task == "depth" else SemsegTeacher
    return cls(spec, model, processor, **kw)


def _task_token_ids(folder: str, config: Any) -> list[int] | None:
    """OneFormer's ``task_inputs`` from the checkpoint's tokenizer (``None`` when the folder has none)."""
    if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return tok(OneFormerTeacher.TASK_PROMPT, padding="max_length", max_length=int(config.task_seq_len),
               truncation=True)["input_ids"]


TINY_DEPTH_MEAN = 1.0
TINY_DEPTH_STD = 0.25


def calibrate_depth_output(model: torch.nn.Module, size: int, seed: int, mean: float = TINY_DEPTH_MEAN,
                           std: float = TINY_DEPTH_STD) -> dict:
    """Give a random-weight depth model O(1) outputs: rescale the last ``Conv2d`` of ``model.head`` (the
    1-channel projection before the final activation) so that, on a seeded probe batch of normalised noise
    ``[2, 3, size, size]``, its output has mean ``mean`` and standard deviation ``std``.

    A random DPT/Depth Anything head otherwise predicts depths of ~1e-7 (weights drawn with std 0.02
    through many layers), which makes every stored ``depth_range`` tiny. Outputs stay image-dependent
    (an affine map of the same features). The global torch RNG is untouched.

    Returns:
        the record stored as ``config.polymae_output_calibration`` (probe, target mean/std, scale and
        shift applied to the layer's output).
    Raises:
        ValueError: ``model.head`` has no 1-channel ``Conv2d``.
    """
    convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d) and m.out_channels == 1]
    if not convs:
        raise ValueError(f"{type(model).__name__}.head has no 1-channel Conv2d to calibrate")
    last = convs[-1]
    seen: dict[str, torch.Tensor] = {}
    hook = last.register_forward_hook(lambda mod, inp, out: seen.__setitem__("z", out.detach()))
    probe = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            model.eval()(pixel_values=probe)
    finally:
        hook.remove()
    z = seen["z"].double()
    scale = std / max(float(z.std()), 1e-30)
    shift = mean - float(z.mean()) * scale
    with torch.no_grad():  # z' = scale * z + shift, i.e. W' = scale W, b' = scale b + shift
        last.weight.mul_(scale)
        if last.bias is None:
            last.bias = torch.nn.Parameter(torch.zeros(1, dtype=last.weight.dtype))
        last.bias.mul_(scale).add_(shift)
    return {"method": "affine last head conv", "probe": f"randn[2,3,{size},{size}] seed={seed}",
            "target_mean": mean, "target_std": std, "scale": scale, "shift": shift}


def build_tiny(name: str, seed: int = 0, *, num_labels: int = 150, short_side: int | None = None,
               device: str = "cpu", batch_size: int = 8, precision: str = "auto",
               interpolation: str | None = None) -> Teacher:
    """The registry architecture ``name`` from a tiny config with random weights drawn from ``seed``.

    Same ``seed`` → bit-identical weights in every process (so every Ray worker labels alike). Semseg
    teachers get ``num_labels`` classes named ``class_000``... and label set ``random-{num_labels}``.
    Depth teachers get O(1) outputs (:func:`calibrate_depth_output`; recorded in the metadata as
    ``output_calibration``). The global torch RNG is left untouched. ``short_side`` (pixels; ``None``:
    the tiny processor's native size, the real checkpoints' one), ``device``, ``batch_size``, ``precision``
    and ``interpolation`` as in :class:`Teacher`.

    Raises:
        KeyError: unknown ``name``. ValueError: unknown ``precision`` or ``interpolation``.
    """
    spec = get_spec(name)
    cfg, processor = spec.tiny(num_labels)
    hf_config_extras(cfg, polymae_random_init=True)
    if spec.task == "semseg":
        hf_config_extras(cfg, polymae_label_set=f"random-{num_labels}")
    with global_torch_seed(seed):
        model = spec.model_cls()(cfg)
    model.eval()
    if spec.task == "depth":
        hf_config_extras(model.config, polymae_output_calibration=calibrate_depth_output(
            model, round_to_multiple(64, spec.multiple), seed))
    return _make(spec, model, processor, revision=state_dict_sha256(model), random_init=True,
                 source=f"tiny:seed={seed}", short_side=short_side, device=device, batch_size=batch_size,
                 precision=precision, interpolation=interpolation)


def load_teacher(name: str, weights: str | None = None, *, seed: int = 0, short_side: int | None = None,
                 device: str = "cpu", batch_size: int = 8, cache_dir: str | None = None, precision: str = "auto",
                 revision: str | None = None, interpolation: str | None = None) -> Teacher:
    """Load teacher ``name`` from ``weights`` (a ``save_pretrained`` folder or an fsspec URL of one), or
    build the tiny random one (:func:`build_tiny`, from ``seed``) when ``weights`` is ``None``.

    Loading uses ``from_pretrained(path, local_files_only=True)``; the image processor comes from the
    folder's ``preprocessor_config.json`` when present, else the class defaults. ``short_side``: input
    short side in pixels (``None``: the native size its image processor declares, see :func:`native_input`);
    ``interpolation``: ``None``/``"auto"`` = the processor's ``resample``, or ``"bilinear"``/``"bicubic"``;
    ``precision``: see :func:`resolve_precision`; ``revision``: the expected ``sha256:<hex>`` revision
    (``None``: any), checked before the model loads.

    Raises:
        KeyError: unknown ``name``. FileNotFoundError: missing folder/weights. ValueError: the folder holds
        another architecture, the revision differs from ``revision`` (both named), or an unknown ``precision``
        or ``interpolation``.
    """
    spec = get_spec(name)
    if weights is None:
        teacher = build_tiny(name, seed, short_side=short_side, device=device, batch_size=batch_size,
                             precision=precision, interpolation=interpolation)
        check_revision(name, teacher.source, revision, teacher.revision)
        return teacher

    folder = materialise(weights, cache_dir)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{weights} has no config.json (write it with save_pretrained)")
    with open(cfg_path) as fh:
        model_type = json.load(fh).get("model_type")
    expected = spec.model_cls().config_class.model_type
    if model_type != expected:
        raise ValueError(f"teacher {name!r} wants a {expected!r} checkpoint, {weights} holds {model_type!r}")
    actual = weights_sha256(folder)
    check_revision(name, weights, revision, actual)
    pp_path = os.path.join(folder, "preprocessor_config.json")
    extra: dict[str, Any] = {}
    with quiet_transformers():
        model = spec.model_cls().from_pretrained(folder, local_files_only=True)
        if os.path.exists(pp_path) and spec.processor_keys is None:
            processor = spec.processor_cls().from_pretrained(folder, local_files_only=True)
        elif os.path.exists(pp_path):
            with open(pp_path) as fh:
                pp = json.load(fh)
            processor = spec.processor_cls()(**{k: pp[k] for k in spec.processor_keys if k in pp})
        else:
            processor = spec.processor_cls()()
        if spec.name == "oneformer":
            extra["task_token_ids"] = _task_token_ids(folder, model.config)
    model.eval()
    return _make(spec, model, processor, revision=actual,
                 random_init=bool(getattr(model.config, "polymae_random_init", False)), source=weights,
                 short_side=short_side, device=device, batch_size=batch_size, precision=precision,
                 interpolation=interpolation, **extra)


# ------------------------------------------------------------------------------------ fingerprint
FINGERPRINT_NAME = "fingerprint.json"  # {output}/{split}/fingerprint.json, beside config.yaml
# The keys of a teacher's metadata that change its labels (device, source URL, batch size do not).
TEACHER_LABEL_KEYS = ("name", "task", "architecture", "revision", "random_init", "short_side", "multiple", "square",
                      "max_aspect", "interpolation", "precision", "kind", "label_set", "num_classes")
_UNSET = "<unset>"


class FingerprintMismatch(ValueError):
    """A split's shards were labelled with other label-affecting settings than this run's."""


def _digest(obj: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``obj`` (sorted keys)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def teacher_label_settings(meta: dict) -> dict:
    """The label-affecting part of a teacher's metadata (:meth:`Teacher.metadata`): the keys of
    :data:`TEACHER_LABEL_KEYS` present in ``meta``."""
    return {k: meta[k] for k in TEACHER_LABEL_KEYS if k in meta}


def teacher_fingerprint(meta: dict) -> str:
    """``sha256:<hex>`` of :func:`teacher_label_settings` of a teacher's metadata."""
    return _digest(teacher_label_settings(meta))


def label_fingerprint(policy: dict, teachers: dict[str, dict] | None = None) -> dict:
    """The fingerprint of every label-affecting setting of a label run, in one place.

    Args:
        policy: the job's label-affecting config (``LabelConfig.label_policy()``: each teacher's name,
            weights revision it expects, input size override, interpolation and precision as configured,
            and the output policy), JSON-able.
        teachers: ``{slot: Teacher.metadata()}`` of the loaded teachers (revision = weights hash, resolved
            input size, multiple, interpolation and precision, depth kind / label set); ``None`` before they
            are loaded: the fingerprint then has only the ``config`` part.
    Returns:
        ``{"sha256": "sha256:<hex>", "settings": {"config": policy, "teachers": {slot: settings}}}``
        (``teachers`` only when given), as it reads back from JSON.
    """
    settings: dict[str, Any] = {"config": policy}
    if teachers is not None:
        settings["teachers"] = {slot: teacher_label_settings(m) for slot, m in sorted(teachers.items())}
    settings = json.loads(json.dumps(settings, sort_keys=True, default=str))
    return {"sha256": _digest(settings), "settings": settings}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of nested dicts (lists are leaves)."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for k, v in obj.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint_changes(old: dict, new: dict) -> list[str]:
    """The settings that differ between two fingerprints (:func:`label_fingerprint`), as
    ``"teachers.depth.precision: 'bf16_full' -> 'fp32'"``, compared over the parts (``config``,
    ``teachers``) that both have; ``[]`` when they agree."""
    parts = sorted(set(old.get("settings", {})) & set(new.get("settings", {})))
    a = _flatten({p: old["settings"][p] for p in parts})
    b = _flatten({p: new["settings"][p] for p in parts})
    return [f"{k}: {a.get(k, _UNSET)!r} -> {b.get(k, _UNSET)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, _UNSET) != b.get(k, _UNSET)]


def check_fingerprint(url: str, fingerprint: dict, *, finished: int, pending: int, replace: bool = False) -> dict:
    """Compare a run's label fingerprint with the one stored for its split at ``url``, and record it.

    * ``replace`` (``mode=overwrite``, after the split was cleared): ``fingerprint`` is written.
    * A fingerprint is stored: the parts both have must agree, else :class:`FingerprintMismatch` naming every
      changed setting; parts only ``fingerprint`` has are added (the ``teachers`` part once they loaded).
    * None is stored: it is written when no shard is finished. Finished shards without one were labelled by
      a polymae that kept none, with settings unknown: labelling ``pending`` shards next to them would mix
      labels silently, so that is a :class:`FingerprintMismatch`; with nothing pending nothing is written.

    Args:
        url: the split's ``fingerprint.json`` (:data:`FINGERPRINT_NAME`), any fsspec URL.
        fingerprint: :func:`label_fingerprint` of this run.
        finished: shards of the split with a done marker; pending: shards this run is to label.
        replace: overwrite whatever is stored.
    Returns:
        the fingerprint stored now (``fingerprint`` itself when nothing was stored or written).
    Raises:
        FingerprintMismatch: see above; the message names each changed setting and the ways out.
        OSError: the stored fingerprint cannot be read or written.
    """
    from polymae.datasets import storage

    stored = None if replace or not storage.exists(url) else storage.read_json(url)
    if stored is None:
        if not replace and finished and pending:
            raise FingerprintMismatch(
                f"{url} does not exist, but {finished} shard(s) of this split are finished: they were labelled by "
                "a polymae that did not record its label settings (teacher input size, interpolation, "
                f"precision), so labelling {pending} more next to them could mix labels made differently. "
                "Relabel the split with mode=overwrite, or write to another output/split.")
        if replace or not finished:
            storage.write_json_atomic(url, fingerprint)
        return fingerprint
    changes = fingerprint_changes(stored, fingerprint)
    if changes:
        lines = "\n  ".join(changes)
        raise FingerprintMismatch(
            f"this run's label settings differ from those the split at {posixpath.dirname(url)} was labelled "
            f"with ({stored.get('sha256')} there, {fingerprint['sha256']} now); changed:\n  {lines}\n"
            "Resume or extend with the same settings, relabel everything with mode=overwrite, or write to another "
            "output/split.")
    missing = set(fingerprint["settings"]) - set(stored.get("settings", {}))
    if not missing:
        return stored
    settings = {**stored["settings"], **{p: fingerprint["settings"][p] for p in missing}}
    merged = {"sha256": _digest(settings), "settings": settings}
    storage.write_json_atomic(url, merged)
    return merged
