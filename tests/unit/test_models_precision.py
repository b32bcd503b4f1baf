"""Mixed precision: ``fp32_output_adapters`` decode chosen modalities in float32 under autocast, and every
loss is computed in float32 whatever the autocast dtype (CPU bf16 autocast stands in for CUDA's)."""

import pytest
import torch

from polymae.models.multimae import MAE, MultiMAE

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

TINY = dict(img_size=32, patch_size=8, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
            decoder_heads=2, semseg_num_classes=5)


def _batch(b=2):
    g = torch.Generator().manual_seed(0)
    return {"rgb": torch.randn(b, 3, 32, 32, generator=g), "depth": torch.rand(b, 1, 32, 32, generator=g) + 0.5,
            "semseg": torch.randint(0, 5, (b, 8, 8), generator=g)}


@pytest.mark.parametrize("fp32", [(), ("semseg",), ("semseg", "norm_rgb")])
def test_listed_output_adapters_run_in_fp32_under_autocast(fp32):
    torch.manual_seed(0)
    model = MultiMAE(**TINY, extra_norm_pix_loss=True, fp32_output_adapters=fp32)
    assert model.fp32_output_adapters == frozenset(fp32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(), num_visible=12, generator=torch.Generator().manual_seed(0))
    for m, pred in out.preds.items():
        assert pred.dtype == (torch.float32 if m in fp32 else torch.bfloat16), m
    assert set(out.losses) == {"rgb", "depth", "semseg", "norm_rgb"}
    assert all(v.dtype == torch.float32 for v in out.losses.values()) and out.loss.dtype == torch.float32
    out.loss.backward()
    assert model.output_adapters["semseg"].out_proj.weight.grad.dtype == torch.float32


def test_fp32_adapter_sees_fp32_inputs_and_computes_as_in_plain_fp32():
    torch.manual_seed(0)
    model = MultiMAE(**TINY, fp32_output_adapters=("semseg",)).eval()
    seen = {}
    model.output_adapters["semseg"].register_forward_pre_hook(lambda mod, args: seen.setdefault("semseg", args))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch(), num_visible=12, generator=torch.Generator().manual_seed(0))
    enc, layout = seen["semseg"]
    assert enc.dtype == torch.float32 and out.preds["depth"].dtype == torch.bfloat16
    with torch.no_grad():  # no autocast at all: the same numbers
        expect = model.output_adapters["semseg"](enc, layout)
    torch.testing.assert_close(out.preds["semseg"], expect, rtol=0, atol=0)
    assert out.losses["semseg"].dtype == torch.float32


def test_losses_are_fp32_for_mae_under_autocast_and_model_in_bf16():
    torch.manual_seed(0)
    mae = MAE(img_size=32, patch_size=8, dim=32, depth=1, num_heads=2, decoder_dim=32, decoder_depth=1,
              decoder_heads=2, fp32_output_adapters=("rgb",))
    x = _batch()["rgb"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mae({"rgb": x}, generator=torch.Generator().manual_seed(0))
    assert out.preds["rgb"].dtype == torch.float32 and out.losses["rgb"].dtype == torch.float32
    # a model converted to bf16 (no autocast): the fp32 adapter runs in its weights' dtype, losses in fp32
    mae = mae.to(torch.bfloat16)
    out = mae({"rgb": x.bfloat16()}, generator=torch.Generator().manual_seed(0))
    assert out.preds["rgb"].dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_fp32_output_adapters_must_name_outputs():
    with pytest.raises(ValueError, match="fp32_output_adapters"):
        MultiMAE(**TINY, fp32_output_adapters=("normals",))
    with pytest.raises(ValueError, match="fp32_output_adapters"):
        MultiMAE(**TINY, fp32_output_adapters=("norm_rgb",))  # no extra_norm_pix_loss
    assert MultiMAE(**TINY, extra_norm_pix_loss=True, fp32_output_adapters=["norm_rgb"]).config \
        .fp32_output_adapters == ("norm_rgb",)
