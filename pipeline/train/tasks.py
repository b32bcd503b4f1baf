"""The tasks of ``polymae multitask``: one class per task kind, each implementing :class:`Task` (its decoder, its
data stream, its loss, its metric), so that a new task is one new class registered in :data:`TASKS`.

* :class:`DepthTask`: DPT head (``models/heads.py``) on four encoder blocks; target = the depth pseudo-label
  standardised per image (MultiMAE's truncated standardisation, ``models/losses.py``), L1 loss over pixels with a
  positive depth; metric: delta1 / AbsRel / RMSE after a least-squares scale and shift (``evaluate/metrics.py``
  conventions, computed there).
* :class:`SemsegTask`: ConvNeXt head on the last block; logits at the label map's stride 4; cross-entropy ignoring
  the shards' ignore value; metric: mIoU.
* :class:`ClassificationTask`: mean-pooled tokens, LayerNorm, linear; cross-entropy on an ImageNet-style folder
  (``datasets/class_folder.py``) or on shards with a ``cls`` member; metric: top-1.
* :class:`DetectionTask`, :class:`InstanceSegTask`, :class:`KeypointTask`, :class:`CaptionTask` (kinds ``det``,
  ``seg``, ``kpt``, ``cap``): Masked AutoDecoder sequences (``models/mad.py``) on COCO-format data
  (``datasets/coco_stream.py``), all read by ONE shared decoder (:class:`SequenceTask`); metrics: box / mask /
  keypoint AP and BLEU-4 / CIDEr (``pipeline/evaluate/sequence.py``).

A task's data stream is deterministic and resumable: ``build_stream(..., skip_batches=b)`` continues after the
``b`` micro-batches this rank already took (``pipeline/train/multitask.py`` derives ``b`` from the sampler).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from polymae.pipeline.train.multitask_config import TaskConfig

log = logging.getLogger(__name__)


class Task:
    """One task of a multitask run (module docstring). Subclasses set :attr:`kind` and :attr:`head_kind` and
    implement :meth:`prepare`, :meth:`head_kwargs`, :meth:`build_stream`, :meth:`inputs` and :meth:`loss`.

    Args:
        name: the task's name (its key in ``tasks``); cfg: its :class:`TaskConfig`.
    Attributes:
        size: samples in its training data (after :meth:`prepare`); info: what evaluation needs to know
            (classes, ignore value), saved in ``model_config.json["multitask"]["tasks"][name]``.
    """

    kind = ""
    head_kind = ""

    def __init__(self, name: str, cfg: TaskConfig):
        self.name, self.cfg = name, cfg
        self.size = 0
        self.info: dict[str, Any] = {"kind": self.kind}

    def prepare(self) -> None:
        """Read the data's size and label set (file listings and manifests only).

        Raises:
            FileNotFoundError: no data; ConfigError: labels missing from the data (names the key).
        """
        raise NotImplementedError

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        """The head's constructor arguments for an encoder of ``encoder_kwargs`` (``init_kwargs``)."""
        raise NotImplementedError

    def head_spec(self, encoder_kwargs: dict) -> dict:
        """``{"kind": head kind, "kwargs": ...}`` for ``models/multitask.py``."""
        return {"kind": self.head_kind, "kwargs": self.head_kwargs(encoder_kwargs)}

    def build_stream(self, img_size: int, rank: int, world: int, seed: int, skip_batches: int, readers: int,
                     num_workers: int, shuffle_buffer: int):
        """``(stream, loader)``: this rank's infinite micro-batches of the task (``micro_batch`` samples each),
        after ``skip_batches`` already taken; ``readers`` canonical readers for shard data."""
        raise NotImplementedError

    def inputs(self, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int] | None]:
        """``(rgb [B, 3, S, S] normalised, target, out_size)`` of a compact batch, on ``device``."""
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's float32 scalar loss of a prediction against :meth:`inputs`' target."""
        raise NotImplementedError

    def forward_kwargs(self, target: Any) -> dict:
        """Extra keyword arguments of the model's forward for ``target`` (sequence tasks: the target itself, as
        their loss is computed in the forward); dense and classification tasks: none."""
        return {}


def _shard_stream(cfg: TaskConfig, img_size: int, rank: int, world: int, seed: int, skip_batches: int,
                  readers: int, num_workers: int, shuffle_buffer: int):
    """A ShardStream + DataLoader over a task's labelled shards (shared crop + flip of every member)."""
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream, make_loader
    from polymae.datasets.transforms import MultiModalAugment

    aug = MultiModalAugment(img_size=img_size, scale=tuple(cfg.crop_scale), hflip=cfg.hflip)
    counts = shards.trusted_shard_counts(cfg.shards, cfg.split)
    stream = ShardStream(counts, cfg.micro_batch, aug, rank=rank, world=world, seed=seed,
                         shuffle_buffer=shuffle_buffer, skip_batches=skip_batches, num_workers=num_workers,
                         readers=readers)
    return stream, make_loader(stream, num_workers)


def _shard_size(cfg: TaskConfig) -> int:
    from polymae.datasets import shards

    return sum(n for _, n in shards.trusted_shard_counts(cfg.shards, cfg.split))


def _rgb(batch: dict, device: torch.device) -> torch.Tensor:
    from polymae.datasets.transforms import to_model_inputs

    return to_model_inputs(batch, device, ["rgb"])["rgb"]


class DepthTask(Task):
    """Monocular depth from RGB with a DPT head (module docstring)."""

    kind, head_kind = "depth", "dpt_depth"

    def prepare(self) -> None:
        self.size = _shard_size(self.cfg)

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        depth = int(encoder_kwargs.get("depth", 12))
        layers = list(self.cfg.layers) or [depth * (i + 1) // 4 - 1 for i in range(4)]
        if any(not 0 <= i < depth for i in layers):
            from polymae.pipeline.config import ConfigError

            raise ConfigError(f"tasks.{self.name}.layers", f"{layers} outside the encoder's {depth} blocks")
        dim, width = int(encoder_kwargs.get("dim", 192)), self.cfg.head_width or 256
        return {"dim": dim, "patch_size": int(encoder_kwargs.get("patch_size", 16)), "layers": layers,
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1)), "features": width,
                "reassemble": [max(8, width // 8 * m) for m in (1, 2, 4, 8)]}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                             shuffle_buffer)

    def inputs(self, batch, device):
        from polymae.datasets.transforms import to_model_inputs

        x = to_model_inputs(batch, device, ["rgb", "depth"])
        return x["rgb"], x["depth"], None

    def loss(self, pred, target):
        from polymae.models.losses import standardize_depth

        valid = (target > 0).float()
        diff = (pred.float() - standardize_depth(target.float())).abs() * valid
        return diff.sum() / valid.sum().clamp_min(1.0)


class SemsegTask(Task):
    """Semantic segmentation from RGB with the ConvNeXt head (module docstring)."""

    kind, head_kind = "semseg", "convnext_seg"

    def prepare(self) -> None:
        from polymae.datasets import shards
        from polymae.pipeline.config import ConfigError
        from polymae.pipeline.train.data import shard_label_info

        self.size = _shard_size(self.cfg)
        n, ignore = shard_label_info(self.cfg.shards, self.cfg.split)
        if self.cfg.num_classes:
            n = self.cfg.num_classes
            ignore = shards.semseg_ignore_value(n) if ignore is None else ignore
        if n is None:
            raise ConfigError(f"tasks.{self.name}.shards", f"{self.cfg.shards} has no semseg pseudo-labels")
        self.info.update(num_classes=int(n), ignore_index=int(ignore))

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        return {"dim": int(encoder_kwargs.get("dim", 192)), "num_classes": self.info["num_classes"],
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1)),
                "width": self.cfg.head_width or 256, "depth": self.cfg.head_depth}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                             shuffle_buffer)

    def inputs(self, batch, device):
        from polymae.datasets.transforms import to_model_inputs

        x = to_model_inputs(batch, device, ["rgb", "semseg"])
        return x["rgb"], x["semseg"], tuple(x["semseg"].shape[-2:])

    def loss(self, pred, target):
        return F.cross_entropy(pred.float(), target, ignore_index=self.info["ignore_index"])


class ClassificationTask(Task):
    """Image classification with the mean-pool + LayerNorm + linear head (module docstring)."""

    kind, head_kind = "cls", "linear_cls"

    def prepare(self) -> None:
        if self.cfg.folder:
            from polymae.datasets.class_folder import list_class_folder

            classes, self.samples = list_class_folder(self.cfg.folder)
            self.size = len(self.samples)
            self.info.update(num_classes=len(classes), classes=classes)
        else:
            self.size = _shard_size(self.cfg)
            self.info.update(num_classes=self.cfg.num_classes)

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        return {"dim": int(encoder_kwargs.get("dim", 192)), "num_classes": self.info["num_classes"],
                "num_global": int(encoder_kwargs.get("num_global_tokens", 1))}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        if not self.cfg.folder:
            return _shard_stream(self.cfg, img_size, rank, world, seed, skip_batches, readers, num_workers,
                                 shuffle_buffer)
        from polymae.datasets.class_folder import ClassFolderStream
        from polymae.datasets.loader import make_loader

        stream = ClassFolderStream(self.samples, self.cfg.micro_batch, img_size, root=self.cfg.folder,
                                   scale=tuple(self.cfg.crop_scale), hflip=self.cfg.hflip, rank=rank, world=world,
                                   seed=seed, skip_batches=skip_batches)
        return stream, make_loader(stream, num_workers)

    def inputs(self, batch, device):
        if "cls" not in batch:
            raise KeyError(f"task {self.name}: a batch without `cls` labels ({batch.get('key', [])[:3]} ...)")
        return _rgb(batch, device), batch["cls"].to(device), None

    def loss(self, pred, target):
        return F.cross_entropy(pred.float(), target)


class SequenceTask(Task):
    """Base of the Masked AutoDecoder tasks (MAD, arXiv 2403.07692; ``models/mad.py``): COCO-format data
    (``datasets/coco_stream.py``), one decoder shared by every sequence task of the run (head kind ``"mad"``,
    ``models/multitask.py``; MT-AdamW updates it whenever any of them is drawn, ``multitask.py`` ``param_groups``),
    memory = the encoder's final tokens, loss = ``mad_loss`` computed inside the model's forward.

    :meth:`prepare` reads the task's annotations; :func:`link_sequence_tasks` then gives all sequence tasks one
    vocabulary (the union of their categories by id, and a caption tokenizer trained on the cap tasks' training
    captions) before the heads are built. A batch's masks, noise boxes and instance draws come from a generator
    seeded by ``(seed, task, global micro-batch)``, so a resumed run repeats them exactly.
    """

    head_kind = "mad"
    mad_task = ""

    def prepare(self) -> None:
        from polymae.datasets.coco_stream import coco_index, read_coco_records
        from polymae.pipeline.config import ConfigError

        coco = coco_index(self.cfg.annotations)
        self.records = [r for r in read_coco_records(coco) if self.usable(r)]
        if not self.records:
            raise ConfigError(f"tasks.{self.name}.annotations", f"{self.cfg.annotations} has no image with "
                              f"{self.kind} annotations")
        self.size = len(self.records)
        self.categories = [{k: c[k] for k in ("id", "name", "keypoints") if k in c}
                           for c in coco.dataset.get("categories", [])]
        self.info.update(mad_task=self.mad_task, annotations=self.cfg.annotations, images=self.cfg.images,
                         val_annotations=self.cfg.val_annotations, val_images=self.cfg.val_images or self.cfg.images)
        self._seed = 0

    def usable(self, record: dict) -> bool:
        """Whether an image record carries this task's annotations (images without them are left out)."""
        raise NotImplementedError

    def link(self, categories: list[dict], tokenizer) -> None:
        """Adopt the run's shared vocabulary: ``categories`` (sorted by id; class index = position) and the caption
        tokenizer (or None)."""
        from polymae.models.mad import MadVocab

        self.cat_index = {int(c["id"]): i for i, c in enumerate(categories)}
        self.tokenizer = tokenizer
        self.vocab = MadVocab(num_classes=len(categories),
                              caption_vocab=tokenizer.get_vocab_size() if tokenizer is not None else 0)
        self.info["categories"] = categories

    def head_kwargs(self, encoder_kwargs: dict) -> dict:
        return {"task": self.mad_task, "num_classes": self.vocab.num_classes,
                "caption_vocab": self.vocab.caption_vocab, "encoder_dim": int(encoder_kwargs.get("dim", 192)),
                "dim": self.cfg.head_width or 256, "depth": self.cfg.decoder_depth, "heads": self.cfg.decoder_heads}

    def build_stream(self, img_size, rank, world, seed, skip_batches, readers, num_workers, shuffle_buffer):
        from polymae.datasets.coco_stream import CocoStream
        from polymae.datasets.loader import make_loader

        self._seed = seed
        stream = CocoStream(self.records, self.cfg.images, self.cfg.micro_batch, img_size, rank=rank, world=world,
                            seed=seed, skip_batches=skip_batches)
        return stream, make_loader(stream, num_workers)

    def inputs(self, batch, device):
        import zlib

        gen = torch.Generator().manual_seed(zlib.crc32(f"{self._seed}/{self.name}/{batch['batch_index']}".encode()))
        target = self.sequences(batch["records"], gen)
        target["seed"] = int(torch.randint(2**31 - 1, (1,), generator=gen))
        return _rgb(batch, device), target, None

    def sequences(self, records: list[dict], gen: torch.Generator) -> dict:
        """The target of a batch's records for ``MultiTaskModel.forward`` (``tokens`` ``[B', L]`` and the
        task's extras)."""
        raise NotImplementedError

    def forward_kwargs(self, target: Any) -> dict:
        return {"target": target}

    def loss(self, pred, target):
        return pred.float()  # the model's forward computed the MAD loss

    def _box_cls(self, ann: dict) -> tuple[torch.Tensor, int]:
        return torch.tensor(ann["box"], dtype=torch.float32), self.cat_index[ann["category_id"]]

    def _instances(self, records: list[dict], gen: torch.Generator, ok) -> list[tuple[int, dict]]:
        """``(image row, annotation)`` of up to ``instances_per_image`` annotations per image passing ``ok``,
        drawn by ``gen``."""
        out = []
        for i, r in enumerate(records):
            anns = [a for a in r["anns"] if ok(a)]
            order = torch.randperm(len(anns), generator=gen)[: self.cfg.instances_per_image].tolist()
            out += [(i, anns[j]) for j in order]
        return out


class DetectionTask(SequenceTask):
    """Object detection as a MAD sequence: one sequence of 100 box slots per image (``models/mad.py``)."""

    kind = mad_task = "det"

    def usable(self, record):
        return True  # an image without objects teaches "no object" in every slot

    def sequences(self, records, gen):
        from polymae.models.mad import DET_SLOTS, encode_detection

        toks, gts = [], []
        for r in records:
            anns = r["anns"][:DET_SLOTS]
            boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
            cls = torch.tensor([self.cat_index[a["category_id"]] for a in anns], dtype=torch.long)
            toks.append(encode_detection(self.vocab, boxes, cls, gen)[0])
            gts.append(torch.cat([self.vocab.coord(boxes), (self.vocab.class_base + cls)[:, None]], dim=1))
        return {"tokens": torch.stack(toks), "gt_boxes": gts}


#: side in pixels at which instance polygons are rasterised for the 16 x 16 segmentation grid
MASK_RES = 128


class InstanceSegTask(SequenceTask):
    """Instance segmentation as MAD sequences: one per instance (up to ``instances_per_image`` per image), prompted
    with its ground-truth box and class in training (the predicted ones at inference)."""

    kind = mad_task = "seg"

    def usable(self, record):
        return any(a["polygons"] for a in record["anns"])

    def sequences(self, records, gen):
        from polymae.datasets.coco_stream import polygons_to_mask
        from polymae.models.mad import encode_segmentation

        toks, rows = [], []
        for i, a in self._instances(records, gen, lambda a: bool(a["polygons"])):
            box, cls = self._box_cls(a)
            toks.append(encode_segmentation(self.vocab, box, cls, polygons_to_mask(a["polygons"], MASK_RES)))
            rows.append(i)
        return {"tokens": torch.stack(toks), "image_index": torch.tensor(rows)}


class KeypointTask(SequenceTask):
    """Human keypoints as MAD sequences: one per person with labelled keypoints (up to ``instances_per_image`` per
    image), prompted with its box and class; unlabelled points carry no coordinate loss."""

    kind = mad_task = "kpt"

    @staticmethod
    def _ok(ann: dict) -> bool:
        from polymae.models.mad import NUM_KEYPOINTS

        kp = ann["keypoints"]
        return kp is not None and len(kp) == NUM_KEYPOINTS and any(v[2] > 0 for v in kp)

    def usable(self, record):
        return any(self._ok(a) for a in record["anns"])

    def sequences(self, records, gen):
        from polymae.models.mad import encode_keypoints

        toks, weights, rows = [], [], []
        for i, a in self._instances(records, gen, self._ok):
            box, cls = self._box_cls(a)
            t, w = encode_keypoints(self.vocab, box, cls, torch.tensor(a["keypoints"], dtype=torch.float32))
            toks.append(t)
            weights.append(w)
            rows.append(i)
        return {"tokens": torch.stack(toks), "loss_weight": torch.stack(weights), "image_index": torch.tensor(rows)}


class CaptionTask(SequenceTask):
    """Image captioning as a MAD sequence of 20 tokens; every reference caption of an image is kept for the
    best-reference loss of the fully masked copy."""

    kind = mad_task = "cap"

    def usable(self, record):
        return bool(record["captions"])

    def link(self, categories, tokenizer):
        super().link(categories, tokenizer)
        self.info["tokenizer"] = tokenizer.to_str()

    def sequences(self, records, gen):
        from polymae.models.mad import encode_caption

        toks, refs = [], []
        for r in records:
            ref = torch.stack([encode_caption(self.vocab, self.tokenizer, c) for c in r["captions"]])
            refs.append(ref)
            toks.append(ref[int(torch.randint(len(ref), (1,), generator=gen))])
        return {"tokens": torch.stack(toks), "references": refs}


def link_sequence_tasks(tasks: dict[str, Task]) -> None:
    """Give the prepared sequence tasks of a run their shared vocabulary (:meth:`SequenceTask.link`): the union of
    their categories by id (sorted; the keypoint names of a person_keypoints file kept) and a word-level caption
    tokenizer trained on the cap tasks' training captions (``datasets/captions.py``; at most ``caption_vocab``
    tokens). No-op without sequence tasks."""
    from polymae.datasets.captions import train_caption_tokenizer

    seq = [t for t in tasks.values() if isinstance(t, SequenceTask)]
    if not seq:
        return
    cats: dict[int, dict] = {}
    for t in seq:
        for c in t.categories:
            cats.setdefault(int(c["id"]), {}).update(c)
    captions = [c for t in seq if t.kind == "cap" for r in t.records for c in r["captions"]]
    tokenizer = train_caption_tokenizer(captions, seq[0].cfg.caption_vocab) if captions else None
    for t in seq:
        t.link([cats[k] for k in sorted(cats)], tokenizer)


#: task classes by kind (``TaskConfig.kind``)
TASKS: dict[str, type[Task]] = {"depth": DepthTask, "semseg": SemsegTask, "cls": ClassificationTask,
                                "det": DetectionTask, "seg": InstanceSegTask, "kpt": KeypointTask,
                                "cap": CaptionTask}


def build_task(name: str, cfg: TaskConfig) -> Task:
    """The :class:`Task` of ``cfg.kind`` named ``name`` (not yet prepared).

    Raises:
        ValueError: an unknown kind.
    """
    if cfg.kind not in TASKS:
        raise ValueError(f"unknown task kind {cfg.kind!r}; known: {sorted(TASKS)}")
    return TASKS[cfg.kind](name, cfg)


__all__ = ["Task", "DepthTask", "SemsegTask", "ClassificationTask", "SequenceTask", "DetectionTask",
           "InstanceSegTask", "KeypointTask", "CaptionTask", "MASK_RES", "TASKS", "build_task", "link_sequence_tasks"]
