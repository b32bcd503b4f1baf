"""The label job end to end on embedded Ray for its label settings and pixel formats: 16-bit and float images
scaled right, too-small / too-elongated / undecodable-format images counted by reason, the label fingerprint
refusing a resume or extend with other settings (naming them), and config.yaml never silently overwritten."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from polymae.datasets import shards as S
from polymae.pipeline.label.config import TeacherConfig
from polymae.pipeline.label.driver import LabelConfig, run_label
from polymae.pipeline.label.teachers import FINGERPRINT_NAME, FingerprintMismatch

pytestmark = pytest.mark.integration


def _cfg(src, out, depth: dict | None = None, **kw) -> LabelConfig:
    teachers = [TeacherConfig("dpt", **{"input_size": 64, **(depth or {})}), TeacherConfig("segformer", input_size=64)]
    base = dict(input=str(src), output=str(out), samples_per_shard=8, teachers=teachers, batch_size=4,
                num_workers=1, progress=False, read_threads=2, max_skip_fraction=1.0)
    return LabelConfig(**{**base, **kw})


def _pixel_format_inputs(folder, photo_array) -> None:
    """Images whose pixels need care (decoded) and images that are unusable (skipped, counted by reason)."""
    tifffile = pytest.importorskip("tifffile")
    camera = photo_array("camera")
    dark = (camera.astype(np.uint32) * 200 // 255).astype(np.uint16)  # 16-bit, values 0..200 of 65535
    Image.fromarray(dark).save(folder / "dark16.png")
    buf = io.BytesIO()
    tifffile.imwrite(buf, photo_array("coffee").astype(np.float32) / 255, photometric="rgb")  # float RGB TIFF
    (folder / "float_rgb.tif").write_bytes(buf.getvalue())
    Image.fromarray(camera[:1, :1]).save(folder / "one_pixel.png")  # too_small
    Image.fromarray(camera[:40, :400]).save(folder / "sliver.png")  # 10:1, too_elongated
    (folder / "codestream.jxl").write_bytes(b"\xff\x0a" + bytes(256))  # JPEG XL: no decoder, unsupported


def test_pixel_formats_and_label_settings_end_to_end(tmp_path, photos_dir, ray_local, skimage_photo):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for name in ("astronaut.jpg", "chelsea.jpg"):
        shutil.copy(photos_dir / name, src / name)
    _pixel_format_inputs(src, skimage_photo)
    split = out / "train"

    first = run_label(_cfg(src, out))
    assert first["written"] == 4 and first["skipped_by_reason"] == {"too_elongated": 1, "too_small": 1,
                                                                     "unsupported": 1}
    samples = {s["__key__"]: S.decode_sample(s) for s in S.iter_raw_samples(S.trusted_shard_urls(str(out), "train"))}
    assert samples["dark16"]["rgb"].max() <= 3  # by bit depth: 200/65535 is black, not white
    coffee = skimage_photo("coffee")
    assert np.abs(samples["float_rgb"]["rgb"].astype(int) - coffee).mean() < 3  # [0, 1] floats, JPEG-stored
    stored = json.loads((split / FINGERPRINT_NAME).read_text())
    assert stored["sha256"].startswith("sha256:") and set(stored["settings"]) == {"config", "teachers"}
    assert stored["settings"]["teachers"]["depth"]["short_side"] == 64
    assert stored["settings"]["teachers"]["depth"]["interpolation"] == "bicubic"  # the DPT processor's
    config_text = (split / "config.yaml").read_text()

    # new images arrive; extending or resuming with other label settings is refused before any work
    for name in ("coffee.jpg", "rocket.jpg", "colorwheel.jpg", "immunohistochemistry.png"):
        shutil.copy(photos_dir / name, src / name)
    files_before = sorted(p.name for p in split.iterdir())
    with pytest.raises(FingerprintMismatch, match=r"config\.teachers\.depth\.precision: 'auto' -> 'bf16_full'"):
        run_label(_cfg(src, out, {"precision": "bf16_full"}, mode="extend"))
    with pytest.raises(FingerprintMismatch, match=r"config\.teachers\.depth\.input_size: 64 -> 96"):
        run_label(_cfg(src, out, {"input_size": 96}, mode="extend"))
    assert sorted(p.name for p in split.iterdir()) == files_before
    assert json.loads((split / FINGERPRINT_NAME).read_text()) == stored

    # the same label settings extend it; a changed run setting keeps config.yaml and records the new one beside
    second = run_label(_cfg(src, out, mode="extend", batch_size=2))
    assert second["shards_labelled"] == 1 and second["written"] == 8
    assert (split / "config.yaml").read_text() == config_text
    extra = [p for p in split.glob("config.*.yaml")]
    assert len(extra) == 1 and "batch_size: 2" in extra[0].read_text()
    assert json.loads((split / FINGERPRINT_NAME).read_text()) == stored
