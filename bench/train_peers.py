#!/usr/bin/env python3
"""The PyTorch peer of `sympow bench train`: the same GPT, trained the way PyTorch users train it.

A GPT of sympow's `gpt2-124m` shape (12 layers, width 768, 12 heads of 64, MLP 4×, learned layer
norms with biases, tied embeddings, GPT-2 vocabulary) in plain PyTorch, one training step = forward
with the cross-entropy loss, backward, gradient clipping at 1.0, fused AdamW — under bf16 autocast
(f32 master weights), the usual mixed-precision recipe. Attention per variant, as in sympow:
  * softmax       fixed RoPE, torch SDPA (FlashAttention)
  * sympow-gated  fixed RoPE, data-dependent gate, Manifest's `retention` p = 2 (chunk 1024)
  * conformal     learned rotary (cumulative softplus steps, per head) + gate, `retention` p = 2
Random tokens; tokens per step fixed (batch = tokens / context); one warm-up step, then the median
of --reps steps, CUDA-synchronised. With --sympow-json (the output of `sympow bench train --json`,
same machine, same call) it prints one table with both and the ratio.

Usage (on the GPU machine; see scripts/bench_train.sh):
  python3 bench/train_peers.py --context 4096,16384 --tokens 16384 [--compile] [--sympow-json F]
"""
import argparse
import json
import math
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, WIDTH, LAYERS, HEADS, HEAD_DIM, BASE = 50257, 768, 12, 12, 64, 10000.0
# sympow pads the embedding / LM head to a multiple of 64 rows (tensor-core-aligned products) and
# takes the loss over the real vocabulary; the PyTorch GPT does the same (--no-pad-vocab: not)
PADDED_VOCAB = (VOCAB + 63) // 64 * 64


def rotate(x, ang):
    """Rotates interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, d] by ang [B|1, T, H|1, d/2]."""
    c, s = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)


class Block(nn.Module):
    def __init__(self, variant, power_retention):
        super().__init__()
        self.variant, self.retention = variant, power_retention
        gate = HEADS if variant != "softmax" else 0
        rot = HEADS if variant == "conformal" else 0
        self.widths = [HEADS * HEAD_DIM] * 3 + [gate, rot]
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv = nn.Linear(WIDTH, sum(self.widths))
        self.proj = nn.Linear(HEADS * HEAD_DIM, WIDTH)
        self.fc, self.fc2 = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)
        self.register_buffer("omega", BASE ** (-torch.arange(HEAD_DIM // 2) * 2.0 / HEAD_DIM), persistent=False)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v, g, r = self.qkv(self.ln1(x)).split(self.widths, -1)
        q, k, v = (z.reshape(b, t, HEADS, HEAD_DIM) for z in (q, k, v))
        if self.variant == "conformal":
            steps = F.softplus(r.float())  # [B, T, H]
            ang = torch.cumsum(steps, 1)[..., None] * self.omega
        else:
            pos = torch.arange(t, device=x.device, dtype=torch.float32)
            ang = (pos[:, None] * self.omega)[None, :, None, :]
        q, k = rotate(q, ang), rotate(k, ang)
        if self.variant == "softmax":
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
            y = y.transpose(1, 2)
        else:
            log_g = F.logsigmoid(g.float())
            y = self.retention(q, k, v, log_g, deg=2, chunk_size=min(1024, t))
        x = x + self.proj(y.reshape(b, t, HEADS * HEAD_DIM))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, variant, power_retention, rows):
        super().__init__()
        self.wte = nn.Embedding(rows, WIDTH)
        self.blocks = nn.ModuleList(Block(variant, power_retention) for _ in range(LAYERS))
        self.lnf = nn.LayerNorm(WIDTH)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, ids):
        x = self.wte(ids)
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.lnf(x), self.wte.weight)  # tied embeddings


def step_ms(variant, context, tokens, reps, compile_, power_retention, pad_vocab=True):
    torch.manual_seed(0)
    model = GPT(variant, power_retention, PADDED_VOCAB if pad_vocab else VOCAB).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compile_ else model
    b = max(1, tokens // context)
    ids = torch.randint(VOCAB, (b, context), device="cuda")
    targets = torch.randint(VOCAB, (b, context), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(ids)
        loss = F.cross_entropy(logits[..., :VOCAB].float().reshape(-1, VOCAB), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(2 if compile_ else 1):  # warm-up (compilation)
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step().item()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    del model, opt
    torch.cuda.empty_cache()
    return b, times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", default="4096,16384")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--variants", default="softmax,sympow-gated,conformal")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--sympow-json", help="output of `sympow bench train --json`")
    ap.add_argument("--no-pad-vocab", action="store_true",
                    help=f"LM head of {VOCAB} rows instead of sympow's {PADDED_VOCAB} (cuBLAS's unaligned kernels)")
    a = ap.parse_args()
    try:
        from retention import power_retention
    except Exception as e:  # noqa: BLE001
        power_retention = None
        print(f"peer unavailable: retention: {type(e).__name__}: {e}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, gpt2-124m shape, "
          f"{a.tokens} tokens per step, LM head of {VOCAB if a.no_pad_vocab else PADDED_VOCAB} rows, "
          f"bf16 autocast, median of {a.reps}")
    ours = {}
    if a.sympow_json:
        for line in open(a.sympow_json):
            r = json.loads(line)
            ours[(r["variant"], r["context"])] = r["tokens_per_s"]
    modes = [False, True] if a.compile else [False]
    rows = []
    for context in (int(c) for c in a.context.split(",")):
        for variant in a.variants.split(","):
            if variant != "softmax" and power_retention is None:
                continue
            for c in modes:
                name = f"PyTorch{' compiled' if c else ''}"
                try:
                    b, ms = step_ms(variant, context, a.tokens, a.reps, c, power_retention,
                                    not a.no_pad_vocab)
                    tps = b * context / ms * 1e3
                    print(f"  {name:<17} {variant:<13} context {context:>6} batch {b:>3}: {ms:8.1f} ms, {tps:9.0f} tokens/s",
                          flush=True)
                except Exception as e:  # noqa: BLE001
                    tps = math.nan
                    print(f"  {name} {variant} at {context}: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
                    torch.cuda.empty_cache()
                rows.append((context, variant, name, tps))
    print(f"\n{'context':>7} | {'variant':<13} | {'sympow tokens/s':>15} | {'peer':<17} | {'peer tokens/s':>13} | sympow ÷ peer")
    print("-" * 92)
    for context, variant, name, tps in rows:
        o = ours.get((variant, context), math.nan)
        print(f"{context:>7} | {variant:<13} | {o:>15.0f} | {name:<17} | {tps:>13.0f} | {o / tps:>8.2f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        sys.exit(1)
