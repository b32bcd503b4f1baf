"""The label job's config: the typed teacher list and its shorthand keys, pure validate(), preflight(),
per-teacher input size / precision / revision reaching the loaded teacher, and the shard-file listings
the driver uses."""

from __future__ import annotations

import copy
import os

import fsspec
import pytest
import torch

from polymae.datasets import shards as S
from polymae.datasets import storage
from polymae.pipeline.config import ConfigError, load_config, validate_tree
from polymae.pipeline.label import teachers as T
from polymae.pipeline.label.config import LabelConfig, TeacherConfig

pytestmark = pytest.mark.unit


def _load(overrides=(), path=None, preflight=False) -> LabelConfig:
    return load_config(LabelConfig, path, ["input=x", *overrides], preflight=preflight)


def _key(overrides=(), path=None, preflight=False) -> str:
    with pytest.raises(ConfigError) as e:
        _load(overrides, path, preflight)
    return e.value.key


def test_typed_teachers_from_yaml_equal_the_shorthand(tmp_path):
    yaml_file = tmp_path / "label.yaml"
    # semseg listed first: the typed list is put in task order (depth, semseg), each task's order kept
    yaml_file.write_text("teachers:\n  - {name: segformer}\n  - {name: dpt, weights: /m/dpt}\n"
                         "  - {name: depth_anything}\n")
    typed = _load(path=str(yaml_file))
    short = _load(["depth_teacher=dpt,depth_anything", "depth_weights=/m/dpt,null"])
    want = [TeacherConfig("dpt", "depth", "/m/dpt"), TeacherConfig("depth_anything", "depth"),
            TeacherConfig("segformer", "semseg")]
    assert typed.teacher_configs() == short.teacher_configs() == want
    assert typed.teacher_specs() == short.teacher_specs()
    assert list(typed.teacher_specs()) == ["depth", "depth.depth_anything", "semseg"]
    # the default shorthand is dpt + segformer, tiny random
    assert _load().teacher_configs() == [TeacherConfig("dpt", "depth"), TeacherConfig("segformer", "semseg")]
    # a typed list on the command line (YAML flow syntax), with every field
    cli = _load(["teachers=[{name: depth_anything, revision: 'sha256:ab', input_size: 224, precision: bf16}]"])
    assert cli.teacher_configs() == [TeacherConfig("depth_anything", "depth", None, "sha256:ab", 224, "bf16")]
    assert cli.teacher_specs()["depth"]["short_side"] == 224 and "semseg" not in cli.teacher_specs()


def test_teachers_and_a_shorthand_key_together_name_the_key():
    typed = "teachers=[{name: dpt}]"
    assert _key([typed, "depth_teacher=depth_anything"]) == "depth_teacher"
    assert _key([typed, "semseg_teacher=none"]) == "semseg_teacher"
    assert _key([typed, "semseg_weights=/m/sf"]) == "semseg_weights"
    assert _load([typed, "depth_teacher=dpt"]).teacher_configs() == [TeacherConfig("dpt", "depth")]  # the default


@pytest.mark.parametrize("override, key", [
    ("teachers=[{name: dpt}, {name: midas}]", "teachers[1].name"),
    ("teachers=[{name: dpt, task: semseg}]", "teachers[0].task"),
    ("teachers=[{name: dpt}, {name: dpt}]", "teachers[1].name"),
    ("teachers=[{name: dpt, revision: abc}]", "teachers[0].revision"),
    ("teachers=[{name: dpt, input_size: 8}]", "teachers[0].input_size"),
    ("teachers=[{name: dpt, precision: fp16}]", "teachers[0].precision"),
    ("teachers=[{name: dpt, interpolation: lanczos}]", "teachers[0].interpolation"),
    ("min_side=0", "min_side"),
    ("max_aspect=0.5", "max_aspect"),
    ("teacher_short_side=16", "teacher_short_side"),
    ("teachers=[{name: dpt, bogus: 1}]", "teachers[0].bogus"),
    ("teachers=[{weights: /m}]", "teachers[0].name"),
    ("depth_teacher=none,dpt", "depth_teacher"),
])
def test_typed_teacher_errors_name_the_key(override, key):
    assert _key([override]) == key


def test_validate_is_pure(monkeypatch):
    configs = [_load(["teachers=[{name: dpt, weights: /nowhere/dpt}, {name: segformer, input_size: 64}]"]),
               _load(["depth_teacher=dpt,depth_anything", "depth_weights=/nowhere/a,null"])]
    before = copy.deepcopy(configs)

    def no_io(*a, **kw):
        raise AssertionError("validate() did I/O")

    monkeypatch.setattr(os.path, "exists", no_io)
    monkeypatch.setattr(os, "listdir", no_io)
    monkeypatch.setattr(fsspec, "open", no_io)
    monkeypatch.setattr(storage, "exists", no_io)
    for cfg in configs:
        cfg.validate()
        validate_tree(cfg)
        cfg.teacher_configs()
        cfg.teacher_specs()
    monkeypatch.undo()
    assert configs == before
    assert configs[0].teachers[0].task is None  # resolving the task did not write it back


def test_preflight_names_the_key_of_missing_weights(tmp_path):
    assert _key(["teachers=[{name: segformer}, {name: dpt, weights: /nowhere/dpt}]"], preflight=True) \
        == "teachers[1].weights"
    assert _key(["depth_weights=/nowhere/dpt"], preflight=True) == "depth_weights"
    (tmp_path / "dpt").mkdir()
    assert _load([f"teachers=[{{name: dpt, weights: {tmp_path / 'dpt'}}}]"], preflight=True).teachers
    # validate() alone accepts the missing folder: only preflight() looks
    assert _load(["depth_weights=/nowhere/dpt"]).teacher_configs()[0].weights == "/nowhere/dpt"


def test_per_teacher_input_size_and_precision_reach_the_teacher():
    cfg = _load(["teacher_short_side=128", "batch_size=2",
                 "teachers=[{name: dpt, input_size: 64, precision: bf16}, {name: segformer}]"])
    specs = cfg.teacher_specs()
    depth, semseg = T.load_teacher(**specs["depth"]), T.load_teacher(**specs["semseg"])
    assert depth.short_side == 64 and semseg.short_side == 128  # None = the job's teacher_short_side
    assert depth.input_size(100, 200) == (64, 64)  # the plain-ViT DPT takes squares of its short side
    assert depth.autocast_dtype is torch.bfloat16 and depth.metadata()["dtype"] == "bfloat16"
    assert semseg.autocast_dtype is None and semseg.metadata()["dtype"] == "float32"  # auto on CPU = fp32
    assert depth.batch_size == 2


def test_a_wrong_revision_names_both(tmp_path):
    folder = tmp_path / "dpt"
    T.build_tiny("dpt", seed=0, short_side=64).save_pretrained(str(folder))
    actual = T.weights_sha256(str(folder))
    wrong = "sha256:" + "0" * 64
    cfg = _load([f"teachers=[{{name: dpt, weights: {folder}, revision: '{wrong}'}}]"], preflight=True)
    with pytest.raises(ValueError) as e:
        T.load_teacher(**cfg.teacher_specs()["depth"])
    assert wrong in str(e.value) and actual in str(e.value)
    ok = _load([f"teachers=[{{name: dpt, weights: {folder}, revision: '{actual}'}}]"], preflight=True)
    assert T.load_teacher(**ok.teacher_specs()["depth"]).revision == actual
    with pytest.raises(ValueError, match=wrong):  # tiny random teachers have a revision too
        T.load_teacher("segformer", None, revision=wrong)


def test_shard_file_listings(tmp_path):
    root, d = str(tmp_path), tmp_path / "train"
    d.mkdir()
    for name in ("train-000000.tar", "train-000000.stats.json", "train-000002.tar", "val-000001.stats.json",
                 ".train-000002.stats.json.tmp-0a1b2c3d", ".train-000003.tar.tmp-ff00", ".val-000001.tar.tmp-ab",
                 "plan.parquet", "manifest.json"):
        (d / name).write_text("{}")
    assert S.list_done_markers(root, "train") == {0: str(d / "train-000000.stats.json")}
    assert S.list_shard_tars(root, "train") == {0: str(d / "train-000000.tar"), 2: str(d / "train-000002.tar")}
    assert S.list_temporaries(root, "train") == [str(d / ".train-000002.stats.json.tmp-0a1b2c3d"),
                                                 str(d / ".train-000003.tar.tmp-ff00")]
    assert S.list_done_markers(root, "test") == {} and S.list_temporaries(root, "test") == []
    assert S.parse_stats_name("s3://b/x/train-000007.stats.json") == ("train", 7)
    assert S.parse_stats_name("train-000007.tar") is None and S.parse_shard_name("train-000007.tar") == ("train", 7)
    assert S.is_valid_split("train_2") and not S.is_valid_split("a/b")
    assert set(S.done_shards(root, "train")) == {0}


def test_ray_session_restores_the_environment(monkeypatch):
    ray = pytest.importorskip("ray")
    from polymae.pipeline.label.scheduler import RAY_ENV, ray_session

    for k in (*RAY_ENV, "RAY_worker_niceness", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "mine")  # an exported value wins and stays
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # joined, not started: nothing to shut down
    with ray_session(None, worker_nice=0) as started:
        assert started is False
        assert os.environ["RAY_USAGE_STATS_ENABLED"] == "0" and os.environ["RAY_AUTH_MODE"] == "mine"
        assert os.environ["RAY_worker_niceness"] == "0"
    assert "RAY_USAGE_STATS_ENABLED" not in os.environ and "RAY_worker_niceness" not in os.environ
    assert os.environ["RAY_AUTH_MODE"] == "mine"


def test_native_sizes_by_default_and_the_deprecated_global_override():
    """No input_size anywhere: each teacher at its processor's native size; teacher_short_side (deprecated) still
    overrides the teachers without an input_size of their own; interpolation reaches the teacher."""
    specs = _load(["teachers=[{name: depth_anything, interpolation: bilinear}, {name: segformer}]"]).teacher_specs()
    depth, semseg = T.load_teacher(**specs["depth"]), T.load_teacher(**specs["semseg"])
    assert (depth.short_side, depth.interpolation, semseg.short_side, semseg.interpolation) == \
        (518, "bilinear", 512, "bilinear")
    old = _load(["teacher_short_side=64", "teachers=[{name: dpt, input_size: 96}, {name: segformer}]"])
    assert [s["short_side"] for s in old.teacher_specs().values()] == [96, 64]
    assert old.label_policy()["teachers"]["semseg"] == {"name": "segformer", "revision": None, "input_size": 64,
                                                         "interpolation": "auto", "precision": "auto"}
    assert _load().min_side == 32 and _load().max_aspect == 4.0


def test_config_yaml_is_never_silently_overwritten(tmp_path):
    from polymae.pipeline.label.config import save_label_config

    url = str(tmp_path / "config.yaml")
    first = _load(["batch_size=4"])
    assert save_label_config(first, url) == url
    text = (tmp_path / "config.yaml").read_text()
    assert save_label_config(_load(["batch_size=4", "mode=extend"]), url) == url  # run-only keys: kept as is
    other = save_label_config(_load(["batch_size=8"]), url)
    assert other != url and other.startswith(str(tmp_path / "config.")) and other.endswith(".yaml")
    assert (tmp_path / "config.yaml").read_text() == text and "batch_size: 8" in open(other).read()
    assert save_label_config(_load(["batch_size=8"]), url, replace=True) == url  # mode=overwrite
    assert "batch_size: 8" in (tmp_path / "config.yaml").read_text()


def test_cpus_and_decode_threads_default_from_the_nodes_cpus_per_gpu():
    """0 = auto: a GPU actor gets the alive GPU nodes' smallest CPUs per GPU (64 CPUs / 8 GPUs -> 8, 24 / 4 -> 6:
    6), decode threads are the actor's CPUs but one; a CPU actor 1 CPU, 1 decode thread; explicit values kept."""
    from polymae.pipeline.label.scheduler import worker_cpus

    nodes = [{"Alive": True, "Resources": {"CPU": 64.0, "GPU": 8.0}},
             {"Alive": True, "Resources": {"CPU": 24.0, "GPU": 4.0}},
             {"Alive": False, "Resources": {"CPU": 2.0, "GPU": 2.0}},
             {"Alive": True, "Resources": {"CPU": 16.0}}]
    assert worker_cpus("auto", 0, 0, nodes) == (6, 5)
    assert worker_cpus("cpu", 0, 0, nodes) == (1, 1)
    assert worker_cpus("auto", 0, 0, [{"Alive": True, "Resources": {"CPU": 2.0}}]) == (1, 1)
    assert worker_cpus("auto", 4, 0, nodes) == (4, 3) and worker_cpus("auto", 0, 2, nodes) == (6, 2)
    assert _load().cpus_per_worker == 0 and _load().decode_threads == 0
