"""No host synchronisation in a training step: a full forward + backward of MultiMAE (rgb + depth + semseg,
Dirichlet masking drawn from a ``torch.Generator``) and of MAE (random masking) calls none of the tensor
methods that copy a value to the host or branch on data (``item``, ``tolist``, ``__bool__``, ``__int__``,
``__float__``, ``__index__``, ``cpu``, ``numpy``, ``nonzero``, ``masked_select``, boolean-mask indexing).

On a GPU each of these waits for every queued kernel; on CPU they cost nothing, which is why they are
counted here rather than timed. The counters wrap the methods with ``monkeypatch`` only around the step.
"""

from __future__ import annotations

import collections
import functools

import pytest
import torch

from polymae.models.multimae import MAE, MultiMAE

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]

TINY = dict(img_size=32, patch_size=8, dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1,
            decoder_heads=2)
#: tensor methods that read data on the host
_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "__array__",
            "nonzero", "masked_select")
#: torch functions with a data-dependent output size
_FUNCTIONS = ("nonzero", "masked_select", "unique", "argwhere")


def _has_bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@pytest.fixture
def host_reads(monkeypatch):
    """``{name: calls}`` of the host-reading methods while the returned counter's ``watch`` flag is set."""
    calls: collections.Counter = collections.Counter()
    state = {"on": False}

    def wrap(name, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if state["on"]:
                calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    for name in _METHODS:
        monkeypatch.setattr(torch.Tensor, name, wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
    for name in _FUNCTIONS:
        monkeypatch.setattr(torch, name, wrap(f"torch.{name}", getattr(torch, name)))
    getitem = torch.Tensor.__getitem__

    def counted_getitem(self, index):
        if state["on"] and _has_bool_index(index):
            calls["Tensor.__getitem__[bool mask]"] += 1
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", counted_getitem)
    return calls, state


def _step(model, inputs, generator, host_reads, **kw):
    calls, state = host_reads
    state["on"] = True
    try:
        out = model(inputs, generator=generator, **kw)
        out.loss.backward()
    finally:
        state["on"] = False
    return out, dict(calls)


def test_counters_see_host_reads(host_reads):
    calls, state = host_reads
    x = torch.arange(4.0)
    state["on"] = True
    x.sum().item(), bool(x.any()), int(x[0]), x.tolist(), x[x > 1], float(x[1]), x.cpu()
    state["on"] = False
    assert all(calls[f"Tensor.{n}"] >= 1 for n in ("item", "__bool__", "__int__", "tolist", "__float__", "cpu"))
    assert calls["Tensor.__getitem__[bool mask]"] == 1


def test_multimae_step_reads_nothing_on_the_host(host_reads):
    torch.manual_seed(0)
    model = MultiMAE(**TINY, semseg_num_classes=5, extra_norm_pix_loss=True, drop_path_rate=0.1)
    g = torch.Generator().manual_seed(0)
    inputs = {"rgb": torch.randn(4, 3, 32, 32, generator=g), "depth": torch.rand(4, 1, 32, 32, generator=g) + 0.5,
              "semseg": torch.randint(0, 6, (4, 8, 8), generator=g)}
    inputs["semseg"][inputs["semseg"] == 5] = 255  # some ignored pixels
    for uniform in (False, True):
        model.zero_grad()
        out, calls = _step(model, inputs, torch.Generator().manual_seed(1), host_reads, num_visible=20,
                           alphas={"rgb": 0.5, "depth": 1.0, "semseg": 2.0}, sample_tasks_uniform=uniform)
        assert calls == {}, calls
        assert set(out.losses) == {"rgb", "depth", "semseg", "norm_rgb"}
        assert model.global_tokens.grad is not None


def test_mae_step_reads_nothing_on_the_host(host_reads):
    torch.manual_seed(0)
    model = MAE(**TINY)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out, calls = _step(model, {"rgb": x}, torch.Generator().manual_seed(1), host_reads)
    assert calls == {}, calls
    assert bool(((~out.masks["rgb"]).sum(1) == 4).all())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_with_a_cpu_generator_never_synchronises():
    """On a GPU, CUDA's own sync detector (``torch.cuda.set_sync_debug_mode("error")``) sees no
    synchronising call in a bf16-autocast step whose masks come from a CPU generator."""
    torch.manual_seed(0)
    model = MultiMAE(**TINY, semseg_num_classes=5, extra_norm_pix_loss=True, fp32_output_adapters=("semseg",)).cuda()
    g = torch.Generator().manual_seed(0)
    inputs = {"rgb": torch.randn(4, 3, 32, 32, generator=g), "depth": torch.rand(4, 1, 32, 32, generator=g) + 0.5,
              "semseg": torch.randint(0, 5, (4, 8, 8), generator=g)}
    inputs = {k: v.cuda() for k, v in inputs.items()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(inputs, num_visible=20, sample_tasks_uniform=True, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        return out

    step()  # lazy initialisation (cuBLAS handles, pinned-memory pool) outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(m.device.type == "cuda" for m in out.masks.values())
    vis = sum((~m).sum(1) for m in out.masks.values())
    assert bool((vis == 20).all())
    assert all(v.dtype == torch.float32 for v in out.losses.values())
