"""A picture per labelled split: ``{root}/{split}/preview.png`` beside the manifest, so a user sees at a glance
whether the teachers did something sensible (MultiMAE, Bachmann et al. 2022, Fig. 2 shows the same triplets).

The picture is a grid: one row per sample, three columns ``rgb | depth | semseg``:

* ``rgb``    – the stored ``rgb.jpg``;
* ``depth``  – the primary teacher's ``depth.png``, colour-mapped with a viridis-like table (:data:`DEPTH_COLORS`)
  between its 2nd and 98th percentile, near = bright (inverted for metric depth, where larger = farther);
* ``semseg`` – the primary teacher's ``semseg.png`` through a fixed class palette (:func:`semseg_palette`),
  ``ignore`` black.

Every image is fitted into a ``tile`` x ``tile`` cell (scale ``tile / max(H, W)``, each side
``max(1, round(side * scale))``, centred; Pillow bilinear for rgb and depth, nearest for semseg); cells are
``gap`` px apart and from the border, on a dark background, so the picture is ``3 * tile + 4 * gap`` px wide and
``rows * tile + (rows + 1) * gap`` px high. A missing member leaves its cell empty. The PNG's text chunks name
what it shows: ``polymae:keys`` (JSON list of sample keys, row by row), ``polymae:shards`` (the shard URLs read)
and ``polymae:columns``.

The samples are the first ones of the split's done shards in index order (the plan shuffles keys, so they are a
random draw); reading them costs the tar headers before them and their members (``datasets.shards.SampleCursor``).

The label driver calls :func:`write_preview_or_warn` after the manifest: a preview is a convenience, so a
failure to render it is a loud warning, never a failed split. :func:`write_preview` works on any existing split.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging

import numpy as np

from polymae.pipeline.colours import DEPTH_COLORS, colour_ramp, semseg_palette  # noqa: F401 (re-exported)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from polymae.datasets import shards as S
from polymae.datasets import storage

log = logging.getLogger("polymae.label")

PREVIEW_SAMPLES = 4
PREVIEW_TILE = 192
PREVIEW_GAP = 4
COLUMNS = ("rgb", "depth", "semseg")
BACKGROUND = (24, 24, 24)
def colorize_depth(codes: np.ndarray, metric: bool = False) -> np.ndarray:
    """Colour-map a depth map for display.

    Args:
        codes: ``[H, W]`` stored depth codes (uint16 ``depth.png``) or depths (any real dtype); only their order
            matters: the 2nd..98th percentile is stretched over :data:`DEPTH_COLORS`.
        metric: True for metric depth (larger = farther): inverted so that near is bright, as for relative
            inverse depth.
    Returns:
        uint8 ``[H, W, 3]``.
    Raises:
        ValueError: a map that is not 2-D.
    """
    d = np.asarray(codes, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must be [H, W], got {d.shape}")
    lo, hi = np.percentile(d, [2.0, 98.0])
    t = np.clip((d - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(d)
    return colour_ramp(1.0 - t if metric else t)


def colorize_semseg(ids: np.ndarray, ignore: int | None = None) -> np.ndarray:
    """Class ids ``[H, W]`` (int) as uint8 ``[H, W, 3]`` through :func:`semseg_palette`; ``ignore`` (and any negative
    id) black.

    Raises:
        ValueError: a map that is not 2-D.
    """
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2:
        raise ValueError(f"semseg must be [H, W], got {ids.shape}")
    valid = ids >= 0 if ignore is None else (ids >= 0) & (ids != ignore)
    pal = semseg_palette(int(ids[valid].max()) + 1 if valid.any() else 1)
    out = np.zeros((*ids.shape, 3), dtype=np.uint8)
    out[valid] = pal[ids[valid]]
    return out


def fit_tile(img: Image.Image, tile: int, resample: int) -> tuple[Image.Image, tuple[int, int]]:
    """``img`` scaled by ``tile / max(W, H)`` (each side ``max(1, round(side * scale))``) with ``resample``, and
    its ``(x, y)`` offset to be centred in a ``tile`` x ``tile`` cell."""
    w, h = img.size
    scale = tile / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, resample=resample), ((tile - size[0]) // 2, (tile - size[1]) // 2)


def _sample_images(sample: dict) -> list[tuple[Image.Image, int] | None]:
    """The ``(image, resample)`` of each of :data:`COLUMNS` for one raw shard sample (None for a missing member)."""
    meta = json.loads(sample[S.META]) if S.META in sample else {}
    cells: list[tuple[Image.Image, int] | None] = []
    cells.append((Image.open(io.BytesIO(sample[S.RGB])).convert("RGB"), Image.Resampling.BILINEAR)
                 if S.RGB in sample else None)
    if S.DEPTH in sample:
        metric = meta.get("depth", {}).get("kind") == "metric"
        depth = colorize_depth(S.decode_png(sample[S.DEPTH]), metric=metric)
        cells.append((Image.fromarray(depth), Image.Resampling.BILINEAR))
    else:
        cells.append(None)
    if S.SEMSEG in sample:
        ignore = meta.get("semseg", {}).get("ignore_index")
        cells.append((Image.fromarray(colorize_semseg(S.decode_semseg(sample[S.SEMSEG]), ignore)),
                      Image.Resampling.NEAREST))
    else:
        cells.append(None)
    return cells


def render_preview(samples: list[dict], tile: int = PREVIEW_TILE, gap: int = PREVIEW_GAP) -> Image.Image:
    """The preview grid (see the module docstring) of raw shard samples (``{member: bytes}``, as
    ``datasets.shards.SampleCursor`` yields them).

    Returns:
        RGB image of ``3 * tile + 4 * gap`` x ``len(samples) * tile + (len(samples) + 1) * gap`` px.
    Raises:
        ValueError: no samples, or ``tile`` < 1. OSError: a member that does not decode.
    """
    if not samples:
        raise ValueError("no samples to preview")
    if tile < 1 or gap < 0:
        raise ValueError(f"tile must be >= 1 and gap >= 0, got {tile}, {gap}")
    n = len(samples)
    canvas = Image.new("RGB", (len(COLUMNS) * tile + (len(COLUMNS) + 1) * gap, n * tile + (n + 1) * gap),
                       BACKGROUND)
    for r, sample in enumerate(samples):
        for c, cell in enumerate(_sample_images(sample)):
            if cell is None:
                continue
            img, (dx, dy) = fit_tile(cell[0], tile, cell[1])
            canvas.paste(img, (gap + c * (tile + gap) + dx, gap + r * (tile + gap) + dy))
    return canvas


def first_samples(root: str, split: str, n: int = PREVIEW_SAMPLES) -> tuple[list[dict], list[str]]:
    """The first ``n`` samples of the done shards of ``split`` in index order (fewer when the split has fewer),
    and the URLs of the shards they came from.

    Raises:
        FileNotFoundError: the split has no done shard. OSError: a shard cannot be read.
    """
    out: list[dict] = []
    used: list[str] = []
    for url in S.trusted_shard_urls(root, split):
        if len(out) >= n:
            break
        cur = S.SampleCursor(url)
        try:
            while len(out) < n and (sample := cur.next_sample()) is not None:
                out.append(sample)
                if not used or used[-1] != url:
                    used.append(url)
        finally:
            cur.close()
    return out, used


def write_preview(root: str, split: str, n: int = PREVIEW_SAMPLES, tile: int = PREVIEW_TILE,
                  gap: int = PREVIEW_GAP) -> dict:
    """Render and write ``preview.png`` of an existing labelled split (see the module docstring), atomically.

    Args:
        root: the label job's ``output`` (local path or fsspec URL); ``split``: the split name.
        n: rows (samples); ``tile``: cell side in px; ``gap``: px between cells.
    Returns:
        ``{"url", "keys" (row order), "shards", "width", "height"}``.
    Raises:
        FileNotFoundError: the split has no done shard. ValueError: its done shards hold no samples.
        OSError: a shard or member cannot be read, or the picture cannot be written.
    """
    samples, shards = first_samples(root, split, n)
    img = render_preview(samples, tile, gap)
    keys = [s["__key__"] for s in samples]
    info = PngInfo()
    info.add_text("polymae:keys", json.dumps(keys))
    info.add_text("polymae:shards", json.dumps(shards))
    info.add_text("polymae:columns", ",".join(COLUMNS))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    url = S.preview_url(root, split)
    storage.write_bytes_atomic(url, buf.getvalue())
    return {"url": url, "keys": keys, "shards": shards, "width": img.width, "height": img.height}


def write_preview_or_warn(root: str, split: str, **kw) -> str | None:
    """:func:`write_preview`, for the end of a label run: returns the picture's URL, or None after logging a loud
    warning when it cannot be made (and removing an older ``preview.png``); a preview never fails a labelled split."""
    try:
        url = write_preview(root, split, **kw)["url"]
    except Exception as e:  # noqa: BLE001 - a convenience picture; the labelled shards are already complete
        log.warning("!!! could not write the preview picture of %s/%s (the labelled shards are not affected): "
                    "%s: %s", root, split, type(e).__name__, e, exc_info=True)
        with contextlib.suppress(Exception):  # an older picture would show other samples than the split holds
            storage.remove(S.preview_url(root, split))
        return None
    log.info("preview of %s/%s: %s", root, split, url)
    return url
