"""Masked AutoDecoder: parallel vs autoregressive decoding time on the same decoder (issue 14's target: >= 50x
for detection sequences).

The decoder is ``models.mad.MadDecoder`` at the paper's size (6 layers, 256-d, 8 heads) with random weights,
reading ``--tokens`` image tokens of width ``--encoder-dim`` (a ViT-B/16 at 224 px: 196 x 768). For each task
and batch size it times :func:`decode_parallel` (one pass; detection: 501 tokens = prompt + 100 boxes x 5) or
:func:`decode_iterative` (captions: 4 passes), against :func:`decode_autoregressive` (causal self-attention, one
token per pass, no key/value cache; ``--ar-repeats`` runs without warm-up: its first pass warms it), medians of
``--repeats`` runs, and prints the ratio (rows print as they finish).

    .venv/bin/python benchmarks/mad_decoding.py                      # CPU
    .venv/bin/python benchmarks/mad_decoding.py --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGET_DET = 50.0


def timed(fn, repeats: int, sync, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (after one warm-up call when ``warmup``)."""
    if warmup:
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Time both decoding modes for detection and captions at each batch size; print the table."""
    import torch

    from polymae.models import mad as M

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tasks", nargs="+", default=["det", "cap"], choices=["det", "cap"])
    p.add_argument("--tokens", type=int, default=196, help="image tokens")
    p.add_argument("--encoder-dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3, help="runs per parallel measurement")
    p.add_argument("--ar-repeats", type=int, default=1, help="runs per autoregressive measurement")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vocab = M.MadVocab(num_classes=80, caption_vocab=8000)
    dec = M.MadDecoder(vocab, encoder_dim=args.encoder_dim).to(dev).eval()
    print(f"MadDecoder 6 x 256-d, 8 heads, {sum(q.numel() for q in dec.parameters()) / 1e6:.1f} M parameters; "
          f"{args.tokens} image tokens x {args.encoder_dim}; {dev}; torch {torch.__version__}")
    print(f"{'task':>10} | {'batch':>5} | {'tokens':>6} | {'parallel ms':>11} | {'autoregr. ms':>12} | {'speed-up':>8}")
    for task, parallel in (("det", M.decode_parallel), ("cap", M.decode_iterative)):
        if task not in args.tasks:
            continue
        for b in args.batch:
            mem = torch.randn(b, args.tokens, args.encoder_dim, device=dev)
            prompt = torch.full((b, 1), vocab.prompt(task), device=dev)
            tp = timed(lambda: parallel(dec, mem, task, prompt), args.repeats, sync)
            ta = timed(lambda: M.decode_autoregressive(dec, mem, task, prompt), args.ar_repeats, sync, warmup=False)
            note = f"  (target >= {TARGET_DET:.0f}x: {'OK' if ta / tp >= TARGET_DET else 'SLOW'})" if task == "det" else ""
            label = "detection" if task == "det" else "caption"
            print(f"{label:>10} | {b:5d} | {M.SEQ_LEN[task]:6d} | {tp * 1e3:11.1f} | {ta * 1e3:12.1f} | "
                  f"{ta / tp:7.1f}x{note}", flush=True)


if __name__ == "__main__":
    main()
