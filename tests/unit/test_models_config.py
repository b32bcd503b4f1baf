"""MultiMAEConfig: the one list of MultiMAE / MAE settings, and backward compatibility of what it writes.

The files in tests/fixtures/ (see its README.md) were written by the code before MultiMAEConfig existed:
``model_config_v0.json`` is a release's model config (``name``, ``init_kwargs``, ``pretrain``, ``timm``,
``source``) with its weights (``model_v0.safetensors``) and reference inputs, masks and outputs
(``model_v0_reference.safetensors``); ``model_config_mae_v0.json`` is a training run's MAE model config with
the same two files; ``init_kwargs_v0.json`` lists constructor calls and the ``init_kwargs`` they produced.
"""

import dataclasses
import json
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from polymae.models.config import MultiMAEConfig
from polymae.models.interop import encoder_to_timm
from polymae.models.multimae import MAE, MultiMAE, build_from_init_kwargs, build_model, create_model

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
RELEASES = [("model_config_v0.json", "model_v0"), ("model_config_mae_v0.json", "model_mae_v0")]
TINY = dict(img_size=32, patch_size=8, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def _split(ref: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in ref.items() if k.startswith(prefix)}


@pytest.mark.parametrize("config_file,stem", RELEASES)
def test_model_saved_before_the_config_class_loads_and_computes_the_same(config_file, stem):
    text = (FIXTURES / config_file).read_text()
    mc = json.loads(text)
    model = build_from_init_kwargs(mc["init_kwargs"])
    assert type(model) is {"multimae": MultiMAE, "mae": MAE}[mc["init_kwargs"]["arch"]]
    model.load_state_dict(load_file(FIXTURES / f"{stem}.safetensors"), strict=True)
    model.eval()

    ref = load_file(FIXTURES / f"{stem}_reference.safetensors")
    inputs, masks = _split(ref, "input."), _split(ref, "mask.")
    with torch.no_grad():
        out = model(inputs, masks=masks)
        enc = model.forward_encoder(inputs)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc, ref["encoder"], **close)
    torch.testing.assert_close(out.loss.reshape(1), ref["loss"], **close)
    assert set(out.losses) == set(_split(ref, "loss.")) and set(out.preds) == set(_split(ref, "pred."))
    for m, v in _split(ref, "loss.").items():
        torch.testing.assert_close(out.losses[m].reshape(1), v, **close)
    for m, v in _split(ref, "pred.").items():
        torch.testing.assert_close(out.preds[m], v, **close)

    # writing the model config again gives the same file, key order included
    assert json.dumps(dict(mc, init_kwargs=model.init_kwargs), indent=2) == text
    if "timm" in mc:
        assert encoder_to_timm(model)[1] == mc["timm"]


def _build(factory: str, kwargs: dict) -> MultiMAE:
    cls = {"MultiMAE": MultiMAE, "MAE": MAE}.get(factory)
    return cls(**kwargs) if cls else create_model(factory, **kwargs)


def test_init_kwargs_equal_the_ones_written_before_for_the_same_arguments():
    rows = json.loads((FIXTURES / "init_kwargs_v0.json").read_text())
    assert len(rows) >= 8
    for row in rows:
        ik = _build(row["factory"], row["kwargs"]).init_kwargs
        assert ik == row["init_kwargs"], row["factory"]
        assert list(ik) == list(row["init_kwargs"])  # same key order, so the same JSON text
        assert MultiMAEConfig.from_dict(row["init_kwargs"]).to_dict() == row["init_kwargs"]


def test_round_trip_through_asdict_and_json():
    configs = [MultiMAEConfig(), MultiMAEConfig.mae(),
               MultiMAEConfig(img_size=(32, 48), patch_size=8, in_modalities=["depth", "rgb"],
                              out_modalities=("rgb", "norm_rgb"), loss_weights={"norm_rgb": 2}, mask_ratio=0.5)]
    for cfg in configs:
        assert MultiMAEConfig.from_dict(dataclasses.asdict(cfg)) == cfg
        assert MultiMAEConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg = configs[2]
    assert cfg.img_size == (32, 48) and cfg.to_dict()["img_size"] == [32, 48] and cfg.img_hw == (32, 48)
    assert cfg.in_modalities == ("depth", "rgb") and cfg.loss_weights == {"norm_rgb": 2.0}
    assert MultiMAEConfig(img_size=[32, 32], patch_size=8).img_size == 32
    assert MultiMAEConfig().out_modalities == ("rgb", "depth", "semseg")
    model = MultiMAE(**TINY, semseg_num_classes=5)
    assert MultiMAEConfig.from_dict(model.init_kwargs) == model.config
    assert model.init_kwargs is not model.init_kwargs  # a fresh dict each time


def test_from_dict_rejects_unknown_keys_and_fills_missing_ones():
    with pytest.raises(ValueError, match="'decoder_width'"):
        MultiMAEConfig.from_dict({"arch": "multimae", "dim": 32, "decoder_width": 64})
    with pytest.raises(ValueError, match="'dimm'"):
        build_from_init_kwargs({"arch": "mae", "dimm": 32})
    with pytest.raises(ValueError, match="arch"):
        MultiMAEConfig.from_dict({"arch": "vit"})
    assert MultiMAEConfig.from_dict({}) == MultiMAEConfig()
    assert MultiMAEConfig.from_dict({"arch": "mae"}) == MultiMAEConfig.mae()
    mae = MultiMAEConfig.from_dict({"arch": "mae", "dim": 32})
    assert (mae.dim, mae.decoder, mae.decoder_dim, mae.mask_ratio, mae.encoder_norm) == (32, "mae", 512, 0.75, True)


def test_config_and_keyword_arguments_build_the_same_model():
    cfg = MultiMAEConfig(**TINY, semseg_num_classes=5)
    torch.manual_seed(0)
    a = MultiMAE(cfg)
    torch.manual_seed(0)
    b = MultiMAE(**TINY, semseg_num_classes=5)
    assert a.config == b.config == cfg
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert MultiMAE(cfg, depth=2).config == dataclasses.replace(cfg, depth=2)
    mae_cfg = MultiMAEConfig.mae(**TINY)
    assert type(build_model(mae_cfg)) is MAE and type(build_model(cfg)) is MultiMAE
    assert MAE(**TINY).config == MAE(mae_cfg).config == mae_cfg
    with pytest.raises(ValueError, match="arch"):
        MultiMAE(mae_cfg)
    with pytest.raises(ValueError, match="arch"):
        MultiMAE(arch="mae", **TINY)
    with pytest.raises(TypeError):
        MultiMAE(dimension=32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 64  # type: ignore[misc]


@pytest.mark.parametrize("bad", [dict(img_size=30), dict(img_size=(32, 32, 3)), dict(patch_size=6, img_size=36),
                                 dict(in_modalities=()), dict(in_modalities=("rgb", "rgb")),
                                 dict(out_modalities=("normals",)), dict(decoder="conv"), dict(num_global_tokens=0),
                                 dict(mask_ratio=1.0), dict(loss_weights={"normals": 1.0}), dict(arch="vit"),
                                 dict(fp32_output_adapters=("normals",)), dict(loss_weights={"norm_rgb": 1.0})])
def test_invalid_settings_raise_value_error(bad):
    with pytest.raises(ValueError):
        MultiMAEConfig(**bad)


def test_added_fields_are_written_only_when_used():
    from polymae.models.config import ADDED_FIELDS

    old_keys = json.loads((FIXTURES / "init_kwargs_v0.json").read_text())[0]["init_kwargs"].keys()
    assert set(ADDED_FIELDS) == {f.name for f in dataclasses.fields(MultiMAEConfig)} - set(old_keys)
    for cfg in (MultiMAEConfig(), MultiMAEConfig.mae()):  # defaults: the old key set, nothing new
        assert list(cfg.to_dict()) == list(old_keys)
        assert (cfg.extra_norm_pix_loss, cfg.fp32_output_adapters) == (False, ())
    cfg = MultiMAEConfig(**TINY, extra_norm_pix_loss=True, fp32_output_adapters=["semseg", "norm_rgb"],
                         loss_weights={"norm_rgb": 0.5})
    assert cfg.out_modalities == ("rgb", "depth", "semseg", "norm_rgb")
    assert cfg.fp32_output_adapters == ("semseg", "norm_rgb")
    d = cfg.to_dict()
    assert d["extra_norm_pix_loss"] is True and d["fp32_output_adapters"] == ["semseg", "norm_rgb"]
    assert list(d)[:len(old_keys)] == list(old_keys)  # old keys first, in their order; new ones after
    assert MultiMAEConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert MultiMAEConfig.from_dict(dataclasses.asdict(cfg)) == cfg
    # the older spelling (norm_rgb listed as an output) builds the same model and still writes no new key
    older = MultiMAEConfig(**TINY, out_modalities=("rgb", "depth", "semseg", "norm_rgb"))
    assert "extra_norm_pix_loss" not in older.to_dict()
    torch.manual_seed(0)
    a = build_model(older)
    torch.manual_seed(0)
    b = build_model(dataclasses.replace(cfg, fp32_output_adapters=(), loss_weights=None))
    assert a.extra_norm_pix_loss and b.extra_norm_pix_loss
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    mae = MultiMAEConfig.mae(**TINY, extra_norm_pix_loss=True)
    assert mae.out_modalities == ("rgb", "norm_rgb") and MAE(mae).extra_norm_pix_loss
