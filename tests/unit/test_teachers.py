"""Teachers: registry, resolution policy, original-size outputs, determinism, save/load round trips."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polymae.pipeline.label import teachers as T

pytestmark = pytest.mark.unit

SIZES = [(301, 451), (17, 33), (64, 64)]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in SIZES]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert T.fit_size(10, 1000, 64, 32) == (64, 256)  # long side capped at 4x the short side
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
