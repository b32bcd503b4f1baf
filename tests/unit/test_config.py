"""Config loading: YAML + overrides, type checks, impossible values, all failing with the key's name."""

import os
import subprocess
import sys

import pytest
import yaml

from polymae.pipeline.config import ConfigError, load_config, parse_overrides, redact, save_config
from polymae.pipeline.train.config import PretrainConfig

pytestmark = pytest.mark.unit


@pytest.fixture()
def shards_dir(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    return str(d)


def test_yaml_then_overrides(tmp_path, shards_dir):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"data": {"shards": shards_dir, "img_size": 64}, "train": {"steps": 7}}))
    cfg = load_config(PretrainConfig, str(p), ["train.steps=9", "model.alpha=0.5", "data.crop_scale=0.3,1.0",
                                                      "model.num_visible=24"])
    assert cfg.data.img_size == 64 and cfg.train.steps == 9 and cfg.model.alpha == 0.5
    assert cfg.data.crop_scale == [0.3, 1.0]
    assert cfg.train.zero_stage == 2  # default kept
    # YAML 1.1 reads 1e-4 (no dot) as a string: a float key takes it as the number, in a file and on the command line
    p.write_text("data:\n  shards: " + shards_dir + "\noptim:\n  base_lr: 1e-4\n")
    assert load_config(PretrainConfig, str(p), ["optim.min_lr=2E-6"]).optim.base_lr == 1e-4
    assert load_config(PretrainConfig, str(p), ["optim.min_lr=2E-6"]).optim.min_lr == 2e-6
    with pytest.raises(ConfigError, match="optim.min_lr"):
        load_config(PretrainConfig, str(p), ["optim.min_lr=2e-x"])


@pytest.mark.parametrize("override,key", [
    ("train.stepz=3", "train.stepz"),
    ("bogus=1", "bogus"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("model.norm_pix_loss=maybe", "model.norm_pix_loss"),
    ("model.mask_ratio=1.5", "model.mask_ratio"),
    ("model.arch=vit", "model.arch"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("data.img_size=100", "data.img_size"),
    ("model.num_visible=10000", "model.num_visible"),
    ("optim.betas=0.9", "optim.betas"),
])
def test_bad_values_name_the_key(shards_dir, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, [f"data.shards={shards_dir}", override])
    assert e.value.key == key
    assert f"'{key}'" in str(e.value)


def test_missing_input_folder(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, [f"data.shards={tmp_path}/nope"])
    assert e.value.key == "data.shards"


def test_global_batch_must_divide(shards_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, [f"data.shards={shards_dir}", "train.global_batch=12", "train.micro_batch=4"])
    assert e.value.key == "train.global_batch"
    cfg = load_config(PretrainConfig, None, [f"data.shards={shards_dir}", "train.global_batch=16", "train.micro_batch=4"])
    assert cfg.train.global_batch == 16


@pytest.mark.parametrize("url", ["s3://AKIAXX:secretpw@bucket/run", "file:///tmp/run", "simplecache::s3://b/run"])
def test_run_folder_must_be_local(url, tmp_path):
    """The run folder (DeepSpeed checkpoints, metrics, TensorBoard) is written with local file I/O: a URL is a
    config error naming ``output``, before any work and without echoing credentials; shards may be remote."""
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, None, ["data.shards=s3://bucket/shards", f"output={url}"], preflight=False)
    assert e.value.key == "output" and "secretpw" not in str(e.value) and "AKIAXX" not in str(e.value)
    cfg = load_config(PretrainConfig, None, ["data.shards=s3://bucket/shards", f"output={tmp_path}/run"])
    assert cfg.data.shards == "s3://bucket/shards"


def test_override_parsing():
    assert parse_overrides(["a.b=1", "c=x,y", "d=true", "e="]) == {"a": {"b": 1}, "c": "x,y", "d": True, "e": ""}
    with pytest.raises(ConfigError):
        parse_overrides(["novalue"])


def test_saved_config_round_trips_and_has_no_credentials(tmp_path):
    cfg = load_config(PretrainConfig, None, ["data.shards=s3://AKIAXX:secretpw@bucket/shards",
                                             f"output={tmp_path}/run"])
    out = tmp_path / "saved.yaml"
    save_config(cfg, str(out))
    text = out.read_text()
    assert "secretpw" not in text and "AKIAXX" not in text
    again = load_config(PretrainConfig, str(out), [])
    assert again.train == cfg.train and again.model == cfg.model
    assert redact({"aws_secret_access_key": "x", "n": 1}) == {"aws_secret_access_key": "<redacted>", "n": 1}


def test_cli_reports_key_before_work(tmp_path):
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, "-m", "polymae.jobs.pretrain", f"data.shards={tmp_path}", "model.mask_ratio=1.5"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "model.mask_ratio" in r.stderr
    r = subprocess.run([sys.executable, "-m", "polymae.jobs.cli", "pretrain", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "train.zero_stage" in r.stdout and "ZeRO" in r.stdout


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "..", "jobs",
                                                                          "configs")) if f.endswith(".yaml") and not f.startswith("multitask_")))
def test_paper_recipes_load(name):
    """The pre-training recipes (the multitask ones are loaded by test_multitask_components.py)."""
    path = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs", name)
    cfg = load_config(PretrainConfig, path, [])
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05
    assert cfg.train.global_batch in (2048, 4096)
    if cfg.model.arch == "mae":
        assert cfg.model.mask_ratio == 0.75 and cfg.model.norm_pix_loss and cfg.optim.base_lr == 1.5e-4
    else:
        assert cfg.model.num_visible == 98 and cfg.optim.base_lr == 1e-4


@pytest.mark.parametrize("stage,world,gloo,enabled,expect", [
    (2, 2, True, True, True), (1, 4, True, True, True),   # CPU ranks: bucketed gloo messages
    (2, 1, True, True, False),                            # one rank: nothing to communicate
    (2, 2, False, True, False),                           # NCCL: DeepSpeed's own defaults
    (2, 2, True, False, False), (3, 2, True, True, False), (0, 2, True, True, False)])
def test_deepspeed_config_gloo_buckets(stage, world, gloo, enabled, expect):
    from polymae.pipeline.train.distributed import GLOO_ALLGATHER_BUCKET
    from polymae.pipeline.train.recipe import deepspeed_config

    cfg = PretrainConfig()
    cfg.train.zero_stage, cfg.train.gloo_bucketed_comm = stage, enabled
    cfg.train.micro_batch, cfg.train.global_batch = 2, 2 * world
    zero = deepspeed_config(cfg, world, "fp32", gloo=gloo)["zero_optimization"]
    assert zero["stage"] == stage
    if expect:
        assert zero["reduce_scatter"] is False and zero["allgather_bucket_size"] == GLOO_ALLGATHER_BUCKET
    else:
        assert "reduce_scatter" not in zero
        assert zero.get("allgather_bucket_size", int(5e7)) == int(5e7)


# -- validate() is pure; preflight() holds the checks that need files or the environment ----------------------
def _configs() -> list[PretrainConfig]:
    mae = PretrainConfig()
    mae.model.arch = "mae"  # keeps the MultiMAE default modalities: validate() must not rewrite them
    weighted = PretrainConfig()
    weighted.model.loss_weights = {"depth": 2.0}
    return [PretrainConfig(), mae, weighted]


@pytest.mark.parametrize("cfg", _configs(), ids=["multimae", "mae", "loss_weights"])
def test_validate_changes_nothing(cfg):
    import copy

    from polymae.pipeline.config import validate_tree

    before = copy.deepcopy(cfg)
    validate_tree(cfg)
    assert cfg == before


def test_mae_uses_rgb_only_without_rewriting_the_config(tmp_path, shards_dir):
    cfg = load_config(PretrainConfig, None, [f"data.shards={shards_dir}", "model.arch=mae"])
    assert cfg.model.modalities == ["rgb", "depth", "semseg"]  # as given
    assert cfg.model.active_modalities() == ["rgb"]
    assert cfg.resolved().model.modalities == ["rgb"] and cfg.model.modalities == ["rgb", "depth", "semseg"]
    with pytest.raises(ConfigError) as e:  # a weight for a modality MAE does not use
        load_config(PretrainConfig, None, [f"data.shards={shards_dir}", "model.arch=mae", "model.loss_weights={depth: 2}"])
    assert e.value.key == "model.loss_weights.depth"


def test_validate_does_no_io_and_reads_no_environment(monkeypatch):
    import fsspec

    from polymae.datasets import storage
    from polymae.pipeline.config import validate_tree
    from polymae.pipeline.train import distributed

    def boom(*a, **kw):
        raise AssertionError("validate() must not touch files or the environment")

    monkeypatch.setattr(os.path, "exists", boom)
    monkeypatch.setattr(os.path, "isdir", boom)
    monkeypatch.setattr(fsspec, "open", boom)
    monkeypatch.setattr(fsspec, "filesystem", boom)
    monkeypatch.setattr(fsspec, "url_to_fs", boom)
    monkeypatch.setattr(storage, "exists", boom)
    monkeypatch.setattr(storage, "get_fs", boom)
    monkeypatch.setattr(distributed, "world_size", boom)
    for cfg in _configs():
        cfg.data.shards = "/nonexistent/shards"
        cfg.train.wandb_project = "never-imported"
        validate_tree(cfg)


def test_preflight_errors_name_the_key(tmp_path, shards_dir, monkeypatch):
    from polymae.pipeline.config import preflight_tree

    cfg = PretrainConfig()
    cfg.data.shards = str(tmp_path / "missing")
    with pytest.raises(ConfigError) as e:
        preflight_tree(cfg)
    assert e.value.key == "data.shards" and "'data.shards'" in str(e.value)

    cfg.data.shards = shards_dir
    cfg.train.global_batch, cfg.train.micro_batch = 12, 4
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError) as e:
        preflight_tree(cfg)
    assert e.value.key == "train.global_batch" and "ranks (2)" in str(e.value)
    monkeypatch.setenv("WORLD_SIZE", "3")
    preflight_tree(cfg)  # 12 = 4 x 3 ranks


def test_preflight_false_accepts_a_missing_shards_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")  # the world of another machine: not checked either
    cfg = load_config(PretrainConfig, None, [f"data.shards={tmp_path}/not-yet-labelled", "train.global_batch=8"],
                      preflight=False)
    assert cfg.data.shards.endswith("not-yet-labelled")
    with pytest.raises(ConfigError) as e:  # the pure checks still run
        load_config(PretrainConfig, None, [f"data.shards={tmp_path}/nope", "train.global_batch=6"], preflight=False)
    assert e.value.key == "train.global_batch"


def _recipes() -> list[str]:
    folder = os.path.join(os.path.dirname(__file__), "..", "..", "jobs", "configs")
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(".yaml") and not f.startswith("multitask_"))  # pre-training recipes only


@pytest.mark.parametrize("path", _recipes(), ids=os.path.basename)
def test_recipe_is_valid_at_its_stated_world_size(path, monkeypatch):
    """Each recipe states the GPUs it is written for (``# world_size: N``) and a justification of its ZeRO stage;
    preflight at that world size accepts it (micro-batch x ranks divides the global batch)."""
    import re

    text = open(path).read()
    m = re.search(r"^# world_size: (\d+)", text, re.M)
    assert m, f"{path} states no '# world_size: N'"
    assert "ZeRO" in text and "GB" in text  # the stage is argued from memory arithmetic
    world = int(m.group(1))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    cfg = load_config(PretrainConfig, path, [])
    assert cfg.train.global_batch // (cfg.train.micro_batch * world) >= 1
    monkeypatch.setenv("WORLD_SIZE", str(world * 3))  # a size the recipe was not written for is refused, naming the key
    with pytest.raises(ConfigError, match="train.global_batch"):
        load_config(PretrainConfig, path, [])


def test_huge_recipe_on_64_gpus_with_its_stated_micro_batch(monkeypatch):
    path = [p for p in _recipes() if p.endswith("multimae_vit_huge.yaml")][0]
    monkeypatch.setenv("WORLD_SIZE", "64")
    with pytest.raises(ConfigError, match="train.global_batch"):
        load_config(PretrainConfig, path, [])
    assert load_config(PretrainConfig, path, ["train.micro_batch=32"]).train.micro_batch == 32
