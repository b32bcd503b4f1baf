"""Teachers: registry, resolution policy, original-size outputs, determinism, save/load round trips."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymae.pipeline.label import teachers as T

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread_module")]

SIZES = [(301, 451), (17, 33), (64, 64)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


def test_registry():
    assert T.names("depth") == ["depth_anything", "dpt"]
    assert T.names("semseg") == ["mask2former", "oneformer", "segformer"]
    with pytest.raises(KeyError, match="known"):
        T.get_spec("nope")


def test_fit_size():
    assert T.fit_size(301, 451, 384, 32) == (384, 576)
    h, w = T.fit_size(301, 451, 384, 14)
    assert h % 14 == 0 and w % 14 == 0 and abs(h - 384) <= 7
    assert T.fit_size(301, 451, 384, 32, square=True) == (384, 384)
    # past max_aspect x short_side the long side is capped and the short side shrinks with it: no squashing
    assert T.fit_size(200, 1000, 64, 16) == (48, 256)
    assert T.fit_size(600, 1000, 800, 32, max_aspect=1333 / 800) == (800, 1344)  # within longest_edge
    assert T.fit_size(400, 1000, 800, 32, max_aspect=1333 / 800) == (544, 1344)  # 1333 / 1000 * 400 = 533
    assert T.fit_size(1, 1, 64, 14) == (70, 70)  # tiny images are upscaled
    with pytest.raises(ValueError):
        T.fit_size(0, 10, 64, 32)


def test_upsample_argmax_matches_interpolate():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(7, 13, 19, generator=g)
    full = F.interpolate(scores[None], size=(301, 451), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(T.upsample_argmax(scores, (301, 451)), full)
    chunked = T.upsample_argmax(scores, (301, 451), max_elements=7 * 451 * 10)
    assert (chunked == full).float().mean() > 0.999
    # scores laid out HWC (as batched post-processing returns them) give the same ids
    hwc = scores.permute(1, 2, 0).contiguous().permute(2, 0, 1)
    assert hwc.stride()[0] == 1 and torch.equal(T.upsample_argmax(hwc, (301, 451)), full)


@pytest.mark.parametrize("name", T.names())
def test_predict_returns_original_sizes(name, images):
    t = T.build_tiny(name, seed=0, short_side=96)
    out = t.predict(images)
    assert len(out) == len(images)
    for o, (h, w) in zip(out, SIZES):
        assert o.shape == (h, w)
        if t.task == "depth":
            assert o.dtype == np.float32 and np.isfinite(o).all()
        else:
            assert o.dtype == np.int64 and o.min() >= 0 and o.max() < t.num_classes
    # input sizes honour the model's multiple
    ih, iw = t.input_size(301, 451)
    assert ih % t.multiple == 0 and iw % t.multiple == 0
    meta = t.metadata()
    for k in ("name", "task", "architecture", "revision", "random_init", "source", "short_side", "multiple"):
        assert k in meta
    assert meta["random_init"] is True and meta["revision"].startswith("sha256:")
    if t.task == "depth":
        assert meta["kind"] == "relative_inverse"
    else:
        assert meta["label_set"] == "random-150" and meta["num_classes"] == 150
        assert len(meta["class_names"]) == 150 and meta["ignore_index"] == 255
    with pytest.raises(ValueError):
        t.predict([images[0].astype(np.float32)])


def test_batching_does_not_change_results(images):
    t = T.build_tiny("segformer", seed=0, short_side=64, batch_size=4)
    same = [images[2], images[2][::-1].copy(), images[2]]
    batched = t.predict(same)
    single = [t.predict([im])[0] for im in same]
    for a, b in zip(batched, single):
        assert (a == b).mean() > 0.999


def test_seeded_tiny_builds_are_identical(images):
    a, b = T.build_tiny("dpt", seed=3, short_side=64), T.build_tiny("dpt", seed=3, short_side=64)
    c = T.build_tiny("dpt", seed=4, short_side=64)
    assert a.revision == b.revision != c.revision
    np.testing.assert_array_equal(a.predict(images[:1])[0], b.predict(images[:1])[0])
    before = torch.random.get_rng_state()
    T.build_tiny("segformer", seed=9)
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is untouched


@pytest.mark.parametrize("name", T.names())
def test_save_pretrained_then_load_gives_identical_outputs(name, images, tmp_path):
    t = T.build_tiny(name, seed=1, short_side=64)
    folder = tmp_path / name
    t.save_pretrained(str(folder))
    loaded = T.load_teacher(name, str(folder), short_side=64)
    assert loaded.random_init is True  # kept in config.json
    assert loaded.revision == T.weights_sha256(str(folder))
    assert loaded.square == t.square and loaded.multiple == t.multiple
    for a, b in zip(t.predict(images), loaded.predict(images)):
        np.testing.assert_array_equal(a, b)
    if t.task == "semseg":
        assert loaded.label_set == t.label_set and loaded.class_names == t.class_names


def test_load_from_fsspec_url_goes_through_the_cache(images, tmp_path):
    t = T.build_tiny("segformer", seed=2, short_side=64)
    local = tmp_path / "sf"
    t.save_pretrained(str(local))
    fs = fsspec.filesystem("memory")
    url = "memory://polymae-test-teachers/sf"
    try:
        for p in local.iterdir():
            fs.pipe(f"/polymae-test-teachers/sf/{p.name}", p.read_bytes())
        loaded = T.load_teacher("segformer", url, short_side=64, cache_dir=str(tmp_path / "cache"))
        assert loaded.source == url
        np.testing.assert_array_equal(t.predict(images[:1])[0], loaded.predict(images[:1])[0])
        cached = T.materialise(url, str(tmp_path / "cache"))
        assert cached.startswith(str(tmp_path / "cache")) and (tmp_path / "cache").exists()
    finally:
        fs.rm("/polymae-test-teachers", recursive=True)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        T.load_teacher("dpt", str(tmp_path / "missing"))
    T.build_tiny("segformer", seed=0).save_pretrained(str(tmp_path / "sf"))
    with pytest.raises(ValueError, match="segformer"):
        T.load_teacher("dpt", str(tmp_path / "sf"))


def test_metric_depth_kind_and_big_label_sets(tmp_path):
    t = T.build_tiny("depth_anything", seed=0, short_side=28)
    t.model.config.depth_estimation_type = "metric"
    t.save_pretrained(str(tmp_path / "da"))
    assert T.load_teacher("depth_anything", str(tmp_path / "da"), short_side=28).kind == "metric"
    big = T.build_tiny("segformer", seed=0, num_labels=300, short_side=32)
    assert big.metadata()["ignore_index"] == 65535 and big.label_set == "random-300"
    out = big.predict([np.zeros((20, 30, 3), np.uint8)])[0]
    assert out.shape == (20, 30) and out.max() < 300


def test_oneformer_takes_task_inputs_from_the_checkpoint_tokenizer(tmp_path, images):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "the": 5, "task": 6, "is": 7, "semantic": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    t = T.build_tiny("oneformer", seed=0, short_side=64)
    t.save_pretrained(str(tmp_path / "of"))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        str(tmp_path / "of"))
    loaded = T.load_teacher("oneformer", str(tmp_path / "of"), short_side=64)
    ids = loaded._task_ids[0].tolist()
    assert ids[:4] == [5, 6, 7, 8] and len(ids) == t.model.config.task_seq_len and set(ids[4:]) == {0}
    out = loaded.predict(images[:1])[0]
    assert out.shape == SIZES[0] and out.dtype == np.int64


@pytest.mark.parametrize("name", ["dpt", "segformer"])
def test_resize_input_ahead_gives_the_same_maps(images, name):
    """The label job resizes in decode threads (resize_input) and hands the result to predict: same maps."""
    t = T.build_tiny(name, seed=0, short_side=64, batch_size=4)
    pre = [t.resize_input(im) for im in images]
    for im, p in zip(images, pre):
        assert p.dtype == torch.float32 and tuple(p.shape) == (1, 3, *t.input_size(*im.shape[:2]))
        assert float(p.min()) >= 0.0 and float(p.max()) <= 255.0
    for a, b in zip(t.predict(images, resized=pre), t.predict(images)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        t.resize_input(images[0].astype(np.float32))


# --------------------------------------------------------------- native input sizes and interpolation
def test_native_input_comes_from_the_image_processor(tmp_path):
    """Without an override each teacher runs at the size and with the resample its image processor declares."""
    want = {"dpt": (384, 32, "bicubic"), "depth_anything": (518, 14, "bicubic"), "segformer": (512, 32, "bilinear"),
            "mask2former": (800, 32, "bilinear"), "oneformer": (800, 32, "bilinear")}
    for name, (side, multiple, interp) in want.items():
        spec = T.get_spec(name)
        native = T.native_input(spec, spec.tiny(150)[1])
        assert (native.short_side, native.multiple, native.interpolation) == (side, multiple, interp), name
    assert T.native_input(T.get_spec("mask2former"), T.get_spec("mask2former").tiny(150)[1]).max_aspect == 1333 / 800
    da = T.build_tiny("depth_anything", seed=0)
    assert (da.short_side, da.interpolation) == (518, "bicubic")
    assert da.input_size(375, 500) == (518, 686)  # ImageNet-like: short side 518, multiple of 14, aspect kept
    assert T.build_tiny("dpt", seed=0).input_size(375, 500) == (384, 384)  # the plain-ViT DPT: squares
    # a checkpoint folder's preprocessor_config.json decides, and the job's overrides win over it
    t = T.build_tiny("segformer", seed=0)
    t.processor.size = {"height": 256, "width": 320}
    t.processor.resample = 3  # PIL bicubic
    t.save_pretrained(str(tmp_path / "sf"))
    loaded = T.load_teacher("segformer", str(tmp_path / "sf"))
    assert (loaded.short_side, loaded.interpolation) == (256, "bicubic")
    assert loaded.metadata()["native_short_side"] == 256
    over = T.load_teacher("segformer", str(tmp_path / "sf"), short_side=100, interpolation="bilinear")
    assert (over.short_side, over.native_short_side, over.interpolation) == (96, 256, "bilinear")
    with pytest.raises(ValueError, match="interpolation"):
        T.build_tiny("dpt", interpolation="lanczos")


@pytest.mark.parametrize("name", ["dpt", "depth_anything", "segformer"])
def test_teacher_input_matches_its_image_processor(name, skimage_photo):
    """On a photograph, the normalised input equals what the teacher's own HF image processor makes at the same
    size (bicubic for DPT / Depth Anything, bilinear for SegFormer); the other interpolation is visibly off."""
    photo = skimage_photo("chelsea")  # 300 x 451 RGB
    t = T.build_tiny(name, seed=0)
    h, w = t.input_size(*photo.shape[:2])
    kw = {} if name == "dpt" else {"size": {"height": h, "width": w}, "keep_aspect_ratio": False}
    if name == "segformer":
        kw.pop("keep_aspect_ratio")
    ref = t.processor(images=photo, return_tensors="pt", **kw)["pixel_values"]
    ours = t._pixel_values([photo], (h, w))
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) < 0.05  # normalised units: ~1.5 grey levels out of 255
    t.interpolation = "bilinear" if t.interpolation == "bicubic" else "bicubic"
    assert float((t._pixel_values([photo], (h, w)) - ref).abs().max()) > 0.1


# ------------------------------------------------------------------------------------------ precision
def _depth_levels(depth: np.ndarray) -> int:
    from polymae.datasets import shards as S

    png, _ = S.encode_depth(depth)
    return len(np.unique(S.decode_png(png)))


def test_depth_png_holds_fp32_resolution_on_a_photograph(skimage_photo):
    """The stored 16-bit depth of a real photograph has >= 10,000 levels when the head runs in fp32 (fp32, and
    bf16 with its fp32 decoder); a bf16 head (bf16_full) leaves a few hundred, i.e. 8-bit depth."""
    crop = skimage_photo("astronaut")[:384, 64:448].copy()  # 384 x 384: the map is stored at the input size
    levels = {}
    for precision in ("fp32", "bf16", "bf16_full"):
        t = T.build_tiny("dpt", seed=0, precision=precision)
        assert t.input_size(384, 384) == (384, 384)
        depth = t.predict([crop])[0]
        assert depth.dtype == np.float32 and depth.shape == (384, 384)
        levels[precision] = _depth_levels(depth)
    assert levels["fp32"] >= 10_000 and levels["bf16"] >= 10_000, levels
    assert levels["bf16_full"] < 1_000, levels
    whole = skimage_photo("astronaut")  # 512 x 512, Depth Anything at its native 518
    assert _depth_levels(T.build_tiny("depth_anything", seed=0, precision="fp32").predict([whole])[0]) >= 10_000


@pytest.mark.parametrize("name", T.names())
def test_bf16_runs_the_output_modules_in_fp32(name, images):
    """precision=bf16 autocasts the trunk, but the modules that make the outputs run in float32."""
    fp32_outputs = {"depth": ("predicted_depth",), "semseg": ("logits", "class_queries_logits", "masks_queries_logits")}
    for precision, want in (("bf16", torch.float32), ("bf16_full", torch.bfloat16)):
        t = T.build_tiny(name, seed=0, short_side=64, precision=precision)
        assert t.precision == precision and t.autocast_dtype is torch.bfloat16
        x = t._pixel_values(images[2:], t.input_size(64, 64))
        with torch.inference_mode(), t._autocast():
            out = t._forward(x)
        dtypes = {k: getattr(out, k).dtype for k in fp32_outputs[t.task] if getattr(out, k, None) is not None}
        assert dtypes and set(dtypes.values()) == {want}, (precision, dtypes)
        assert t.metadata()["output_dtype"] == ("float32" if want is torch.float32 else "bfloat16")
    auto = T.build_tiny(name, seed=0, short_side=64)
    assert auto.precision == "fp32" and auto.autocast_dtype is None  # auto on CPU


# ---------------------------------------------------------------------------------------- fingerprint
def test_teacher_metadata_fingerprints_every_label_setting():
    base = T.build_tiny("segformer", seed=0, short_side=64).metadata()
    assert base["fingerprint"] == T.teacher_fingerprint(base) and base["fingerprint"].startswith("sha256:")
    for kw in ({"short_side": 96}, {"precision": "bf16"}, {"interpolation": "bicubic"}):
        assert T.build_tiny("segformer", seed=0, **{"short_side": 64, **kw}).metadata()["fingerprint"] \
            != base["fingerprint"], kw
    assert T.build_tiny("segformer", seed=1, short_side=64).metadata()["fingerprint"] != base["fingerprint"]
    # device and batch size do not change labels
    assert T.build_tiny("segformer", seed=0, short_side=64, batch_size=3).metadata()["fingerprint"] == base["fingerprint"]


def test_check_fingerprint_records_and_refuses_changes(tmp_path):
    from polymae.datasets import storage

    url = str(tmp_path / "train" / T.FINGERPRINT_NAME)
    policy = {"teachers": {"depth": {"name": "dpt", "input_size": None, "precision": "auto", "interpolation": "auto",
                                     "revision": None}}}
    meta = {"depth": T.build_tiny("dpt", seed=0, short_side=64).metadata()}
    first = T.label_fingerprint(policy)
    assert T.check_fingerprint(url, first, finished=0, pending=2) == first and storage.read_json(url) == first
    # the teachers part is added once they have loaded; the same settings then pass
    full = T.check_fingerprint(url, T.label_fingerprint(policy, meta), finished=0, pending=2)
    assert set(full["settings"]) == {"config", "teachers"} and storage.read_json(url) == full
    assert T.check_fingerprint(url, T.label_fingerprint(policy, meta), finished=1, pending=1) == full
    # a changed config setting is refused before anything loads, naming it
    changed = {"teachers": {"depth": {**policy["teachers"]["depth"], "precision": "bf16_full"}}}
    with pytest.raises(T.FingerprintMismatch, match=r"config\.teachers\.depth\.precision: 'auto' -> 'bf16_full'"):
        T.check_fingerprint(url, T.label_fingerprint(changed), finished=1, pending=1)
    # other weights (revision) or another input size show up in the teachers part
    other = {"depth": T.build_tiny("dpt", seed=5, short_side=96).metadata()}
    with pytest.raises(T.FingerprintMismatch) as e:
        T.check_fingerprint(url, T.label_fingerprint(policy, other), finished=1, pending=1)
    assert "teachers.depth.revision" in str(e.value) and "teachers.depth.short_side: 64 -> 96" in str(e.value)
    assert storage.read_json(url) == full  # a refused run changes nothing
    # mode=overwrite replaces it
    assert T.check_fingerprint(url, T.label_fingerprint(changed), finished=0, pending=2, replace=True) \
        == storage.read_json(url) == T.label_fingerprint(changed)
    # finished shards without any fingerprint (an older polymae): refusing beats mixing labels
    legacy = str(tmp_path / "old" / T.FINGERPRINT_NAME)
    with pytest.raises(T.FingerprintMismatch, match="mode=overwrite"):
        T.check_fingerprint(legacy, first, finished=3, pending=1)
    assert T.check_fingerprint(legacy, first, finished=3, pending=0) == first and not storage.exists(legacy)
