"""Source readers: folders, ImageNet-style class folders, list/parquet files, WebDataset tars, fsspec URLs."""

from __future__ import annotations

import io
import shutil
import sys

import fsspec
import numpy as np
import pytest
from PIL import Image

from polymae.datasets import sources as src

pytestmark = pytest.mark.unit


def _img_bytes(fmt: str = "JPEG", seed: int = 0, size=(12, 16)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_make_key():
    assert src.make_key("n01440764/n01440764_10026.JPEG") == "n01440764__n01440764_10026"
    assert src.make_key("my.photo v2.jpg") == "my_photo_v2"
    assert src.make_key("a/b/c.png") == "a__b__c"
    assert src.make_key("noext") == "noext"
    assert src.sanitise_key("dir/sub/x.y") == "dir__sub__x_y"
    for k in (src.make_key("x.y.z.jpg"), src.make_key("dir.v1/a b.png")):
        assert "." not in k and "/" not in k


def test_imagefolder(tmp_path):
    root = tmp_path / "train"
    _write(root / "n02_dog" / "d1.JPEG", _img_bytes(seed=1))
    _write(root / "n01_cat" / "c1.jpg", _img_bytes(seed=2))
    _write(root / "n01_cat" / "sub" / "c2.png", _img_bytes("PNG", seed=3))
    _write(root / "n01_cat" / "notes.txt", b"not an image")
    _write(root / "n01_cat" / ".hidden.jpg", b"hidden")
    (root / "n03_empty").mkdir()
    assert src.detect_kind(str(root)) == "imagefolder"
    s = src.open_source(str(root))
    assert s.kind == "imagefolder"
    assert s.classes == ["n01_cat", "n02_dog", "n03_empty"]
    by_key = {e.key: e for e in s.entries}
    assert set(by_key) == {"n01_cat__c1", "n01_cat__sub__c2", "n02_dog__d1"}
    assert by_key["n01_cat__c1"].cls == 0 and by_key["n02_dog__d1"].cls == 1
    assert [e.key for e in s.entries] == sorted(by_key)
    assert src.read_uri(by_key["n02_dog__d1"].uri) == (root / "n02_dog" / "d1.JPEG").read_bytes()
    # the same listing again gives the same keys (stable)
    assert src.open_source(str(root)).entries == s.entries


def test_flat_folder_and_file_url(tmp_path):
    root = tmp_path / "flat"
    _write(root / "a.jpg", _img_bytes(seed=1))
    _write(root / "b.v2.png", _img_bytes("PNG", seed=2))
    _write(root / "deeper" / "c.jpeg", _img_bytes(seed=3))
    _write(root / "readme.md", b"# not an image")
    s = src.open_source(str(root))
    assert s.kind == "folder" and s.classes is None
    assert [e.key for e in s.entries] == ["a", "b_v2", "deeper__c"]
    assert all(e.cls is None for e in s.entries)
    s2 = src.open_source(f"file://{root}", kind="folder")
    assert [e.key for e in s2.entries] == [e.key for e in s.entries]


def test_key_collision_is_an_error(tmp_path):
    root = tmp_path / "dup"
    _write(root / "a.jpg", _img_bytes())
    _write(root / "a.png", _img_bytes("PNG"))
    with pytest.raises(src.SourceError, match="same sample key 'a'") as e:
        src.open_source(str(root))
    assert "a.jpg" in str(e.value) and "a.png" in str(e.value)


def test_missing_or_empty_source(tmp_path):
    with pytest.raises(src.SourceError):
        src.open_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(src.SourceError):
        src.open_source(str(tmp_path / "empty"))
    with pytest.raises(src.SourceError):
        src.open_source(str(tmp_path), kind="bogus")


def test_list_file(tmp_path):
    _write(tmp_path / "imgs" / "x.jpg", _img_bytes(seed=1))
    _write(tmp_path / "imgs" / "y.png", _img_bytes("PNG", seed=2))
    _write(tmp_path / "other" / "z.jpg", _img_bytes(seed=3))
    lst = tmp_path / "list.txt"
    lst.write_text(f"# comment\nimgs/x.jpg\n\n{tmp_path}/imgs/y.png\nfile://{tmp_path}/other/z.jpg\n")
    s = src.open_source(str(lst))
    assert s.kind == "list"
    assert [e.key for e in s.entries] == ["imgs__x", "imgs__y", "other__z"]
    for e in s.entries:
        assert src.read_uri(e.uri)[:2] in (b"\xff\xd8", b"\x89P")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    for n in ("p", "q"):
        _write(tmp_path / "d" / f"{n}.jpg", _img_bytes(seed=ord(n)))
    pq.write_table(pa.table({"uri": ["d/p.jpg", str(tmp_path / "d" / "q.jpg")], "cls": [3, None]}),
                   tmp_path / "a.parquet")
    s = src.open_source(str(tmp_path / "a.parquet"))
    assert s.kind == "parquet"
    assert [(e.key, e.cls) for e in s.entries] == [("d__p", 3), ("d__q", None)]
    pq.write_table(pa.table({"uri": ["d/p.jpg", "d/q.jpg"], "key": ["first.one", "second/two"]}),
                   tmp_path / "b.parquet")
    s = src.open_source(str(tmp_path / "b.parquet"))
    assert [e.key for e in s.entries] == ["first_one", "second__two"]
    pq.write_table(pa.table({"path": ["d/p.jpg"]}), tmp_path / "c.parquet")
    with pytest.raises(src.SourceError, match="uri"):
        src.open_source(str(tmp_path / "c.parquet"))


def _write_tar(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def test_webdataset_tars(tmp_path):
    jpgs = {f"k{i}": _img_bytes(seed=i) for i in range(5)}
    d = tmp_path / "tars"
    d.mkdir()
    _write_tar(d / "src-000000.tar", [{"__key__": "k0", "jpg": jpgs["k0"], "cls": b"4"},
                                      {"__key__": "k1", "jpg": jpgs["k1"], "txt": b"caption"},
                                      {"__key__": "nolabel", "txt": b"no image here"}])
    _write_tar(d / "src-000001.tar", [{"__key__": "dir/k2", "jpeg": jpgs["k2"]},
                                      {"__key__": "k3", "png": jpgs["k3"], "cls": b"1"},
                                      {"__key__": "k4", "rgb.jpg": jpgs["k4"]}])
    for url in (str(d), str(d / "src-{000000..000001}.tar")):
        s = src.open_source(url)
        assert s.kind == "tars"
        by_key = {e.key: e for e in s.entries}
        assert set(by_key) == {"k0", "k1", "dir__k2", "k3", "k4"}
        assert by_key["k0"].cls == 4 and by_key["k3"].cls == 1 and by_key["k1"].cls is None
        for raw, key in (("k0", "k0"), ("k1", "k1"), ("k2", "dir__k2"), ("k3", "k3"), ("k4", "k4")):
            assert src.read_uri(by_key[key].uri) == jpgs[raw]  # the source bytes, unchanged
        assert src.member_name(by_key["dir__k2"].uri) == "dir/k2.jpeg"
    single = src.open_source(str(d / "src-000000.tar"))
    assert [e.key for e in single.entries] == ["k0", "k1"]
    _write_tar(d / "src-000002.tar", [{"__key__": "k0", "jpg": jpgs["k0"]}])
    with pytest.raises(src.SourceError, match="same sample key 'k0'"):
        src.open_source(str(d))


def test_memory_fsspec_url(tmp_path):
    fs = fsspec.filesystem("memory")
    root = "memory://polymae-test-src"
    try:
        for cls in ("b", "a"):
            with fs.open(f"{root}/{cls}/img_{cls}.jpg", "wb") as fh:
                fh.write(_img_bytes(seed=ord(cls)))
        s = src.open_source(root)
        assert s.kind == "imagefolder" and s.classes == ["a", "b"]
        assert [e.key for e in s.entries] == ["a__img_a", "b__img_b"]
        assert all(e.uri.startswith("memory://") for e in s.entries)
        assert src.read_uri(s.entries[0].uri) == _img_bytes(seed=ord("a"))
    finally:
        fs.rm("/polymae-test-src", recursive=True)


def test_iter_bytes_keeps_order_and_returns_errors(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes([i]) * (i + 1))
        paths.append(str(p))
    paths.insert(5, str(tmp_path / "missing.bin"))
    out = list(src.iter_bytes(paths, threads=4))
    assert [u for u, _ in out] == paths
    assert isinstance(out[5][1], FileNotFoundError)
    assert out[0][1] == b"\x00" and out[-1][1] == bytes([19]) * 20
    assert [b for _, b in src.iter_bytes(paths[:3], threads=1)][:1] == [b"\x00"]


def test_shutil_copy_of_source_keeps_keys(tmp_path):
    """Keys depend on paths relative to the root, so moving the root keeps them."""
    root = tmp_path / "one"
    _write(root / "c1" / "x.jpg", _img_bytes())
    moved = tmp_path / "two"
    shutil.copytree(root, moved)
    assert [e.key for e in src.open_source(str(root))] == [e.key for e in src.open_source(str(moved))]


# -------------------------------------------------------------------------------------- decoding
def _pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _reason(data: bytes, **kw) -> str:
    with pytest.raises(src.BadImage) as e:
        src.decode_image(data, **kw)
    assert e.value.reason in src.SKIP_REASONS
    return e.value.reason


def test_16_bit_images_are_scaled_by_bit_depth(skimage_photo):
    gray, rgb = skimage_photo("camera"), skimage_photo("astronaut")
    png16 = _pil_bytes(Image.fromarray(gray.astype(np.uint16) * 257), "PNG")  # full 16-bit range
    out = src.decode_image(png16)
    assert out.format == "PNG" and not out.plain_jpeg and out.rgb.shape == (*gray.shape, 3)
    np.testing.assert_array_equal(out.rgb[..., 0], gray)
    assert (out.rgb[..., 0] == out.rgb[..., 2]).all()
    # a dark 16-bit photo stays dark: 200 of 65535 is pixel 1, not 200 (the maximum is no scale)
    dark = (gray.astype(np.uint32) * 200 // 255).astype(np.uint16)
    assert dark.max() == 200 and src.decode_image(_pil_bytes(Image.fromarray(dark), "PNG")).rgb.max() == 1
    assert src.decode_image(_tiff(dark)).rgb.max() == 1  # 16-bit TIFF
    pgm = b"P5\n%d %d\n65535\n" % (gray.shape[1], gray.shape[0]) + (gray.astype(">u2") * 257).tobytes()
    np.testing.assert_array_equal(src.decode_image(pgm).rgb[..., 1], gray)  # 16-bit PGM
    np.testing.assert_array_equal(src.decode_image(_tiff(rgb.astype(np.uint16) * 257, photometric="rgb")).rgb, rgb)


def test_float_tiffs_in_unit_range(skimage_photo, monkeypatch):
    gray, rgb = skimage_photo("camera"), skimage_photo("astronaut")
    f_gray = _pil_bytes(Image.fromarray(gray.astype(np.float32) / 255), "TIFF")  # Pillow's mode F
    assert np.abs(src.decode_image(f_gray).rgb[..., 0].astype(int) - gray).max() <= 1
    for dtype in (np.float16, np.float32, np.float64):  # multi-sample / non-32-bit floats: through tifffile
        out = src.decode_image(_tiff(rgb.astype(dtype) / 255, photometric="rgb"))
        assert out.format == "TIFF" and np.abs(out.rgb.astype(int) - rgb).max() <= 1, dtype
    rgba = np.dstack([rgb / 255, np.zeros(rgb.shape[:2])]).astype(np.float32)  # fully transparent: white
    assert (src.decode_image(_tiff(rgba, photometric="rgb", extrasamples=["unassalpha"])).rgb == 255).all()
    assert _reason(_tiff(rgb.astype(np.float32), photometric="rgb")) == "unsupported"  # 0..255 floats: no scale
    nan = (gray / 255).astype(np.float32)
    nan[0, 0] = np.nan
    assert _reason(_pil_bytes(Image.fromarray(nan), "TIFF")) == "undecodable"
    float_rgb = _tiff(rgb.astype(np.float32) / 255, photometric="rgb")
    monkeypatch.setitem(sys.modules, "tifffile", None)  # tifffile not installed: a counted skip, never dropped
    with pytest.raises(src.BadImage, match="tifffile") as e:
        src.decode_image(float_rgb)
    assert e.value.reason == "unsupported"


def test_size_limits_are_counted_skips(skimage_photo):
    rgb = skimage_photo("astronaut")  # 512 x 512
    limits = {"min_side": 32, "max_aspect": 4.0}
    png = lambda a: _pil_bytes(Image.fromarray(np.ascontiguousarray(a)), "PNG")  # noqa: E731
    assert _reason(png(rgb[:1, :1]), **limits) == "too_small"  # a 1 x 1 image
    wide = np.concatenate([rgb[:2]] * 6, axis=1)  # 2 x 3072
    assert _reason(png(wide), **limits) == "too_small"
    assert _reason(png(np.concatenate([rgb[:40]] * 2, axis=1)[:, :170]), **limits) == "too_elongated"  # 4.25:1
    assert src.decode_image(png(rgb[:40, :160]), **limits).rgb.shape == (40, 160, 3)  # exactly 4:1 passes
    assert src.decode_image(png(rgb[:40, :160].transpose(1, 0, 2)), **limits).rgb.shape == (160, 40, 3)
    assert _reason(png(rgb), max_pixels=512 * 511) == "too_large"
    assert src.decode_image(png(rgb[:1, :1])).rgb.shape == (1, 1, 3)  # the function's own defaults: no limits
    assert _reason(b"") == "empty" and _reason(b"GIF89a-but-not-really") == "undecodable"
    assert _reason(png(rgb)[:300]) == "undecodable"  # truncated


def test_heic_and_avif_decode_where_a_codec_is_installed(skimage_photo, monkeypatch):
    from PIL import features

    rgb = skimage_photo("chelsea")  # 300 x 451
    if features.check("avif"):
        out = src.decode_image(_pil_bytes(Image.fromarray(rgb), "AVIF", quality=90))
        assert out.format == "AVIF" and out.rgb.shape == rgb.shape
        assert np.abs(out.rgb.astype(int) - rgb).mean() < 6
    try:
        import pillow_heif
    except ImportError:
        pillow_heif = None
    if pillow_heif is not None:
        buf = io.BytesIO()
        pillow_heif.from_bytes(mode="RGB", size=(rgb.shape[1], rgb.shape[0]), data=rgb.tobytes()).save(buf, quality=90)
        heic = buf.getvalue()
        out = src.decode_image(heic, min_side=32, max_aspect=4.0)
        assert out.format == "HEIF" and out.rgb.shape == rgb.shape and not out.plain_jpeg
        assert np.abs(out.rgb.astype(int) - rgb).mean() < 6
    else:  # no encoder here either: a HEIC file's ISO-BMFF header is what the decoder sees first
        heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
    assert src.sniff_format(heic) == "heif"
    # pillow-heif not installed: nor imported, nor registered as a Pillow opener (as imageio may have done)
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])
    with pytest.raises(src.BadImage, match="pillow-heif") as e:
        src.decode_image(heic)
    assert e.value.reason == "unsupported"
    assert src.sniff_format(b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf") == "avif"
    assert src.sniff_format(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avif" + bytes(8)) == "avif"
    assert _reason(b"\xff\x0a" + bytes(100)) == "unsupported"  # a JPEG XL codestream: no decoder, counted


def test_heic_and_avif_files_are_listed_in_folders_and_tars(tmp_path):
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    root = tmp_path / "imgs"
    for name, data in (("a.jpg", _img_bytes()), ("b.HEIC", heic), ("c.avif", _img_bytes("AVIF")), ("d.jxl", b"\xff\x0a")):
        _write(root / name, data)
    keys = [e.key for e in src.open_source(str(root))]
    assert keys == ["a", "b", "c", "d"]  # listed, so a file without a decoder becomes a counted skip
    _write_tar(tmp_path / "t.tar", [{"__key__": "h", "heic": heic}, {"__key__": "v", "avif": _img_bytes("AVIF")}])
    entries = src.open_source(str(tmp_path / "t.tar")).entries
    assert [e.key for e in entries] == ["h", "v"] and src.read_uri(entries[0].uri) == heic
