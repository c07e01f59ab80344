"""Where one fastflamingo op call spends its time on a GPU.

    python benchmarks/gpu_overhead.py --out DIR

For the image-causal cross-attention, the Perceiver attention and the NF4 linear, at benchmark
shapes, in bf16: ``triton.testing.do_bench`` of the raw Triton launcher, of the custom op and of
the public function; the host time per call (a loop of calls, one synchronisation at the end);
the kernels' own GPU time per call (torch.profiler's device time); the benchmark suite's GPU time
per call (``graph_us``: CUDA-graph replay, L2 flushed, :mod:`fastflamingo.bench.timing`; where the
capture fails, ``graph_method`` says ``events`` and ``graph_fallback`` why); and the Python
functions that take the host time of the public call (cProfile). The first case, ``graph floor``,
is a one-element add: what graph replay reports for (almost) no GPU work. Writes
``DIR/overhead.json``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch


def gpu_us(fn, n: int = 20) -> float:
    """Device time per call from torch.profiler (all kernels of the call)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    total = sum(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
                for e in prof.key_averages())
    return total / n


def host_us(fn, n: int = 200) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def bench_us(fn) -> float:
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100) * 1e3


def graph_us(fn) -> dict:
    """The benchmark suite's own GPU timing of ``fn`` (CUDA-graph replay; events if the capture fails)."""
    from fastflamingo.bench.timing import measure
    fn()
    t = measure(fn, "cuda")
    out = dict(graph_us=round(t.median * 1e3, 1), graph_p20_p80_us=[round(t.p20 * 1e3, 1), round(t.p80 * 1e3, 1)],
               graph_method=t.method)
    if t.fallback:
        out["graph_fallback"] = t.fallback
    return out


def hot_spots(fn, n: int = 200) -> str:
    fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(12)
    return s.getvalue()


def cases():
    from fastflamingo import ops
    from fastflamingo.bench.image_causal import random_text_time
    from fastflamingo.kernels import image_causal as ic
    from fastflamingo.kernels import perceiver as pc
    from fastflamingo.ops.image_causal_op import _image_causal_attention
    dev, bf = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    one = torch.zeros(1, device=dev)
    yield "graph floor (1-element add)", {"x.add_(1)": lambda: one.add_(1)}
    for B, N, T in ((8, 32, 2048), (8, 4, 256)):
        H, D, L = 8, 64, 64
        q = torch.randn(B, H, T, D, device=dev, dtype=bf)
        k, v = (torch.randn(B, H, N * L, D, device=dev, dtype=bf) for _ in range(2))
        tt = random_text_time(B, T, N, g).to(dev).to(torch.int32)
        s = D ** -0.5
        yield f"image-causal fwd B={B} N={N} T={T}", {
            "raw launcher": lambda q=q, k=k, v=v, tt=tt: ic.image_causal_fwd(q, k, v, tt, L, True, s),
            "custom op": lambda q=q, k=k, v=v, tt=tt: _image_causal_attention(q, k, v, tt, L, True, s),
            "public": lambda q=q, k=k, v=v, tt=tt: ops.image_causal_attention(
                q, k, v, text_time=tt, latents_per_media=L, validate=False)}
    for images in (64, 256):
        H, D, L, V = 8, 64, 64, 257
        q, kl, vl = (torch.randn(images, H, L, D, device=dev, dtype=bf) for _ in range(3))
        km, vm = (torch.randn(images, H, V, D, device=dev, dtype=bf) for _ in range(2))
        yield f"perceiver fwd images={images}", {
            "raw launcher": lambda q=q, km=km, vm=vm, kl=kl, vl=vl: pc.perceiver_fwd(q, km, vm, kl, vl, D ** -0.5),
            "public": lambda q=q, km=km, vm=vm, kl=kl, vl=vl: ops.perceiver_attention(q, km, vm, kl, vl)}
    try:
        from fastflamingo.bench.nf4 import _quantized_layer
        from fastflamingo.kernels.nf4 import nf4_matmul
        from fastflamingo.ops.nf4 import _packed_bytes, nf4_linear, quant_tensors
    except ImportError as e:
        print(f"nf4: {e}")
        return
    layer, _ = _quantized_layer(4096, 4096, dev)
    state = layer.weight.quant_state
    qt = quant_tensors(state)
    w = _packed_bytes(layer.weight, qt)
    for M in (1, 16):
        x = torch.randn(M, 4096, device=dev, dtype=bf)
        yield f"nf4 linear 4096x4096 M={M}", {
            "raw launcher": lambda x=x: nf4_matmul(x, w, qt.absmax, qt.code, qt.absmax2, qt.code2, qt.offset, None,
                                                   qt.out_features, qt.blocksize, qt.blocksize2),
            "public": lambda x=x: nf4_linear(x, layer.weight, state, backend="triton"),
            "bitsandbytes": lambda x=x: layer(x)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_overhead: needs a CUDA GPU (it times the Triton kernels and their launch)")
        return
    os.makedirs(a.out, exist_ok=True)
    results = {}
    for name, fns in cases():
        row = {}
        for label, fn in fns.items():
            try:
                row[label] = dict(do_bench_us=round(bench_us(fn), 1), host_us=round(host_us(fn), 1),
                                  gpu_us=round(gpu_us(fn), 1))
            except Exception as e:  # noqa: BLE001 - reported
                row[label] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            try:
                row[label].update(graph_us(fn))
            except Exception as e:  # noqa: BLE001 - reported
                row[label]["graph_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"{name:36s} {label:14s} {row[label]}", flush=True)
        torch.cuda.empty_cache()
        public = fns.get("public")
        if public is not None:
            row["hot_spots"] = hot_spots(public)
        results[name] = row
    with open(os.path.join(a.out, "overhead.json"), "w") as f:
        json.dump(results, f, indent=1)
    for name, row in results.items():
        print(f"--- {name}: public call, cProfile\n" + "\n".join(row.get("hot_spots", "").splitlines()[:30]))


if __name__ == "__main__":
    main()
