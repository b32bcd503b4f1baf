"""MT-AdamW and unmixed sampling (Uni-Perceiver v2, Sec. 4.4) against the formula, written out element by element."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from polymae.pipeline.train.mt_adamw import MTAdamW
from polymae.pipeline.train.sampler import UnmixedSampler, sampling_probs

pytestmark = pytest.mark.unit

SHAPES = {"shared": [(4, 3), (3,)], "depth": [(2, 3)], "semseg": [(5,)]}
TASKS = {"depth": (0.7, 1.0), "semseg": (0.3, 0.5)}  # s_k, omega_k


def _reference(params, grads_per_step, tasks, lr, betas, eps, wd):
    """The update of the module docstring in float64 scalars: params/moments are dicts name -> list of arrays."""
    b1, b2 = betas
    m = {k: [np.zeros_like(p) for p in ps] for k, ps in params.items()}
    v = {k: [np.zeros_like(p) for p in ps] for k, ps in params.items()}
    for t, (task, grads) in enumerate(zip(tasks, grads_per_step), start=1):
        s, w = TASKS[task]
        trained = ["shared", task]
        norm = math.sqrt(sum(float((g ** 2).sum()) for k in trained for g in grads[k]))
        for k in trained:
            for i, p in enumerate(params[k]):
                g = w * grads[k][i] / norm
                p *= 1 - lr * wd
                m[k][i] = b1 * m[k][i] + (1 - b1) / s * g
                v[k][i] = b2 * v[k][i] + (1 - b2) / s * g * g
                p -= lr * (m[k][i] / (1 - b1 ** t)) / (np.sqrt(v[k][i] / (1 - b2 ** t)) + eps)
    return params, m, v


def test_three_steps_of_two_tasks_match_the_formula():
    rng = np.random.default_rng(0)
    init = {k: [rng.standard_normal(s) for s in shapes] for k, shapes in SHAPES.items()}
    tasks = ["depth", "semseg", "depth"]
    grads = [{k: [rng.standard_normal(s) for s in shapes] for k, shapes in SHAPES.items()} for _ in tasks]
    lr, betas, eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.05
    ref, m_ref, v_ref = _reference({k: [p.copy() for p in ps] for k, ps in init.items()}, grads, tasks, lr, betas,
                                   eps, wd)

    params = {k: [torch.nn.Parameter(torch.tensor(p)) for p in ps] for k, ps in init.items()}
    opt = MTAdamW([{"params": params["shared"]}, {"params": params["depth"], "task": "depth"},
                   {"params": params["semseg"], "task": "semseg"}], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for task, g in zip(tasks, grads):
        for k, ps in params.items():
            for p, gk in zip(ps, g[k]):
                p.grad = torch.tensor(gk) if k in ("shared", task) else None  # the other decoder took no part
        opt.set_task(task, *TASKS[task])
        opt.step()
    for k, ps in params.items():
        for i, p in enumerate(ps):
            np.testing.assert_allclose(p.detach().numpy(), ref[k][i], rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), m_ref[k][i], rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(opt.state[p]["exp_avg_sq"].numpy(), v_ref[k][i], rtol=1e-6, atol=1e-15)
    assert [g["mt_step"] for g in opt.param_groups] == [3, 3, 3]


@pytest.mark.parametrize("other_grad", ["none", "zeros"])
def test_a_step_of_one_task_leaves_the_other_decoder_bit_identical(other_grad):
    """Zero gradients (ZeRO's flat partitions) or None: task B's parameters and moments do not change."""
    torch.manual_seed(0)
    shared, a, b = (torch.nn.Parameter(torch.randn(6)) for _ in range(3))
    opt = MTAdamW([{"params": [shared]}, {"params": [a], "task": "A"}, {"params": [b], "task": "B"}],
                  lr=0.1, weight_decay=0.1)
    for p in (shared, b):
        p.grad = torch.randn(6)
    opt.set_task("B", 0.5)
    opt.step()  # B now has moments
    before = [b.detach().clone(), opt.state[b]["exp_avg"].clone(), opt.state[b]["exp_avg_sq"].clone()]
    shared_before = shared.detach().clone()
    shared.grad, a.grad = torch.randn(6), torch.randn(6)
    b.grad = None if other_grad == "none" else torch.zeros(6)
    opt.set_task("A", 0.5)
    opt.step()
    after = [b.detach(), opt.state[b]["exp_avg"], opt.state[b]["exp_avg_sq"]]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert not torch.equal(shared.detach(), shared_before) and "exp_avg" in opt.state[a]


def test_a_group_shared_by_several_tasks_trains_with_each_of_them_only():
    """A decoder shared by tasks A and B (``task=("A", "B")``, e.g. the Masked AutoDecoder) moves on A's and B's
    steps, enters their gradient norm, and stays bit-identical (moments too) on a step of task C."""
    torch.manual_seed(0)
    shared_dec, c = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(6))
    opt = MTAdamW([{"params": [shared_dec], "task": ("A", "B")}, {"params": [c], "task": "C"}], lr=0.1)
    for task in ("A", "B"):
        before = shared_dec.detach().clone()
        shared_dec.grad, c.grad = torch.tensor([3.0, 4.0, 0, 0, 0, 0]), torch.zeros(6)
        opt.set_task(task, 0.5)
        opt.step()
        assert not torch.equal(shared_dec.detach(), before) and opt.last_norm == pytest.approx(5.0)
    before = [shared_dec.detach().clone(), opt.state[shared_dec]["exp_avg"].clone()]
    shared_dec.grad, c.grad = torch.randn(6), torch.randn(6)
    c_norm = float(c.grad.norm())  # before the step: the fused path scales gradients in place
    opt.set_task("C", 0.5)
    opt.step()
    assert torch.equal(shared_dec.detach(), before[0]) and torch.equal(opt.state[shared_dec]["exp_avg"], before[1])
    assert opt.last_norm == pytest.approx(c_norm)
    opt.param_groups[0]["task"] = ["A", "B"]  # as a list (a resumed optimizer state)
    assert not opt.trains(opt.param_groups[0])
    opt.set_task("B", 0.5)
    assert opt.trains(opt.param_groups[0]) and not opt.trains(opt.param_groups[1])


def test_the_gradient_is_normalised_and_weighted():
    """One step from zero moments moves a parameter by lr * sign(g) / sqrt(s_k) whatever the gradient's scale
    (m_hat = g / s_k, v_hat = g^2 / s_k), and the first moment holds (1 - beta1) / s_k * omega_k * g / ||g||."""
    for scale in (1e-3, 1e3):
        p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
        p.grad = torch.tensor([3.0, -4.0, 0.0, 0.0], dtype=torch.float64) * scale
        opt = MTAdamW([p], lr=0.1, weight_decay=0.0, eps=1e-200)
        opt.set_task("x", 0.25, 2.0)
        opt.step()
        np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), [0.1 / 0.25 * 2 * 0.6, -0.1 / 0.25 * 2 * 0.8, 0, 0])
        np.testing.assert_allclose(p.detach().numpy(), [-0.2, 0.2, 0, 0])  # lr / sqrt(0.25)
        assert opt.last_norm == pytest.approx(5.0 * scale)


def test_misuse_raises():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    opt = MTAdamW([p])
    with pytest.raises(RuntimeError, match="set_task"):
        opt.step()
    with pytest.raises(ValueError, match="probability"):
        opt.set_task("x", 0.0)
    with pytest.raises(ValueError, match="betas"):
        MTAdamW([p], betas=(0.9, 1.0))


def test_sampler_frequencies_are_within_three_sigma():
    probs = sampling_probs([None, None, None], sizes=[5000, 3000, 2000])
    assert probs == pytest.approx([0.5, 0.3, 0.2])
    sampler = UnmixedSampler(["depth", "semseg", "cls"], probs, seed=7)
    n = 10_000
    counts = sampler.counts(0, n)
    for task, s in zip(sampler.tasks, probs):
        sigma = math.sqrt(n * s * (1 - s))
        assert abs(counts[task] - n * s) < 3 * sigma, (task, counts)
    assert [sampler.draw(t) for t in range(50)] != [UnmixedSampler(sampler.tasks, probs, seed=8).draw(t)
                                                    for t in range(50)]
    assert UnmixedSampler(["a", "b"], [1.0, 0.0]).counts(0, 1000) == {"a": 1000, "b": 0}


def test_every_process_draws_the_same_tasks():
    """Two fresh interpreters (as two ranks) draw the same 200 tasks as this one, without communicating."""
    code = ("from polymae.pipeline.train.sampler import UnmixedSampler as U; "
            "print(''.join(U(['a','b','c'], [0.2, 0.5, 0.3], seed=3).draw(t) for t in range(200)))")
    here = "".join(UnmixedSampler(["a", "b", "c"], [0.2, 0.5, 0.3], seed=3).draw(t) for t in range(200))
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert outs == {here} and len(set(here)) == 3


def test_sampling_probs_errors():
    assert sampling_probs([2, 1, 1]) == [0.5, 0.25, 0.25]
    for bad in ([1, None], [-1, 2], [0, 0], []):
        with pytest.raises(ValueError):
            sampling_probs(bad, sizes=[1] * len(bad))
    with pytest.raises(ValueError, match="size"):
        sampling_probs([None, None])


def test_the_fused_kernel_path_equals_the_foreach_path_and_the_formula():
    """float32 parameters: torch's fused AdamW kernel (first moment stored times m_scale) and the
    foreach path give the same parameters and moments over 3 steps of 2 tasks, and both match the float64
    element-wise reference to float32 precision."""
    rng = np.random.default_rng(1)
    init = {k: [rng.standard_normal(s) for s in shapes] for k, shapes in SHAPES.items()}
    tasks = ["semseg", "depth", "semseg"]
    grads = [{k: [rng.standard_normal(s) for s in shapes] for k, shapes in SHAPES.items()} for _ in tasks]
    lr, betas, eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.05
    ref, m_ref, _ = _reference({k: [p.copy() for p in ps] for k, ps in init.items()}, grads, tasks, lr, betas, eps, wd)
    runs = []
    for fused in (True, False):
        params = {k: [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in ps] for k, ps in init.items()}
        opt = MTAdamW([{"params": params["shared"]}, {"params": params["depth"], "task": "depth"},
                       {"params": params["semseg"], "task": "semseg"}], lr=lr, betas=betas, eps=eps,
                      weight_decay=wd, fused=fused)
        assert opt._use_fused(params["shared"]) == fused
        for task, g in zip(tasks, grads):
            for k, ps in params.items():
                for p, gk in zip(ps, g[k]):
                    p.grad = torch.tensor(gk, dtype=torch.float32) if k in ("shared", task) else None
            opt.set_task(task, *TASKS[task])
            opt.step()
        runs.append((params, opt))
    (pf, of), (pe, oe) = runs
    group_of = {"shared": 0, "depth": 1, "semseg": 2}
    # the fused path stores the first moment times the group's m_scale (one kernel pass per step, no rescaling)
    assert of.param_groups[0]["m_scale"] != 1.0 and oe.param_groups[0]["m_scale"] == 1.0
    for k in SHAPES:
        for i, (a, b) in enumerate(zip(pf[k], pe[k])):
            m_fused = of.state[a]["exp_avg"].numpy() / of.param_groups[group_of[k]]["m_scale"]
            np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(m_fused, oe.state[b]["exp_avg"].numpy(), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(a.detach().numpy(), ref[k][i], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(m_fused, m_ref[k][i], rtol=1e-4, atol=1e-8)


def test_fused_path_per_sub_group_steps_and_idle_parameters_keep_the_true_moments():
    """ZeRO-3 calls step() once per sub-group of a param group (its ``params`` swapped in turn): the fused path's
    first-moment scale moves once per optimizer step, so two sub-group calls equal one call on both tensors; a
    parameter of the group without a gradient keeps its true moment (exp_avg / m_scale) and its value."""
    torch.manual_seed(0)
    a0, b0, c0 = (torch.randn(5) for _ in range(3))
    grads = [(torch.randn(5), torch.randn(5), torch.randn(5)) for _ in range(3)]

    def run(split: bool):
        a, b, c = (torch.nn.Parameter(x.clone()) for x in (a0, b0, c0))
        opt = MTAdamW([{"params": [a, b, c]}], lr=0.01, weight_decay=0.05, fused=True)
        for i, (ga, gb, gc) in enumerate(grads):
            a.grad, b.grad = ga.clone(), gb.clone()
            c.grad = gc.clone() if i == 0 else None  # c trains at the first step only
            opt.set_task("x", 0.3, 1.0)
            opt.last_norm = float(torch.cat([ga, gb] + ([gc] if i == 0 else [])).norm())
            if split:
                for sub in ([a], [b], [c]):
                    opt.param_groups[0]["params"] = sub
                    opt.step()
                opt.param_groups[0]["params"] = [a, b, c]
            else:
                opt.step()
        return (a, b, c), opt

    (pa, pb, pc), o1 = run(False)
    (qa, qb, qc), o2 = run(True)
    for x, y in ((pa, qa), (pb, qb), (pc, qc)):
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-7)
    scale = o1.param_groups[0]["m_scale"]
    assert scale == o2.param_groups[0]["m_scale"] and scale < 1.0
    # c's true moment after step 1 = (1 - beta1) / s * g_c / ||g||, then untouched by steps 2-3
    g0 = torch.cat(grads[0]).norm()
    expected = 0.1 / 0.3 * grads[0][2] / g0
    assert torch.allclose(o1.state[pc]["exp_avg"] / scale, expected, rtol=1e-5)
    assert torch.allclose(o2.state[qc]["exp_avg"] / scale, expected, rtol=1e-5)
