"""``fastflamingo evaluate``: few-shot evaluation, as open_flamingo evaluates (VQA accuracy of
3-beam answers, COCO's CIDEr of 3-beam captions, rank classification, Hateful Memes' ROC AUC), on
your model and data, or on a synthetic world that a tiny Flamingo learns on a CPU in a few minutes.

Examples::

    fastflamingo evaluate --synthetic                      # train the tiny model, then 0-8 shots
    fastflamingo evaluate --model DIR --task vqa --queries val.jsonl --support train.jsonl --shots 0 4 8
    fastflamingo evaluate --model DIR --task vqa --vqa-format vqav2 \\
        --queries v2_OpenEnded_mscoco_val2014_questions.json --queries-annotations v2_mscoco_val2014_annotations.json \\
        --queries-images coco/val2014 --support v2_OpenEnded_mscoco_train2014_questions.json \\
        --support-annotations v2_mscoco_train2014_annotations.json --support-images coco/train2014
    fastflamingo evaluate --model DIR --task captioning --karpathy dataset_coco.json --image-dir coco/
    fastflamingo evaluate --model DIR --task classification --queries val.jsonl --support train.jsonl \\
        --class-names-file classes.txt --shots 0 1 2 4
    fastflamingo evaluate --model DIR --task classification --queries imagenet/val --support imagenet/train \\
        --class-names-file imagenet_names.txt
    fastflamingo evaluate --model DIR --task hateful_memes --queries hm/dev_seen.jsonl --support hm/train.jsonl

Data files are JSON lines (paths relative to the file): ``{"image": "cat.jpg", "question": "what
animal?", "answers": ["cat", ...]}`` for VQA, ``{"image": "cat.jpg", "captions": ["...", ...]}``
for captioning (or a Karpathy split file: ``--karpathy``, its "train" images the support, its
"test" images the queries), ``{"image": "cat.jpg", "label": "cat"}`` for classification (or a
folder of class folders, ImageNet's layout: ``--class-names-file`` names its sorted folders, or the
folders are the names), and Hateful Memes' own files. ``--vqa-format`` reads VQAv2's, VizWiz's
and TextVQA's question and annotation files instead (their images in ``--queries-images`` and
``--support-images``; the predictions are also written in the official VQA results format,
``vqa_results_{shots}shot.json``, VizWiz's keyed by image as its server takes them; without
``--queries-annotations``, a split with no published answers, VQAv2's test-dev or test-std, its
images in ``test2015``: predictions only, that file being what the evaluation server takes, with
``--vqa-all-questions`` answering every question of the whole test split, "" where not run, as
VQAv2's server wants even for test-dev; captions from ``--karpathy`` in COCO's,
``captioning_results_{shots}shot.json``). Captioning's CIDEr needs pycocoevalcap and Java
(``pip install 'fastflamingo[eval]'``). Results go to ``--out``: ``results.json`` (every
prediction), ``few_shot.png`` (score by shots).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch


def add_parser(subparsers) -> None:
    from ..cli import count_arg, device_arg
    from .datasets import VQA_DATASETS
    from .prompts import TASKS
    p = subparsers.add_parser("evaluate", help="few-shot evaluation (VQA, captioning, classification, Hateful Memes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true",
                     help="train the tiny preset on a synthetic world of shapes and colours, then evaluate it")
    src.add_argument("--model", help="a directory written by Flamingo.save_pretrained, with its tokenizer")
    p.add_argument("--task", choices=TASKS, default=None, help="with --model (default vqa)")
    p.add_argument("--queries", help="the examples to answer: a JSON-lines file (or a questions file with "
                                     "--vqa-format, a folder of class folders for classification)")
    p.add_argument("--support", help="the examples the demonstrations are drawn from, as --queries")
    p.add_argument("--vqa-format", choices=VQA_DATASETS, default=None,
                   help="--queries and --support are that dataset's question files (VQAv2's layout), with "
                        "--queries-annotations, --queries-images, --support-annotations and --support-images")
    p.add_argument("--vqa-all-questions", metavar="FILE",
                   help="--vqa-format without --queries-annotations: the whole test split's questions file (VQAv2: "
                        "v2_OpenEnded_mscoco_test2015_questions.json, which the server wants answered even for "
                        "test-dev; VizWiz: its test questions): the results file answers every question of it, "
                        "\"\" for those not run, as open_flamingo's fill_vqa_testdev_results does")
    for split in ("queries", "support"):
        p.add_argument(f"--{split}-annotations", help=f"--vqa-format: the annotation file of --{split}"
                       + (" (none: a split with no published answers, e.g. VQAv2 test-dev: predictions only)"
                          if split == "queries" else ""))
        p.add_argument(f"--{split}-images", help=f"--vqa-format: the image folder of --{split}")
    p.add_argument("--karpathy", help="captioning: a Karpathy split file (dataset_coco.json, dataset_flickr30k.json) "
                                      "instead of --queries and --support; with --image-dir")
    p.add_argument("--image-dir", help="--karpathy: the folder its images' filepath/filename are under")
    p.add_argument("--class-names-file", help="classification: the class names, one per line")
    p.add_argument("--shots", type=count_arg("--shots"), nargs="+", default=None,
                   help="numbers of demonstrations (default: 0 4 8; --synthetic: 0 1 2 4 8)")
    p.add_argument("--text-demos-at-zero", type=count_arg("--text-demos-at-zero"), default=None,
                   help="text-only demonstrations in a zero-shot prompt (default 2, as open_flamingo; "
                        "--synthetic: 0)")
    p.add_argument("--demonstrations", choices=["random", "similar"], default="random",
                   help="drawn at random for each query, or the support images most like the query's "
                        "(open_flamingo's RICES, on the model's own visual tokens)")
    p.add_argument("--shared-demonstrations", action="store_true",
                   help="one draw of demonstrations for all queries, encoded once (few-shot prefix)")
    p.add_argument("--prompt-ensembling", action="store_true",
                   help="classification, hateful_memes: average the class log-probabilities over min(6, k!) "
                        "orders of the demonstrations (open_flamingo's --classification_prompt_ensembling)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per call (default 8; --synthetic: 32)")
    p.add_argument("--num-beams", type=int, default=None, help="beam search of the generated tasks (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 5 for vqa, 20 for captioning")
    p.add_argument("--length-penalty", type=float, default=None,
                   help="beam search's length penalty, generated tasks (default 0.0)")
    p.add_argument("--vqa-script", choices=["open_flamingo", "official"], default=None,
                   help="vqa: how the accuracy normalizes the human answers: as open_flamingo's copy of the VQA "
                        "script (default: the numbers OpenFlamingo published) or the VQA challenge's own script "
                        "(they differ only where answers are not normalized already: capitals, number words)")
    p.add_argument("--seed", type=int, default=42, help="the draw of demonstrations")
    p.add_argument("--steps", type=count_arg("--steps"), default=None, help="--synthetic: training steps (1500)")
    p.add_argument("--num-queries", type=count_arg("--num-queries"), default=None,
                   help="--synthetic: queries per attribute (200)")
    p.add_argument("--save", help="--synthetic: also save the trained model and its tokenizer here")
    p.add_argument("--quantization", choices=["nf4", "int8"], default=None)
    p.add_argument("--device", type=device_arg, default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--out", default="evaluation-results", help="directory for results.json and few_shot.png")
    p.set_defaults(func=run)


_VQA_FILES = ("queries_annotations", "queries_images", "support_annotations", "support_images")


def _check(args) -> None:
    from .prompts import GENERATED
    for name in ("batch_size", "num_beams", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.synthetic:
        given = [f"--{n.replace('_', '-')}" for n in ("queries", "support", "class_names_file", "quantization", "task",
                                                      "karpathy", "image_dir", "vqa_format", "vqa_script",
                                                      "vqa_all_questions", *_VQA_FILES)
                 if getattr(args, n)]
        # (its task ranks class names: nothing is generated)
        given += [f"--{n.replace('_', '-')}" for n in ("num_beams", "max_new_tokens", "length_penalty")
                  if getattr(args, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not used with --synthetic (it makes its own data and model)")
        for name in ("steps", "num_queries"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        return
    given = [f"--{n.replace('_', '-')}" for n in ("steps", "num_queries", "save") if getattr(args, n) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: only used with --synthetic")
    args.task = args.task or "vqa"
    folders = [n for n in ("queries", "support") if getattr(args, n) and os.path.isdir(getattr(args, n))]
    if folders and (args.task != "classification" or len(folders) != (2 if args.support else 1)):
        raise ValueError(f"--{folders[0]} is a folder: folders of class folders are for --task classification, "
                         "both --queries and --support (else JSON-lines files)")
    if args.task == "classification" and not args.class_names_file and not folders:
        raise ValueError("--task classification ranks class names: pass --class-names-file (one per line), "
                         "or folders of class folders as --queries and --support")
    if args.class_names_file and args.task in GENERATED:
        raise ValueError(f"--class-names-file is for classification and hateful_memes, not --task {args.task}")
    if args.vqa_script and args.task != "vqa":
        raise ValueError(f"--vqa-script is for --task vqa, not --task {args.task}")
    if args.prompt_ensembling and args.task in GENERATED:
        raise ValueError(f"--prompt-ensembling averages class rankings: it is for classification and hateful_memes, "
                         f"not --task {args.task}")
    for name in ("max_new_tokens", "num_beams", "length_penalty"):
        if getattr(args, name) is not None and args.task not in GENERATED:
            raise ValueError(f"--{name.replace('_', '-')} is for the generated tasks (vqa, captioning), not --task "
                             f"{args.task} (it ranks class names: nothing is generated)")
    if args.karpathy:
        if args.task != "captioning":
            raise ValueError(f"--karpathy holds captions: use it with --task captioning, not --task {args.task}")
        if args.queries or args.support:
            raise ValueError("--karpathy gives both the queries (its test split) and the support (its train split): "
                             "drop --queries and --support")
        if not args.image_dir or not os.path.isdir(args.image_dir):
            raise ValueError(f"--karpathy needs --image-dir, the folder of its images, got {args.image_dir!r}")
    elif args.image_dir:
        raise ValueError("--image-dir is for --karpathy; JSON-lines files give image paths relative to themselves")
    else:
        # (no demonstration shown, at 0 shots with --text-demos-at-zero 0: no support needed)
        from .harness import _most
        demos = _most(_shots(args), _text_demos(args))
        missing = [f"--{n}" for n in ("queries", "support") if not getattr(args, n) and (n == "queries" or demos)]
        if missing:
            raise ValueError(f"evaluating --model needs {' and '.join(missing)} (JSON-lines files)"
                             + (", or --karpathy" if args.task == "captioning" else ""))
    if args.vqa_format:
        if args.task != "vqa":
            raise ValueError(f"--vqa-format reads VQA files: use it with --task vqa, not --task {args.task}")
        missing = [f"--{n.replace('_', '-')}" for n in ("queries", "support", *_VQA_FILES)
                   if not getattr(args, n) and n != "queries_annotations"]  # (none: predictions only)
        if missing:
            raise ValueError(f"--vqa-format needs {', '.join(missing)}: the questions (--queries, --support), "
                             "annotations and image folder of each split (--queries-annotations may be left out: "
                             "a split with no published answers, predictions only)")
        for name in ("queries_images", "support_images"):
            if not os.path.isdir(getattr(args, name)):
                raise FileNotFoundError(f"--{name.replace('_', '-')}: no folder {getattr(args, name)!r}")
        if args.vqa_all_questions and args.queries_annotations:
            raise ValueError("--vqa-all-questions fills a results file for the evaluation server, of a split with no "
                             "published answers: drop it, or --queries-annotations (which scores the queries here)")
        if args.vqa_all_questions and not os.path.isfile(args.vqa_all_questions):
            raise FileNotFoundError(f"--vqa-all-questions: no file {args.vqa_all_questions!r}")
    else:
        given = [f"--{n.replace('_', '-')}" for n in (*_VQA_FILES, "vqa_all_questions") if getattr(args, n)]
        if given:
            raise ValueError(f"{', '.join(given)}: only used with --vqa-format")
    for name in ("queries", "support", "class_names_file", "karpathy", "queries_annotations", "support_annotations"):
        path = getattr(args, name)
        if path and not os.path.isfile(path) and not (name in ("queries", "support") and name in folders):
            raise FileNotFoundError(f"--{name.replace('_', '-')}: no file {path!r}")


def run(args) -> int:
    _check(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    if args.synthetic:
        report = _synthetic(args, device, dtype)
    else:
        report = _user_data(args, device, dtype)
    path = _write_report(args.out, report)
    from .plot import few_shot_plot
    png = few_shot_plot(report, os.path.join(args.out, "few_shot.png"))
    print(f"wrote {path}" + (f", {png}" if png else ""))
    return 0


def _write_report(out: str, report: dict) -> str:
    """``out``/results.json, replaced whole (a reader, or a run killed meanwhile, never sees half)."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    return path


def _table(report: dict) -> str:
    shots = sorted({r["shots"] for rs in report["results"].values() for r in rs})
    lines = [f"{'shots':<10}" + "".join(f"{s:>8}" for s in shots)]
    for name, rs in report["results"].items():
        by = {r["shots"]: r["score"] for r in rs if r["score"] is not None}  # (None: predictions only)
        lines.append(f"{name:<10}" + "".join(f"{by[s]:>8.1f}" if s in by else f"{'-':>8}" for s in shots))
        # VQA per answer type (the official evaluation's perAnswerType), where the data carry it
        types = {r["shots"]: (r.get("breakdown") or {}).get("answer_type", {}) for r in rs}
        for t in sorted({t for by_type in types.values() for t in by_type}):
            lines.append(f"  {t:<8}" + "".join(f"{types[s][t]:>8.1f}" if t in types.get(s, {}) else f"{'-':>8}"
                                             for s in shots))
    return "\n".join(lines)


def _meta(device) -> dict:
    from ..bench.env import device_name, versions
    return {"device": device_name(device), "versions": versions(), "torch_threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def _synthetic(args, device, dtype) -> dict:
    from ..model import Flamingo
    from . import synthetic
    from .harness import evaluate
    shots = args.shots or [0, 1, 2, 4, 8]
    zero = 0 if args.text_demos_at_zero is None else args.text_demos_at_zero
    model = Flamingo.from_preset("tiny", device=device, dtype=dtype, seed=args.seed)
    tok = synthetic.tokenizer(model.config.media_token_id, model.config.eoc_token_id)
    start = time.perf_counter()
    steps = 1500 if args.steps is None else args.steps
    num_queries = 200 if args.num_queries is None else args.num_queries
    if not sys.stderr.isatty():  # (a terminal shows the progress bars instead)
        print(f"training the tiny preset {steps} steps on the synthetic world (about 3 minutes on 2 CPU cores "
              f"at 1500), then {num_queries} queries per attribute ...", flush=True)
    losses = synthetic.train(model, tok, steps=steps, seed=args.seed)
    trained = time.perf_counter() - start
    if args.save:
        model.save_pretrained(args.save)
        tok.save_pretrained(args.save)
    results = {}
    for i, attribute in enumerate(synthetic.ATTRIBUTES):
        queries = synthetic.examples(num_queries, attribute, seed=10_000 + i, size=model.config.vision.image_size)
        support = synthetic.examples(64, attribute, seed=20_000 + i, size=model.config.vision.image_size)
        rs = evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=shots,
                      seed=args.seed, batch_size=args.batch_size or 32, text_demos_at_zero=zero,
                      demonstrations=args.demonstrations, shared_demonstrations=args.shared_demonstrations,
                      prompt_ensembling=args.prompt_ensembling)
        results[attribute] = [r.to_dict() for r in rs]
    report = {"kind": "synthetic", "metric": "accuracy (%), rank classification over "
              f"{len(synthetic.NAMES)} names", "steps": steps, "train_seconds": trained,
              "final_loss": sum(losses[-20:]) / len(losses[-20:]), "text_demos_at_zero": zero,
              "results": results, **_meta(device)}
    print(f"synthetic few-shot world: the tiny preset trained {steps} steps in {trained:.0f} s "
          f"(loss {report['final_loss']:.3f}) on {report['device']}; {report['metric']}; "
          f"{num_queries} queries per attribute; a zero-shot prompt has {zero} text-only demonstrations, "
          "and without any a model can only guess which attribute is asked (50% at best)")
    print(_table(report))
    return report


def _load(args):
    """(queries, support, class names or None) from the files the arguments name."""
    from .datasets import load_examples, load_image_folder, load_karpathy, load_vqa
    class_names = None
    if args.class_names_file:
        with open(args.class_names_file) as f:
            class_names = [line.strip() for line in f if line.strip()]
        if not class_names:
            raise ValueError(f"{args.class_names_file} holds no class names (one per line)")
    if args.karpathy:
        queries, support = (load_karpathy(args.karpathy, args.image_dir, split, check_images=True)
                            for split in ("test", "train"))
    elif args.vqa_format:
        queries, support = (load_vqa(getattr(args, s), getattr(args, f"{s}_annotations"), getattr(args, f"{s}_images"),
                                     args.vqa_format) for s in ("queries", "support"))
    elif os.path.isdir(args.queries):
        queries, class_names = load_image_folder(args.queries, class_names)
        if args.support is None:  # (no demonstrations: _check)
            return queries, [], class_names
        support, _ = load_image_folder(args.support, class_names)
        folders = [sorted({e.extra["folder"] for e in examples}) for examples in (queries, support)]
        if folders[0] != folders[1]:
            raise ValueError(f"--queries {args.queries} and --support {args.support} must hold the same class folders; "
                             f"only in one: {sorted(set(folders[0]) ^ set(folders[1]))[:10]}")
    else:
        queries, support = (load_examples(path, args.task, check_images=True) if path else []
                            for path in (args.queries, args.support))
    return queries, support, class_names


def _user_data(args, device, dtype) -> dict:
    from ..convert.io import saved_tokenizer
    from ..convert.pretrained import check_model_directory
    from ..model import Flamingo
    from .harness import evaluate
    queries, support, class_names = _load(args)  # the data's errors first (they need no model)
    check_model_directory(args.model)
    tok = saved_tokenizer(args.model, required_by="fastflamingo evaluate --model")  # before the weights load
    model = Flamingo.from_pretrained(args.model, quantization=args.quantization, dtype=dtype, device=device).eval()
    transform = model.image_processor()
    _clear_official_results(args.out)
    report = {"kind": args.task, "model": args.model, "queries": args.queries or f"{args.karpathy}: test",
              "support": args.support or (f"{args.karpathy}: train" if args.karpathy else None), "metric": None,
              "results": {args.task: []},
              **_meta(device)}

    def done(r):  # each number of shots saved as it finishes: a later failure loses only its own
        report["metric"] = r.metric
        report["results"][args.task].append(r.to_dict())
        path = _write_report(args.out, report)
        written = _official_results(args, queries, [r])
        scored = f"{r.metric} {r.score:.2f}" if r.score is not None else "predictions only (no references)"
        print(f"  {r.shots}-shot: {scored} ({r.seconds:.0f} s); saved to {path}"
              + "".join(f", {w}" for w in written), flush=True)

    rs = evaluate(model, tok, queries, support, task=args.task, shots=_shots(args),
                  image_processor=transform, class_names=class_names, seed=args.seed, batch_size=args.batch_size or 8,
                  num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, length_penalty=args.length_penalty,
                  demonstrations=args.demonstrations, shared_demonstrations=args.shared_demonstrations,
                  prompt_ensembling=args.prompt_ensembling,
                  text_demos_at_zero=_text_demos(args),
                  vqa_script=args.vqa_script, on_result=done)
    if rs[0].score is None:
        print(f"{args.task}: {len(queries)} queries with no references, demonstrations from {len(support)}, on "
              f"{report['device']}: predictions only" + (", in the evaluation server's format: "
                                                          + ", ".join(_official_paths(args, rs)) if args.vqa_format else ""))
        return report
    print(f"{args.task}: {len(queries)} queries, demonstrations from {len(support)}; {rs[0].metric} (x 100) "
          f"on {report['device']}")
    print(_table(report))
    return report


def _shots(args) -> list[int]:
    """--shots, or open_flamingo's 0, 4 and 8 (the user-data evaluation's)."""
    return args.shots or [0, 4, 8]


def _text_demos(args) -> int:
    """--text-demos-at-zero, or open_flamingo's (the user-data evaluation's)."""
    from .prompts import ZERO_SHOT_TEXT_DEMOS
    return ZERO_SHOT_TEXT_DEMOS if args.text_demos_at_zero is None else args.text_demos_at_zero


def _official_results(args, queries, rs) -> list[str]:
    """Each number of shots' predictions in the benchmark's own results format, for its official
    evaluation script and server: VQA's ``[{"question_id", "answer"}]`` (``--vqa-format``;
    VizWiz's ``[{"image", "answer"}]``, the image's file name), COCO captions' ``[{"image_id",
    "caption"}]`` (``--karpathy``); with ``--vqa-all-questions``, every question of that file
    answered, ``""`` where it was not run. The paths written."""
    if args.vqa_format:
        name, value = "vqa_results", "answer"
        key, field = ("image", "image_id") if args.vqa_format == "vizwiz" else ("question_id", "question_id")
    elif args.karpathy:
        name, key, field, value = "captioning_results", "image_id", "image_id", "caption"
    else:
        return []
    everything = _all_questions(args.vqa_all_questions, field) if getattr(args, "vqa_all_questions", None) else None
    os.makedirs(args.out, exist_ok=True)
    paths = _official_paths(args, rs)
    for r, path in zip(rs, paths):
        answers = {q.extra[field]: p for q, p in zip(queries, r.predictions)}
        if everything is not None:
            strays = [k for k in answers if k not in everything]
            if strays:
                raise ValueError(f"--vqa-all-questions {args.vqa_all_questions} lacks {len(strays)} of the queries' "
                                 f"{field}s (e.g. {strays[0]!r}): is it the questions file of the same split?")
            answers = {k: answers.get(k, "") for k in everything}
        with open(path, "w") as f:
            json.dump([{key: k, value: p} for k, p in answers.items()], f)
    return paths


def _all_questions(path: str, field: str) -> list:
    """The ``field`` (question_id, or VizWiz's image_id) of every question of a VQA questions file,
    in its order, once each."""
    from .datasets import _json
    qs = _json(path, "questions", "VQA questions")
    bad = next((n for n, q in enumerate(qs) if not isinstance(q, dict) or field not in q), None)
    if bad is not None:
        raise ValueError(f"{path}: questions[{bad}] has no {field!r}")
    return list(dict.fromkeys(q[field] for q in qs))


def _clear_official_results(out: str) -> None:
    """An earlier run's official results files in ``out`` go: results.json is replaced whole, so
    one of another number of shots left beside it would be read as this run's."""
    import glob
    for path in glob.glob(os.path.join(glob.escape(out), "*_results_*shot.json")):
        if os.path.basename(path).startswith(("vqa_results_", "captioning_results_")):
            os.remove(path)


def _official_paths(args, rs) -> list[str]:
    name = "vqa_results" if args.vqa_format else "captioning_results"
    return [os.path.join(args.out, f"{name}_{r.shots}shot.json") for r in rs]
