"""The training data of a run: the labelled shards' semantic classes and the per-rank batch stream."""

from __future__ import annotations

import json

from polymae.pipeline.train.config import PretrainConfig


def shard_label_info(root: str, split: str) -> tuple[int | None, int | None]:
    """``(semseg num_classes, ignore value)`` of the shards under ``root/split``, from their manifest or else
    the first sample's JSON; ``(None, None)`` when the shards carry no semseg pseudo-labels."""
    from polymae.datasets import shards, storage

    murl = shards.manifest_url(root, split)
    if storage.exists(murl):
        man = storage.read_json(murl)
        ls = man.get("teachers", {}).get("semseg") or {}
        if "num_classes" in ls:
            n = int(ls["num_classes"])
            return n, shards.semseg_ignore_value(n)
    urls = shards.trusted_shard_urls(root, split)
    for raw in shards.iter_raw_samples(urls[:1]):
        meta = json.loads(raw[shards.META])
        if "semseg" in meta:
            return int(meta["semseg"]["num_classes"]), int(meta["semseg"]["ignore_index"])
        break
    return None, None


def build_loader(cfg: PretrainConfig, rank: int, world: int, skip_batches: int = 0, readers: int | None = None):
    """This rank's micro-batches: ``(stream, loader)``, a :class:`~polymae.datasets.loader.ShardStream` over the
    verified shards (random-resized crop + flip shared by all modalities, MultiMAE App. A.1) and the
    ``DataLoader`` around it.

    Each item is a compact dict (``datasets/transforms.py``): ``rgb`` uint8 ``[B, 3, S, S]``, ``depth`` uint16
    codes ``[B, 1, S, S]`` + ``depth_range [B]``, ``semseg`` ``[B, S/4, S/4]`` ids and ``key`` (sample names), with
    ``B = train.micro_batch`` and ``S = data.img_size`` pixels; ``to_model_inputs`` converts it on the device. ``skip_batches``: micro-batches of this rank
    already consumed (``resumed step × gradient accumulation``), so a resumed run sees the same data; the stream
    seeks straight to it (cost bounded by one shuffle chunk, ``datasets/loader.py``). ``readers``: the canonical
    readers that define the order (the run's, from its checkpoint; default ``data.readers`` or ranks x workers).

    Raises:
        FileNotFoundError: no done shard under ``data.shards``/``data.split``.
    """
    from polymae.datasets import shards
    from polymae.datasets.loader import ShardStream, make_loader
    from polymae.datasets.transforms import MultiModalAugment

    counts = shards.trusted_shard_counts(cfg.data.shards, cfg.data.split)
    aug = MultiModalAugment(img_size=cfg.data.img_size, scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                            rgb_decode=cfg.data.rgb_decode)
    stream = ShardStream(counts, cfg.train.micro_batch, aug, rank=rank, world=world, seed=cfg.train.seed,
                         shuffle_buffer=cfg.data.shuffle_buffer, shuffle_buffer_mb=cfg.data.shuffle_buffer_mb,
                         skip_batches=skip_batches, num_workers=cfg.data.num_workers,
                         readers=readers or cfg.data.readers or None)
    return stream, make_loader(stream, cfg.data.num_workers)


__all__ = ["shard_label_info", "build_loader"]
