"""Few-shot evaluation: prompts of k demonstrations and a query, batched through ``generate`` or
``score``, answers post-processed and scored as the benchmarks' scripts score them.

It follows open_flamingo's evaluation (``open_flamingo/eval/evaluate.py``) so its numbers can be
set beside the published ones: the same prompts (:mod:`.prompts`), demonstrations drawn at random
from a support set for every query, two text-only demonstrations at zero shots, and per task:

- ``"vqa"``: 3-beam search of at most 5 new tokens with no length penalty, the answer cut at the
  next "Question" / "Answer" / "Short", the VQA accuracy of the official script (:mod:`.metrics`).
- ``"captioning"``: 3-beam search of at most 20 new tokens, no length penalty, the caption cut
  at the next "Output", CIDEr as the COCO caption evaluation computes it (x 100, as reported).
- ``"classification"``: the class names ranked by their mean log-probability per token after
  the prompt (open_flamingo's ``get_rank_classifications`` with ``normalize_length=True``),
  every prompt encoded once for all the classes (:func:`fastflamingo.generation.score`); accuracy.
- ``"hateful_memes"``: the same ranking of "no" and "yes"; the ROC AUC of the probability of
  "yes" (the softmax of the two log-probabilities), x 100.

``demonstrations="similar"`` picks for each query the support examples whose images are most
like its own instead (open_flamingo's RICES, retrieval-based in-context example selection; the
features here are the model's own visual tokens, averaged, where open_flamingo loads a separate
CLIP), the most similar last.

``shared_demonstrations=True`` draws one set of demonstrations for all queries instead, encoded
once as a few-shot prefix (:func:`fastflamingo.generation.encode_prefix`) and reused by every
batch: the way to evaluate many queries against the same k examples quickly.

``prompt_ensembling=True`` (the ranked tasks) shows each query's demonstrations in min(6, k!)
orders and ranks the classes by their log-probabilities averaged over the orders (open_flamingo's
``--classification_prompt_ensembling``; k counts the text-only demonstrations at zero shots).
"""
from __future__ import annotations

import itertools
import math
import os
import random
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..checks import check_count, is_int
from ..generation.score import check_distinct
from ..inputs import image_tensor
from . import metrics
from .prompts import (GENERATED, HATEFUL_MEMES_CLASSES, TASKS, ZERO_SHOT_TEXT_DEMOS, Example,
                      DemonstrationSampler, demonstrations_text, few_shot_text, positions_by_image, query)

DEMONSTRATIONS = ("random", "similar")
METRICS = {"vqa": "vqa_accuracy", "captioning": "cider", "classification": "accuracy", "hateful_memes": "roc_auc"}
MAX_NEW_TOKENS = {"vqa": 5, "captioning": 20}  # open_flamingo's evaluate_vqa and evaluate_captioning
ENSEMBLE_ORDERINGS = 6  # open_flamingo's classification prompt ensembling: min(6, k!) orders


@dataclass
class Result:
    """One number of shots: the task's score (x 100: percent, or CIDEr as papers report it) and
    every query's prediction; for Hateful Memes also each query's probability of "yes";
    ``orderings``: how many orders of the demonstrations each query's ranking averaged over;
    ``breakdown``: VQA's accuracy (x 100) per ``"answer_type"`` and per ``"question_type"``, as the
    official evaluation reports them, where the queries carry those (:func:`.datasets.load_vqa`).
    Queries with no references (``answers=None``: VQAv2 test-dev) get predictions only:
    ``score``, ``references`` and ``breakdown`` are None."""
    task: str
    shots: int
    score: float | None
    metric: str
    predictions: list[str]
    references: list[list[str]] | None
    seconds: float
    positive_probabilities: list[float] | None = None
    orderings: int = 1
    breakdown: dict[str, dict[str, float]] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _batch_inputs(model, tokenizer, image_processor, texts: list[str], images: list[list], device, dtype,
                  first: bool = True):
    """Left-padded ids and mask, and vision_x (B, N, F, C, H, W) (None when no row has images).
    ``first``: the texts start their sequences (the tokenizer's BOS); not after a prefix."""
    enc = tokenizer(texts, return_tensors="pt", padding="longest", padding_side="left",
                    add_special_tokens=first)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if not any(images):
        return None, ids, mask
    rows = [torch.stack([image_tensor(im, image_processor) for im in row]) for row in images]
    n = {r.shape[0] for r in rows}
    if len(n) != 1:
        raise ValueError(f"every prompt of a batch must have as many images, got {sorted(n)}")
    return torch.stack(rows).to(device=device, dtype=dtype), ids, mask


def _draw(queries, pick, shots, text_demos_at_zero, shared):
    """(each query's demonstrations, or None with ``shared``; the one draw for all with ``shared``,
    else None; how many a prompt shows), drawn by ``pick(i, query, k)``."""
    k = text_demos_at_zero if shots == 0 else shots
    if shared:
        return None, pick(None, None, k) if k else None, k
    return [pick(i, q, k) if k else [] for i, q in enumerate(queries)], None, k


def _orderings(k: int, ensemble: bool, seed: int) -> list[tuple[int, ...]]:
    """The orders the demonstrations are shown in: the drawn order alone, or with ``ensemble``
    min(6, k!) distinct orders, the drawn one first (open_flamingo's prompt ensembling, which
    shuffles the demonstrations min(6, k!) times, independently, so an order may repeat there)."""
    identity = tuple(range(k))
    if not ensemble or k < 2:
        return [identity]
    if math.factorial(k) <= ENSEMBLE_ORDERINGS:
        return [identity] + [p for p in itertools.permutations(range(k)) if p != identity]
    rng, out = random.Random(seed), [identity]
    while len(out) < ENSEMBLE_ORDERINGS:
        p = tuple(rng.sample(range(k), k))
        if p not in out:
            out.append(p)
    return out


def _prompts(task, queries, demos, order, text_only):
    """(texts, images) per query, its demonstrations (``demos[i]``; none with a shared prefix)
    shown in ``order``."""
    texts, images = [], []
    for i, q in enumerate(queries):
        shown = [demos[i][j] for j in order] if demos is not None and demos[i] else []
        texts.append(few_shot_text(task, shown, q, text_only=text_only))
        images.append(([] if text_only else [d.image for d in shown]) + [q.image])
    return texts, images


@torch.no_grad()
def image_features(model, examples: list[Example], image_processor=None, batch_size: int = 32,
                   progress: bool | None = False, desc: str = "image features") -> torch.Tensor:
    """(len(examples), D) unit vectors: each image's visual tokens (the resampler's output),
    averaged. What ``demonstrations="similar"`` compares. ``progress``: a tqdm bar (None: when
    stderr is a terminal)."""
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False,
                  disable=None if progress is None else not progress):
        vx = torch.stack([image_tensor(e.image, image_processor) for e in examples[i:i + batch_size]])[:, None]
        visual = model.encode_vision(vx.to(device=model.device, dtype=model.vision_encoder_dtype))
        out.append(torch.nn.functional.normalize(visual.float().mean((1, 2)), dim=-1).cpu())
    return torch.cat(out)


def _picker(model, image_processor, queries, support, how, seed, batch_size, most: int, progress=False):
    """``pick(i, query, k)``: k <= ``most`` demonstrations for query i (query None: one draw for
    all queries, of none of their images). ``"random"``: drawn at random (never one of the query's
    own image: :class:`DemonstrationSampler`). ``"similar"``: the k support examples whose images are most
    like the query's (cosine of :func:`image_features`), the most similar last, next to the
    query, as open_flamingo's RICES orders them; never one of the query's own image (with
    another question), which would always be the nearest."""
    if how == "random":
        sampler = DemonstrationSampler(support, random.Random(seed))
        return lambda i, q, k: sampler.draw_shared(k, queries) if q is None else sampler.draw(k, q)
    qf = image_features(model, queries, image_processor, batch_size, progress, "image features: queries")
    sf = image_features(model, support, image_processor, batch_size, progress, "image features: support")
    # a support example of the query's own image (any copy, with any question) is not its demonstration: its
    # features are the query's, so it would be the nearest, its answer to another question about the same image shown
    where = positions_by_image(support)
    own = [where.get(q.image_key, []) for q in queries]
    nearest = nearest_support(qf, sf, own, most)

    def pick(i, q, k):
        if k > len(support) - len(own[i]):
            raise ValueError(f"{k} shots need at least {k} support examples besides the query's image, "
                             f"the support set has {len(support)} ({len(own[i])} of them of the query's image)")
        if k > nearest.shape[1]:
            raise ValueError(f"{k} shots: the nearest {nearest.shape[1]} support examples were kept (most={most})")
        return [support[j] for j in reversed(nearest[i, :k].tolist())]
    return pick


def nearest_support(qf: torch.Tensor, sf: torch.Tensor, own: list[list[int]], most: int,
                    block: int = 1 << 24) -> torch.Tensor:
    """(Q, min(most, S)) support positions per query, the most similar (``qf @ sf.T``) first,
    ties in support order (a stable descending sort's first ``most``), never a position in
    ``own[i]``. Computed per block of queries of about ``block`` similarities, keeping top-k
    only: the whole (Q, S) matrix and its argsort would take 12 * Q * S bytes (1 TB for VQAv2)."""
    m = min(most, sf.shape[0])
    rows = max(1, block // max(1, sf.shape[0]))
    out = []
    for a in range(0, qf.shape[0], rows):
        sim = qf[a:a + rows] @ sf.T
        for r, js in enumerate(own[a:a + rows]):
            sim[r, js] = float("-inf")
        out.append(_stable_top(sim, m))
    return torch.cat(out) if out else torch.empty(0, m, dtype=torch.long)


def _stable_top(sim: torch.Tensor, m: int) -> torch.Tensor:
    """Each row's first ``m`` positions of ``sim.argsort(-1, descending=True, stable=True)``."""
    if m == 0:
        return torch.empty(sim.shape[0], 0, dtype=torch.long)
    last = sim.topk(m, dim=-1).values[:, -1:]  # the m-th largest value of each row
    above, tied = sim > last, sim == last
    need = m - above.sum(-1, keepdim=True)  # how many of the tied values make the first m: the earliest
    take = above | (tied & (tied.cumsum(-1) <= need))
    idx = take.nonzero()[:, 1].view(sim.shape[0], m)  # positions in support order
    return idx.gather(1, sim.gather(1, idx).argsort(dim=-1, descending=True, stable=True))


def _check(task, queries, support, shots_list, tokenizer, class_names, text_demos_at_zero=ZERO_SHOT_TEXT_DEMOS,
           demonstrations="random", shared=False, model=None):
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not queries:
        raise ValueError("no queries to evaluate")
    for s in shots_list:
        if not is_int(s) or s < 0:
            raise ValueError(f"shots must be integers >= 0, got {s!r}")
    _check_support(queries, support, shots_list, text_demos_at_zero, demonstrations, shared)
    _check_references(queries, support if _most(shots_list, text_demos_at_zero) else [])
    _check_images(queries, support)
    if task == "classification" and not class_names:
        raise ValueError("classification ranks the class names: pass class_names")
    if task == "captioning" and queries[0].answers is not None:
        metrics.check_cider_available()  # before any generation, not after it
    if task == "hateful_memes" and len(class_names) != 2:
        raise ValueError(f"hateful_memes ranks two class names, the second the hateful one, got {class_names!r}")
    if task == "vqa" and queries[0].answers is not None:
        few = [i for i, q in enumerate(queries) if len(q.answers) < 4]
        if few:
            from ..warn import warn_caller
            n = len(queries[few[0]].answers)
            warn_caller(f"{len(few)} of {len(queries)} VQA queries have fewer than 4 reference answers "
                        f"(queries[{few[0]}] has {n}): VQA accuracy averages min(1, matches / 3) over the answers "
                        f"left out one at a time, so an exact answer scores at most "
                        f"{100 * min(1.0, (n - 1) / 3):.0f}% there. It is "
                        "made for VQAv2's 10 human answers; single-answer data is scored as task='classification' "
                        "scores (exact match), not by this")
    if task not in GENERATED:
        repeated = sorted({c for c in class_names if class_names.count(c) > 1})
        if repeated:
            raise ValueError(f"class names must be distinct (a ranking cannot tell copies apart): {repeated[:10]} "
                             "appear more than once")
        # a query whose label is no class name could never be right: an error, not a lower accuracy
        # (classification's accuracy matches any answer, stripped and lowercased; Hateful Memes' AUC the label)
        if task == "classification":
            # ... so names equal that way are one class to the metric, two to the ranking: refused
            folded: dict[str, list[str]] = {}
            for c in class_names:
                folded.setdefault(c.strip().lower(), []).append(c)
            same = [v for v in folded.values() if len(v) > 1]
            if same:
                raise ValueError(f"class names {same[:5]} differ only in case or surrounding spaces: the accuracy "
                                 "compares answers stripped and lowercased, so a wrong one of them would count as "
                                 "right; merge them, or rename one")
            names = {c.strip().lower() for c in class_names}
            other = sorted({q.answers[0] for q in queries
                            if q.answers is not None and not any(a.strip().lower() in names for a in q.answers)})
        else:
            other = sorted({q.answers[0] for q in queries if q.answers is not None} - set(class_names))
        if other:
            shown = class_names if len(class_names) <= 10 else f"{class_names[:10]} (of {len(class_names)})"
            raise ValueError(f"{task} queries' labels must be class names {shown}, got {other[:10]}")
    if task == "hateful_memes" and queries[0].answers is not None:  # (ROC AUC: found after every prompt ran)
        labels = {q.answers[0] for q in queries}
        if len(labels & set(class_names)) < 2:
            raise ValueError(f"hateful_memes scores the ROC AUC of {class_names[-1]!r}, which needs queries of both "
                             f"labels {class_names}; all {len(queries)} are {sorted(labels)}")
    if model is not None and model.config.cross_attention.style == "idefics":
        raise ValueError("the evaluation's prompts are open_flamingo's (<image>, each demonstration ended by "
                         "<|endofchunk|>, generation stopped there), which this IDEFICS model was not trained on "
                         "(its images sit between <fake_token_around_image> tokens, its tokenizer has no "
                         "<|endofchunk|>): the harness evaluates open_flamingo-style models. For an IDEFICS model, "
                         "build its prompts with IDEFICS's processor and call model.generate / "
                         "model.score on them")
    vocab = tokenizer.get_vocab()
    for tok, field in (("<image>", "media_token_id"), ("<|endofchunk|>", "eoc_token_id")):
        if tok not in vocab:
            raise ValueError(f"the tokenizer has no {tok!r} token: use the tokenizer the model was built with "
                             "(create_model_and_transforms adds it)")
        want = None if model is None else getattr(model.config, field, None)
        if want is not None and vocab[tok] != want:
            raise ValueError(f"the tokenizer's {tok!r} is id {vocab[tok]}, the model's config.{field} is {want}: "
                             "use the tokenizer the model was built with (saved beside it)")
    _check_examples(task, queries, support if _most(shots_list, text_demos_at_zero) else [])


def _most(shots_list, text_demos_at_zero) -> int:
    """The most demonstrations a prompt shows (zero shots: ``text_demos_at_zero`` text-only ones)."""
    return max((text_demos_at_zero if k == 0 else k) for k in shots_list) if shots_list else 0


def _check_examples(task, queries, support) -> None:
    """Every query and demonstration has what its prompt needs (a VQA question, a meme's text),
    before the first prompt runs; the first that does not is named."""
    for name, examples in (("queries", queries), ("support", support)):
        for i, ex in enumerate(examples):
            try:
                query(task, ex)
            except ValueError as e:
                image = str(ex.image) if isinstance(ex.image, (str, os.PathLike)) else type(ex.image).__name__
                raise ValueError(f"{name}[{i}] (image {image}{', ' + repr(ex.extra) if ex.extra else ''}): {e}") from None


def _check_references(queries, support) -> None:
    """The queries have references all (scored) or none (predictions only: a split with no
    published answers); every support example that may be shown has them (a demonstration
    shows its answer)."""
    missing = [i for i, q in enumerate(queries) if q.answers is None]
    if missing and len(missing) < len(queries):
        given = next(i for i, q in enumerate(queries) if q.answers is not None)
        raise ValueError(f"queries[{missing[0]}] has no references (answers=None) but queries[{given}] has: "
                         f"{len(missing)} of {len(queries)} queries have none. Evaluate a split with references "
                         "(scored), or one without (predictions only), not a mix")
    bare = next((i for i, e in enumerate(support) if e.answers is None), None)
    if bare is not None:
        raise ValueError(f"support[{bare}] has no references (answers=None), but demonstrations show their answers: "
                         "draw them from a split with references (its annotations), or evaluate at 0 shots with "
                         "text_demos_at_zero=0")


def _check_support(queries, support, shots_list, text_demos_at_zero, demonstrations, shared) -> None:
    """The most demonstrations a prompt shows (zero shots: ``text_demos_at_zero`` text-only ones)
    fit in the support set besides the query's image (a query is never shown a support example
    of its own image; one shared draw is of none of the queries' images): found before the
    smaller shots run."""
    need = _most(shots_list, text_demos_at_zero)
    if not need:
        return
    if shared:
        images = {q.image_key for q in queries}
        have = sum(s.image_key not in images for s in support)
    else:
        where = positions_by_image(support)
        inside = max((len(where.get(q.image_key, ())) for q in queries), default=0)  # never shown to a query of them
        have = len(support) - inside
    if need > have:
        what = f"{need} shots" if need in shots_list else f"0 shots (with text_demos_at_zero={need})"
        raise ValueError(f"{what} need at least {need} support examples besides the query's image, "
                         f"the support set has {len(support)}" + (f" ({len(support) - have} of them of a query's image)"
                                                                 if have < len(support) else "")
                         + ": pass fewer shots, or a bigger support set")


def _check_images(queries, support) -> None:
    """Every image given as a path is a file, before the first prompt runs."""
    import os

    from .datasets import check_image_files
    check_image_files([str(e.image) for e in [*queries, *support] if isinstance(e.image, (str, os.PathLike))],
                      "the queries and support")


def evaluate(model, tokenizer, queries: list[Example], support: list[Example], *, task: str = "vqa",
             shots=(0, 4, 8), image_processor=None, class_names: list[str] | None = None, seed: int = 42,
             batch_size: int = 8, num_beams: int | None = None, max_new_tokens: int | None = None,
             length_penalty: float | None = None,
             demonstrations: str = "random", shared_demonstrations: bool = False, prompt_ensembling: bool = False,
             text_demos_at_zero: int = ZERO_SHOT_TEXT_DEMOS, vqa_script: str | None = None,
             progress: bool | None = None, on_result=None) -> list[Result]:
    """Few-shot evaluation of ``model`` on ``queries``, one :class:`Result` per number of shots.

    Args:
        model: a :class:`~fastflamingo.Flamingo`.
        tokenizer: its tokenizer (with ``<image>`` and ``<|endofchunk|>``).
        queries: the examples to answer; with ``answers=None`` all (a split with no published
            references: :func:`.datasets.load_vqa` ``annotations=None``), predictions only, the
            results' ``score`` None.
        support: the examples demonstrations are drawn from (the training split).
        task: ``"vqa"`` (generation, VQA accuracy), ``"captioning"`` (generation, CIDEr: needs
            pycocoevalcap and Java), ``"classification"`` (rank classification over
            ``class_names``, accuracy) or ``"hateful_memes"`` (rank classification over
            ``class_names``, default ``["no", "yes"]``, ROC AUC of the second).
        shots: the numbers of demonstrations to evaluate at.
        image_processor: turns a PIL image into a (C, H, W) tensor; not needed for tensor images.
        seed: the draw of demonstrations (the same for every number of shots' first query).
        batch_size: prompts per ``generate`` / ``score`` call.
        num_beams, max_new_tokens, length_penalty: generation (the generated tasks only: given
            for a ranked one, an error), open_flamingo's defaults where None: 3 beams, no length
            penalty (0.0), 5 new tokens for VQA, 20 for captioning.
        demonstrations: ``"random"`` (drawn for each query) or ``"similar"`` (the support
            examples whose images are most like the query's: open_flamingo's RICES, here with
            the model's own visual tokens as the features).
        shared_demonstrations: one draw of demonstrations for all queries, encoded once.
        prompt_ensembling: classification and Hateful Memes: average each class's
            log-probability over min(6, k!) orders of the query's demonstrations.
        text_demos_at_zero: the text-only demonstrations of a zero-shot prompt (open_flamingo,
            after Flamingo: 2; 0 for none at all).
        vqa_script: how VQA accuracy normalizes the human answers: ``"open_flamingo"`` (its
            published numbers; None: this) or ``"official"`` (the VQA challenge's script;
            :mod:`.metrics`). VQA only.
        progress: tqdm bars; None: when stderr is a terminal.
        on_result: called with each number of shots' :class:`Result` as soon as it is done (to
            save it: a failure at a later number of shots then loses only that one).
    """
    import time

    check_count("batch_size", batch_size, 1)
    # arguments a task does not read are refused, not ignored
    unread = [f"{n}={v!r}" for n, v in (("num_beams", num_beams), ("length_penalty", length_penalty))
              if v is not None and task not in GENERATED]
    unread += [f"vqa_script={vqa_script!r}"] if vqa_script is not None and task != "vqa" else []
    unread += [f"class_names=[{len(class_names)} names]"] if class_names is not None and task in GENERATED else []
    if unread and task in TASKS:
        raise ValueError(f"{', '.join(unread)}: task={task!r} does not read "
                         f"{'it' if len(unread) == 1 else 'them'} (beams and length penalty are for the generated "
                         "tasks, vqa_script for vqa, class names for the ranked tasks)")
    num_beams = 3 if num_beams is None else num_beams
    length_penalty = 0.0 if length_penalty is None else length_penalty
    vqa_script = "open_flamingo" if vqa_script is None else vqa_script
    check_count("num_beams", num_beams, 1)
    check_count("text_demos_at_zero", text_demos_at_zero, 0)
    check_count("max_new_tokens", max_new_tokens, 1, optional=True)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number, got {length_penalty!r}")
    if is_int(shots):
        shots_list = [shots]
    elif isinstance(shots, (list, tuple, range)) and len(shots):
        shots_list = list(shots)
    else:  # (a float was a TypeError naming nothing; an empty list evaluated nothing, silently)
        raise ValueError(f"shots must be an int or a non-empty list of ints >= 0, got {shots!r}")
    if task == "hateful_memes" and class_names is None:
        class_names = HATEFUL_MEMES_CLASSES
    if vqa_script not in metrics.VQA_SCRIPTS:
        raise ValueError(f"vqa_script={vqa_script!r} is not one of {metrics.VQA_SCRIPTS}")
    _check(task, queries, support, shots_list, tokenizer, class_names, text_demos_at_zero, demonstrations,
           shared_demonstrations, model)
    if max_new_tokens is None:
        max_new_tokens = MAX_NEW_TOKENS.get(task)
    elif task not in GENERATED:
        raise ValueError(f"max_new_tokens is for the generated tasks {GENERATED}; {task!r} ranks class names")
    if prompt_ensembling and task in GENERATED:
        raise ValueError(f"prompt_ensembling averages the class rankings of several demonstration orders: it is "
                         f"for the ranked tasks (classification, hateful_memes), not {task!r}")
    if demonstrations not in DEMONSTRATIONS:
        raise ValueError(f"demonstrations must be one of {DEMONSTRATIONS}, got {demonstrations!r}")
    if shared_demonstrations and demonstrations != "random":
        raise ValueError(f"shared_demonstrations draws one set for all queries; demonstrations={demonstrations!r} "
                         "picks a set per query: use one or the other")
    device, dtype = model.device, model.vision_encoder_dtype
    candidates = None if task in GENERATED else _class_tokens(tokenizer, class_names)
    results = []
    was_training = model.training
    model.eval()
    try:
        most = _most(shots_list, text_demos_at_zero)
        similar = None if demonstrations == "random" else _picker(
            model, image_processor, queries, support, demonstrations, seed, batch_size, most, progress)
        for k in shots_list:
            t0 = time.perf_counter()
            preds, probs = [], []
            pick = similar or _picker(model, image_processor, queries, support, "random", seed, batch_size, most)
            demos, fixed, shown = _draw(queries, pick, k, text_demos_at_zero, shared_demonstrations)
            # one variant per order of the demonstrations: its prompts, and its prefix when shared
            variants = [(*_prompts(task, queries, demos, order, k == 0),
                         _encode_shared(model, tokenizer, image_processor, task,
                                        None if fixed is None else [fixed[j] for j in order], k, device, dtype))
                        for order in _orderings(shown, prompt_ensembling, seed)]
            bar = tqdm(range(0, len(queries), batch_size), desc=f"{task} {k}-shot",
                       disable=None if progress is None else not progress, leave=False)
            for i in bar:
                batches = [(*_batch_inputs(model, tokenizer, image_processor, texts[i:i + batch_size],
                                           images[i:i + batch_size], device, dtype, first=prefix is None), prefix)
                           for texts, images, prefix in variants]
                if task in GENERATED:
                    preds += _answer(task, model, tokenizer, *batches[0], num_beams, max_new_tokens, length_penalty)
                else:
                    # open_flamingo's ensembling: the mean over the orders of each class's log-probability
                    logp = torch.stack([_rank(model, *b, candidates) for b in batches]).mean(0)
                    preds += [class_names[j] for j in logp.argmax(-1).tolist()]
                    probs += logp.softmax(-1).tolist()
            positive = [p[-1] for p in probs] if task == "hateful_memes" else None
            if queries[0].answers is None:  # a split with no published references: predictions only
                score, refs, breakdown = None, None, None
            else:
                refs = [q.answers for q in queries]
                score, per_query = _score(task, preds, refs, positive, class_names, vqa_script)
                score, breakdown = 100 * score, _breakdown(task, queries, per_query)
            results.append(Result(task, k, score, _metric_name(task, vqa_script), preds, refs,
                                  time.perf_counter() - t0, positive, len(variants), breakdown))
            if on_result is not None:
                on_result(results[-1])
    finally:
        model.train(was_training)
    return results


def _encode_shared(model, tokenizer, image_processor, task, fixed, shots, device, dtype):
    if fixed is None:
        return None
    from ..generation import encode_prefix
    vx = None if shots == 0 else torch.stack(
        [image_tensor(d.image, image_processor) for d in fixed])[None].to(device=device, dtype=dtype)
    ids = tokenizer(demonstrations_text(task, fixed, text_only=shots == 0), return_tensors="pt")["input_ids"].to(device)
    return encode_prefix(model, vx, ids)


def _metric_name(task, vqa_script) -> str:
    return METRICS[task] + (f" ({vqa_script} script)" if task == "vqa" and vqa_script != "open_flamingo" else "")


def _score(task, preds, refs, positive, class_names, vqa_script="open_flamingo") -> tuple[float, list[float] | None]:
    """The task's metric over all queries, 0 to 1 (CIDEr: 0 to about 10), and each query's score
    where the metric is their mean (VQA accuracy, classification accuracy; None for the corpus
    metrics, CIDEr and ROC AUC)."""
    if task == "captioning":
        return metrics.cider(preds, refs), None
    if task == "hateful_memes":
        return metrics.roc_auc([r[0] == class_names[-1] for r in refs], positive), None
    if task == "vqa":
        per_query = [metrics.vqa_accuracy(p, r, vqa_script) for p, r in zip(preds, refs)]
    else:
        per_query = [metrics.exact_match(p, r) for p, r in zip(preds, refs)]
    return sum(per_query) / len(per_query), per_query


def _breakdown(task, queries, per_query) -> dict[str, dict[str, float]] | None:
    """VQA accuracy (x 100) per answer type and per question type (the official evaluation's
    perAnswerType and perQuestionType; a query without an answer type counts as "other", as
    there), for the keys some query's ``extra`` has; None for the other tasks or without them."""
    keys = [k for k in ("answer_type", "question_type") if any(k in q.extra for q in queries)]
    if task != "vqa" or not keys:
        return None
    out = {}
    for key in keys:
        groups = {}
        for q, acc in zip(queries, per_query):
            groups.setdefault(str(q.extra.get(key, "other")), []).append(acc)
        out[key] = {g: 100 * sum(v) / len(v) for g, v in sorted(groups.items())}
    return out


@torch.no_grad()
def _answer(task, model, tokenizer, vx, ids, mask, prefix, num_beams, max_new_tokens, length_penalty) -> list[str]:
    beams = dict(num_beams=num_beams, length_penalty=length_penalty) if num_beams > 1 else {}
    out = model.generate(vx, ids, attention_mask=mask, prefix=prefix, max_new_tokens=max_new_tokens, **beams)
    new = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    if task == "captioning":
        return [metrics.postprocess_caption(t) for t in new]
    return [metrics.postprocess_vqa(t).strip() for t in new]


def _class_tokens(tokenizer, class_names: list[str]) -> list[list[int]]:
    """The class names' token ids (each a continuation to score), checked once per evaluation."""
    cands = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in class_names]
    empty = [c for c, t in zip(class_names, cands) if not t]
    if empty:
        raise ValueError(f"class names {empty} tokenize to nothing")
    check_distinct(class_names, cands, "class names", tokenizer)
    return cands


@torch.no_grad()
def _rank(model, vx, ids, mask, prefix, cands) -> torch.Tensor:
    """(prompts, classes): each class name's mean log-probability per token after each prompt.
    The best is the prediction; their softmax, open_flamingo's score (Hateful Memes' "yes")."""
    return model.score(vx, ids, cands, attention_mask=mask, prefix=prefix, reduction="mean").float()
