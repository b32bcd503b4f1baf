"""Units of the classification protocols (``pipeline/evaluate/classification.py``): top-k on a hand-computed case,
config errors that name the key, the paper defaults of ``jobs/configs/eval/*.yaml``, the pooled heads, MAE's LARS
step, the warm-up + cosine schedule, timm's layer-wise lr decay on the polymae encoder, and the fine-tuning
augmentation (timm's RandAugment + random erasing on scikit-image photographs: shapes, the erased rectangle,
determinism in (seed, epoch, image) whatever the global generators, Pillow 13's posterize)."""

import math
import os

import numpy as np
import pytest
import torch
import yaml

from polymae.pipeline.config import ConfigError, load_config
from polymae.pipeline.evaluate.classification import (AugmentedClassFolderStream, ClassifierModel, FinetuneAugment,
                                                      FinetuneConfig, LinearProbeConfig, PooledHead,
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
    (FinetuneConfig, "auto_augment=bogus", "finetune.auto_augment"),            # timm: unknown policy
    (FinetuneConfig, "auto_augment=rand-x9", "finetune.auto_augment"),          # timm: unknown section
    (FinetuneConfig, "auto_augment=rand-m9-mstd0.5-inc", "finetune.auto_augment"),  # timm would ignore "inc"
    (FinetuneConfig, "re_prob=1.5", "finetune.re_prob"),
    (FinetuneConfig, "re_prob=-0.1", "finetune.re_prob"),
    (FinetuneConfig, "re_count=0", "finetune.re_count"),
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
    # MAE's main_finetune.py: --aa rand-m9-mstd0.5-inc1 --reprob 0.25 --remode pixel --recount 1 (also the defaults)
    assert (b.auto_augment, b.re_prob, b.re_mode, b.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    d = FinetuneConfig()
    assert (d.auto_augment, d.re_prob, d.re_mode, d.re_count) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    load_config(FinetuneConfig, None, ["auto_augment=", "re_prob=0"])  # both off is valid
    from polymae.pipeline.evaluate.job import EvaluateConfig

    with pytest.raises(ConfigError) as e:  # a Literal outside its choices, named under evaluate's tree
        load_config(EvaluateConfig, None, ["finetune.re_mode=zero"])
    assert e.value.key == "finetune.re_mode"
    with pytest.raises(ConfigError) as e:  # validate() itself, for a config built in code
        FinetuneConfig(re_mode="zero").validate()
    assert e.value.key == "finetune.re_mode"


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


# ------------------------------------------------------------------------------ fine-tuning augmentation
S = 32  # augmented side


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """scikit-image colour photographs as a class folder: people/{astronaut}, things/{chelsea, coffee, rocket}, long
    side 96 px; returns ``(root, samples)``."""
    import skimage.data
    from PIL import Image

    from polymae.datasets.class_folder import list_class_folder

    root = tmp_path_factory.mktemp("photos")
    for cls, names in (("people", ["astronaut"]), ("things", ["chelsea", "coffee", "rocket"])):
        os.makedirs(root / cls)
        for n in names:
            img = Image.fromarray(getattr(skimage.data, n)())
            img.thumbnail((96, 96), Image.BICUBIC)
            img.save(root / cls / f"{n}.png")
    return str(root), list_class_folder(str(root))[1]


def _aug_stream(photos, augment, seed=0):
    root, samples = photos
    return AugmentedClassFolderStream(samples, 4, S, root=root, scale=(0.08, 1.0), seed=seed, augment=augment)


def _global_states():
    import random

    import numpy as np

    return random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()


def test_mae_augmentation_gives_normalised_float_images(photos):
    from polymae.datasets.class_folder import ClassFolderStream

    mae = FinetuneAugment.from_config(FinetuneConfig(img_size=S))  # rand-m9-mstd0.5-inc1, erasing 0.25 pixel x1
    b = _aug_stream(photos, mae).batch(0)
    assert b["rgb"].dtype == torch.float32 and b["rgb"].shape == (4, 3, S, S) and torch.isfinite(b["rgb"]).all()
    keys = {os.path.relpath(u, photos[0]): c for u, c in photos[1]}
    assert len(set(b["key"])) == 4 and b["cls"].tolist() == [keys[k] for k in b["key"]]  # the 4 photos, labelled
    assert -2.2 < float(b["rgb"].mean()) < 2.7  # ImageNet-normalised range (erased pixels are N(0, 1))
    # both off: no augmentation object, and a do-nothing one keeps the crop + flip bit-identical (uint8)
    assert FinetuneAugment.from_config(FinetuneConfig(img_size=S, auto_augment="", re_prob=0.0)) is None
    root, samples = photos
    plain = ClassFolderStream(samples, 4, S, root=root, scale=(0.08, 1.0), seed=0).batch(0)
    off = _aug_stream(photos, FinetuneAugment(S, "", 0.0)).batch(0)
    assert off["rgb"].dtype == torch.uint8 and torch.equal(off["rgb"], plain["rgb"]) and off["key"] == plain["key"]
    assert not torch.equal(_aug_stream(photos, FinetuneAugment(S, re_prob=0.0)).batch(0)["rgb"], plain["rgb"])


def test_random_erasing_replaces_one_rectangle_after_normalisation(photos):
    from polymae.datasets.transforms import to_model_inputs

    root, samples = photos
    rgb = _aug_stream(photos, FinetuneAugment(S, "", 0.0)).batch(0)["rgb"][0]  # a cropped astronaut/cat, uint8
    for seed in range(5):
        kept = FinetuneAugment(S, re_prob=0.0)(rgb, seed)            # RandAugment only: uint8
        erased = FinetuneAugment(S, re_prob=1.0)(rgb, seed)          # the same RandAugment draws, then erasing
        ref = to_model_inputs({"rgb": kept[None]}, "cpu", ["rgb"])["rgb"][0]
        changed = ((erased - ref).abs() > 1e-4).any(0)               # [S, S]
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = torch.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        # the changed pixels form exactly one rectangle (pixel mode: every value redrawn), everything else equal
        assert torch.equal(changed, box)
        assert torch.allclose(erased[:, ~box], ref[:, ~box], atol=1e-5)
        area = int(box.sum())
        assert 0.02 * S * S * 0.5 <= area <= S * S / 3 + 2 * S  # timm's area fraction [0.02, 1/3] (rounded sides)
        vals = erased[:, box]
        assert abs(float(vals.mean())) < 0.6 and 0.5 < float(vals.std()) < 1.6  # N(0, 1) per pixel and channel


def test_augmentation_is_a_function_of_seed_epoch_and_image(photos):
    import random

    import numpy as np

    aug = FinetuneAugment(S)  # MAE's settings
    n = len(photos[1])
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = _global_states()
    first = _aug_stream(photos, aug, seed=3).batch(0)
    after = _global_states()
    # the caller's generators are put back (drop path / mixup draws are untouched by the loader)
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and torch.equal(before[2], after[2])
    random.seed(99), np.random.seed(99), torch.manual_seed(99)  # other global states: bit-identical images
    again = _aug_stream(photos, aug, seed=3).batch(0)
    assert again["key"] == first["key"] and torch.equal(again["rgb"], first["rgb"])
    # the same image in epoch 1 (positions n..2n-1) differs; and another run seed differs
    stream = _aug_stream(photos, aug, seed=3)
    by_key = {}
    for pos in range(2 * n):
        item = stream._load(pos)
        by_key.setdefault(item["key"], []).append(item["rgb"])
    assert len(by_key) == n and all(len(v) == 2 and not torch.equal(v[0], v[1]) for v in by_key.values())
    assert not torch.equal(_aug_stream(photos, aug, seed=4).batch(0)["rgb"], first["rgb"])
    # the augmentation alone: the same (image, seed) twice is identical, another seed is not
    x = _aug_stream(photos, FinetuneAugment(S, "", 0.0)).batch(0)["rgb"][1]
    assert torch.equal(aug(x, 7), aug(x, 7)) and not torch.equal(aug(x, 7), aug(x, 8))


def test_zero_bit_posterize_is_black_instead_of_a_pillow_error(photos):
    from PIL import Image, ImageOps

    from polymae.pipeline.evaluate.classification import _posterize_any_bits

    img = Image.open(os.path.join(photos[0], "people", "astronaut.png")).convert("RGB")
    assert _posterize_any_bits(img, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert _posterize_any_bits(img, 3).tobytes() == ImageOps.posterize(img, 3).tobytes()
    # magnitude 10 without noise: all 15 ops on every image, PosterizeIncreasing keeps 4 - int(0.4 * 10) = 0 bits
    rgb = torch.from_numpy(np.array(img.resize((S, S)))).permute(2, 0, 1)
    out = FinetuneAugment(S, "rand-m10-n15-p1.0-inc1", 0.0)(rgb, 0)
    assert out.dtype == torch.uint8 and out.shape == (3, S, S)
