"""Few-shot prompts as open_flamingo's evaluation writes them.

Every demonstration is ``<image>`` + its text + ``<|endofchunk|>``, joined by newlines; the query
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

import random
from dataclasses import dataclass, field
from typing import Any

TASKS = ("vqa", "captioning", "classification", "hateful_memes")
GENERATED = ("vqa", "captioning")          # answered by generate; the others rank their class names
HATEFUL_MEMES_CLASSES = ["no", "yes"]
ZERO_SHOT_TEXT_DEMOS = 2  # open_flamingo's compute_effective_num_shots


@dataclass(eq=False)
class Example:
    """One evaluation example (equal only to itself: its image may be a tensor).

    Attributes:
        image: a PIL image, a path to one, or a (C, H, W) / (F, C, H, W) tensor already processed.
        answers: the references: VQA's human answers (ten in VQAv2), the image's captions
            (five in COCO), or ``[class name]`` (Hateful Memes: ``["yes"]`` for a hateful meme).
        question: the question (VQA); None for the other tasks.
        text: the meme's text (Hateful Memes); None for the other tasks.
    """
    image: Any
    answers: list[str]
    question: str | None = None
    extra: dict = field(default_factory=dict)
    text: str | None = None

    def __post_init__(self):
        if isinstance(self.answers, str) or not self.answers:
            raise ValueError(f"Example.answers must be a non-empty list of strings, got {self.answers!r}")


def demonstration(task: str, ex: Example) -> str:
    """A solved example: its image tag, text and answer (the first reference, as open_flamingo;
    a caption stripped of surrounding spaces, as its captioning evaluation does)."""
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
    """Examples from a JSON-lines file, one object a line, image paths relative to the file:

    - VQA: ``{"image": "a.jpg", "question": "...", "answers": ["...", ...]}``
    - captioning: ``{"image": "a.jpg", "captions": ["...", ...]}`` (or ``"answers"``); the
      Karpathy split files of COCO and Flickr30k load with :func:`load_karpathy`
    - classification: ``{"image": "a.jpg", "label": "cat"}`` (or ``"answers": ["cat"]``)
    - Hateful Memes: its own files as published (``train.jsonl``, ``dev_seen.jsonl``):
      ``{"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}``, label 1 for hateful
      (``"yes"``), 0 for not (``"no"``)."""
    import os

    from ..inputs import json_lines
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out = []
    for where, row, base in json_lines(path):
        image_key = "img" if task == "hateful_memes" else "image"
        if not isinstance(row.get(image_key), str):
            raise ValueError(f"{where} needs an \"{image_key}\" (a path), got keys {sorted(row)}")
        answers, text = _answers(where, row, task), None
        if task == "vqa" and not isinstance(row.get("question"), str):
            raise ValueError(f"{where}: a VQA example needs a \"question\" string")
        if task == "hateful_memes":
            text = row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: a Hateful Memes example needs its meme's \"text\" string, got {text!r}")
        used = (image_key, "question", "answers", "captions", "label", "text" if task == "hateful_memes" else None)
        extra = {k: v for k, v in row.items() if k not in used}
        out.append(Example(os.path.join(base, row[image_key]), answers, row.get("question"), extra, text))
    if not out:
        raise ValueError(f"{path} holds no examples")
    return out


def _answers(where: str, row: dict, task: str) -> list[str]:
    if task == "hateful_memes":
        label = row.get("label")
        if label not in (0, 1) or isinstance(label, float):
            raise ValueError(f"{where} needs a \"label\" of 0 (not hateful) or 1 (hateful), got {label!r}")
        return [HATEFUL_MEMES_CLASSES[label]]
    key = {"captioning": "captions"}.get(task)
    answers = row.get(key) if key in row else row.get("answers", [row["label"]] if "label" in row else None)
    if not answers or not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        other = {"classification": ' or a "label"', "captioning": ' or "captions"'}.get(task, "")
        raise ValueError(f"{where} needs \"answers\" (a non-empty list of strings){other}, got {answers!r}")
    return answers


def load_karpathy(path: str, image_dir: str, split: str) -> list[Example]:
    """The captioning examples of one split of a Karpathy split file (``dataset_coco.json``,
    ``dataset_flickr30k.json``), as open_flamingo's ``CaptionDataset`` reads them: the images
    whose ``"split"`` is ``split`` (open_flamingo: ``"train"`` for demonstrations, ``"test"`` for
    queries; ``"restval"`` is neither), each at ``image_dir/filepath/filename`` (COCO's
    ``filepath`` is ``train2014`` or ``val2014``; Flickr30k has none), its references the raw
    sentences. ``extra["image_id"]`` is COCO's ``cocoid`` or the file name's stem."""
    import json
    import os
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Karpathy split file {path!r}")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy split file: it needs an \"images\" list")
    splits = sorted({im.get("split") for im in data["images"] if isinstance(im, dict)} - {None})
    out = []
    for n, im in enumerate(data["images"]):
        if not isinstance(im, dict) or im.get("split") != split:
            continue
        captions = [s.get("raw") for s in im.get("sentences", []) if isinstance(s, dict)]
        if not captions or not all(isinstance(c, str) for c in captions) or "filename" not in im:
            raise ValueError(f"{path}: images[{n}] needs a \"filename\" and \"sentences\" with \"raw\" captions")
        image_id = im.get("cocoid", os.path.splitext(im["filename"])[0])
        out.append(Example(os.path.join(image_dir, im.get("filepath", ""), im["filename"]), captions,
                           extra={"image_id": image_id}))
    if not out:
        raise ValueError(f"{path} has no images in split {split!r}; its splits are {splits}")
    return out
