"""``fastflamingo convert``: open_flamingo checkpoints and IDEFICS directories to fastflamingo's
own format (:mod:`fastflamingo.convert.pretrained`), with a progress bar over the tensors.

Examples::

    fastflamingo convert open_flamingo checkpoint.pt out/ --lm ./mpt-1b --tokenizer ./mpt-1b \\
        --vision ViT-L-14 --vision-pretrained openai --ln-post-on-tokens no --trainable-only
    fastflamingo convert idefics ./idefics-9b out/ --dtype bfloat16
"""
from __future__ import annotations

import argparse
import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _yes_no(value: str) -> bool:
    v = value.lower()
    if v in ("yes", "true", "1"):
        return True
    if v in ("no", "false", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, got {value!r}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert", help="convert open_flamingo / IDEFICS weights to a fastflamingo directory",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source_format", choices=["open_flamingo", "idefics"])
    p.add_argument("source", help="open_flamingo checkpoint file (.pt/.bin/.safetensors) or IDEFICS directory")
    p.add_argument("output", help="directory to write config.json and model.safetensors to")
    p.add_argument("--trainable-only", action="store_true",
                   help="open_flamingo only: write only the resampler, cross-attention and embeddings (the base "
                        "LM / vision encoder sources are recorded and reloaded from there)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast before writing")
    g = p.add_argument_group("open_flamingo")
    g.add_argument("--lm", help="local directory of the LM the checkpoint was trained with")
    g.add_argument("--tokenizer", help="local tokenizer directory (default: --lm)")
    g.add_argument("--vision", help="open_clip model name, e.g. ViT-L-14")
    g.add_argument("--vision-pretrained", default=None,
                   help="required: open_clip pretrained tag (openai for OpenFlamingo's releases) or local checkpoint "
                        "path; none builds the vision encoder with random weights, on purpose")
    g.add_argument("--ln-post-on-tokens", type=_yes_no, default=None,
                   help="yes/no: apply open_clip's ln_post to the patch tokens (no for OpenFlamingo's releases)")
    g.add_argument("--cross-attn-every-n-layers", type=int, default=None, help="default: read from the checkpoint")
    g.add_argument("--trust-remote-code", action="store_true", help="allow the LM's own code (MosaicML MPT repos)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Convert, then write the model and its tokenizer (when there is one) to ``args.output``."""
    from .pretrained import save_pretrained
    dtype = DTYPES[args.dtype] if args.dtype else None
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"the output {args.output!r} is a file: give a folder to write the model to")
    if args.source_format == "idefics" and args.trainable_only:
        raise ValueError("--trainable-only applies to open_flamingo checkpoints only: an IDEFICS model has no "
                         "separate base LM or vision encoder directory to record, so the frozen weights could not "
                         "be reloaded (Flamingo.from_pretrained could not load the output). Write the full model: drop "
                         "--trainable-only")
    if args.source_format == "idefics":
        from .idefics import from_idefics
        model = from_idefics(args.source, dtype=dtype)
        tokenizer = _tokenizer(args.source, args.trust_remote_code, required=False)
    else:
        from .open_flamingo import from_open_flamingo
        missing = [flag for flag, value in (("--lm", args.lm), ("--vision", args.vision),
                                            ("--vision-pretrained", args.vision_pretrained),
                                            ("--ln-post-on-tokens", args.ln_post_on_tokens)) if value is None]
        if missing:
            raise ValueError(f"converting an open_flamingo checkpoint needs {', '.join(missing)} "
                             "(the LM and vision encoder it was trained with, e.g. --vision ViT-L-14 "
                             "--vision-pretrained openai, or none for random vision weights; and whether ln_post "
                             "applies to the patch tokens: no for OpenFlamingo's releases)")
        for flag, value in (("--lm", args.lm), ("--tokenizer", args.tokenizer)):
            if value is not None and not os.path.isdir(value):  # (else transformers takes it for a hub name, offline)
                raise FileNotFoundError(f"{flag} {value!r} is not a directory: give the local directory of the "
                                        f"{'LM' if flag == '--lm' else 'tokenizer'} the checkpoint was trained with "
                                        "(nothing is downloaded)")
        pretrained = None if args.vision_pretrained == "none" else args.vision_pretrained
        tokenizer = _tokenizer(args.tokenizer or args.lm, args.trust_remote_code, required=True)
        model = from_open_flamingo(args.source, lang_encoder=args.lm, tokenizer=tokenizer,  # adds <image>, ...
                                   vision_encoder=(args.vision, pretrained),
                                   ln_post_on_tokens=args.ln_post_on_tokens,
                                   cross_attn_every_n_layers=args.cross_attn_every_n_layers,
                                   trust_remote_code=args.trust_remote_code, dtype=dtype)
    out = save_pretrained(model, args.output, trainable_only=args.trainable_only, progress=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    print(f"wrote {out}")
    return 0


def _tokenizer(path: str, trust_remote_code: bool, *, required: bool):
    from transformers import AutoTokenizer

    from .io import has_tokenizer
    if not required and not has_tokenizer(path):
        return None
    return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
