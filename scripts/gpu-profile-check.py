#!/usr/bin/env python3
"""Checks the simulator's `gpu-8b` engine profile (sim/src/profile.rs) on a real GPU.

The profile models one engine step as `base + per_token * tokens + per_context_token * context`.
Its `per_token` (0.04 ms, 25k prefill tokens/s) is an assumption (40% of the H100's dense BF16
peak), not a published figure. This script times the work of such steps on the GPU it runs on:
a Llama-3.1-8B-shaped decoder (32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336,
vocabulary 128256) in BF16 with random weights. One layer's weights (0.44 GB) are reused for all
32 layers and one KV tensor for all layers' caches: each is far larger than the GPU's L2, so the
memory traffic per layer is the model's, in a fraction of its memory.

- prefill: one sequence's chunk of T tokens over its own T-token causal context, logits for the
  last token only (as vLLM computes them);
- decode: B sequences, one token each, each reading a C-token KV cache.

Each step is captured and replayed as a CUDA graph (as vLLM runs decode steps), so what is timed
is the GPU's work, not Python's kernel launches.

It leaves out what vLLM adds on top (RoPE, sampling, the scheduler, paged-KV indirection), so a
measured step is a lower bound on vLLM's. Output: a table of measured vs profile step times and
a least-squares fit of the three coefficients. Needs PyTorch with CUDA; writes nothing.
"""

import statistics
import sys

import torch
import torch.nn.functional as F

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB, LAYERS = 4096, 32, 8, 128, 14336, 128256, 32

# sim/src/profile.rs, EngineProfile::gpu_8b
PROFILE_BASE_S, PROFILE_PER_TOKEN_S, PROFILE_PER_CONTEXT_S = 0.0063, 0.000_04, 0.000_000_04

dev = "cuda"
dt = torch.bfloat16
torch.manual_seed(0)


def w(*shape):
    return torch.randn(*shape, device=dev, dtype=dt) * 0.02


W = {
    "q": w(HIDDEN, HEADS * HEAD_DIM),
    "k": w(HIDDEN, KV_HEADS * HEAD_DIM),
    "v": w(HIDDEN, KV_HEADS * HEAD_DIM),
    "o": w(HEADS * HEAD_DIM, HIDDEN),
    "gate": w(HIDDEN, MLP),
    "up": w(HIDDEN, MLP),
    "down": w(MLP, HIDDEN),
    "n1": torch.ones(HIDDEN, device=dev, dtype=dt),
    "n2": torch.ones(HIDDEN, device=dev, dtype=dt),
}
LM_HEAD = w(HIDDEN, VOCAB)


def rms(x, g):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5).to(x.dtype) * g


def attend(q, k, v, causal):
    try:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    except TypeError:  # PyTorch < 2.5: expand the KV heads
        rep = HEADS // KV_HEADS
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def layer(x, k_cache, v_cache, causal):
    """x: [B, T, HIDDEN]. Prefill (causal): attends over its own k, v. Decode: over the cache."""
    b, t, _ = x.shape
    h = rms(x, W["n1"])
    q = (h @ W["q"]).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
    k = (h @ W["k"]).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = (h @ W["v"]).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
    if causal:
        a = attend(q, k, v, True)
    else:
        a = attend(q, k_cache, v_cache, False)
    x = x + a.transpose(1, 2).reshape(b, t, HEADS * HEAD_DIM) @ W["o"]
    h = rms(x, W["n2"])
    return x + (F.silu(h @ W["gate"]) * (h @ W["up"])) @ W["down"]


def model(x, k_cache=None, v_cache=None, causal=True):
    for _ in range(LAYERS):
        x = layer(x, k_cache, v_cache, causal)
    return x[:, -1, :] @ LM_HEAD


def time_ms(fn, iters=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def graphed_ms(fn):
    """GPU time of `fn` replayed as one CUDA graph: no Python launch overhead in the step."""
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        ms = time_ms(g.replay)
    del g
    torch.cuda.empty_cache()
    return ms


def prefill(t):
    x = torch.randn(1, t, HIDDEN, device=dev, dtype=dt)
    return graphed_ms(lambda: model(x))


def decode(b, ctx):
    x = torch.randn(b, 1, HIDDEN, device=dev, dtype=dt)
    kc = torch.randn(b, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=dt)
    vc = torch.randn(b, KV_HEADS, ctx, HEAD_DIM, device=dev, dtype=dt)
    return graphed_ms(lambda: model(x, kc, vc, False))


def profile_ms(tokens, context):
    return 1e3 * (PROFILE_BASE_S + PROFILE_PER_TOKEN_S * tokens + PROFILE_PER_CONTEXT_S * context)


def main():
    p = torch.cuda.get_device_properties(0)
    print(f"# {p.name}, {p.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}", flush=True)
    rows = []  # (kind, tokens, context read, measured ms)
    for t in (128, 256, 512, 1024, 2048):
        # A prefill chunk reads its own context: t tokens attend over on average t/2.
        rows.append(("prefill", t, t, prefill(t)))
        print("  prefill", t, f"{rows[-1][3]:.2f} ms", flush=True)
    for b, ctx in ((1, 1024), (1, 4096), (16, 2048), (64, 2048), (128, 2048), (256, 1024)):
        rows.append(("decode", b, b * ctx, decode(b, ctx)))
        print("  decode", b, ctx, f"{rows[-1][3]:.2f} ms", flush=True)

    print()
    print("| step | tokens | context read | measured ms | profile ms | profile / measured |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, t, c, ms in rows:
        pm = profile_ms(t, c)
        print(f"| {kind} | {t} | {c} | {ms:.2f} | {pm:.2f} | {pm / ms:.2f} |")

    # Least squares for base, per_token, per_context over all steps.
    a = torch.tensor([[1.0, t, c] for _, t, c, _ in rows], dtype=torch.float64)
    y = torch.tensor([ms / 1e3 for *_, ms in rows], dtype=torch.float64)
    coef = torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1).tolist()
    print()
    print("| coefficient | profile | fit here |")
    print("|---|---:|---:|")
    print(f"| base (ms) | {PROFILE_BASE_S * 1e3:.2f} | {coef[0] * 1e3:.2f} |")
    print(f"| per token (us) | {PROFILE_PER_TOKEN_S * 1e6:.2f} | {coef[1] * 1e6:.2f} |")
    print(f"| per context token (ns) | {PROFILE_PER_CONTEXT_S * 1e9:.1f} | {coef[2] * 1e9:.1f} |")
    full = next(ms for kind, t, _, ms in rows if kind == "prefill" and t == 2048)
    print(f"\nprefill throughput at a 2048-token chunk: {2048 / full * 1e3:,.0f} tokens/s "
          f"(profile: {2048 / profile_ms(2048, 2048) * 1e3:,.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
