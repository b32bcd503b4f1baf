"""MT-AdamW: AdamW for unmixed multi-task training (Uni-Perceiver v2, Li et al., arXiv 2211.09808, Sec. 4.4; the
CVPR 2023 version calls it "task-balanced gradient normalisation").

**The update.** At optimizer step ``t`` (counted over all tasks) one task ``k`` is drawn for every rank
(:mod:`polymae.pipeline.train.sampler`), with sampling probability ``s_k`` and loss weight ``omega_k``. Its
gradient is normalised over every parameter the step trains (the shared encoder and task ``k``'s decoder), one
norm across all ranks and ZeRO partitions::

    g_t = omega_k * grad L_k / ||grad L_k||

and enters the moments divided by ``s_k``, so that in expectation over the draw each task contributes
``omega_k * grad L_k / ||grad L_k||`` to every step, as if all tasks were mixed in one batch.

**Convention.** The paper writes the moment updates with beta as the weight of the *new* gradient,
``m_t = (1 - beta1) m_{t-1} + (beta1 / s_k) g_t`` and ``v_t = (1 - beta2) v_{t-1} + (beta2 / s_k) g_t^2``. This
module uses PyTorch's convention, where ``beta1 = 0.9`` weights the *old* moment (paper beta = 1 - torch beta)::

    m_t = beta1 * m_{t-1} + ((1 - beta1) / s_k) * g_t
    v_t = beta2 * v_{t-1} + ((1 - beta2) / s_k) * g_t^2
    theta_t = theta_{t-1} * (1 - lr * lambda) - lr * (m_t / (1 - beta1^t)) / (sqrt(v_t / (1 - beta2^t)) + eps)

Choices the paper leaves open, made here:

* **Bias correction with the global step count** ``t`` (every step of every task), kept per parameter group as
  ``mt_step``; a decoder updated only when its task is drawn is corrected with ``t``, not with its own count.
* **Decoupled weight decay** as AdamW (Loshchilov & Hutter), applied only to the parameters the step trains.
* **Parameters of the other tasks get no update at all**: not moved, not decayed, moments unchanged (as
  ``torch.optim`` treats parameters whose ``.grad`` is None). A parameter group belongs to one task (``task``
  key, e.g. ``"depth"``), to several (a list or tuple of names: a decoder shared by those tasks, such as the Masked
  AutoDecoder of det / seg / kpt / cap, updated whenever any of them is drawn) or to all (``task=None``: the shared
  encoder); under ZeRO a group's flat partition stays in that group, so the rule holds there too, where the other
  tasks' slices carry zero gradients.
* **(1 - beta) / s_k above 1** (``s_k < 1 - beta1``, e.g. a task drawn less than 10 % of the time) is *not*
  clipped: it is the weight that makes the moments unbiased over the draw; the new gradient then outweighs the
  decayed old moment, as the estimator requires.
* **eps** is added to the bias-corrected ``sqrt(v)`` as in ``torch.optim.AdamW``; a zero gradient norm (a task
  whose loss is constant) gives ``g_t = 0`` rather than a division by zero (``norm_eps``).

**Under DeepSpeed** (client optimizer at ZeRO 0-3): pass ``grad_norm`` returning the engine's global gradient
norm (ZeRO 1-3 compute it across partitions before calling this optimizer; ZeRO-3 calls :meth:`step` once per
parameter sub-group, so the norm must come from outside). Without it (one process, or ZeRO-0 where every rank
holds the whole averaged gradient) the norm is computed here over the trained groups' gradients. Gradient
clipping must be off: clipped gradients divided by the pre-clip norm would no longer have norm ``omega_k``.
Under ZeRO-3 every task's decoder must take part in every backward (e.g. its output on one sample with weight
0): DeepSpeed's ZeRO-3 keeps the last gradient partition of a parameter that received no gradient and counts it
in the global norm (measured with DeepSpeed 0.19.8: the norm of a step after a task switch was 0.652 instead of
0.614; with the zero-weighted term ZeRO 0-3 on 2 ranks equal one process to 2.2e-7 relative over 10 steps).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

NormFn = Callable[[], "float | torch.Tensor | None"]


def _global_norm(grads: list[torch.Tensor]) -> float | torch.Tensor:
    """L2 norm over every tensor of ``grads`` (0.0 for none). Contiguous fp32 CPU tensors go through BLAS ``dot``
    (2x faster than ``torch._foreach_norm`` on CPU: 2.4 vs 4.7 ms for ViT-S's 22 M gradients on 2 cores), summed in
    float64; elsewhere ``torch._foreach_norm`` (one multi-tensor kernel on CUDA)."""
    if not grads:
        return 0.0
    if all(g.device.type == "cpu" and g.dtype == torch.float32 and g.is_contiguous() for g in grads):
        squares = torch.stack([torch.dot(g.view(-1), g.view(-1)) for g in grads])
        return squares.double().sum().sqrt()
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


class MTAdamW(torch.optim.Optimizer):
    """MT-AdamW (module docstring): call :meth:`set_task` before each :meth:`step`.

    Args:
        params: parameters or parameter groups; a group's ``task`` names the task whose decoder it holds, or a
            list/tuple of the tasks sharing it (None or absent: shared by all tasks). ``lr``, ``weight_decay`` may differ per group (layer-wise decay).
        lr: learning rate (per group, as in AdamW).
        betas: ``(beta1, beta2)`` in PyTorch's convention (weights of the old moments).
        eps: added to ``sqrt(v_hat)``.
        weight_decay: decoupled weight decay ``lambda``.
        grad_norm: returns the global L2 norm of the step's gradient (DeepSpeed ZeRO 1-3), or None to compute it.
        norm_eps: floor of the gradient norm in the normalisation.
        fused: run the update through torch's fused AdamW kernel (:meth:`_update_group_fused`; None = where it
            exists and the group is fp32/fp16/bf16 on one device) or through ``torch._foreach_*`` ops. The fused
            path scales the gradients in place (as an AMP unscale does); both give the same update.
    Raises:
        ValueError: a learning rate, beta, eps or weight decay out of range (constructor).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.05, grad_norm: NormFn | None = None,
                 norm_eps: float = 1e-12, fused: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0: {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1): {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, task=None, mt_step=0,
                        m_scale=1.0)
        super().__init__(params, defaults)
        self.grad_norm, self.norm_eps, self.fused = grad_norm, norm_eps, fused
        self.active: tuple[str, float, float] | None = None
        self.last_norm: float | None = None

    def set_task(self, task: str, prob: float, weight: float = 1.0) -> None:
        """The task ``k`` drawn for the coming step, its sampling probability ``s_k`` (0 < s_k <= 1) and loss
        weight ``omega_k``; advances every group's global step count ``mt_step``. Call once per optimizer step,
        before the step (under ZeRO-3, :meth:`step` then runs once per sub-group).

        Raises:
            ValueError: ``prob`` not in (0, 1] or ``weight`` negative.
        """
        if not 0.0 < prob <= 1.0:
            raise ValueError(f"sampling probability of task {task!r} must be in (0, 1], got {prob}")
        if weight < 0:
            raise ValueError(f"loss weight of task {task!r} must be >= 0, got {weight}")
        self.active = (task, float(prob), float(weight))
        self.last_norm = None
        for group in self.param_groups:
            group["mt_step"] += 1

    def trains(self, group: dict) -> bool:
        """Whether ``group`` is trained by the active task's step (shared groups always are; a group of several
        tasks when the active task is one of them)."""
        task = group.get("task")
        if task is None:
            return True
        if self.active is None:
            return False
        return self.active[0] in task if isinstance(task, (list, tuple)) else task == self.active[0]

    def _norm(self) -> float:
        """The step's global gradient norm: ``grad_norm()`` when given (cached for the step), else the L2 norm of
        the trained groups' gradients in this process."""
        if self.last_norm is not None:
            return self.last_norm
        norm = self.grad_norm() if self.grad_norm is not None else None
        if norm is None:
            grads = [p.grad for g in self.param_groups if self.trains(g) for p in g["params"] if p.grad is not None]
            norm = _global_norm(grads)
        self.last_norm = float(norm)
        return self.last_norm

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """One MT-AdamW update of the groups the active task trains (module docstring); the others are left
        bit-identical. Returns ``closure()`` when given.

        Raises:
            RuntimeError: :meth:`set_task` was not called; or the gradient norm is not finite.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.active is None:
            raise RuntimeError("MTAdamW.step() without set_task(): which task's step is this?")
        _, prob, weight = self.active
        norm = self._norm()
        if not math.isfinite(norm):
            raise RuntimeError(f"gradient norm is {norm} at step {self.param_groups[0]['mt_step']}")
        scale = weight / max(norm, self.norm_eps)
        for group in self.param_groups:
            if self.trains(group):
                self._update_group(group, scale, prob)
        return loss

    def _use_fused(self, params: list[torch.Tensor]) -> bool:
        """Whether ``params`` go through the fused kernel (``fused`` setting; auto: kernel present, one device,
        fp32/fp16/bf16)."""
        ok = hasattr(torch, "_fused_adamw_") and len({p.device for p in params}) == 1 and all(
            p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)
        return ok if self.fused is None else (self.fused and ok)

    def _update_group(self, group: dict, scale: float, prob: float) -> None:
        """The update of one group with gradient scale ``scale`` = ``omega_k / ||grad||``: the fused kernel
        (:meth:`_update_group_fused`) or multi-tensor ``torch._foreach_*`` ops with ``scale`` folded into the
        moments' weights (the gradients are read, never written)."""
        if group["params"] and self._use_fused(group["params"]):
            self._advance_m_scale(group, prob)
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        t, lr = group["mt_step"], group["lr"]
        m, v = [], []
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            m.append(state["exp_avg"])
            v.append(state["exp_avg_sq"])
        if self._use_fused(params):
            self._update_group_fused(group, params, m, v, scale, prob)
            return
        if group.get("m_scale", 1.0) != 1.0:  # the group went through the fused path before: true moments first
            held = [self.state[p]["exp_avg"] for p in group["params"] if "exp_avg" in self.state.get(p, {})]
            torch._foreach_mul_(held, 1.0 / group["m_scale"])
            group["m_scale"] = 1.0
        grads = [p.grad for p in params]  # the normalisation ``scale`` is folded into the moments' weights
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1.0 - lr * group["weight_decay"])
        torch._foreach_mul_(m, beta1)
        torch._foreach_add_(m, grads, alpha=(1.0 - beta1) / prob * scale)
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, grads, grads, value=(1.0 - beta2) / prob * scale * scale)
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(bc2))
        torch._foreach_add_(denom, group["eps"])
        torch._foreach_addcdiv_(params, m, denom, value=-lr / bc1)

    def _advance_m_scale(self, group: dict, prob: float) -> None:
        """Move the group's first-moment scale ``m_scale`` (:meth:`_update_group_fused`) once per optimizer step
        (DeepSpeed ZeRO-3 calls :meth:`step` once per sub-group), and rescale the stored moment of each of its
        parameters without a gradient this step, once, so that its true moment ``exp_avg / m_scale`` is unchanged."""
        t = group["mt_step"]
        if group.get("m_scale_step") != t:
            a = float(group.get("m_scale", 1.0))
            beta1 = group["betas"][0]
            group["m_scale_prev"], group["m_scale_step"] = a, t
            group["m_scale"] = 1.0 / (beta1 / a + (1.0 - beta1) / math.sqrt(prob))
        ratio = group["m_scale"] / group["m_scale_prev"]
        for p in group["params"]:
            state = self.state.get(p, {})
            if p.grad is None and "exp_avg" in state and state.get("m_scale_step") != t:
                state["exp_avg"].mul_(ratio)
                state["m_scale_step"] = t

    def _update_group_fused(self, group: dict, params: list, m: list, v: list, scale: float, prob: float) -> None:
        """The same update in ONE call of ``torch._fused_adamw_`` (one pass over parameters, gradients and moments).

        The kernel computes AdamW with its own ``beta1'``, gradient ``g' = g / grad_scale``, ``lr'``, ``wd'``,
        ``eps'`` and step count. Take ``g' = scale * g / sqrt(s_k)``: with ``beta2' = beta2``, ``v`` gets exactly
        ``(1 - beta2) / s_k * (scale g)^2``. The first moment is stored as ``M = a * m`` with a per-group scalar
        ``a`` (``group["m_scale"]``, 1 until a task with ``s_k < 1`` is drawn): the kernel's
        ``M' = beta1' M + (1 - beta1') g'`` equals ``a' * (beta1 m + (1 - beta1) / s_k * scale g)`` for
        ``a' = 1 / (beta1 / a + (1 - beta1) / sqrt(s_k))`` and ``beta1' = beta1 a' / a``, so ``a`` stays between
        ``min sqrt(s_k)`` and 1. The kernel's step count is fixed at 1 and the true bias corrections (global step
        ``t``), ``1 / a`` and the kernel's own corrections are folded into ``lr'`` and ``eps'``; ``wd' = lr wd /
        lr'`` keeps the decoupled decay ``lr * wd``. The true first moment is ``exp_avg / m_scale`` (the foreach
        path restores it first, should a group change path)."""
        beta1, beta2 = group["betas"]
        root = math.sqrt(prob)
        t = group["mt_step"]
        a, a_new = group["m_scale_prev"], group["m_scale"]
        beta1_k = beta1 * a_new / a
        bc1, bc2 = 1.0 - beta1 ** t, 1.0 - beta2 ** t
        bc1_k, bc2_k = 1.0 - beta1_k, 1.0 - beta2  # the kernel's corrections at its step count 1
        ratio = math.sqrt(bc2 / bc2_k)
        lr_k = group["lr"] * ratio * bc1_k / (bc1 * a_new)
        steps = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["step"].fill_(1.0)
            steps.append(state["step"])
        grad_scale = torch.tensor(root / scale, dtype=torch.float32, device=params[0].device)
        wd_k = group["lr"] * group["weight_decay"] / lr_k if lr_k else 0.0
        torch._fused_adamw_(params, [p.grad for p in params], m, v, [], steps, lr=lr_k, beta1=beta1_k, beta2=beta2,
                            weight_decay=wd_k, eps=group["eps"] * ratio, amsgrad=False, maximize=False,
                            grad_scale=grad_scale, found_inf=None)


__all__ = ["MTAdamW"]
