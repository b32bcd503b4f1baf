"""Units of the classification protocols (``pipeline/evaluate/classification.py``): top-k on a hand-computed case,
config errors that name the key, the paper defaults of ``jobs/configs/eval/*.yaml``, the pooled heads, MAE's LARS
step, the warm-up + cosine schedule, and timm's layer-wise lr decay on the polymae encoder."""

import math
import os

import pytest
import torch
import yaml

from polymae.pipeline.config import ConfigError, load_config
from polymae.pipeline.evaluate.classification import (ClassifierModel, FinetuneConfig, LinearProbeConfig, PooledHead,
                                                      make_finetune_optimizer, make_probe_optimizer, make_scheduler,
                                                      topk_metrics)

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPTH = 4


def test_topk_on_a_hand_computed_case():
    # 4 samples, 6 classes. Ranks of the true class: 1 (hit), 2 (top-5 only), 5 (top-5 only), 6 (miss).
    logits = torch.tensor([[9.0, 1, 2, 3, 4, 5],    # target 0: rank 1
                           [5.0, 4, 3, 2, 1, 0],    # target 1: rank 2
                           [5.0, 4, 1, 3, 2, 0],    # target 2: rank 5
                           [5.0, 4, 3, 0, 2, 1]])   # target 3: rank 6
    target = torch.tensor([0, 1, 2, 3])
    assert topk_metrics(logits, target) == pytest.approx({"top1": 0.25, "top5": 0.75})
    # three classes: top-5 is not reported (it would be 1); top-1 of [hit, miss] = 0.5
    three = topk_metrics(torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]]), torch.tensor([1, 2]))
    assert three == pytest.approx({"top1": 0.5})
    with pytest.raises(ValueError):
        topk_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("cls, override, key", [
    (LinearProbeConfig, "epochs=0", "linear_probe.epochs"),
    (LinearProbeConfig, "warmup_epochs=90", "linear_probe.warmup_epochs"),
    (LinearProbeConfig, "blr=0", "linear_probe.blr"),
    (LinearProbeConfig, "batch_size=0", "linear_probe.batch_size"),
    (LinearProbeConfig, "momentum=1.0", "linear_probe.momentum"),
    (LinearProbeConfig, "min_crop_scale=0", "linear_probe.min_crop_scale"),
    (FinetuneConfig, "layer_decay=0", "finetune.layer_decay"),
    (FinetuneConfig, "drop_path=1.0", "finetune.drop_path"),
    (FinetuneConfig, "mixup=-0.1", "finetune.mixup"),
    (FinetuneConfig, "label_smoothing=1.0", "finetune.label_smoothing"),
    (FinetuneConfig, "micro_batch=-1", "finetune.micro_batch"),
])
def test_config_errors_name_the_key(cls, override, key):
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert e.value.key == key and key in str(e.value)


def test_defaults_validate_and_the_data_is_required_by_the_run():
    for cls, section in ((LinearProbeConfig, "linear_probe"), (FinetuneConfig, "finetune")):
        cfg = load_config(cls, None, [])  # defaults pass: the section is in EvaluateConfig for every protocol
        with pytest.raises(ConfigError) as e:
            cfg.require_data()
        assert e.value.key == f"{section}.data"
        load_config(cls, None, ["train=a", "val=b"], preflight=False).require_data()
        assert load_config(cls, None, ["data=root/"], preflight=False).roots() == ("root/train", "root/val")
        with pytest.raises(ConfigError) as e:  # preflight: a local folder that is set must exist
            load_config(cls, None, ["data=/nonexistent/polymae-data"])
        assert e.value.key == f"{section}.data"


def test_yaml_configs_carry_the_paper_settings():
    lp = yaml.safe_load(open(os.path.join(REPO, "jobs", "configs", "eval", "linear_probe.yaml")))
    ft = yaml.safe_load(open(os.path.join(REPO, "jobs", "configs", "eval", "finetune.yaml")))
    assert lp["protocol"] == "linear_probe" and ft["protocol"] == "finetune"
    assert set(lp) == {"protocol", "checkpoint", "linear_probe"} and set(ft) == {"protocol", "checkpoint", "finetune"}
    a, b = LinearProbeConfig(**lp["linear_probe"]), FinetuneConfig(**ft["finetune"])
    a.validate()
    b.validate()
    assert (a.blr, a.batch_size, a.epochs, a.warmup_epochs, a.weight_decay, a.momentum, a.pool) == \
        (0.1, 16384, 90, 10, 0.0, 0.9, "cls")
    assert (b.blr, b.batch_size, b.epochs, b.warmup_epochs, b.layer_decay, b.drop_path, b.mixup, b.cutmix,
            b.label_smoothing, b.weight_decay) == (5e-4, 1024, 100, 5, 0.65, 0.1, 0.8, 1.0, 0.1, 0.05)
    assert b.batch_size % b.micro_batch == 0 and b.micro_batch % 2 == 0


def test_pooled_heads():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # G=1 global + 4 patch tokens, D=3
    probe = PooledHead(3, 4, num_global=1, pool="cls", style="probe")
    assert torch.equal(probe.features(tokens), tokens[:, 0])
    mean = PooledHead(3, 4, num_global=1, pool="mean", style="finetune")
    assert torch.allclose(mean.features(tokens), torch.tensor([[7.5, 8.5, 9.5], [22.5, 23.5, 24.5]]))
    bn = probe.classifier[0]
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert [n for n, _ in probe.named_parameters()] == ["classifier.1.weight", "classifier.1.bias"]
    assert isinstance(mean.classifier[0], torch.nn.LayerNorm)
    assert PooledHead(3, 4, pool="cls", style="finetune").classifier[0].weight.abs().max() < 1e-4  # std 2e-5
    assert probe(list(tokens[None])).shape == (2, 4)


def test_lars_step_is_maes_trust_ratio_update():
    head = PooledHead(2, 2, style="probe")
    w, b = head.classifier[1].weight, head.classifier[1].bias
    with torch.no_grad():
        w.copy_(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))   # |w| = 5
        b.copy_(torch.tensor([1.0, -1.0]))
    opt = make_probe_optimizer(head, lr=2.0, momentum=0.9)
    assert [g["always_adapt"] for g in opt.param_groups] == [True, False]
    w.grad = torch.tensor([[0.0, 1.0], [0.0, 0.0]])      # |g| = 1 -> trust ratio 0.001 * 5 / 1
    b.grad = torch.tensor([0.5, 0.5])
    opt.step()
    assert torch.allclose(w, torch.tensor([[3.0, -2.0 * 0.005], [0.0, 4.0]]))
    assert torch.allclose(b, torch.tensor([1.0 - 1.0, -1.0 - 1.0]))  # 1-d: plain SGD, lr * g


def test_warmup_then_cosine_per_step():
    head = PooledHead(2, 2, style="probe")
    opt = make_probe_optimizer(head, lr=1.0)
    sched = make_scheduler(opt, LinearProbeConfig(epochs=4, warmup_epochs=1, min_lr=0.0), steps_per_epoch=2)
    got = []
    for step in range(8):
        sched.step_update(step)
        got.append(opt.param_groups[0]["lr"])
    cosine = [0.5 * (1 + math.cos(math.pi * t / 6)) for t in range(6)]  # 6 steps after 2 of warm-up
    assert got == pytest.approx([0.0, 0.5] + cosine)


@pytest.fixture(scope="module")
def tiny_classifier():
    from polymae.models.multimae import create_model
    from polymae.models.multitask import encoder_init_kwargs

    # MAE-style: it has the final encoder norm (MultiMAE has none)
    enc = create_model("mae_tiny", img_size=32, dim=32, depth=DEPTH, num_heads=2, decoder_dim=32, decoder_depth=1,
                       decoder_heads=2)
    return ClassifierModel(encoder_init_kwargs(enc.init_kwargs), num_classes=3, pool="mean", style="finetune")


def test_layer_decay_scales_follow_timm(tiny_classifier):
    model, ld = tiny_classifier, 0.5
    opt = make_finetune_optimizer(model, FinetuneConfig(layer_decay=ld, weight_decay=0.05), lr=1.0)
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(group) == len(named)  # every parameter in exactly one group

    def scale_wd(name):
        g = group[id(named[name])]
        return g["lr_scale"], g["weight_decay"]

    # timm: stem = layer 0, block i = layer i + 1, head = layer depth + 1 (scale 1); scale = ld ** (max - layer)
    assert scale_wd("net.encoder.global_tokens") == (ld ** (DEPTH + 1), 0.0)
    assert scale_wd("net.encoder.input_adapters.rgb.proj.weight") == (ld ** (DEPTH + 1), 0.05)
    assert scale_wd("net.encoder.encoder.0.attn.qkv.weight") == (ld ** DEPTH, 0.05)
    assert scale_wd("net.encoder.encoder.0.norm1.weight") == (ld ** DEPTH, 0.0)
    assert scale_wd("net.encoder.encoder.3.mlp.fc2.weight") == (ld, 0.05)
    assert scale_wd("net.encoder.encoder_norm.weight") == (ld, 0.0)  # joins the last block, as timm's ViT norm
    assert scale_wd("net.heads.cls.classifier.1.weight") == (1.0, 0.05)
    assert scale_wd("net.heads.cls.classifier.1.bias") == (1.0, 0.0)
    sched = make_scheduler(opt, FinetuneConfig(epochs=3, warmup_epochs=1), steps_per_epoch=4)
    sched.step_update(2)  # half-way through the warm-up
    lrs = {n: group[id(p)]["lr"] for n, p in named.items()}
    assert lrs["net.encoder.encoder.0.attn.qkv.weight"] == pytest.approx(0.5 * ld ** DEPTH)
    assert lrs["net.heads.cls.classifier.1.weight"] == pytest.approx(0.5)
