"""Source readers: folders, ImageNet-style class folders, list/parquet files, WebDataset tars, fsspec URLs."""

from __future__ import annotations

import io
import shutil

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
