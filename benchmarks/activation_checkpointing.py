"""Activation checkpointing's trade: a training step's peak memory and time, with and without.

    python benchmarks/activation_checkpointing.py [--preset tiny] [--batch 4] [--images 4]
        [--tokens 512] [--device cpu] [--dtype float32] [--out DIR]

One model (random weights), one batch of ``--images`` images and ``--tokens`` tokens per row; AdamW
over the trainable parameters. Each mode runs a first step (the optimizer's state is then
allocated), one step measured for peak memory (:func:`fastflamingo.bench.memory.peak_memory_call`:
on a GPU everything allocated, weights included; on the CPU the tensors allocated during the step),
then timed steps; the modes alternate twice, so that drift shows. The weights are put back between
modes. Writes ``DIR/activation_checkpointing.json`` with the device and the command.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fastflamingo import Flamingo
from fastflamingo.bench.memory import peak_memory_call, training_batch, write_report


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and round")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: steady timings on a shared machine)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = Flamingo.from_preset(args.preset, dtype=dtype, device=args.device).train()
    vx, ids = training_batch(model, args.batch, args.images, args.tokens, args.device, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    rows = []
    for mode in ("plain", "checkpointed") * 2:
        if mode == "checkpointed":
            model.activation_checkpointing_enable()
        else:
            model.activation_checkpointing_disable()
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            loss = model(vx, ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        step()
        _, peak, how = peak_memory_call(step, args.device)
        times = []
        for _ in range(args.steps):
            sync(args.device)
            t0 = time.perf_counter()
            step()
            sync(args.device)
            times.append(time.perf_counter() - t0)
        with torch.no_grad():
            for p_, w in zip(params, saved):
                p_.copy_(w)
        rows.append(dict(mode=mode, peak_MiB=peak, step_ms=statistics.median(times) * 1e3))
        print(f"{mode:13s} peak {peak:9.1f} MiB   step {rows[-1]['step_ms']:8.1f} ms", flush=True)
    trainable = sum(p.numel() for p in params) / 1e6
    info = write_report(args.out, "activation_checkpointing.json", args.device, argv, preset=args.preset,
                        batch=args.batch, images=args.images, tokens=args.tokens, dtype=args.dtype,
                        trainable_M=trainable, memory_method=how, rows=rows)
    print(f"{info['device']}; {how}; AdamW over {trainable:.2f}M trainable parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
