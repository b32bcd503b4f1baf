"""One MT-AdamW step against one fused AdamW step on the same parameters (issue 13's target: >= 0.9x the speed).

The parameters are those of a timm ViT (default ViT-S/16, 22 M) plus three task decoders (linear heads of
``--decoder-dim`` outputs), in the groups the multitask job builds: the encoder shared, one group per decoder.
Both optimizers get the same gradients (random, fixed). MT-AdamW's step includes its global gradient norm (one
extra pass over the gradients) and trains the encoder + one decoder, as an unmixed step does; AdamW is
``torch.optim.AdamW(fused=True)`` (fused kernels on CPU and CUDA) stepping the encoder + that decoder too (the
others' gradients are None, as in an unmixed single-process step). Two more rows: AdamW after
``clip_grad_norm_`` (the usual recipe, which pays the same norm pass) and MT-AdamW with the norm handed in (as
under DeepSpeed ZeRO 1-3, whose engine computes it anyway). ``--repeats`` interleaved rounds of ``--steps``
steps each; medians printed side by side with the ratios.

    .venv/bin/python benchmarks/mt_adamw_speed.py                       # CPU, ViT-S
    .venv/bin/python benchmarks/mt_adamw_speed.py --model vit_base_patch16_224 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGET = 0.9


def build(model_name: str, decoder_dim: int, device: str):
    """``(groups, params_by_task)``: the encoder and 3 decoders' parameters on ``device`` with random grads."""
    import timm
    import torch

    torch.manual_seed(0)
    enc = timm.create_model(model_name, pretrained=False, num_classes=0).to(device)
    decoders = {t: torch.nn.Linear(enc.num_features, decoder_dim).to(device) for t in ("depth", "semseg", "cls")}
    enc_params = list(enc.parameters())
    for p in enc_params + [p for d in decoders.values() for p in d.parameters()]:
        p.grad = torch.randn_like(p)
    groups = [{"params": enc_params}] + [{"params": list(d.parameters()), "task": t} for t, d in decoders.items()]
    return groups, {t: list(d.parameters()) for t, d in decoders.items()}, enc_params


def time_steps(step, steps: int, sync, restore) -> float:
    """Seconds per call of ``step`` over ``steps`` calls (after one warm-up call), each timed alone after
    ``restore()`` put the original gradients back (MT-AdamW's fused path scales them in place, as an AMP unscale
    does; without the restore later steps would see ever smaller gradients, down to denormals)."""
    restore()
    step()
    total = 0.0
    for _ in range(steps):
        restore()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        total += time.perf_counter() - t0
    return total / steps


def main() -> None:
    """Build both optimizers, time interleaved rounds, print the table."""
    import torch

    from polymae.pipeline.train.mt_adamw import MTAdamW

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_small_patch16_224", help="timm encoder")
    p.add_argument("--decoder-dim", type=int, default=1000, help="outputs of each task decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    groups, decoders, enc = build(args.model, args.decoder_dim, args.device)
    mt = MTAdamW(groups, lr=1e-4, weight_decay=0.05)
    trained = enc + decoders["depth"]
    fused = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05, fused=True)
    for t in ("semseg", "cls"):
        for q in decoders[t]:
            q.grad = None  # an unmixed step: only the drawn task's decoder has gradients

    def mt_step():
        mt.set_task("depth", 0.5, 1.0)
        mt.step()

    saved = [q.grad.clone() for q in trained]

    def restore():
        torch._foreach_copy_([q.grad for q in trained], saved)

    norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm([q.grad for q in trained]))))
    mt_given = MTAdamW(groups, lr=1e-4, weight_decay=0.05, grad_norm=lambda: norm)

    def mt_given_step():  # the norm handed in, as DeepSpeed ZeRO 1-3 do (the engine computes it anyway)
        mt_given.set_task("depth", 0.5, 1.0)
        mt_given.step()

    clipped = torch.optim.AdamW(trained, lr=1e-4, weight_decay=0.05, fused=True)

    def clip_step():  # the usual recipe: clip at the global norm (one norm pass; the scale is a no-op at 1e9)
        torch.nn.utils.clip_grad_norm_(trained, 1e9, foreach=True)
        clipped.step()

    steps = {"AdamW fused": fused.step, "AdamW + clip": clip_step, "MT-AdamW": mt_step,
             "MT-AdamW, norm given": mt_given_step}
    rows = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, fn in steps.items():
            rows[k].append(time_steps(fn, args.steps, sync, restore))
    n = sum(q.numel() for q in trained)
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"{args.model} + 3 decoders of {args.decoder_dim}: {n / 1e6:.1f} M parameters stepped; {args.device}; "
          f"torch {torch.__version__}; median of {args.repeats} rounds x {args.steps} steps")
    print(f"{'optimizer':>22} | {'ms/step':>8} | {'speed vs fused AdamW':>20} | {'vs AdamW + clip':>15}")
    for k, sec in med.items():
        ratio = med["AdamW fused"] / sec
        flag = f"  (target >= {TARGET}) {'OK' if ratio >= TARGET else 'SLOW'}" if k.startswith("MT") else ""
        print(f"{k:>22} | {sec * 1e3:8.1f} | {ratio:20.3f} | {med['AdamW + clip'] / sec:15.3f}{flag}")

if __name__ == "__main__":
    main()
