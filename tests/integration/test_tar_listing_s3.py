"""A tar source on S3 (a local moto server) is listed with small ranged reads, not downloaded: the server's own
request log shows only partial (206) GETs of the tar, as many as the listing counted."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from polymae.datasets import sources as src

pytestmark = pytest.mark.integration


def test_s3_tar_listing_uses_ranged_reads(moto_s3, tmp_path, skimage_photo):
    import fsspec
    import webdataset as wds

    images = {}
    path = tmp_path / "photos-000000.tar"
    with wds.TarWriter(str(path)) as w:
        for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "coins", "immunohistochemistry")):
            buf = io.BytesIO()
            Image.fromarray(skimage_photo(name)).save(buf, format="PNG")
            images[name] = buf.getvalue()
            w.write({"__key__": name, "png": images[name], "cls": str(i).encode()})
    size = path.stat().st_size
    assert size > 1_500_000
    fs = fsspec.filesystem("s3")
    fs.mkdir("polymae-tars")
    fs.put_file(str(path), "polymae-tars/src/photos-000000.tar")

    log_start = (tmp_path / "moto.log").stat().st_size
    s = src.open_source("s3://polymae-tars/src/photos-000000.tar")
    cost = s.extra["tar_listing"]
    assert cost["tar_bytes"] == size and cost["bytes_read"] < 0.05 * size, cost
    # the server saw only ranged GETs of the tar (206 Partial Content), one per counted read
    log = re.sub(r"\x1b\[[0-9;]*m", "", (tmp_path / "moto.log").read_text(errors="replace")[log_start:])
    statuses = re.findall(r'"GET /polymae-tars/src/photos-000000\.tar HTTP/1\.1" (\d{3})', log)
    assert statuses and set(statuses) == {"206"}, log[-2000:]
    assert len(statuses) == cost["requests"] <= 2 * len(images)
    # and the entries read back the photographs from S3 with one ranged read each
    by_key = {e.key: e for e in s.entries}
    assert sorted(by_key) == sorted(images)
    for i, name in enumerate(("astronaut", "coffee", "chelsea", "rocket", "coins", "immunohistochemistry")):
        assert by_key[name].cls == i and by_key[name].uri.startswith("s3://polymae-tars/")
        assert src.read_uri(by_key[name].uri) == images[name]
