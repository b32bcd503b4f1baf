"""Parts of the multitask job without DeepSpeed: the heads' shapes, the ImageNet-style folder stream (deterministic,
resumable, world-size independent), the config's checks, the recipes in jobs/configs, the parameter groups."""

import os

import pytest
import torch

from polymae.pipeline.config import ConfigError, load_config
from polymae.pipeline.train.multitask_config import MultitaskConfig

pytestmark = pytest.mark.unit
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_heads_give_their_documented_shapes():
    from polymae.models.heads import ClassificationHead, ConvNeXtSegHead, DPTDepthHead

    feats = [torch.randn(2, 1 + 16, 32) for _ in range(4)]  # 4 blocks, 1 global token, 4x4 patches of 64 px
    assert DPTDepthHead(32, 16, [0, 1, 2, 3], features=16, reassemble=[8, 8, 16, 16])(feats, (4, 4), (64, 64)).shape \
        == (2, 1, 64, 64)
    assert ConvNeXtSegHead(32, 7, width=16, depth=1)(feats, (4, 4), (16, 16)).shape == (2, 7, 16, 16)
    assert ClassificationHead(32, 5)(feats).shape == (2, 5)
    with pytest.raises(ValueError, match="4 encoder blocks"):
        DPTDepthHead(32, 16, [0, 1, 2])


@pytest.fixture(scope="module")
def class_folder(tmp_path_factory):
    import sys

    sys.path.insert(0, os.path.join(REPO, "tests", "integration"))
    from multitask_helpers import write_class_folder

    return write_class_folder(str(tmp_path_factory.mktemp("classes")), size=40)


def test_class_folder_stream_is_deterministic_resumable_and_world_size_free(class_folder):
    from polymae.datasets.class_folder import ClassFolderStream, list_class_folder

    classes, samples = list_class_folder(class_folder)
    assert classes == ["animal", "object", "person", "texture"] and len(samples) == 8

    def take(n, **kw):
        it = iter(ClassFolderStream(samples, 3, 16, root=class_folder, seed=1, **kw))
        return [next(it) for _ in range(n)]

    one = take(6)  # 18 positions: crosses two epochs of 8 images
    assert all(b["rgb"].shape == (3, 3, 16, 16) and b["rgb"].dtype == torch.uint8 for b in one)
    again = take(6)
    assert all(torch.equal(a["rgb"], b["rgb"]) and a["key"] == b["key"] for a, b in zip(one, again))
    resumed = take(2, skip_batches=4)
    assert [b["key"] for b in resumed] == [b["key"] for b in one[4:]]
    assert all(torch.equal(a["rgb"], b["rgb"]) for a, b in zip(resumed, one[4:]))
    r0, r1 = take(3, rank=0, world=2), take(3, rank=1, world=2)  # global micro-batch g = b W + r
    assert [b["key"] for pair in zip(r0, r1) for b in pair] == [b["key"] for b in one]
    epoch0 = [k for b in one[:2] for k in b["key"]]
    assert len(set(epoch0)) == 6  # no image twice inside an epoch


def test_config_checks_name_the_key(tmp_path):
    base = ["tasks.d.kind=depth", "tasks.d.shards=x"]
    with pytest.raises(ConfigError, match="'tasks'"):
        load_config(MultitaskConfig, overrides=[], preflight=False)
    with pytest.raises(ConfigError, match="tasks.d.global_batch"):
        load_config(MultitaskConfig, overrides=base + ["tasks.d.micro_batch=3"], preflight=False)
    with pytest.raises(ConfigError, match="tasks.c.folder"):
        load_config(MultitaskConfig, overrides=base + ["tasks.c.kind=cls"], preflight=False)
    with pytest.raises(ConfigError, match="every task a sampling_weight"):
        load_config(MultitaskConfig, overrides=base + ["tasks.d.sampling_weight=1", "tasks.e.kind=semseg",
                                                       "tasks.e.shards=x"], preflight=False)
    with pytest.raises(ConfigError, match="encoder"):
        load_config(MultitaskConfig, overrides=base + [f"encoder={tmp_path}/none", f"tasks.d.shards={tmp_path}"])


@pytest.mark.parametrize("name", ["multitask_vit_base", "multitask_vit_large"])
def test_recipes_load(name):
    cfg = load_config(MultitaskConfig, os.path.join(REPO, "jobs", "configs", f"{name}.yaml"), preflight=False)
    assert list(cfg.tasks) == ["depth", "semseg", "cls"]
    assert [t.kind for t in cfg.tasks.values()] == ["depth", "semseg", "cls"]
    assert abs(sum(t.sampling_weight for t in cfg.tasks.values()) - 1.0) < 1e-9
    for t in cfg.tasks.values():
        assert t.global_batch % (t.micro_batch * 8) == 0  # fits 8 ranks
    assert cfg.tasks["depth"].layers[-1] == (11 if name.endswith("base") else 23)


def test_param_groups_freeze_or_decay_the_encoder_by_layer():
    from polymae.models.multimae import create_model
    from polymae.models.multitask import MultiTaskModel, encoder_init_kwargs
    from polymae.pipeline.train.multitask import param_groups

    ik = encoder_init_kwargs(create_model("multimae_tiny", img_size=32, dim=32, depth=4, num_heads=2).init_kwargs)
    heads = {"c": {"kind": "linear_cls", "kwargs": {"dim": 32, "num_classes": 3}}}
    over = ["tasks.c.kind=cls", "tasks.c.folder=x", "optim.encoder_lr_mult=0.5", "optim.layer_decay=0.5"]
    cfg = load_config(MultitaskConfig, overrides=over, preflight=False)
    groups = param_groups(MultiTaskModel(ik, heads), cfg)
    scales = {g["name"]: g["lr_scale"] for g in groups}
    assert scales["encoder.4"] == 0.25 and scales["encoder.1"] == 0.5 * 0.5 ** 4 and scales["encoder.0"] == 0.5 * 0.5 ** 5
    assert scales["head.c"] == 1.0 and {g["task"] for g in groups} == {None, "c"}
    frozen = MultiTaskModel(ik, heads)
    cfg.optim.encoder_lr_mult = 0.0
    groups = param_groups(frozen, cfg)
    assert {g["task"] for g in groups} == {"c"}
    assert not any(p.requires_grad for p in frozen.encoder.parameters())
