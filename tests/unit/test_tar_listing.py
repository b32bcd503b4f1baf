"""Tar sources are listed without downloading them: member names from the headers read with seeks over the data
(or from a DALI index), measured in bytes actually read, on a tar of the scikit-image photographs."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from polymae.datasets import sources as src

pytestmark = pytest.mark.unit

PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "immunohistochemistry", "colorwheel")


def _encode(arr, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo_tar(tmp_path_factory, skimage_photo) -> dict:
    """A WebDataset tar (webdataset's TarWriter: pax headers) of the photographs as JPEG and PNG samples with
    ``cls`` and ``json`` members (about 3 MB), and the member bytes by sample key."""
    import webdataset as wds

    folder = tmp_path_factory.mktemp("tars")
    path = folder / "photos-000000.tar"
    images, classes = {}, {}
    with wds.TarWriter(str(path)) as w:
        for i, name in enumerate(PHOTO_NAMES):
            for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
                key = f"{name}_{ext}"
                images[key], classes[key] = _encode(skimage_photo(name), fmt), i
                w.write({"__key__": key, ext: images[key], "cls": str(i).encode(), "json": b'{"source": "skimage"}'})
    return {"path": path, "images": images, "classes": classes}


def _rchar() -> int | None:
    """Bytes this process has read through read()-like system calls (Linux ``/proc/self/io``), or None."""
    try:
        with open("/proc/self/io") as fh:
            return int(next(ln for ln in fh if ln.startswith("rchar")).split()[1])
    except (OSError, StopIteration):
        return None


def _dali_index(tar: Path) -> str:
    """The DALI ``wds2idx`` v1.2 index text of ``tar``, built here from Python's tarfile (data offsets)."""
    groups: list[list[str]] = []
    last = None
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            key, ext = m.name[: len(m.name) - len(base) + base.index(".")], base.split(".", 1)[1]
            if key != last:
                groups.append([])
                last = key
            groups[-1].append(f"{ext} {m.offset_data} {m.size} {m.name}")
    return f"v1.2 {len(groups)}\n" + "".join(" ".join(g) + "\n" for g in groups)


def test_listing_reads_under_5_percent_of_the_tar(photo_tar, tmp_path):
    tar, size = photo_tar["path"], photo_tar["path"].stat().st_size
    assert size > 2_000_000
    # warm up imports and fsspec's local filesystem on another tar, so the measurement is the listing alone
    warm = tmp_path / "warm.tar"
    with tarfile.open(warm, "w") as tf:
        tf.addfile(tarfile.TarInfo("a.jpg"), io.BytesIO())
    src.open_source(str(warm))

    before = _rchar()
    s = src.open_source(str(tar))
    after = _rchar()
    cost = s.extra["tar_listing"]
    assert cost["tars"] == 1 and cost["tar_bytes"] == size and cost["indexed"] == 0
    assert cost["bytes_read"] < 0.05 * size, cost
    assert cost["requests"] <= 2 * len(photo_tar["images"])  # about one small read per sample, not per block
    if before is not None:  # the kernel's count agrees: nothing else was read
        assert cost["bytes_read"] <= after - before < 0.05 * size
    # and the listing is right: every sample, its class, its member bytes
    by_key = {e.key: e for e in s.entries}
    assert set(by_key) == set(photo_tar["images"])
    for key, data in photo_tar["images"].items():
        assert by_key[key].cls == photo_tar["classes"][key]
        assert src.read_uri(by_key[key].uri) == data


def test_long_and_pax_names_match_tarfile(tmp_path, skimage_photo):
    """GNU long names and pax (non-ASCII) names come out as Python's tarfile reads them, with data offsets."""
    jpg = _encode(skimage_photo("chelsea"), "JPEG")
    long_dir = "n" * 60 + "/" + "deep" * 20
    for fmt, name in ((tarfile.GNU_FORMAT, f"{long_dir}/cat_{'x' * 90}.jpg"), (tarfile.PAX_FORMAT, "ünï/çat.jpg"),
                      (tarfile.USTAR_FORMAT, "plain/cat.jpg")):
        path = tmp_path / f"f{fmt}.tar"
        with tarfile.open(path, "w", format=fmt) as tf:
            for n, data in ((name, jpg), (name.replace(".jpg", ".cls"), b"7")):
                info = tarfile.TarInfo(n)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        listing = src.list_tar_members(str(path))
        with tarfile.open(path) as tf:
            want = [(m.name, m.offset_data, m.size) for m in tf.getmembers()]
        assert [tuple(m) for m in listing.members] == want
        (entry,) = src.open_source(str(path)).entries
        assert entry.key == src.sanitise_key(name.rsplit(".", 1)[0]) and entry.cls == 7
        assert src.read_uri(entry.uri) == jpg and src.member_name(entry.uri) == name


def test_dali_index_is_used_and_checked(photo_tar, tmp_path, caplog):
    tar = tmp_path / "photos-000000.tar"
    tar.write_bytes(photo_tar["path"].read_bytes())
    headers = src.open_source(str(tar))
    (tmp_path / "photos-000000.idx").write_text(_dali_index(tar))
    s = src.open_source(str(tmp_path))  # a folder of tars: the index beside the tar is found
    cost = s.extra["tar_listing"]
    assert cost["indexed"] == 1
    assert s.entries == headers.entries  # same keys, classes and member offsets
    assert cost["requests"] == 2 + len(photo_tar["images"])  # index, one header check, the cls members
    # a stale index (the same samples rewritten in another order: same size, other offsets) is noticed by its
    # header check, logged and ignored: the headers are read instead
    import webdataset as wds

    other = tmp_path / "other"
    other.mkdir()
    with wds.TarWriter(str(other / "photos-000000.tar")) as w:
        for key in sorted(photo_tar["images"], reverse=True):
            ext = key.rsplit("_", 1)[1]
            w.write({"__key__": key, ext: photo_tar["images"][key], "cls": str(photo_tar["classes"][key]).encode(),
                     "json": b'{"source": "skimage"}'})
    assert (other / "photos-000000.tar").stat().st_size == tar.stat().st_size
    (other / "photos-000000.idx").write_text(_dali_index(tar))
    with caplog.at_level(logging.WARNING, logger="polymae.sources"):
        s2 = src.open_source(str(other))
    assert s2.extra["tar_listing"]["indexed"] == 0
    assert "ignoring the index" in caplog.text
    by_key = {e.key: e for e in s2.entries}
    assert {k: src.read_uri(e.uri) for k, e in by_key.items()} == photo_tar["images"]


def test_missing_and_broken_tars_are_source_errors(tmp_path):
    with pytest.raises(src.SourceError, match="does not exist"):
        src.open_source(str(tmp_path / "nope-000000.tar"))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 100)
    with pytest.raises(src.SourceError, match="cannot be listed"):
        src.open_source(str(tmp_path / "junk.tar"))


def test_samples_without_an_image_are_counted_and_logged(tmp_path, skimage_photo, caplog):
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "mixed.tar")) as w:
        w.write({"__key__": "coins", "png": _encode(skimage_photo("coins"), "PNG")})
        w.write({"__key__": "caption_only", "txt": b"a caption without its image"})
    with caplog.at_level(logging.WARNING, logger="polymae.sources"):
        s = src.open_source(str(tmp_path / "mixed.tar"))
    assert [e.key for e in s.entries] == ["coins"] and s.extra["tar_listing"]["samples_without_image"] == 1
    assert "1 sample(s)" in caplog.text and "caption_only" in caplog.text
