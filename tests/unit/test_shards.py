"""The shard format through a real tar: encodings, json, cls, atomic writes, and ``load_rgb`` conversions."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from polymae.datasets import shards as S
from polymae.datasets import storage

pytestmark = pytest.mark.unit


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture()
def samples():
    rng = np.random.default_rng(0)
    h, w = 37, 53
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    depth = rng.uniform(0.0, 12.5, (h, w)).astype(np.float32)
    depth[0, 0] = 12.5
    sem150 = rng.integers(0, 150, (h, w))
    sem150[0, :3] = [-1, 150, 999]  # outside the label set -> ignore
    sem300 = rng.integers(0, 300, (h, w))
    sem300[1, 1] = 299
    return [
        S.LabelledSample("img_a", _jpeg(rgb), depth=depth, semseg=sem150, num_classes=150,
                         meta={"source": {"uri": "x/a.jpg"}, "depth": {"kind": "relative_inverse"}}, cls=7),
        S.LabelledSample("n01__img_b", _jpeg(rgb), depth=depth, depth_range=20.0, semseg=sem300, num_classes=300,
                         meta={"source": {"uri": "x/b.jpg"}}),
    ]


def test_round_trip_through_tar(tmp_path, samples):
    url = str(tmp_path / "train-000000.tar")
    with S.ShardTarWriter(url) as w:
        for s in samples:
            w.write(s)
    data = open(url, "rb").read()
    assert w.sha256 == hashlib.sha256(data).hexdigest() and w.bytes_written == len(data)

    with tarfile.open(url) as tf:
        names = tf.getnames()
    assert "img_a.rgb.jpg" in names and "img_a.depth.png" in names and "img_a.semseg.png" in names
    assert "img_a.json" in names and "img_a.cls" in names and "n01__img_b.cls" not in names

    raw = list(S.iter_raw_samples([url]))
    assert [r["__key__"] for r in raw] == ["img_a", "n01__img_b"]
    for r, s in zip(raw, samples):
        d = S.decode_sample(r)
        rng_ = d["meta"]["depth"]["depth_range"]
        assert d["depth"].dtype == np.float32 and d["depth"].shape == s.depth.shape
        step = rng_ / S.DEPTH_MAX_CODE
        assert np.abs(d["depth"] - s.depth).max() <= step
        ignore = 255 if s.num_classes <= 255 else 65535
        assert d["semseg_ignore"] == ignore == d["meta"]["semseg"]["ignore_index"]
        expect = np.where((s.semseg >= 0) & (s.semseg < s.num_classes), s.semseg, ignore)
        np.testing.assert_array_equal(d["semseg"], expect)
        assert d["semseg"].dtype == np.int64
        assert d["rgb"].shape == (37, 53, 3)
        assert d["meta"]["source"] == s.meta["source"]
    d0, d1 = S.decode_sample(raw[0]), S.decode_sample(raw[1])
    assert d0["cls"] == 7 and d1["cls"] is None
    assert d0["meta"]["depth"]["depth_range"] == pytest.approx(12.5)  # per-sample range = max
    assert d1["meta"]["depth"]["depth_range"] == 20.0                   # fixed range kept
    assert d0["meta"]["depth"]["kind"] == "relative_inverse"
    # 8-bit PNG for <= 255 classes, 16-bit beyond
    assert S.decode_png(raw[0][S.SEMSEG]).dtype == np.uint8
    assert S.decode_png(raw[1][S.SEMSEG]).dtype == np.uint16
    assert int(S.decode_png(raw[1][S.SEMSEG]).max()) == 299
    assert json.loads(raw[0][S.META])["semseg"]["num_classes"] == 150


def test_identical_inputs_give_identical_tars(tmp_path, samples):
    digests = []
    for name in ("a.tar", "b.tar"):
        with S.ShardTarWriter(str(tmp_path / name)) as w:
            for s in samples:
                w.write(s)
        digests.append(w.sha256)
    assert digests[0] == digests[1]


def test_abort_leaves_nothing(tmp_path, samples):
    url = str(tmp_path / "train-000001.tar")
    with pytest.raises(RuntimeError):
        with S.ShardTarWriter(url) as w:
            w.write(samples[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    storage.write_json_atomic(str(tmp_path / "x.json"), {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_key_with_dot_or_slash_is_rejected(samples):
    for bad in ("a.b", "a/b"):
        with pytest.raises(ValueError):
            S.LabelledSample(bad, samples[0].rgb_jpeg).encode()


def test_depth_quantisation_bounds():
    depth = np.linspace(0, 3.0, 1000, dtype=np.float32).reshape(10, 100)
    png, rng = S.encode_depth(depth)
    back = S.decode_depth(png, rng)
    assert np.abs(back - depth).max() <= rng / 65535 / 2 + 1e-6
    zero_png, zero_rng = S.encode_depth(np.zeros((4, 4)))
    assert zero_rng == 1.0 and S.decode_depth(zero_png, zero_rng).max() == 0
    with pytest.raises(ValueError):
        S.encode_depth(np.array([[np.nan]]))


# ----------------------------------------------------------------------------------- load_rgb
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_load_rgb_keeps_plain_jpeg_bytes():
    arr = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    data = _jpeg(arr)
    rgb, out = S.load_rgb(data)
    assert out is data and rgb.shape == (20, 30, 3)


def test_load_rgb_conversions():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    # RGBA: composited on white
    rgba = np.dstack([base, np.full((24, 40), 0, np.uint8)])
    rgba[:12, :, 3] = 255
    rgb, jpeg = S.load_rgb(_png(Image.fromarray(rgba, "RGBA")))
    assert rgb.shape == (24, 40, 3)
    np.testing.assert_array_equal(rgb[:12], base[:12])
    assert (rgb[12:] == 255).all()
    assert jpeg[:2] == b"\xff\xd8"
    # palette
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    rgb, _ = S.load_rgb(_png(pal))
    np.testing.assert_array_equal(rgb, np.array(pal.convert("RGB")))
    # 16-bit grayscale
    g8 = base[..., 0]
    rgb, _ = S.load_rgb(_png(Image.fromarray(g8.astype(np.uint16) * 257)))
    np.testing.assert_array_equal(rgb[..., 0], g8)
    assert (rgb[..., 0] == rgb[..., 2]).all()
    # CMYK JPEG
    smooth = np.zeros((24, 40, 3), np.uint8)
    smooth[..., 0], smooth[..., 1], smooth[..., 2] = 200, 120, 40
    cmyk = Image.fromarray(smooth).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG", quality=95)
    rgb, jpeg = S.load_rgb(buf.getvalue())
    assert jpeg != buf.getvalue() and np.abs(rgb.astype(int) - smooth).mean() < 4
    # EXIF orientation 6: displayed rotated 90 degrees clockwise
    yy, xx = np.mgrid[0:24, 0:40]
    base = np.dstack([xx * 6, yy * 10, np.full_like(xx, 90)]).astype(np.uint8)
    img = Image.fromarray(base)
    exif = img.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    rgb, jpeg = S.load_rgb(buf.getvalue())
    assert rgb.shape == (40, 24, 3) and jpeg != buf.getvalue()
    assert np.abs(rgb.astype(int) - np.rot90(base, k=-1)).mean() < 4


@pytest.mark.parametrize("data,reason", [
    (b"", "empty"),
    (b"hello, I am text pretending to be a JPEG\n", "undecodable"),
])
def test_load_rgb_bad_inputs(data, reason):
    with pytest.raises(S.BadImage) as e:
        S.load_rgb(data)
    assert e.value.reason == reason


def test_load_rgb_truncated_and_too_large():
    arr = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _jpeg(arr)
    with pytest.raises(S.BadImage) as e:
        S.load_rgb(data[: len(data) // 3])
    assert e.value.reason == "undecodable"
    with pytest.raises(S.BadImage) as e:
        S.load_rgb(data, max_pixels=64 * 63)
    assert e.value.reason == "too_large"
