"""``fastflamingo score``: rank candidate continuations after images and a prompt (or after each
query of a few-shot file) by their log-likelihood: zero- and few-shot classification from the
command line.

Examples::

    fastflamingo score --preset tiny --random-images 1 --prompt-ids "510 17 42" --candidate-ids "5 6" "7" "8 9 10"
    fastflamingo score --model DIR --image cat.jpg --prompt "<image>A photo of a" --candidates " cat" " dog" " car"
    fastflamingo score --model DIR --few-shot shots.json --candidates-file classes.txt --top 5

Candidates are texts (``--candidates``, or ``--candidates-file`` with one per line, tokenized as
given: mind the leading space) or token ids (``--candidate-ids``, each a space-separated list).
For each prompt the candidates are printed best first with their summed log-likelihood and its
mean per token (``--by mean`` ranks by the mean: open_flamingo's classification evaluation
normalizes by length).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .cli import _encode, prepare, token_ids
from .score import check_distinct


def add_parser(subparsers) -> None:
    from .cli import add_model_arguments, add_prompt_arguments
    p = subparsers.add_parser("score", help="rank candidate continuations after images and a prompt",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_prompt_arguments(p)
    cands = p.add_mutually_exclusive_group(required=True)
    cands.add_argument("--candidates", nargs="+", help="candidate texts (tokenized as given)")
    cands.add_argument("--candidates-file", help="a file of candidate texts, one per line")
    cands.add_argument("--candidate-ids", nargs="+", help='candidates as token ids, each "id id ..."')
    p.add_argument("--by", choices=["sum", "mean"], default="sum", help="rank by the summed or the mean log-likelihood")
    p.add_argument("--top", type=int, default=None, help="print only the best K per prompt")
    p.set_defaults(func=run)


def _read_candidates(args, tokenizer) -> tuple[list[str], list[list[int]]]:
    """(labels to print, token ids) of the candidates."""
    if args.candidate_ids:
        ids = [token_ids(c, "--candidate-ids") for c in args.candidate_ids]
        check_distinct([c.strip() for c in args.candidate_ids], ids, "candidates")
        return [c.strip() for c in args.candidate_ids], ids
    if args.candidates_file:
        with open(args.candidates_file) as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{args.candidates_file} holds no candidates (one per line)")
    else:
        texts = list(args.candidates)
    ids = [_encode(t, tokenizer, "a candidate") for t in texts]
    empty = [t for t, i in zip(texts, ids) if not i]
    if empty:
        raise ValueError(f"candidate {empty[0]!r} tokenizes to nothing ({len(empty)} of {len(texts)} do): a "
                         "candidate is the text scored after the prompt; give each at least one token")
    check_distinct(texts, ids, "candidates", tokenizer)
    return texts, ids


def run(args) -> int:
    from . import encode_prefix, score
    if args.top is not None and args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.candidates_file and not os.path.isfile(args.candidates_file):  # before the model loads
        raise FileNotFoundError(f"no candidates file {args.candidates_file!r}")
    model, tokenizer, ids, mask, vision, prefix = prepare(args)
    labels, candidates = _read_candidates(args, tokenizer)
    start = time.perf_counter()
    with torch.no_grad():
        prefix = None if prefix is None else encode_prefix(model, *prefix)
        per_token = score(model, vision, ids, candidates, mask, prefix=prefix, reduction="none").cpu()
    seconds = time.perf_counter() - start
    lengths = torch.tensor([len(t) for t in candidates])
    total = per_token.sum(-1)
    mean = total / lengths
    key = total if args.by == "sum" else mean
    for b in range(ids.shape[0]):
        if ids.shape[0] > 1:
            print(f"[{b}]")
        order = key[b].argsort(descending=True)[:args.top]
        for rank, i in enumerate(order.tolist(), 1):
            print(f"{rank:>4}  {float(total[b, i]):10.4f}  {float(mean[b, i]):9.4f}/token  {labels[i]!r}")
    print(f"{len(candidates)} candidates x {ids.shape[0]} prompt(s) scored in {seconds:.2f} s "
          f"(ranked by the {args.by}; columns: summed log-likelihood, its mean per token)",
          file=sys.stderr)
    return 0
