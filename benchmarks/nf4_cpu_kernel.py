"""bitsandbytes' AVX512-BF16 NF4 CPU kernel, which fastflamingo keeps off (fastflamingo.quant), against
the generic kernel it uses instead: the ``tiny`` preset's NF4 generation on the CPU, side by side.

    python benchmarks/nf4_cpu_kernel.py [--reps 9] [--threads 1]

The AVX512-BF16 kernel computes in bf16 and has no backward once it has repacked a weight; this
measures what keeping it off costs. Only layers whose shapes the kernel handles (both dims multiples
of 64) get it, as bitsandbytes would give them. Rounds alternate the two models.
"""
import argparse
import json
import platform
import time

import torch

import fastflamingo


def build(fast: bool):
    import bitsandbytes as bnb
    model = fastflamingo.Flamingo.from_preset("tiny", quantization="nf4").eval()
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = fast and m.in_features % 64 == 0 and m.out_features % 64 == 0
    return model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from bitsandbytes.functional import has_avx512bf16
    if not has_avx512bf16():
        raise SystemExit("this CPU has no AVX512-BF16: bitsandbytes never uses the kernel here")
    torch.set_num_threads(args.threads)
    models = {"avx512bf16 kernel (bitsandbytes' default)": build(True), "generic kernel (fastflamingo)": build(False)}
    vx = torch.randn(2, 2, 1, 3, 32, 32)
    lx = torch.tensor([[510, 5, 6, 7, 511, 510, 8, 9]] * 2)
    for m in models.values():
        m.generate(vx, lx, max_new_tokens=4)  # warm-up (and the repack)
    times = {k: [] for k in models}
    for _ in range(args.reps):
        for k, m in models.items():
            t = time.perf_counter()
            m.generate(vx, lx, max_new_tokens=32, min_new_tokens=32, eos_token_id=[])
            times[k].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    print(json.dumps({"device": f"CPU {platform.processor() or platform.machine()}, {args.threads} thread(s)",
                      "batch": 2, "new_tokens": 32, "reps": args.reps,
                      "median_s": med, "generic / avx512bf16": med["generic kernel (fastflamingo)"]
                      / med["avx512bf16 kernel (bitsandbytes' default)"]}, indent=1))


if __name__ == "__main__":
    main()
