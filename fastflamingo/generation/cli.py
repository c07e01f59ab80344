"""``fastflamingo generate``: images and a prompt (or a few-shot file) in, tokens streamed out.

Examples::

    fastflamingo generate --preset tiny --random-images 1 --prompt-ids "510 17 42"
    fastflamingo generate --model DIR --image cat.jpg --prompt "<image>An image of"
    fastflamingo generate --model DIR --few-shot shots.json

A few-shot file is JSON: ``{"prefix": {"images": [...], "text": "..."}, "queries": [{"images":
[...], "text": "..."}, ...]}``; the prefix (demonstrations) is encoded once and the queries run as
one batch after it. Image paths in it are relative to the file's folder (or absolute), or
``"random"``. Without a tokenizer (``--preset``), texts are lists of token ids. Texts are tokenized
as the tokenizer does by default (its BOS first, as ``fastflamingo evaluate`` does) at the start of
a sequence: the prompt, the prefix, the queries of a file without a prefix; not a query after a
prefix.

One prompt greedy or sampled streams its text as it comes; several rows (a few-shot file's
queries, ``--num-beams``, ``--num-return-sequences``) print when all are done, one line each.
Each row ends at its first stop token (printed and counted among the new tokens).
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings

import torch

from ..cli import count_arg, device_arg
from ..inputs import read_image
from ..warn import warn_caller



def add_parser(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text after images and a prompt",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_prompt_arguments(p)
    p.add_argument("--max-new-tokens", type=count_arg("--max-new-tokens", 1), default=20,
                   help="new tokens per row at most (a stop token included)")
    p.add_argument("--num-beams", type=count_arg("--num-beams", 1), default=1)
    p.add_argument("--length-penalty", type=float, default=1.0, help="beam search (--num-beams > 1) only")
    p.add_argument("--do-sample", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50, help="sampling: the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=None,
                   help="sampling: drop tokens less likely than this times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 1 lowers the score of tokens already in the text (Hugging Face's rule)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=0, help="n > 0: no n-gram of tokens twice")
    p.add_argument("--num-return-sequences", type=count_arg("--num-return-sequences", 1), default=1,
                   help="continuations per prompt: the best beams (<= --num-beams) or samples (--do-sample)")
    p.add_argument("--cache", choices=["auto", "static", "dynamic"], default="auto")
    p.add_argument("--compile", choices=["auto", "yes", "no"], default="auto",
                   help="compile the decode step (static cache); auto: on CUDA only")
    p.set_defaults(func=run)


def add_model_arguments(p) -> None:
    """Which model, and where (``generate`` and ``score``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="a named shape with random weights (no tokenizer: use --prompt-ids)")
    src.add_argument("--model", help="a directory written by Flamingo.save_pretrained (with its tokenizer)")
    p.add_argument("--quantization", choices=["nf4", "int8"], default=None)
    p.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread the model over the GPUs (and CPU memory beyond them) with accelerate")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--seed", type=int, default=0)


def add_prompt_arguments(p) -> None:
    """The prompt and its images, or a few-shot file (``generate`` and ``score``)."""
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text with <image> tokens, one per image")
    prompt.add_argument("--prompt-ids", help="space-separated token ids (models without a tokenizer)")
    prompt.add_argument("--few-shot", help="JSON file with a shared prefix and a batch of queries (its image "
                                           "paths relative to the file)")
    p.add_argument("--image", action="append", default=[],
                   help="image file, one per <image> of --prompt / --prompt-ids (repeatable)")
    p.add_argument("--random-images", type=count_arg("--random-images"), default=0,
                   help="use N random images instead of files (with --prompt / --prompt-ids)")


def load_image(path: str, transform) -> torch.Tensor:
    """An image file -> (3, H, W) pixels through ``transform`` (:func:`fastflamingo.inputs.image_transform`)."""
    return transform(read_image(path))


def _images(sources: list[str], size: int, generator: torch.Generator, transform,
            decoded: dict | None = None) -> torch.Tensor:
    """Paths or "random" -> (N, 1, 3, size, size); ``decoded``: images already read, by path."""
    decoded = decoded or {}

    def pixels(s: str) -> torch.Tensor:
        if s == "random":
            return torch.randn(3, size, size, generator=generator)
        return transform(decoded[s]) if s in decoded else load_image(s, transform)
    return torch.stack([pixels(s) for s in sources])[:, None] if sources else torch.zeros(0, 1, 3, size, size)


def _load(args):
    from ..model import Flamingo
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.device_map is not None and args.device is not None:
        raise ValueError("give --device or --device-map, not both")
    where = dict(device_map=args.device_map) if args.device_map else dict(
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.preset:
        return Flamingo.from_preset(args.preset, dtype=dtype, quantization=args.quantization, seed=args.seed,
                                    **where), None
    model = Flamingo.from_pretrained(args.model, quantization=args.quantization, dtype=dtype, **where)
    from ..convert.io import saved_tokenizer
    return model.eval(), saved_tokenizer(args.model)


def token_ids(values, what: str) -> list[int]:
    """Token ids from a list (a few-shot file's) or a space-separated string (``--prompt-ids``,
    ``--candidate-ids``): integers only, no silent truncation of 5.7 to 5; else an error naming
    ``what`` and the value."""
    items = values.split() if isinstance(values, str) else values
    for v in items:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, str) and v.lstrip("-").isdigit())):
            raise ValueError(f"{what}: {v!r} is not a token id (an integer)")
    return [int(v) for v in items]


def _encode(text, tokenizer, what: str, first: bool = False) -> list[int]:
    """A text's token ids (a list: the ids as given). ``first``: the text starts a sequence (the
    prompt, a few-shot prefix, a query without one) and gets the tokenizer's special tokens (its
    BOS) as ``tokenizer(text)`` adds them, as the evaluation harness does; not a query after a
    prefix, nor a candidate continuation."""
    if isinstance(text, list):
        return token_ids(text, what)
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: give texts as token ids (--prompt-ids, or lists in the "
                         "few-shot file), or save its tokenizer into the model directory "
                         "(tokenizer.save_pretrained(DIR); `fastflamingo convert` writes one)")
    return tokenizer(text, add_special_tokens=first)["input_ids"]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def _few_shot_spec(path: str) -> tuple[dict | None, list[dict]]:
    """The few-shot file's (prefix, queries), each entry {"text": ..., "images": [...]}, or a
    ValueError naming what is wrong with it."""
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory: --few-shot takes a JSON file (see fastflamingo generate --help)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no few-shot file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    queries = spec.get("queries") if isinstance(spec, dict) else None
    if not isinstance(queries, list) or not queries:
        raise ValueError(f'{path}: needs a non-empty list "queries" of {{"text": ..., "images": [...]}} '
                         f"(see fastflamingo generate --help)")
    unknown = sorted(set(spec) - {"prefix", "queries"})
    if unknown:  # a misspelt "prefix" would otherwise run the queries without their demonstrations
        raise ValueError(f'{path}: unknown key(s) {unknown}: the file holds "queries" and, optionally, "prefix"')
    pre = spec.get("prefix")
    for name, entry in [("prefix", pre)] * (pre is not None) + [(f"query {i}", q) for i, q in enumerate(queries)]:
        if not isinstance(entry, dict) or "text" not in entry:
            raise ValueError(f'{path}: {name} must be {{"text": ..., "images": [...]}}, got {entry!r}')
        if set(entry) - {"text", "images"}:  # e.g. a misspelt "images": its images would go unused
            raise ValueError(f'{path}: {name} has unknown key(s) {sorted(set(entry) - {"text", "images"})}: an entry '
                             'is {"text": ..., "images": [...]}')
        images = entry.get("images", [])
        if not isinstance(images, list) or not all(isinstance(s, str) for s in images):
            raise ValueError(f'{path}: {name}\'s "images" must be a list of paths or "random", got '
                             f'{entry["images"]!r}')
        text = entry["text"]
        if not isinstance(text, (str, list)):
            raise ValueError(f'{path}: {name}\'s "text" must be a string (with a tokenizer) or a list of token ids, '
                             f"got {text!r}")
        if not text:
            raise ValueError(f'{path}: {name}\'s "text" is empty: give the text the model reads')
    base = os.path.dirname(os.path.abspath(path))

    def resolved(entry):  # image paths relative to the file, as evaluation's load_examples reads them
        return dict(entry, images=[s if s == "random" else os.path.join(base, os.path.expanduser(s))
                                   for s in entry.get("images", [])])
    return (None if pre is None else resolved(pre)), [resolved(q) for q in queries]


def _check_images(name: str, ids: list[int], images: torch.Tensor, media_token_id: int) -> None:
    """On the command line every image is given for a reason: one per <image> token, exactly."""
    tokens = sum(t == media_token_id for t in ids)
    if tokens != images.shape[0]:
        raise ValueError(f"{name} has {images.shape[0]} image(s) but {tokens} <image> token(s) (id {media_token_id}) "
                         "in its text: give one image per <image> token")


def _check_request(args) -> tuple[tuple[dict | None, list[dict]] | None, dict]:
    """What can be checked before the model loads (minutes, for a 9B one): the flags that go
    together, the prompt, the few-shot file, and that every image file exists and is an image PIL
    reads. Returns the few-shot file's (prefix, queries) (None without one) and the images it
    read, by path (decoded once: :func:`_requests` transforms them once the model loaded)."""
    if args.image and args.random_images:
        raise ValueError("give --image files or --random-images, not both")
    R, beams = getattr(args, "num_return_sequences", 1), getattr(args, "num_beams", 1)  # (score has neither)
    if R > 1 and beams == 1 and not args.do_sample:
        raise ValueError(f"--num-return-sequences {R} with greedy decoding would print one sequence {R} times: add "
                         "--do-sample, or --num-beams >= --num-return-sequences")
    if R > beams > 1:
        raise ValueError(f"--num-return-sequences {R} is more than --num-beams {beams}: beam search keeps "
                         f"{beams} hypotheses per prompt")
    if not getattr(args, "do_sample", True):
        unused = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n, default in
                  (("temperature", 1.0), ("top_k", 50), ("top_p", 1.0), ("min_p", None)) if getattr(args, n) != default]
        if unused:
            warn_caller(f"{', '.join(unused)}: only sampling reads {'it' if len(unused) == 1 else 'them'}; add "
                        "--do-sample (without it the most likely token is taken)")
    if beams == 1 and getattr(args, "length_penalty", 1.0) != 1.0:
        warn_caller(f"--length-penalty {args.length_penalty}: only beam search reads it; add --num-beams N (N > 1)")
    if args.few_shot is not None and (args.image or args.random_images):
        flag = "--image" if args.image else "--random-images"
        raise ValueError(f"{flag} goes with --prompt / --prompt-ids: a few-shot file names its own images (each "
                         'entry\'s "images", paths or "random")')
    if args.prompt_ids is not None:
        if not token_ids(args.prompt_ids, "--prompt-ids"):
            raise ValueError('--prompt-ids is empty: give the prompt\'s token ids, e.g. --prompt-ids "510 17 42"')
    elif args.prompt is not None and not args.prompt:
        raise ValueError('--prompt is empty: give the text the model reads, e.g. --prompt "<image>An image of"')
    spec = _few_shot_spec(args.few_shot) if args.few_shot is not None else None
    images = list(args.image)
    if spec is not None:
        pre, queries = spec
        images += [s for entry in ([pre] if pre else []) + queries for s in entry.get("images", [])]
    decoded = {path: read_image(path) for path in dict.fromkeys(images) if path != "random"}
    return spec, decoded


def _requests(args, spec, tokenizer, size: int, generator, media_token_id: int, transform, decoded=None):
    """-> (prefix ids (1, P) | None, prefix images, query ids (B, T), mask, query images (B, N, 1, 3, s, s))."""
    if spec is not None:
        pre, queries = spec
        # the queries start their sequences only where no prefix comes before them
        rows = [_encode(q["text"], tokenizer, f"query {i}'s text", first=pre is None) for i, q in enumerate(queries)]
        per_row = [_images(q.get("images", []), size, generator, transform, decoded) for q in queries]
        pre_ids = torch.tensor([_encode(pre["text"], tokenizer, "the prefix's text", first=True)]) if pre else None
        pre_images = _images(pre.get("images", []), size, generator, transform, decoded)[None] if pre else None
        if pre:
            if not pre_ids.shape[1]:
                raise ValueError("the prefix's text has no tokens: give the demonstrations' text")
            _check_images("the prefix", pre_ids[0].tolist(), pre_images[0], media_token_id)
        names = [f"query {i}" for i in range(len(rows))]
    else:
        rows = [token_ids(args.prompt_ids, "--prompt-ids") if args.prompt_ids is not None else
                _encode(args.prompt, tokenizer, "--prompt", first=True)]
        sources = args.image or ["random"] * args.random_images
        per_row, pre_ids, pre_images = [_images(sources, size, generator, transform, decoded)], None, None
        names = ["the prompt"]
    for name, row, images in zip(names, rows, per_row):
        if not row:
            raise ValueError(f"{name}'s text has no tokens: give the text the model reads")
        _check_images(name, row, images, media_token_id)
    N = max(x.shape[0] for x in per_row)
    vision = torch.zeros(len(rows), N, 1, 3, size, size)
    for i, x in enumerate(per_row):
        vision[i, :x.shape[0]] = x
    return pre_ids, pre_images, *_left_pad(rows, 0), vision


def _show(tokens: list[int], tokenizer) -> str:
    return tokenizer.decode(tokens) if tokenizer is not None else " ".join(map(str, tokens))


def _until_stop(tokens: list[int], stops) -> list[int]:
    """A generated row up to its first stop token, included: what follows is generate's fill of a
    finished row, not generated text."""
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i + 1]
    return tokens


class _TextStream:
    """The text of the tokens streamed so far, piece by piece, as transformers' ``TextStreamer``
    prints it: each new token decodes with all before it (a word-level or sentencepiece
    tokenizer's spaces come from the tokens around them) and only the new end of the text is
    given; an end in U+FFFD (a character whose bytes are split over tokens) waits for the rest of
    its bytes. The pieces joined are ``tokenizer.decode`` of all the tokens. Without a tokenizer:
    the ids, space-separated."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], 0

    def put(self, token: int) -> str:
        self.tokens.append(token)
        if self.tokenizer is None:
            return f"{token} "
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown:], len(text)
        return new

    def end(self) -> str:
        """What is still held back (bytes that never completed a character print as U+FFFD)."""
        return "" if self.tokenizer is None or not self.tokens else self.tokenizer.decode(self.tokens)[self.shown:]


def prepare(args):
    """Load the model and build the request (``generate`` and ``score``): (model, tokenizer, ids,
    mask, vision_x or None, the prefix's (vision_x or None, ids) or None), on the device where the
    token embeddings compute (the first device of a device map)."""
    from ..distribute import execution_device
    spec, decoded = _check_request(args)
    model, tokenizer = _load(args)
    c = model.config
    device = execution_device(model.lang_encoder.get_input_embeddings()) or torch.device("cpu")
    g = torch.Generator().manual_seed(args.seed)
    pre_ids, pre_images, ids, mask, vision = _requests(args, spec, tokenizer, c.vision.image_size, g, c.media_token_id,
                                                       model.image_processor(),
                                                       decoded)
    if c.pad_token_id is not None:
        ids = ids.masked_fill(mask == 0, c.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    vision = vision.to(device, model.vision_encoder_dtype) if vision.shape[1] else None
    prefix = None if pre_ids is None else (
        pre_images.to(device, model.vision_encoder_dtype) if pre_images.shape[1] else None, pre_ids.to(device))
    return model, tokenizer, ids, mask, vision, prefix


def run(args) -> int:
    from . import _stop_ids, encode_prefix, generate, stream
    model, tokenizer, ids, mask, vision, prefix = prepare(args)
    stops = set(_stop_ids(model, None))  # generate's default stop tokens
    compile_ = {"auto": "auto", "yes": True, "no": False}[args.compile]
    kw = dict(max_new_tokens=args.max_new_tokens, cache=args.cache, compile=compile_)
    sampling = dict(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                    no_repeat_ngram_size=args.no_repeat_ngram_size)
    start, first = time.perf_counter(), None  # first: the first streamed token's time
    with torch.no_grad():
        if prefix is not None:
            kw["prefix"] = encode_prefix(model, *prefix)
        R = args.num_return_sequences
        # seeded here, after the model loaded (which draws random numbers): --seed S samples what
        # torch.manual_seed(S) then model.generate(...) samples
        torch.manual_seed(args.seed)
        if args.num_beams > 1 or ids.shape[0] > 1 or R > 1:
            with warnings.catch_warnings():  # (said above in the flags' names, before the model loaded)
                warnings.filterwarnings("ignore", message="`(do_sample|num_beams)` is set to")
                out = generate(model, vision, ids, mask, num_beams=args.num_beams, length_penalty=args.length_penalty,
                               num_return_sequences=R, **sampling, **kw)
            rows = [_until_stop(row, stops) for row in out[:, ids.shape[1]:].tolist()]
            for i, row in enumerate(rows):
                print(f"[{i // R}{f'.{i % R}' if R > 1 else ''}] {_show(row, tokenizer)}")
            count = sum(map(len, rows))  # as streamed: up to each row's first stop token, included
        else:
            count, text = 0, _TextStream(tokenizer)
            with warnings.catch_warnings():  # (said above in the flags' names)
                warnings.filterwarnings("ignore", message="`(do_sample|num_beams)` is set to")
                for step in stream(model, vision, ids, mask, **sampling, **kw):
                    print(text.put(int(step[0])), end="", flush=True)
                    count += 1
                    first = first if first is not None else time.perf_counter() - start
            print(text.end())
    seconds = time.perf_counter() - start
    detail = (f"first token after {first:.2f} s, then {(count - 1) / max(seconds - first, 1e-9):.1f} tokens/s"
              if first is not None and count > 1 else "prefill included")
    print(f"{count} new tokens in {seconds:.2f} s ({detail}"
          f"{'; the first compiled call compiles' if args.compile == 'yes' else ''})", file=sys.stderr)
    return 0
