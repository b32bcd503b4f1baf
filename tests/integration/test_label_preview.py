"""preview.png beside a labelled split: written by the label run on the scikit-image photographs (tiny
random-weight teachers), a grid of rgb | depth | semseg whose tiles are the shards' own members."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polymae.datasets import shards as S
from polymae.pipeline.label import preview as P
from polymae.pipeline.label.config import TeacherConfig
from polymae.pipeline.label.driver import LabelConfig, run_label

pytestmark = pytest.mark.integration

PHOTOS = ["astronaut", "coffee", "chelsea", "camera", "coins"]  # square, landscape, grayscale: several tile shapes


@pytest.fixture(scope="module")
def labelled_split(tmp_path_factory, ray_local, photo_writer) -> Path:
    root = tmp_path_factory.mktemp("preview")
    photo_writer(root / "src", PHOTOS)
    teachers = [TeacherConfig(name="dpt", input_size=64), TeacherConfig(name="segformer", input_size=64)]
    run_label(LabelConfig(input=str(root / "src"), output=str(root / "out"), samples_per_shard=3, teachers=teachers,
                          batch_size=4, num_workers=1, progress=False, read_threads=2))
    return root / "out"


def _shard_samples(tar: Path) -> list[dict]:
    """Samples of a shard in tar order, read with Python's tarfile: ``{"__key__", member: bytes}``."""
    out: list[dict] = []
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            key, member = m.name.split(".", 1)
            if not out or out[-1]["__key__"] != key:
                out.append({"__key__": key})
            out[-1][member] = tf.extractfile(m).read()
    return out


def _cell(img: np.ndarray, row: int, col: int, size: tuple[int, int], tile: int, gap: int) -> np.ndarray:
    """The fitted image inside grid cell (row, col): ``size`` = (w, h), centred in a ``tile`` square."""
    w, h = size
    x0 = gap + col * (tile + gap) + (tile - w) // 2
    y0 = gap + row * (tile + gap) + (tile - h) // 2
    return img[y0:y0 + h, x0:x0 + w]


def _fitted(w: int, h: int, tile: int) -> tuple[int, int]:
    s = tile / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def test_label_run_writes_a_preview_of_its_shards(labelled_split):
    split = labelled_split / "train"
    path = split / "preview.png"
    assert (split / "manifest.json").exists() and path.exists()
    assert S.preview_url(str(labelled_split), "train") == str(path)
    img = Image.open(path)
    img.load()
    tile, gap, rows = P.PREVIEW_TILE, P.PREVIEW_GAP, P.PREVIEW_SAMPLES
    assert img.mode == "RGB" and img.size == (3 * tile + 4 * gap, rows * tile + (rows + 1) * gap)
    # the rows are the first samples of the shards in index order, read here with tarfile
    samples = _shard_samples(split / "train-000000.tar") + _shard_samples(split / "train-000001.tar")
    samples = samples[:rows]
    assert json.loads(img.text["polymae:keys"]) == [s["__key__"] for s in samples]
    assert img.text["polymae:columns"] == "rgb,depth,semseg"
    grid = np.asarray(img).astype(np.float64)
    for r, sample in enumerate(samples):
        rgb = Image.open(io.BytesIO(sample["rgb.jpg"])).convert("RGB")
        size = _fitted(*rgb.size, tile)
        want = np.asarray(rgb.resize(size, Image.Resampling.BILINEAR)).astype(np.float64)
        got = _cell(grid, r, 0, size, tile, gap)
        assert np.abs(got - want).mean() < 1.0, sample["__key__"]
        if r:  # and it is this sample's rgb, not the row above's
            other = Image.open(io.BytesIO(samples[r - 1]["rgb.jpg"])).convert("RGB").resize(size)
            assert np.abs(got - np.asarray(other)).mean() > 10
        # depth: near (large relative inverse depth) is bright; the tile follows the stored map
        codes = np.asarray(Image.open(io.BytesIO(sample["depth.png"]))).astype(np.float32)
        dsize = _fitted(codes.shape[1], codes.shape[0], tile)
        want_d = np.asarray(Image.fromarray(codes, mode="F").resize(dsize, Image.Resampling.BILINEAR))
        lum = _cell(grid, r, 1, dsize, tile, gap) @ np.array([0.299, 0.587, 0.114])
        assert np.corrcoef(lum.ravel(), want_d.ravel())[0, 1] > 0.8, sample["__key__"]
        # semseg: one palette colour per class id present (no blending), different ids different colours
        ids = np.asarray(Image.open(io.BytesIO(sample["semseg.png"])))
        ssize = _fitted(ids.shape[1], ids.shape[0], tile)
        want_ids = np.asarray(Image.fromarray(ids).resize(ssize, Image.Resampling.NEAREST))
        colours = _cell(grid, r, 2, ssize, tile, gap).reshape(-1, 3)
        pairs = {(int(i), tuple(c)) for i, c in zip(want_ids.ravel(), colours.astype(int))}
        assert len(pairs) == len({i for i, _ in pairs}) == len({c for _, c in pairs}) > 1


def test_preview_of_an_existing_split_on_s3_and_failures_only_warn(labelled_split, moto_s3, caplog):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.mkdir("polymae-preview")
    fs.put(str(labelled_split / "train"), "polymae-preview/out/train", recursive=True)
    fs.rm("polymae-preview/out/train/preview.png")
    out = P.write_preview("s3://polymae-preview/out", "train", n=2, tile=48, gap=2)
    assert out["url"] == "s3://polymae-preview/out/train/preview.png" and len(out["keys"]) == 2
    img = Image.open(io.BytesIO(fs.cat_file("polymae-preview/out/train/preview.png")))
    assert img.size == (3 * 48 + 4 * 2, 2 * 48 + 3 * 2) == (out["width"], out["height"])
    # a split without done shards: a loud warning, no exception, and no stale picture left behind
    for p in fs.find("polymae-preview/out/train"):
        if p.endswith((".stats.json", "manifest.json")):
            fs.rm(p)
    with caplog.at_level(logging.WARNING, logger="polymae.label"):
        assert P.write_preview_or_warn("s3://polymae-preview/out", "train") is None
    assert "could not write the preview" in caplog.text
    assert not fs.exists("polymae-preview/out/train/preview.png")


def test_colour_maps():
    ids = np.array([[0, 1, 2], [149, 255, 3]])
    col = P.colorize_semseg(ids, ignore=255)
    assert col[1, 1].tolist() == [0, 0, 0] and (col.reshape(-1, 3).sum(1) > 0).sum() == 5
    pal = P.semseg_palette(65535)
    assert len({tuple(c) for c in pal}) == 65535 and not (pal.sum(1) == 0).any()
    ramp = P.colorize_depth(np.tile(np.arange(100, dtype=np.uint16), (3, 1)))
    lum = ramp[0] @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(lum) >= -1e-9).all() and lum[-1] - lum[0] > 150  # brighter with larger (nearer) values
    assert np.array_equal(P.colorize_depth(np.tile(np.arange(100.0), (3, 1)), metric=True)[0], ramp[0][::-1])
