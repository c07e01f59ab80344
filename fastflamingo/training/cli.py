"""``fastflamingo finetune``: fine-tune a Flamingo on interleaved documents (JSON lines, see
:mod:`fastflamingo.training.data`), the Flamingo recipe: the vision encoder and the LM frozen (the
LM may be 4- or 8-bit), the resampler, cross-attention layers and added tokens' rows trained.

Examples::

    fastflamingo finetune --model DIR --data train.jsonl --steps 1000 --batch-size 4 --grad-accum 8 \\
        --quantization nf4 --activation-checkpointing --optimizer adamw8bit --out run1 \\
        --eval-data val.jsonl --eval-every 100
    fastflamingo finetune --model DIR --data train.jsonl --steps 2000 --out run1 --resume

``--resume`` continues from ``--out``'s checkpoint with its ``--lr``, ``--weight-decay``,
``--warmup``, ``--optimizer`` and ``--max-grad-norm``, and its data order: ``--seed``,
``--batch-size``, ``--grad-accum``, the number of processes and of documents in ``--data`` (others
are an error naming both values); ``--steps`` may change (the second example extends a 1000-step
run): the learning rate then follows the schedule of the new ``--steps`` from the first resumed
step on. Every document is checked before training starts (an error names its ``file:line``):
its image files, its ``--max-length``, that it has text to learn from, and its number of images
(at most the model's ``max_num_media``). Where stderr is not a terminal (a log file), a line on
stdout every ``--log-every`` steps takes the progress bar's place. An epoch is the documents'
number // (``--batch-size`` x ``--grad-accum`` x processes) steps: the remainder sits out each
epoch (other documents each epoch, the order being shuffled anew), with a warning giving how
many; a number of documents that is a multiple of it trains on all of them every epoch.

``--out`` gets ``checkpoint.pt`` (to resume), ``model/`` (the trained weights only, with the
tokenizer; ``Flamingo.from_pretrained("run1/model")`` loads it as it is, the frozen parts from the
``--model`` directory it records; ``lang_encoder=`` loads it onto another module),
``history.json`` and ``loss.png`` (with ``--eval-data``, the held-out documents' loss beside the
training loss: the mean over their target tokens, every ``--eval-every`` steps and at the last).
Over several GPUs, FSDP2 (data parallel, weights and optimizer state sharded): ``torchrun
--nproc-per-node 8 -m fastflamingo.cli finetune ... --shard``; each process takes its share of
every step (``--grad-accum`` micro-batches of ``--batch-size``), the step being the one a single
process makes with all of them.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch


def add_parser(subparsers) -> None:
    from ..cli import count_arg, device_arg
    p = subparsers.add_parser("finetune", help="fine-tune on interleaved image-text documents",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a directory written by Flamingo.save_pretrained, with its tokenizer")
    p.add_argument("--data", required=True, help="JSON-lines documents: {\"images\": [...], \"text\": \"<image>...\"}")
    p.add_argument("--steps", type=count_arg("--steps"), required=True, help="optimizer steps in all (with --resume it may change: the warm-up and cosine "
                        "schedule of the new total from the first resumed step on)")
    p.add_argument("--batch-size", type=count_arg("--batch-size"), default=4, help="documents per micro-batch")
    p.add_argument("--grad-accum", type=count_arg("--grad-accum"), default=1,
                   help="micro-batches per step (the documents' number modulo --batch-size x --grad-accum x "
                        "processes sit out each epoch, with a warning)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=count_arg("--warmup"), default=0, help="steps of linear warm-up")
    p.add_argument("--max-grad-norm", type=_max_grad_norm, default=1.0,
                   help="clip the gradient norm to this (0: no clipping)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    p.add_argument("--max-length", type=count_arg("--max-length"), default=None,
                   help="refuse documents longer than this many tokens (never cut)")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--quantization", choices=["nf4", "int8"], default=None, help="the frozen LM in 4 or 8 bits")
    p.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="the model's dtype (default: the checkpoint's); bfloat16's trained weights step as float32 "
                        "master copies (float16 needs loss scaling, which is not done: refused)")
    p.add_argument("--seed", type=int, default=0, help="the order of the documents")
    p.add_argument("--save-every", type=count_arg("--save-every"), default=0, help="checkpoint every N steps too")
    p.add_argument("--resume", action="store_true",
                   help="continue from --out's checkpoint, with its --lr, --weight-decay, --warmup, --optimizer, "
                        "--max-grad-norm, --seed, --batch-size, --grad-accum, processes and number of documents "
                        "(a change is an error; --steps may change)")
    p.add_argument("--shard", action="store_true",
                   help="FSDP2 data parallel, one process per GPU under torchrun: torchrun --nproc-per-node N "
                        "-m fastflamingo.cli finetune ... --shard (gloo on CPUs)")
    p.add_argument("--eval-data", help="held-out documents, as --data: their loss (the mean over their target tokens) "
                                       "every --eval-every steps and at the last, in history.json and loss.png")
    p.add_argument("--eval-every", type=count_arg("--eval-every"), default=0, metavar="N",
                   help="with --eval-data: evaluate every N steps (default 0: at the last step only)")
    p.add_argument("--log-every", type=count_arg("--log-every"), default=None, metavar="N",
                   help="a line on stdout every N steps (loss, learning rate, tokens, seconds a step); default: "
                        "10 where stderr is not a terminal (a log file), else 0 (none: the progress bar shows them)")
    p.add_argument("--out", required=True, help="directory for checkpoints, history.json and loss.png")
    p.set_defaults(func=run)


def _max_grad_norm(text: str) -> float:
    """argparse ``type`` of ``--max-grad-norm``: a norm >= 0 (0: no clipping); a negative one
    would flip every gradient (gradient ascent)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(x) and x >= 0):
        raise argparse.ArgumentTypeError(f"--max-grad-norm must be > 0 (the norm to clip the gradients to) "
                                         f"or 0 (no clipping), got {text}")
    return x


def run(args) -> int:
    from ..convert.io import saved_tokenizer
    from ..convert.pretrained import check_model_directory
    from ..model import Flamingo
    from . import DocumentBatches, HeldOut, fine_tune, load_documents
    check_model_directory(args.model)
    for flag, path in (("--data", args.data), ("--eval-data", args.eval_data)):
        if path is not None and not os.path.isfile(path):
            raise FileNotFoundError(f"{flag}: no file {path!r}")
    if args.eval_every and not args.eval_data:
        raise ValueError(f"--eval-every {args.eval_every} evaluates held-out documents: give them with --eval-data")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        raise ValueError("--steps, --batch-size and --grad-accum must be >= 1")
    tok = saved_tokenizer(args.model, required_by="fastflamingo finetune --model")
    # every document's images and length checked before the model loads, naming its file:line
    docs = load_documents(args.data, tok, args.max_length)
    held_out = None if args.eval_data is None else load_documents(args.eval_data, tok, args.max_length)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = 0, 1
    if args.shard:
        device, rank, world = _init_distributed(device)
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model = Flamingo.from_pretrained(args.model, quantization=args.quantization, dtype=dtype, device=device)
    data = DocumentBatches(docs, tok, model.config.media_token_id, batch_size=args.batch_size,
                           grad_accum=args.grad_accum, seed=args.seed, max_length=args.max_length,
                           rank=rank, world_size=world,
                           image_processor=model.image_processor(),
                           image_size=model.config.vision.image_size)
    if held_out is not None:
        held_out = HeldOut(held_out, tok, model.config.media_token_id, batch_size=args.batch_size,
                           max_length=args.max_length, rank=rank, world_size=world,
                           image_processor=model.image_processor(), image_size=model.config.vision.image_size)
        held_out.check(model)
    done = 0
    if args.resume and os.path.isfile(os.path.join(args.out, "history.json")):
        with open(os.path.join(args.out, "history.json")) as f:
            done = len(json.load(f))
    every = (0 if sys.stderr.isatty() else 10) if args.log_every is None else args.log_every
    data.check(model)  # (what fine_tune checks first: here before the line saying training starts)
    if rank == 0 and not sys.stderr.isatty():  # (a terminal shows the progress bar instead)
        print(f"training {len(docs)} documents to step {args.steps} on {device} ...", flush=True)
    # the tokenizer beside the weights from the first checkpoint on (a run cut short leaves a model/ that
    # loads); not into an earlier run's directory, which fine_tune refuses without --resume, nor into one
    # with no checkpoint to resume from, which fine_tune refuses with it (nothing written)
    if rank == 0 and args.resume == os.path.isfile(os.path.join(args.out, "checkpoint.pt")):
        tok.save_pretrained(os.path.join(args.out, "model"))
    history = fine_tune(model, data, steps=args.steps, lr=args.lr, weight_decay=args.weight_decay,
                        warmup=args.warmup, max_grad_norm=args.max_grad_norm or None, optimizer=args.optimizer,
                        activation_checkpointing=args.activation_checkpointing, shard=args.shard,
                        out=args.out, save_every=args.save_every, resume=args.resume, progress=None if rank == 0 else False,
                        on_step=_step_lines(every, args.steps) if rank == 0 and every else None,
                        eval_data=held_out, eval_every=args.eval_every)
    if args.shard:
        torch.distributed.destroy_process_group()
        if rank != 0:
            return 0
    png = loss_plot(history, os.path.join(args.out, "loss.png"))
    run_ = history[done:]
    first, last = run_[0], run_[-1]
    evals = [h for h in run_ if "eval_loss" in h]
    print(f"{len(docs)} documents; steps {first['step']}..{last['step']}: loss {first['loss']:.4f} -> "
          f"{last['loss']:.4f}; {sum(h['seconds'] for h in run_):.1f} s on {device}"
          + (f"; held-out loss at step {evals[0]['step']} {evals[0]['eval_loss']:.4f}"
             + (f", at step {evals[-1]['step']} {evals[-1]['eval_loss']:.4f}" if len(evals) > 1 else "")
             if evals else ""))
    print(f"wrote {os.path.join(args.out, 'checkpoint.pt')}, {os.path.join(args.out, 'model')}, "
          f"{os.path.join(args.out, 'history.json')}" + (f", {png}" if png else ""))
    return 0


def _step_lines(every: int, steps: int):
    """``on_step`` printing a line every ``every`` steps and at the last: the step's loss and
    learning rate, and the mean target tokens and seconds of the steps since the last line."""
    since: list[dict] = []

    def line(record: dict) -> None:
        since.append(record)
        if record["step"] % every and record["step"] != steps and "eval_loss" not in record:
            return
        n = len(since)
        held_out = f", held-out loss {record['eval_loss']:.4f}" if "eval_loss" in record else ""
        print(f"step {record['step']}/{steps}: loss {record['loss']:.4f}{held_out}, lr {record['lr']:.3g}, "
              f"{sum(r['tokens'] for r in since) / n:.0f} target tokens, {sum(r['seconds'] for r in since) / n:.2f} s "
              f"a step", flush=True)
        since.clear()
    return line


def _init_distributed(device: str) -> tuple[str, int, int]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs): (this process's device, rank, world size)."""
    import torch.distributed as dist
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--shard runs one process per device under torchrun: "
                         "torchrun --nproc-per-node N -m fastflamingo.cli finetune ... --shard")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def loss_plot(history: list[dict], path: str) -> str | None:
    """The training loss by step, and the held-out loss where it was measured, as a PNG at
    ``path`` (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=1, label="training")
    evals = [h for h in history if "eval_loss" in h]
    if evals:
        ax.plot([h["step"] for h in evals], [h["eval_loss"] for h in evals], marker="o", lw=1, label="held out")
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
