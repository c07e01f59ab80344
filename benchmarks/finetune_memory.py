"""Low-memory fine-tuning: peak memory and step time of `fastflamingo.training.fine_tune` in three
set-ups, side by side in one run: the 16-bit LM with AdamW; the same, activation-checkpointed;
the NF4 LM with bitsandbytes' 8-bit AdamW, checkpointed (what fits a 9B model on one 24 GB GPU).

    python benchmarks/finetune_memory.py [--preset openflamingo-9b] [--batch 1] [--images 5]
        [--tokens 512] [--steps 4] [--device cuda] [--dtype bfloat16] [--out DIR]

Each set-up builds the model anew (random weights, the preset's shape), then one ``fine_tune`` call
of ``--steps`` steps on one fixed batch is measured for peak memory
(:func:`fastflamingo.bench.memory.peak_memory_call`: on a GPU everything allocated, weights and
optimizer state included, which is what must fit the card; on the CPU only the tensors the call
allocates, so the 4-bit weights' saving does not show there), and its steps after the first give
the median step time. Writes ``DIR/finetune_memory.json`` with the device and the command.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys

import torch

from fastflamingo import Flamingo
from fastflamingo.bench.memory import peak_memory_call, training_batch, write_report
from fastflamingo.training import fine_tune

SETUPS = (("16-bit LM, AdamW", None, "adamw", False),
          ("16-bit LM, AdamW, checkpointed", None, "adamw", True),
          ("NF4 LM, 8-bit AdamW, checkpointed", "nf4", "adamw8bit", True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: openflamingo-9b on a GPU, tiny on the CPU")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    preset = args.preset or ("openflamingo-9b" if cuda else "tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step allocates the optimizer state; the rest are timed)")
    rows = []
    for name, quantization, optimizer, checkpointed in SETUPS:
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        try:
            model = Flamingo.from_preset(preset, dtype=dtype, device=args.device, quantization=quantization)
            vx, ids = training_batch(model, args.batch, args.images, args.tokens, args.device, dtype)
            data = [(vx, ids, torch.ones_like(ids), ids.masked_fill(ids == model.config.media_token_id, -100))]
            history, peak, how = peak_memory_call(
                lambda: fine_tune(model, lambda step: data, steps=args.steps, lr=1e-5, optimizer=optimizer,
                                  activation_checkpointing=checkpointed, progress=False), args.device)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
            row = dict(setup=name, peak_MiB=peak, step_ms=statistics.median(h["seconds"] for h in history[1:]) * 1e3,
                       loss_first=history[0]["loss"], loss_last=history[-1]["loss"], trainable_M=trainable, memory_method=how)
        except (torch.cuda.OutOfMemoryError, MemoryError) as e:  # running out of memory is a result here
            row = dict(setup=name, error=f"{type(e).__name__}: {str(e)[:200]}")
        rows.append(row)
        print(f"{name:36s} " + (f"peak {row['peak_MiB']:10.1f} MiB   step {row['step_ms']:9.1f} ms" if "error" not in row
                                 else row["error"]), flush=True)
        model = data = None
    info = write_report(args.out, "finetune_memory.json", args.device, argv, preset=preset, batch=args.batch,
                        images=args.images, tokens=args.tokens, dtype=str(dtype), rows=rows)
    print(f"{info['device']}; preset {preset}, B={args.batch}, {args.images} images, {args.tokens} tokens, {dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
