"""Few-shot prompts as open_flamingo's evaluation writes them.

Every demonstration is ``<image>`` + its text + ``<|endofchunk|>``, joined by newlines; the query
is ``<image>`` + its text up to where the answer goes. With no shots, open_flamingo (following
Flamingo) still shows the model two demonstrations, text only: their ``<image>`` tags removed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

TASKS = ("vqa", "classification")
ZERO_SHOT_TEXT_DEMOS = 2  # open_flamingo's compute_effective_num_shots


@dataclass(eq=False)
class Example:
    """One evaluation example (equal only to itself: its image may be a tensor).

    Attributes:
        image: a PIL image, a path to one, or a (C, H, W) / (F, C, H, W) tensor already processed.
        answers: the references: VQA's human answers (ten in VQAv2), or ``[class name]``.
        question: the question (VQA); None for classification.
    """
    image: Any
    answers: list[str]
    question: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.answers, str) or not self.answers:
            raise ValueError(f"Example.answers must be a non-empty list of strings, got {self.answers!r}")


def demonstration(task: str, ex: Example) -> str:
    """A solved example: its image tag, text and answer (the first reference, as open_flamingo)."""
    return query(task, ex) + ex.answers[0] + "<|endofchunk|>"


def query(task: str, ex: Example) -> str:
    """The text of an example up to its answer."""
    if task == "vqa":
        if ex.question is None:
            raise ValueError("a VQA example needs a question, got question=None")
        return f"<image>Question:{ex.question} Short answer:"
    if task == "classification":
        return "<image>Output:"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def demonstrations_text(task: str, demos: list[Example], text_only: bool = False) -> str:
    """The demonstrations, one a line (each ending in a newline). ``text_only`` drops their image
    tags (the zero-shot prompt)."""
    context = "".join(demonstration(task, d) + "\n" for d in demos)
    return context.replace("<image>", "") if text_only else context


def few_shot_text(task: str, demos: list[Example], ex: Example, text_only: bool = False) -> str:
    """The whole prompt: :func:`demonstrations_text`, then the query."""
    return demonstrations_text(task, demos, text_only) + query(task, ex)


def sample_demonstrations(support: list[Example], shots: int, rng: random.Random,
                          exclude: Example | None = None) -> list[Example]:
    """``shots`` distinct demonstrations drawn at random from ``support`` (never the query itself)."""
    pool = [s for s in support if s is not exclude]
    if shots > len(pool):
        raise ValueError(f"{shots} shots need at least {shots} support examples besides the query, "
                         f"the support set has {len(pool)}")
    return rng.sample(pool, shots)


def load_examples(path: str, task: str) -> list[Example]:
    """Examples from a JSON-lines file, one object a line: ``{"image": "cat.jpg", "question":
    "...", "answers": ["...", ...]}`` for VQA, ``{"image": "cat.jpg", "label": "cat"}`` (or
    ``"answers": ["cat"]``) for classification. Image paths are relative to the file."""
    import os

    from ..inputs import json_lines
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = []
    for where, row, base in json_lines(path):
        if "image" not in row:
            raise ValueError(f"{where} needs an \"image\" (a path), got keys {sorted(row)}")
        answers = row.get("answers", [row["label"]] if "label" in row else None)
        if not answers or not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            label = ' or a "label"' if task == "classification" else ""
            raise ValueError(f"{where} needs \"answers\" (a non-empty list of strings){label}, got {answers!r}")
        if task == "vqa" and not isinstance(row.get("question"), str):
            raise ValueError(f"{where}: a VQA example needs a \"question\" string")
        extra = {k: v for k, v in row.items() if k not in ("image", "question", "answers", "label")}
        out.append(Example(os.path.join(base, row["image"]), answers, row.get("question"), extra))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out
