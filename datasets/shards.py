"""The polymae shard format: the one place that owns member names, encodings and file layout.

Layout (docs/ARCHITECTURE.md, "Shard format")::

    {root}/{split}/{split}-{index:06d}.tar          WebDataset tar, one sample per __key__
    {root}/{split}/{split}-{index:06d}.stats.json   written after the tar is in place: the done marker
    {root}/{split}/index.parquet                    one row per sample (key, shard, size, skip reason)
    {root}/{split}/manifest.json                    schema version, teachers, label sets, counts, shards+sha256
    {root}/{split}/preview.png                      a few samples as a picture: rgb | depth | semseg

Members of one sample:

* ``rgb.jpg``    – the source bytes when they are a plain JPEG, re-encoded (quality 95) otherwise;
* ``depth.png``  – 16-bit PNG at the rgb resolution, ``value = png / 65535 * depth_range``;
  ``json["depth"]`` gives ``depth_range`` and the teacher's depth ``kind``;
* ``semseg.png`` – class ids, 8-bit when the label set has <= 255 classes else 16-bit; the top value
  (255 or 65535) is ``ignore``;
* ``json``       – source id and size, teachers (name, revision, random-init flag), label resolution,
  label-set id;
* ``cls``        – class index (ASCII integer), where the source has one.

A second teacher for the same modality is stored as ``depth.<teacher>.png`` / ``semseg.<teacher>.png``.

Reading: :func:`iter_raw_samples` streams whole shards through webdataset; :class:`SampleCursor` reads one
shard from any sample on (tar headers only up to there, member data skipped with ``seek``), which the training
stream uses to resume; :func:`trusted_shard_counts` / :func:`shard_sample_counts` give per-shard sample counts
(manifest ``samples``, stats ``written``, else counted from the tar headers).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from polymae.datasets import storage
from polymae.datasets.sources import BadImage, decode_image  # noqa: F401 - BadImage: re-exported
from polymae.datasets.storage import CommitOnExit

SCHEMA_VERSION = 1
DEFAULT_SAMPLES_PER_SHARD = 2000
RGB = "rgb.jpg"
DEPTH = "depth.png"
SEMSEG = "semseg.png"
META = "json"
CLS = "cls"
DEPTH_MAX_CODE = 65535
JPEG_QUALITY = 95
_SHARD_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.tar$")
_STATS_RE = re.compile(r"^(?P<split>.+)-(?P<index>\d{6})\.stats\.json$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")
# the hidden name ``storage.AtomicWriter`` writes ``{name}`` under until it is complete
_TEMP_RE = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]+$")


# --------------------------------------------------------------------------------------- layout
def shard_name(split: str, index: int) -> str:
    """``train-000012.tar`` for ``("train", 12)``."""
    return f"{split}-{index:06d}.tar"


def stats_name(split: str, index: int) -> str:
    """``train-000012.stats.json``: the done marker beside shard ``(split, index)``."""
    return f"{split}-{index:06d}.stats.json"


def split_dir(root: str, split: str) -> str:
    """``{root}/{split}``: the folder of one split."""
    return f"{root.rstrip('/')}/{split}"


def shard_url(root: str, split: str, index: int) -> str:
    """``{root}/{split}/{split}-{index:06d}.tar``."""
    return f"{split_dir(root, split)}/{shard_name(split, index)}"


def stats_url(root: str, split: str, index: int) -> str:
    """``{root}/{split}/{split}-{index:06d}.stats.json`` (the shard's done marker)."""
    return f"{split_dir(root, split)}/{stats_name(split, index)}"


def manifest_url(root: str, split: str) -> str:
    """``{root}/{split}/manifest.json``."""
    return f"{split_dir(root, split)}/manifest.json"


def index_url(root: str, split: str) -> str:
    """``{root}/{split}/index.parquet`` (one row per sample)."""
    return f"{split_dir(root, split)}/index.parquet"


def preview_url(root: str, split: str) -> str:
    """``{root}/{split}/preview.png``: a picture of a few samples (rgb | depth | semseg), beside the manifest."""
    return f"{split_dir(root, split)}/preview.png"


def is_valid_split(split: str) -> bool:
    """True for a usable split name: ``[A-Za-z0-9_]+`` (it starts every file name of the split)."""
    return bool(_SPLIT_RE.match(split))


def parse_shard_name(name: str) -> tuple[str, int] | None:
    """``(split, index)`` of a shard file name or URL, or None when it is not one."""
    m = _SHARD_RE.match(name.rsplit("/", 1)[-1])
    return (m["split"], int(m["index"])) if m else None


def parse_stats_name(name: str) -> tuple[str, int] | None:
    """``(split, index)`` of a done-marker (stats) file name or URL, or None when it is not one."""
    m = _STATS_RE.match(name.rsplit("/", 1)[-1])
    return (m["split"], int(m["index"])) if m else None


def _list_indexed(root: str, split: str, parse) -> dict[int, str]:
    """``{index: url}`` of the files directly in ``{root}/{split}`` whose name ``parse`` maps to
    ``(split, index)`` (one listing; hidden files are left out; ``{}`` when the folder is missing)."""
    d = split_dir(root, split)
    if not storage.exists(d):
        return {}
    out = {}
    for url in storage.list_files(d, recursive=False):
        parsed = parse(url)
        if parsed is not None and parsed[0] == split:
            out[parsed[1]] = url
    return out


def list_done_markers(root: str, split: str) -> dict[int, str]:
    """``{index: stats url}`` of the split's finished shards: one listing of ``{root}/{split}``, not one
    request per shard. A stats file is written only after its tar is in place, so these shards are whole."""
    return _list_indexed(root, split, parse_stats_name)


def list_shard_tars(root: str, split: str) -> dict[int, str]:
    """``{index: tar url}`` of the split's shard tars, done or not (one listing of ``{root}/{split}``)."""
    return _list_indexed(root, split, parse_shard_name)


def list_temporaries(root: str, split: str) -> list[str]:
    """URLs of the hidden ``.{split}-NNNNNN.tar.tmp-*`` / ``.{split}-NNNNNN.stats.json.tmp-*`` files that an
    unfinished atomic write of a shard or its done marker leaves (readers ignore them); sorted."""
    d = split_dir(root, split)
    if not storage.exists(d):
        return []
    fs, path = storage.get_fs(d)
    out = []
    for p in sorted(fs.ls(path, detail=False)):
        m = _TEMP_RE.match(p.rsplit("/", 1)[-1])
        target = m and (parse_shard_name(m["target"]) or parse_stats_name(m["target"]))
        if target and target[0] == split:
            out.append(storage.full_url(fs, p))
    return out


def brace_pattern(root: str, split: str, indices: Iterable[int]) -> str:
    """Brace-expandable URL covering ``indices`` (contiguous) or a comma list."""
    idx = sorted(indices)
    if not idx:
        raise ValueError("no shards")
    if idx == list(range(idx[0], idx[-1] + 1)):
        return f"{split_dir(root, split)}/{split}-{{{idx[0]:06d}..{idx[-1]:06d}}}.tar"
    return f"{split_dir(root, split)}/{split}-{{{','.join(f'{i:06d}' for i in idx)}}}.tar"


def member(modality: str, teacher: str | None = None) -> str:
    """Member name for a pseudo-label: ``depth.png`` or, for an extra teacher, ``depth.<teacher>.png``."""
    if modality not in ("depth", "semseg"):
        raise ValueError(f"unknown modality {modality!r}")
    return f"{modality}.png" if teacher is None else f"{modality}.{teacher}.png"


# ------------------------------------------------------------------------------------ encodings
def encode_png(arr: np.ndarray) -> bytes:
    """Lossless PNG of a 2-D uint8 or uint16 array."""
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png wants a 2-D uint8/uint16 array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """2-D uint8 or uint16 array from PNG bytes."""
    img = Image.open(io.BytesIO(data))
    arr = np.array(img)
    if img.mode in ("I;16", "I;16B", "I"):
        arr = arr.astype(np.uint16)
    return arr


def encode_depth(depth: np.ndarray, depth_range: float | None = None) -> tuple[bytes, float]:
    """Quantise a depth map to a 16-bit PNG.

    Args:
        depth: float ``[H, W]``, non-negative (relative inverse depth, or metres for metric teachers).
        depth_range: value mapped to 65535; ``None`` uses the map's maximum (per-sample range).
    Returns:
        ``(png bytes, depth_range)``; decoding is ``png / 65535 * depth_range``, so the error is at
        most half a quantisation step ``depth_range / 65535 / 2``.
    Raises:
        ValueError: a non-2-D map or non-finite values.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {depth.shape}")
    if not np.isfinite(depth).all():
        raise ValueError("depth has NaN/inf values")
    depth = np.clip(depth, 0.0, None)
    if depth_range is None:
        depth_range = float(depth.max())
    depth_range = float(depth_range) if depth_range > 0 else 1.0
    codes = np.rint(np.clip(depth / depth_range, 0.0, 1.0) * DEPTH_MAX_CODE).astype(np.uint16)
    return encode_png(codes), depth_range


def decode_depth(data: bytes, depth_range: float) -> np.ndarray:
    """float32 ``[H, W]`` depth from ``depth.png`` bytes and the sample's ``depth_range``."""
    codes = decode_png(data)
    return (codes.astype(np.float32) / DEPTH_MAX_CODE * np.float32(depth_range)).astype(np.float32)


def semseg_ignore_value(num_classes: int) -> int:
    """The stored ``ignore`` id: 255 for label sets of <= 255 classes, else 65535."""
    if num_classes < 1 or num_classes > 65535:
        raise ValueError(f"num_classes must be in [1, 65535], got {num_classes}")
    return 255 if num_classes <= 255 else 65535


def encode_semseg(ids: np.ndarray, num_classes: int) -> bytes:
    """PNG of class ids ``[H, W]``; ids outside ``[0, num_classes)`` become ``ignore``."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"semseg must be [H, W], got {ids.shape}")
    ignore = semseg_ignore_value(num_classes)
    dtype = np.uint8 if ignore == 255 else np.uint16
    out = np.where((ids >= 0) & (ids < num_classes), ids, ignore).astype(dtype)
    return encode_png(out)


def decode_semseg(data: bytes) -> np.ndarray:
    """int64 ``[H, W]`` class ids (``ignore`` keeps its stored value 255/65535)."""
    return decode_png(data).astype(np.int64)


def load_rgb(data: bytes, max_pixels: int = 178_956_970, min_side: int = 1,
             max_aspect: float | None = None) -> tuple[np.ndarray, bytes]:
    """Decode a source image to RGB (:func:`~polymae.datasets.sources.decode_image`) and decide the
    ``rgb.jpg`` bytes: the source bytes when they already are a JPEG that decodes to the same pixels (RGB or
    grayscale, no rotation), else the RGB pixels re-encoded at :data:`JPEG_QUALITY`.

    Args:
        data: the source file's bytes. max_pixels, min_side, max_aspect: the size limits of ``decode_image``
            (the label job passes its config's; the defaults accept any size up to Pillow's bomb limit).
    Returns:
        ``(uint8 [H, W, 3] array, jpeg bytes)``.
    Raises:
        BadImage: ``reason`` one of ``sources.SKIP_REASONS`` (``empty``, ``undecodable``, ``unsupported``,
        ``too_large``, ``too_small``, ``too_elongated``).
    """
    img = decode_image(data, max_pixels=max_pixels, min_side=min_side, max_aspect=max_aspect)
    if img.plain_jpeg:
        return img.rgb, data
    return img.rgb, encode_rgb(img.rgb)


def encode_rgb(rgb: np.ndarray) -> bytes:
    """``rgb.jpg`` bytes of uint8 ``[H, W, 3]`` pixels, JPEG at :data:`JPEG_QUALITY`."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def output_size(height: int, width: int, short_side: int | None = None, max_side: int | None = None
                ) -> tuple[int, int]:
    """The stored ``(height, width)`` in pixels of a ``height x width`` source under the label job's output
    policy: shrunk (aspect kept) so that the short side is at most ``short_side`` and the long side at most
    ``max_side``; never enlarged; ``None`` = no limit. Sides are rounded, at least 1.

    Raises:
        ValueError: non-positive sizes or limits.
    """
    if height <= 0 or width <= 0 or (short_side is not None and short_side <= 0) or (max_side is not None
                                                                                      and max_side <= 0):
        raise ValueError(f"sizes must be positive: {height}x{width}, short_side={short_side}, max_side={max_side}")
    scale = 1.0
    if short_side is not None:
        scale = min(scale, short_side / min(height, width))
    if max_side is not None:
        scale = min(scale, max_side / max(height, width))
    if scale >= 1.0:
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[h, w, 3]``: ``rgb`` (uint8 ``[H, W, 3]``) resized to ``size = (h, w)`` pixels with Pillow's
    bicubic filter, antialiased when shrinking (the filter widens with the scale); ``rgb`` itself when the
    size is unchanged."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == rgb.shape[:2]:
        return rgb
    return np.array(Image.fromarray(rgb).resize((w, h), Image.BICUBIC))  # writable (torch.from_numpy)


def decode_rgb(data: bytes) -> np.ndarray:
    """uint8 ``[H, W, 3]`` from ``rgb.jpg`` bytes."""
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


# ------------------------------------------------------------------------------------- samples
@dataclass
class LabelledSample:
    """One sample as written to a shard.

    ``rgb_jpeg``: bytes; ``depth``: float32 ``[H, W]``; ``semseg``: int64 ``[H, W]`` (both at the rgb
    resolution); ``meta``: the ``json`` member; ``extra``: further members (e.g. a second teacher).
    """

    key: str
    rgb_jpeg: bytes
    depth: np.ndarray | None = None
    semseg: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    cls: int | None = None
    depth_range: float | None = None
    num_classes: int | None = None
    extra: dict = field(default_factory=dict)

    def encode(self) -> dict[str, Any]:
        """The WebDataset sample dict (``__key__`` + member bytes)."""
        if "/" in self.key or "." in self.key:
            raise ValueError(f"sample key must not contain '/' or '.': {self.key!r}")
        out: dict[str, Any] = {"__key__": self.key, RGB: self.rgb_jpeg}
        meta = dict(self.meta)
        if self.depth is not None:
            png, rng = encode_depth(self.depth, self.depth_range)
            out[DEPTH] = png
            meta.setdefault("depth", {})["depth_range"] = rng
        if self.semseg is not None:
            if self.num_classes is None:
                raise ValueError("num_classes is required to encode semseg")
            out[SEMSEG] = encode_semseg(self.semseg, self.num_classes)
            meta.setdefault("semseg", {}).update(
                num_classes=self.num_classes, ignore_index=semseg_ignore_value(self.num_classes))
        out.update(self.extra)
        out[META] = json.dumps(meta, sort_keys=True).encode()
        if self.cls is not None:
            out[CLS] = str(int(self.cls)).encode()
        return out


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Decode a raw WebDataset sample (member name -> bytes) into arrays.

    Returns:
        dict with ``key``; ``rgb`` uint8 ``[H, W, 3]``; ``depth`` float32 ``[H, W]`` (if present);
        ``semseg`` int64 ``[H, W]`` (ignore keeps its stored top value, given in ``semseg_ignore``);
        ``meta`` dict; ``cls`` int or None.
    Raises:
        KeyError: a sample without ``rgb.jpg`` or ``json``.
    """
    meta = json.loads(sample[META])
    out: dict[str, Any] = {"key": sample["__key__"], "rgb": decode_rgb(sample[RGB]), "meta": meta}
    if DEPTH in sample:
        out["depth"] = decode_depth(sample[DEPTH], meta["depth"]["depth_range"])
    if SEMSEG in sample:
        out["semseg"] = decode_semseg(sample[SEMSEG])
        out["semseg_ignore"] = int(meta["semseg"]["ignore_index"])
    out["cls"] = int(sample[CLS]) if CLS in sample else None
    return out


# --------------------------------------------------------------------------------------- writer
class _HashingStream:
    """Write-through stream that feeds every byte to a hash (so a shard's sha256 needs no re-read)."""

    def __init__(self, sink: Any, h: Any):
        self._sink, self._h = sink, h

    def write(self, data: bytes) -> int:
        self._h.update(data)
        return self._sink.write(data)

    def flush(self) -> None:
        self._sink.flush()

    def tell(self) -> int:
        return self._sink.tell()

    def close(self) -> None:  # the owner closes the sink itself
        pass


class ShardTarWriter(CommitOnExit):
    """Writes one shard tar atomically (``datasets.atomic.AtomicWriter``) through ``webdataset.TarWriter``.

    Members get a fixed mtime so identical inputs give byte-identical tars. ``close()`` publishes the
    tar; ``abort()`` leaves nothing behind. Errors at close (e.g. a failed upload) propagate.
    """

    def __init__(self, url: str):
        import webdataset as wds

        from polymae.datasets.storage import AtomicWriter

        self.url = url
        self._sink = AtomicWriter(url)
        self._hash = hashlib.sha256()
        self._tar = wds.TarWriter(_HashingStream(self._sink, self._hash), encoder=False, mtime=0.0)
        self.count = 0

    def write(self, sample: LabelledSample | dict[str, Any]) -> None:
        enc = sample.encode() if isinstance(sample, LabelledSample) else sample
        self._tar.write(enc)
        self.count += 1

    @property
    def bytes_written(self) -> int:
        return self._sink.bytes_written

    @property
    def sha256(self) -> str:
        """Hex sha256 of the bytes written so far (of the whole tar once closed)."""
        return self._hash.hexdigest()

    def close(self) -> None:
        self._tar.close()  # does not close a caller-given stream
        self._sink.close()

    def abort(self) -> None:
        try:
            self._tar.tarstream.close()
        except Exception:
            pass
        self._sink.abort()


# --------------------------------------------------------------------------------------- reader
def register_fsspec_gopen() -> None:
    """Let webdataset open ``s3://``/``gcs://``/... URLs through fsspec (``polymae.patches.webdataset_fsspec_schemes``,
    applied once per process and kept: every reader of the process needs it)."""
    global _GOPEN_PATCH
    if _GOPEN_PATCH is None or not _GOPEN_PATCH.active:
        from polymae.patches import webdataset_fsspec_schemes

        _GOPEN_PATCH = webdataset_fsspec_schemes()


_GOPEN_PATCH = None


def done_shards(root: str, split: str) -> dict[int, dict]:
    """Shards a reader may trust: those listed in the manifest, plus any with a stats (done) file.

    Returns ``{index: stats-or-manifest entry}``.
    """
    out: dict[int, dict] = {}
    murl = manifest_url(root, split)
    if storage.exists(murl):
        for s in storage.read_json(murl).get("shards", []):
            out[int(s["index"])] = s
    for index, url in list_done_markers(root, split).items():
        if index not in out:
            out[index] = storage.read_json(url)
    return out


def trusted_shard_urls(root: str, split: str) -> list[str]:
    """URLs of the done shards of ``split`` in index order.

    Raises:
        FileNotFoundError: no done shard under ``{root}/{split}``.
    """
    idx = sorted(done_shards(root, split))
    if not idx:
        raise FileNotFoundError(f"no finished shards under {split_dir(root, split)} (no manifest/stats files)")
    return [shard_url(root, split, i) for i in idx]


def _every_shard(src, group=None):
    """Node/worker splitter that keeps every URL: polymae's loaders split the data themselves."""
    yield from src


def iter_raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """Raw samples (member -> bytes) from shard URLs in order, via webdataset (no implicit node/worker split)."""
    import webdataset as wds

    register_fsspec_gopen()
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=_every_shard,
                        workersplitter=_every_shard)
    yield from ds


# ------------------------------------------------------------------------------- counts, seeking
def _split_of(url: str) -> tuple[str, str, int] | None:
    """``(root, split, index)`` of a shard URL laid out as ``{root}/{split}/{split}-NNNNNN.tar``, else None."""
    parsed = parse_shard_name(url)
    if parsed is None:
        return None
    d = url.rsplit("/", 1)[0] if "/" in url else "."
    root, _, folder = d.rpartition("/")
    return (root, parsed[0], parsed[1]) if folder == parsed[0] else None


def _entries_beside(urls: list[str]) -> dict[str, dict]:
    """``{url: manifest-or-stats entry}`` for the given shard URLs that have one (one ``done_shards`` per split
    folder); URLs outside the shard layout or without an entry are left out."""
    by_split: dict[tuple[str, str], dict[int, dict]] = {}
    out = {}
    for url in urls:
        where = _split_of(url)
        if where is None:
            continue
        root, split, index = where
        if (root, split) not in by_split:
            by_split[(root, split)] = done_shards(root or ".", split)
        entry = by_split[(root, split)].get(index)
        if entry is not None:
            out[url] = entry
    return out


def _entry_count(entry: dict) -> int | None:
    """Samples in a shard from its manifest entry (``samples``) or stats file (``written``); None if neither."""
    for k in ("samples", "written"):
        if entry.get(k) is not None:
            return int(entry[k])
    return None


def shard_sample_counts(urls: list[str]) -> list[tuple[str, int]]:
    """``(url, samples)`` for each shard URL, in the given order: the manifest's ``samples`` or the stats file's
    ``written`` beside the shard, else counted from the tar's headers (:func:`count_samples`; no payload read).

    Raises:
        OSError: a shard without an entry that cannot be opened.
    """
    entries = _entries_beside(urls)
    out = []
    for url in urls:
        n = _entry_count(entries.get(url, {}))
        out.append((url, n if n is not None else count_samples(url)))
    return out


def trusted_shard_counts(root: str, split: str) -> list[tuple[str, int]]:
    """``(url, samples)`` of the done shards of ``split`` in index order (see :func:`trusted_shard_urls`); the
    counts come from the manifest (``samples``) or the stats files (``written``).

    Raises:
        FileNotFoundError: no done shard under ``{root}/{split}``.
    """
    done = done_shards(root, split)
    urls = trusted_shard_urls(root, split)
    counts = [_entry_count(done[i]) for i in sorted(done)]
    return [(u, n if n is not None else count_samples(u)) for u, n in zip(urls, counts)]


def mean_sample_bytes(shards_: list[tuple[str, int]]) -> float | None:
    """Mean bytes per sample over ``(url, samples)`` shards: the manifest/stats ``size`` of each shard (its file
    size where no entry gives one) over the summed counts; None when there are no samples."""
    total = sum(n for _, n in shards_)
    if total <= 0:
        return None
    entries = _entries_beside([u for u, _ in shards_])
    size = 0
    for url, _ in shards_:
        s = entries.get(url, {}).get("size")
        if s is None:
            fs, path = storage.get_fs(url)
            s = fs.size(path)
        size += int(s)
    return size / total


_BLOCK = 512


def _tar_number(field_: bytes) -> int:
    """A tar header number: octal ASCII, or GNU base-256 when the top bit is set."""
    if field_[:1] and field_[0] & 0x80:
        return int.from_bytes(bytes([field_[0] & 0x7F]) + field_[1:], "big")
    s = field_.split(b"\0", 1)[0].strip()
    return int(s, 8) if s else 0


def _tar_header(hdr: bytes) -> tuple[str, int, bytes]:
    """``(name, size in bytes, type flag)`` of one 512-byte header.

    Raises:
        ValueError: a header whose checksum does not match (a corrupt or truncated tar).
    """
    chk = _tar_number(hdr[148:156])
    if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
        raise ValueError("tar header checksum mismatch")
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
        name = hdr[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), _tar_number(hdr[124:136]), hdr[156:157]


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    for rec in data.decode("utf-8", "replace").split("\n"):
        _, _, kv = rec.partition(" ")
        if kv.startswith("path="):
            return kv[5:]
    return None


class SampleCursor:
    """Reads one shard tar sample by sample through an fsspec file, seeking over the data it does not need.

    Members are grouped as webdataset groups them: consecutive members with the same key form a sample (key =
    member name up to the first ``.`` of its base name, member = the rest, lower-cased). Headers are 512-byte
    blocks; a member's data is read only when the sample is loaded, and skipped with ``seek`` otherwise, so
    :meth:`skip` costs header reads only. A truncated or corrupt tar ends the shard early (``truncated`` is set).

    Attributes: ``payload_bytes`` (member data bytes read), ``header_bytes`` (header bytes read).
    Raises:
        OSError: the shard cannot be opened (from the constructor).
    """

    def __init__(self, url: str):
        fs, path = storage.get_fs(url)
        self.url = url
        self._fh = fs.open(path, "rb")
        self._pos = 0
        self._next: tuple[str, str, int, int] | None = None  # (key, member, data offset, size)
        self.truncated = False
        self.payload_bytes = self.header_bytes = 0
        self._advance()

    def _read_header(self) -> tuple[str, int, bytes] | None:
        self._fh.seek(self._pos)
        hdr = self._fh.read(_BLOCK)
        self.header_bytes += len(hdr)
        if len(hdr) < _BLOCK or hdr == bytes(_BLOCK):
            self.truncated = len(hdr) < _BLOCK
            return None
        name, size, typ = _tar_header(hdr)
        self._pos += _BLOCK + -(-size // _BLOCK) * _BLOCK
        return name, size, typ

    def _advance(self) -> None:
        """Move ``_next`` to the next regular member that has a key (end of shard: None)."""
        self._next, long_name = None, None
        try:
            while (h := self._read_header()) is not None:
                name, size, typ = h
                if typ in (b"L", b"x"):
                    data = self._fh.read(size)
                    self.header_bytes += len(data)
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace") if typ == b"L" else _pax_path(data)
                    continue
                name, long_name = long_name or name, None
                if typ not in (b"0", b"\0", b"7"):
                    continue
                base = name.rsplit("/", 1)[-1]
                if "." not in base or base.startswith("__"):
                    continue
                cut = len(name) - len(base) + base.index(".")
                self._next = (name[:cut], name[cut + 1:].lower(), self._pos - -(-size // _BLOCK) * _BLOCK, size)
                return
        except ValueError:
            self.truncated = True

    def next_sample(self, load: bool = True) -> dict[str, Any] | None:
        """The next sample: ``{"__key__", "__url__", member: bytes ...}`` (members only when ``load``), or None
        at the end of the shard. A member whose data is cut short ends the shard (``truncated``)."""
        if self._next is None:
            return None
        key = self._next[0]
        out: dict[str, Any] = {"__key__": key, "__url__": self.url}
        while self._next is not None and self._next[0] == key:
            _, member_, offset, size = self._next
            if load:
                self._fh.seek(offset)
                data = self._fh.read(size)
                self.payload_bytes += len(data)
                if len(data) < size:
                    self.truncated, self._next = True, None
                    return None
                out[member_] = data
            self._advance()
        return out

    def skip(self, n: int) -> int:
        """Skip ``n`` samples reading headers only; returns how many were skipped (fewer at the shard's end)."""
        done = 0
        while done < n and self.next_sample(load=False) is not None:
            done += 1
        return done

    def close(self) -> None:
        """Close the underlying file."""
        self._fh.close()


def count_samples(url: str) -> int:
    """Samples in one shard tar, from its headers only (see :class:`SampleCursor`).

    Raises:
        OSError: the shard cannot be opened.
    """
    cur = SampleCursor(url)
    try:
        return cur.skip(1 << 62)
    finally:
        cur.close()
