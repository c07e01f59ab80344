"""Few-shot prompts as open_flamingo's evaluation writes them.

Every demonstration is ``<image>`` + its text + ``<|endofchunk|>``, followed by a newline for VQA and
captioning and by nothing for classification and Hateful Memes (open_flamingo's evaluation); the query
is ``<image>`` + its text up to where the answer goes. With no shots, open_flamingo (following
Flamingo) still shows the model two demonstrations, text only: their ``<image>`` tags removed.

The tasks' texts (open_flamingo's ``get_vqa_prompt``, ``get_caption_prompt``,
``get_imagenet_prompt`` and ``get_hateful_memes_prompt``):

- ``"vqa"``: ``<image>Question:{question} Short answer:{answer}``
- ``"captioning"``: ``<image>Output:{caption}`` (COCO, Flickr30k)
- ``"classification"``: ``<image>Output:{class name}`` (ImageNet)
- ``"hateful_memes"``: ``<image>is an image with: '{meme text}' written on it. Is it hateful? Answer:{no | yes}``
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
from dataclasses import dataclass, field
from typing import Any

TASKS = ("vqa", "captioning", "classification", "hateful_memes")
GENERATED = ("vqa", "captioning")          # answered by generate; the others rank their class names
HATEFUL_MEMES_CLASSES = ["no", "yes"]
ZERO_SHOT_TEXT_DEMOS = 2  # open_flamingo's compute_effective_num_shots
# after each demonstration: open_flamingo's evaluate_vqa / evaluate_captioning add "\n", its
# evaluate_classification (ImageNet, Hateful Memes) joins them with nothing
SEPARATOR = {"vqa": "\n", "captioning": "\n", "classification": "", "hateful_memes": ""}


@dataclass(eq=False)
class Example:
    """One evaluation example (equal only to itself: its image may be a tensor; :attr:`key` says
    whether two are the same example, loaded twice).

    Attributes:
        image: a PIL image, a path to one, or a (C, H, W) / (F, C, H, W) tensor already processed.
        answers: the references: VQA's human answers (ten in VQAv2), the image's captions
            (five in COCO), or ``[class name]`` (Hateful Memes: ``["yes"]`` for a hateful meme);
            None for a query of a split with no published references (VQAv2 test-dev): it gets
            a prediction, not a score, and cannot be a demonstration.
        question: the question (VQA); None for the other tasks.
        text: the meme's text (Hateful Memes); None for the other tasks.
    """
    image: Any
    answers: list[str] | None
    question: str | None = None
    extra: dict = field(default_factory=dict)
    text: str | None = None

    def __post_init__(self):
        if self.answers is not None and (isinstance(self.answers, str) or not self.answers):
            raise ValueError(f"Example.answers must be a non-empty list of strings (None: no references), "
                             f"got {self.answers!r}")

    @functools.cached_property
    def image_key(self) -> tuple:
        """What makes two examples' images the same one, however they were loaded: a file by its
        resolved path, a tensor or a PIL image by its pixels. A query is never shown a
        demonstration of its own image (itself, or the same image with another question or
        caption: its answer would tell the query's), by this key."""
        img = self.image
        if isinstance(img, (str, os.PathLike)):
            return "file", os.path.realpath(img)
        if hasattr(img, "data_ptr") and hasattr(img, "contiguous"):  # a tensor
            import torch
            t = img.detach().cpu().contiguous().view(-1)
            return "tensor", tuple(img.shape), str(t.dtype), hashlib.sha1(t.view(torch.uint8).numpy()).hexdigest()
        if hasattr(img, "tobytes") and hasattr(img, "mode"):  # a PIL image
            return "pixels", img.mode, img.size, hashlib.sha1(img.tobytes()).hexdigest()
        return "object", id(img)

    @property
    def key(self) -> tuple:
        """What makes two examples the same one (queries and support read from one file, or
        overlapping splits): the image (:attr:`image_key`), the question and the text."""
        return self.image_key, self.question, self.text


def demonstration(task: str, ex: Example) -> str:
    """A solved example: its image tag, text and answer (the first reference, as open_flamingo;
    a caption stripped of surrounding spaces, as its captioning evaluation does)."""
    if ex.answers is None:
        raise ValueError("a demonstration shows its answer, but this example has no references (answers=None)")
    answer = ex.answers[0].strip() if task == "captioning" else ex.answers[0]
    return query(task, ex) + answer + "<|endofchunk|>"


def query(task: str, ex: Example) -> str:
    """The text of an example up to its answer."""
    if task == "vqa":
        if ex.question is None:
            raise ValueError("a VQA example needs a question, got question=None")
        return f"<image>Question:{ex.question} Short answer:"
    if task in ("captioning", "classification"):
        return "<image>Output:"
    if task == "hateful_memes":
        if ex.text is None:
            raise ValueError("a Hateful Memes example needs its meme's text, got text=None")
        return f"<image>is an image with: '{ex.text}' written on it. Is it hateful? Answer:"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def demonstrations_text(task: str, demos: list[Example], text_only: bool = False) -> str:
    """The demonstrations, each followed by its task's :data:`SEPARATOR` (a newline for VQA and
    captioning, nothing for classification and Hateful Memes, as open_flamingo's evaluation joins
    them). ``text_only`` drops their image tags (the zero-shot prompt)."""
    context = "".join(demonstration(task, d) + SEPARATOR[task] for d in demos)
    return context.replace("<image>", "") if text_only else context


def few_shot_text(task: str, demos: list[Example], ex: Example, text_only: bool = False) -> str:
    """The whole prompt: :func:`demonstrations_text`, then the query."""
    return demonstrations_text(task, demos, text_only) + query(task, ex)


def positions_by_image(examples: list[Example]) -> dict[tuple, list[int]]:
    """{:attr:`Example.image_key`: the positions of the examples of that image}."""
    where: dict[tuple, list[int]] = {}
    for j, ex in enumerate(examples):
        where.setdefault(ex.image_key, []).append(j)
    return where


class DemonstrationSampler:
    """Random demonstrations from one support set: ``shots`` distinct examples, never one of the
    query's own image (:attr:`Example.image_key`: the query itself, a copy of it, or its image
    with another question). The support is indexed once, so a draw costs O(shots + the examples
    of the query's image), not O(len(support)) (hours of Python at VQAv2's 444k): ``shots + c``
    distinct positions drawn with ``rng.sample`` (c: the support examples of the query's image),
    those dropped, the first ``shots`` kept."""

    def __init__(self, support: list[Example], rng: random.Random):
        self.support, self.rng = support, rng
        self.where = positions_by_image(support)

    def draw(self, shots: int, exclude: Example | None = None) -> list[Example]:
        own = set(self.where.get(exclude.image_key, ())) if exclude is not None else set()
        if shots > len(self.support) - len(own):
            raise ValueError(f"{shots} shots need at least {shots} support examples besides the query's image, "
                             f"the support set has {len(self.support)}"
                             + (f" ({len(own)} of them of the query's image)" if own else ""))
        drawn = self.rng.sample(range(len(self.support)), shots + len(own))
        return [self.support[j] for j in drawn if j not in own][:shots]

    def draw_shared(self, shots: int, queries: list[Example]) -> list[Example]:
        """One draw for all ``queries``: from the support examples of none of their images."""
        images = {q.image_key for q in queries}
        pool = [s for s in self.support if s.image_key not in images]
        if shots > len(pool):
            raise ValueError(f"{shots} shared shots need at least {shots} support examples of no query's image, "
                             f"the support set has {len(pool)}")
        return self.rng.sample(pool, shots)


def sample_demonstrations(support: list[Example], shots: int, rng: random.Random,
                          exclude: Example | None = None) -> list[Example]:
    """``shots`` distinct demonstrations drawn at random from ``support`` (never one of the query's
    own image: :attr:`Example.image_key`), as :class:`DemonstrationSampler` draws them."""
    return DemonstrationSampler(support, rng).draw(shots, exclude)
