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

Resolution policy (:func:`fit_size`): the image is resized (bilinear, antialiased) so that its short
side is ``short_side`` pixels and both sides are multiples of the model's ``multiple`` (aspect ratio
kept, the long side capped at ``4 * short_side``); the plain-ViT DPT reassembles its tokens into a
square grid, so it gets a ``short_side x short_side`` square like its own image processor does. The
prediction is resized back to the original size: bilinear for depth; for semseg the class scores from
the image processor's ``post_process_semantic_segmentation`` are upsampled bilinearly and arg-maxed
(:func:`upsample_argmax`, in row chunks so large images do not need ``C x H x W`` floats at once).

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
PRECISIONS = ("auto", "fp32", "bf16")
MAX_ASPECT = 4.0
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")


# ----------------------------------------------------------------------------- resolution policy
def round_to_multiple(x: float, multiple: int) -> int:
    """Nearest multiple of ``multiple`` to ``x`` (at least ``multiple``)."""
    return max(multiple, int(round(x / multiple)) * multiple)


def fit_size(height: int, width: int, short_side: int, multiple: int, square: bool = False,
             max_aspect: float = MAX_ASPECT) -> tuple[int, int]:
    """Model input size ``(h, w)`` in pixels for an image of ``height x width`` pixels.

    The short side becomes ~``short_side``, the aspect ratio is kept (the long side is capped at
    ``max_aspect * short_side``) and both sides are rounded to multiples of ``multiple``; with
    ``square=True`` the result is ``(s, s)`` with ``s = round_to_multiple(short_side)``.

    Raises:
        ValueError: non-positive sizes.
    """
    if height <= 0 or width <= 0 or short_side <= 0 or multiple <= 0:
        raise ValueError(f"sizes must be positive: {height}x{width}, short_side={short_side}, multiple={multiple}")
    if square:
        s = round_to_multiple(short_side, multiple)
        return s, s
    scale = short_side / min(height, width)
    h, w = height * scale, width * scale
    cap = short_side * max_aspect
    h, w = min(h, cap), min(w, cap)
    return round_to_multiple(h, multiple), round_to_multiple(w, multiple)


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
        ``short_side``/``multiple``/``square``: the resolution policy (pixels); ``device``: torch device;
        ``precision``: as given (see :func:`autocast_dtype`); ``autocast_dtype``: the forward pass's
        autocast dtype, ``None`` = float32.
    """

    task = ""

    def __init__(self, spec: "TeacherSpec", model: torch.nn.Module, processor: Any, *, revision: str,
                 random_init: bool, source: str, short_side: int | None = None, device: str = "cpu",
                 batch_size: int = 8, precision: str = "auto"):
        self.spec = spec
        self.name = spec.name
        self.model = model.eval()
        self.processor = processor
        self.revision = revision
        self.random_init = bool(random_init)
        self.source = source
        self.multiple = spec.multiple
        self.short_side = round_to_multiple(short_side or spec.default_short_side, self.multiple)
        self.square = spec.square(model.config)
        self.batch_size = max(1, int(batch_size))
        self.device = torch.device(resolve_device(device))
        self.precision = precision
        self.autocast_dtype = autocast_dtype(precision, self.device.type)
        self.model.to(self.device)
        mean = torch.tensor(list(getattr(processor, "image_mean", (0.5, 0.5, 0.5))), dtype=torch.float32)
        std = torch.tensor(list(getattr(processor, "image_std", (0.5, 0.5, 0.5))), dtype=torch.float32)
        self._mean = (mean * 255.0).view(1, 3, 1, 1).to(self.device)
        self._std = (std * 255.0).view(1, 3, 1, 1).to(self.device)

    # -- policy -----------------------------------------------------------------------------
    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Model input ``(h, w)`` in pixels for an image of ``height x width`` (see :func:`fit_size`)."""
        return fit_size(height, width, self.short_side, self.multiple, square=self.square)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def resize_input(self, image: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
        """The image resized to this teacher's input size, before normalisation.

        This is the CPU half of :meth:`predict`: the label job calls it in decode threads ahead of the
        teacher stage and hands the result to ``predict(images, resized=...)``; the maps are the same as
        without it when ``device`` is the teacher's device.

        Args:
            image: uint8 ``[H, W, 3]`` RGB.
            device: where to resize (default CPU).
        Returns:
            float32 ``[1, 3, h, w]`` with values in ``[0, 255]``, ``(h, w)`` = :meth:`input_size`.
        Raises:
            ValueError: an input that is not uint8 ``[H, W, 3]``.
        """
        self._check([image])
        return self._resize(image, self.input_size(image.shape[0], image.shape[1]), torch.device(device))

    @staticmethod
    def _resize(img: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img)).to(device).permute(2, 0, 1)[None].float()
        if tuple(t.shape[-2:]) != tuple(size):
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
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
    def predict(self, images: Sequence[np.ndarray],
                resized: Sequence[torch.Tensor | None] | None = None) -> list[np.ndarray]:
        """Dense maps at each image's original size.

        Images are grouped by model input size and run in batches of up to ``batch_size``.

        Args:
            images: uint8 ``[H, W, 3]`` RGB arrays (sizes may differ).
            resized: optional, one per image: :meth:`resize_input` of it (done ahead, e.g. in another
                thread), or ``None`` to resize here; a tensor of the wrong size is ignored.
        Returns:
            depth teachers: float32 ``[H, W]`` per image; semseg teachers: int64 ``[H, W]`` class ids.
        Raises:
            ValueError: an input that is not uint8 ``[H, W, 3]``.
        """
        self._check(images)
        results: list[np.ndarray | None] = [None] * len(images)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self.input_size(img.shape[0], img.shape[1]), []).append(i)
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
        policy (``short_side``, ``multiple``, ``square``), ``device``, ``dtype``, and the task's keys."""
        return {
            "name": self.name, "task": self.task, "architecture": type(self.model).__name__,
            "revision": self.revision, "random_init": self.random_init, "source": self.source,
            "short_side": self.short_side, "multiple": self.multiple, "square": self.square,
            "device": self.device.type, "dtype": "bfloat16" if self.autocast_dtype is torch.bfloat16 else "float32",
        }

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
            up = F.interpolate(d[None, None], size=(int(H), int(W)), mode="bilinear", align_corners=False)[0, 0]
            out.append(up.cpu().numpy().astype(np.float32, copy=False))
        return out

    def metadata(self) -> dict:
        """:meth:`Teacher.metadata` plus ``kind``, ``unit`` and, for calibrated random models,
        ``output_calibration`` (see :func:`calibrate_depth_output`)."""
        meta = {**super().metadata(), "kind": self.kind,
                "unit": "metre" if self.kind == "metric" else "relative inverse depth"}
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

    def metadata(self) -> dict:
        from polymae.datasets.shards import semseg_ignore_value

        return {**super().metadata(), "label_set": self.label_set, "num_classes": self.num_classes,
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
    ``multiple`` and default ``short_side`` (pixels), ``square(config)`` (square inputs needed), and
    ``tiny(num_labels)`` building ``(config, processor)`` for a tiny random model."""

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


REGISTRY: dict[str, TeacherSpec] = {
    "dpt": TeacherSpec("dpt", "depth", "DPTForDepthEstimation", "DPTImageProcessor", 32, 384, _tiny_dpt,
                       square=_dpt_square, description="DPT (Ranftl et al. 2021), relative inverse depth"),
    "depth_anything": TeacherSpec("depth_anything", "depth", "DepthAnythingForDepthEstimation", "DPTImageProcessor",
                                  14, 518, _tiny_depth_anything,
                                  description="Depth Anything (Yang et al. 2024), relative or metric depth"),
    "segformer": TeacherSpec("segformer", "semseg", "SegformerForSemanticSegmentation", "SegformerImageProcessor",
                             32, 512, _tiny_segformer, description="SegFormer (Xie et al. 2021)"),
    "mask2former": TeacherSpec("mask2former", "semseg", "Mask2FormerForUniversalSegmentation",
                               "Mask2FormerImageProcessor", 32, 384, _tiny_mask2former,
                               description="Mask2Former (Cheng et al. 2022), semantic post-processing"),
    "oneformer": TeacherSpec("oneformer", "semseg", "OneFormerForUniversalSegmentation", "OneFormerImageProcessor",
                             32, 384, _tiny_oneformer, description="OneFormer (Jain et al. 2023), semantic task",
                             processor_keys=("image_mean", "image_std", "rescale_factor")),
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


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The autocast dtype of a teacher's forward pass: ``"auto"`` = bfloat16 on CUDA, float32 (no autocast,
    ``None``) elsewhere; ``"fp32"`` = float32 everywhere; ``"bf16"`` = bfloat16 autocast on any device.

    Raises:
        ValueError: ``precision`` not in :data:`PRECISIONS`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


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
               device: str = "cpu", batch_size: int = 8, precision: str = "auto") -> Teacher:
    """The registry architecture ``name`` from a tiny config with random weights drawn from ``seed``.

    Same ``seed`` → bit-identical weights in every process (so every Ray worker labels alike). Semseg
    teachers get ``num_labels`` classes named ``class_000``... and label set ``random-{num_labels}``.
    Depth teachers get O(1) outputs (:func:`calibrate_depth_output`; recorded in the metadata as
    ``output_calibration``). The global torch RNG is left untouched. ``short_side`` (pixels),
    ``device``, ``batch_size`` and ``precision`` as in :class:`Teacher`.

    Raises:
        KeyError: unknown ``name``. ValueError: unknown ``precision``.
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
                 precision=precision)


def load_teacher(name: str, weights: str | None = None, *, seed: int = 0, short_side: int | None = None,
                 device: str = "cpu", batch_size: int = 8, cache_dir: str | None = None, precision: str = "auto",
                 revision: str | None = None) -> Teacher:
    """Load teacher ``name`` from ``weights`` (a ``save_pretrained`` folder or an fsspec URL of one), or
    build the tiny random one (:func:`build_tiny`, from ``seed``) when ``weights`` is ``None``.

    Loading uses ``from_pretrained(path, local_files_only=True)``; the image processor comes from the
    folder's ``preprocessor_config.json`` when present, else the class defaults. ``short_side``: input
    short side in pixels (``None``: the registry default); ``precision``: see :func:`autocast_dtype`;
    ``revision``: the expected ``sha256:<hex>`` revision (``None``: any), checked before the model loads.

    Raises:
        KeyError: unknown ``name``. FileNotFoundError: missing folder/weights. ValueError: the folder holds
        another architecture, the revision differs from ``revision`` (both named), or unknown ``precision``.
    """
    spec = get_spec(name)
    if weights is None:
        teacher = build_tiny(name, seed, short_side=short_side, device=device, batch_size=batch_size,
                             precision=precision)
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
                 short_side=short_side, device=device, batch_size=batch_size, precision=precision, **extra)
