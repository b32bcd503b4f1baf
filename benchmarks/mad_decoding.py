"""Masked AutoDecoder: parallel vs autoregressive decoding time on the same decoder (issue 14's target: >= 50x
for detection sequences), at batch 1 and 8.

The decoder is ``models.mad.MadDecoder`` at the paper's size (6 layers, 256-d, 8 heads) with random weights,
reading ``--tokens`` image tokens of width ``--encoder-dim`` (a ViT-B/16 at 224 px: 196 x 768). For each task
and batch size it times

* ``parallel``: :func:`decode_parallel` (detection: one pass over 501 tokens = prompt + 100 boxes x 5) or
  :func:`decode_iterative` (captions: 4 passes over 21 tokens), median of ``--repeats`` runs after a warm-up;
* ``AR``: :func:`decode_autoregressive` (causal self-attention, one token per pass, **no key/value cache**: pass
  ``t`` re-reads the whole prefix), the full sequence measured (500 / 20 passes; ``--ar-repeats`` runs, no
  warm-up: its first pass warms it). ``--ar-sample K`` instead times single passes at K prefix lengths spread
  over the sequence and sums the linearly interpolated per-pass times over every length: the row is then
  labelled ``extrapolated`` (the no-cache pass cost grows with the prefix, so a sum, not a multiple of one pass);
* ``AR+KV``: the same greedy decoding with a key/value cache (:func:`decode_autoregressive_cached`, written here
  from ``nn.TransformerDecoderLayer``'s weights: each step feeds the previous position's chosen token and the new
  ``[MASK]`` position, cross-attention keys/values computed once). Its tokens are compared with
  ``decode_autoregressive``'s (``same tokens`` column: the fraction equal; random weights make near-ties, so a
  float-order difference can flip a late token).

The speed-up columns are AR / parallel and AR+KV / parallel; ``load`` is the 1-minute load average when the row
finished (the machine may be shared). Rows print as they finish.

    .venv/bin/python -u benchmarks/mad_decoding.py                      # CPU, batch 1 and 8 (~3-4 min idle 2 cores)
    .venv/bin/python -u benchmarks/mad_decoding.py --ar-sample 12       # extrapolated no-cache AR (faster)
    .venv/bin/python -u benchmarks/mad_decoding.py --device cuda
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

TARGET_DET = 50.0


def timed(fn, repeats: int, sync, warmup: bool = True) -> tuple[float, object]:
    """``(median seconds of repeats calls of fn, the last call's result)``, after one warm-up call when
    ``warmup``."""
    if warmup:
        fn()
        sync()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """``[B, L, D]`` -> ``[B, h, L, D / h]``."""
    b, n, d = x.shape
    return x.view(b, n, h, d // h).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """``[B, h, L, d]`` -> ``[B, L, h * d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


@torch.no_grad()
def decode_autoregressive_cached(decoder, memory: torch.Tensor, task: str, prompt: torch.Tensor) -> torch.Tensor:
    """Greedy autoregressive decoding as ``models.mad.decode_autoregressive`` (causal self-attention; position
    ``t`` is fed ``[MASK]`` and predicts its own token), with a key/value cache: the self-attention keys/values
    of decided positions are kept, and each step runs only two positions through the layers (the previous
    position with its chosen token, replacing the ``[MASK]`` it was fed, and the new ``[MASK]`` position); the
    cross-attention keys/values of ``memory`` ``[B, N, E]`` are computed once. Returns ``[B, L]`` tokens.

    Pre-norm ``nn.TransformerDecoderLayer`` (``norm_first=True``, dropout 0) is assumed, as ``MadDecoder`` builds.
    """
    from polymae.models.mad import SEQ_LEN

    layers, v = decoder.layers, decoder.vocab
    mem = decoder.memory_proj(memory)
    cross = []
    for layer in layers:
        a = layer.multihead_attn
        d = a.embed_dim
        k = F.linear(mem, a.in_proj_weight[d:2 * d], a.in_proj_bias[d:2 * d])
        val = F.linear(mem, a.in_proj_weight[2 * d:], a.in_proj_bias[2 * d:])
        cross.append((_heads(k, a.num_heads), _heads(val, a.num_heads)))
    cache: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(layers)
    b, p = prompt.shape
    tokens = prompt.clone()
    new = torch.cat([prompt, torch.full((b, 1), v.MASK, dtype=torch.long, device=prompt.device)], dim=1)
    start = 0  # position of new[:, 0]
    while tokens.shape[1] < SEQ_LEN[task]:
        x = decoder.embed(new) + decoder.pos[:, start:start + new.shape[1]]
        n_keep = new.shape[1] - 1  # positions whose token is decided: their keys/values stay in the cache
        for i, layer in enumerate(layers):
            sa = layer.self_attn
            d, h = sa.embed_dim, sa.num_heads
            q, k, val = F.linear(layer.norm1(x), sa.in_proj_weight, sa.in_proj_bias).split(d, dim=-1)
            q, k, val = _heads(q, h), _heads(k, h), _heads(val, h)
            if cache[i] is not None:
                k, val = torch.cat([cache[i][0], k], dim=2), torch.cat([cache[i][1], val], dim=2)
            total, m = k.shape[2], q.shape[2]
            causal = torch.ones(m, total, dtype=torch.bool, device=x.device).tril(total - m)
            x = x + sa.out_proj(_merge(F.scaled_dot_product_attention(q, k, val, attn_mask=causal)))
            keep = total - (new.shape[1] - n_keep)
            cache[i] = (k[:, :, :keep], val[:, :, :keep])
            ca = layer.multihead_attn
            qc = F.linear(layer.norm2(x), ca.in_proj_weight[:d], ca.in_proj_bias[:d])
            x = x + ca.out_proj(_merge(F.scaled_dot_product_attention(_heads(qc, h), *cross[i])))
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        nxt = decoder.logits(x[:, -1:], task)[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, nxt], dim=1)
        start += n_keep
        new = torch.cat([nxt, torch.full_like(nxt, v.MASK)], dim=1)
    return tokens


def ar_sampled(decoder, memory: torch.Tensor, task: str, prompt: torch.Tensor, samples: int, sync) -> float:
    """Extrapolated seconds of ``decode_autoregressive`` (no cache): one pass timed (median of 3) at ``samples``
    prefix lengths spread over the sequence, linearly interpolated and summed over every pass's length."""
    import numpy as np

    from polymae.models.mad import SEQ_LEN

    p, length = prompt.shape[1], SEQ_LEN[task]
    lengths = np.unique(np.linspace(p + 1, length, samples).round().astype(int))
    per = []
    for n in lengths:
        tok = torch.full((prompt.shape[0], int(n)), decoder.vocab.MASK, dtype=torch.long, device=prompt.device)
        tok[:, :p] = prompt
        t, _ = timed(lambda: decoder(tok, memory, task, causal=True)[:, -1].argmax(-1), 3, sync)
        per.append(t)
    return float(np.interp(np.arange(p + 1, length + 1), lengths, per).sum())


def main() -> None:
    """Time the decoding modes for detection and captions at each batch size; print the table."""
    from polymae.models import mad as M

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tasks", nargs="+", default=["det", "cap"], choices=["det", "cap"])
    p.add_argument("--tokens", type=int, default=196, help="image tokens")
    p.add_argument("--encoder-dim", type=int, default=768)
    p.add_argument("--repeats", type=int, default=3, help="runs per parallel / AR+KV measurement")
    p.add_argument("--ar-repeats", type=int, default=1, help="runs per no-cache autoregressive measurement")
    p.add_argument("--ar-sample", type=int, default=0,
                   help="time the no-cache AR at this many prefix lengths and extrapolate (0 = measure it all)")
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    vocab = M.MadVocab(num_classes=80, caption_vocab=8000)
    dec = M.MadDecoder(vocab, encoder_dim=args.encoder_dim).to(dev).eval()
    print(f"MadDecoder 6 x 256-d, 8 heads, {sum(q.numel() for q in dec.parameters()) / 1e6:.1f} M parameters; "
          f"{args.tokens} image tokens x {args.encoder_dim}; {dev} ({torch.get_num_threads()} threads); "
          f"torch {torch.__version__}")
    print(f"{'task':>9} | {'batch':>5} | {'tokens':>6} | {'parallel ms':>11} | {'AR ms':>10} | {'AR/par':>7} | "
          f"{'AR+KV ms':>8} | {'KV/par':>6} | same tokens | load")
    for task, parallel in (("det", M.decode_parallel), ("cap", M.decode_iterative)):
        if task not in args.tasks:
            continue
        for b in args.batch:
            mem = torch.randn(b, args.tokens, args.encoder_dim, device=dev)
            prompt = torch.full((b, 1), vocab.prompt(task), device=dev)
            tp, _ = timed(lambda: parallel(dec, mem, task, prompt), args.repeats, sync)
            tk, kv_tokens = timed(lambda: decode_autoregressive_cached(dec, mem, task, prompt), args.repeats, sync)
            if args.ar_sample:
                ta, ar_tokens = ar_sampled(dec, mem, task, prompt, args.ar_sample, sync), None
            else:
                ta, ar_tokens = timed(lambda: M.decode_autoregressive(dec, mem, task, prompt), args.ar_repeats, sync,
                                      warmup=False)
            same = "n/a" if ar_tokens is None else f"{(ar_tokens == kv_tokens).float().mean().item():.3f}"
            label = "detection" if task == "det" else "caption"
            ar_txt = f"{ta * 1e3:10.1f}" + (" (extrapolated)" if args.ar_sample else "")
            ok = "OK" if ta / tp >= TARGET_DET else "SLOW"
            note = f"  det target >= {TARGET_DET:.0f}x: {ok}" if task == "det" else ""
            print(f"{label:>9} | {b:5d} | {M.SEQ_LEN[task]:6d} | {tp * 1e3:11.1f} | {ar_txt} | {ta / tp:6.1f}x | "
                  f"{tk * 1e3:8.1f} | {tk / tp:5.1f}x | {same:>11} | {os.getloadavg()[0]:4.1f}{note}", flush=True)


if __name__ == "__main__":
    main()
