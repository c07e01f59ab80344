"""The evaluation data as the benchmarks publish it, read into :class:`~.prompts.Example` lists:

- :func:`load_examples`: JSON lines of fastflamingo's own (one example a line; Hateful Memes' own
  ``train.jsonl`` / ``dev_seen.jsonl`` as published);
- :func:`load_vqa`: the question and annotation files of VQAv2, VizWiz and TextVQA, as
  open_flamingo's ``VQADataset`` reads them;
- :func:`load_karpathy`: the Karpathy split files of COCO and Flickr30k captions;
- :func:`load_image_folder`: a folder of class folders (ImageNet as torchvision's ``ImageFolder``
  reads it, which open_flamingo's ImageNet evaluation uses).
"""
from __future__ import annotations

import json
import os

from .prompts import HATEFUL_MEMES_CLASSES, TASKS, Example

VQA_DATASETS = ("vqav2", "vizwiz", "textvqa")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # ImageFolder's


def load_examples(path: str, task: str, check_images: bool = False) -> list[Example]:
    """Examples from a JSON-lines file, one object a line, image paths relative to the file:

    - VQA: ``{"image": "a.jpg", "question": "...", "answers": ["...", ...]}``
    - captioning: ``{"image": "a.jpg", "captions": ["...", ...]}`` (or ``"answers"``)
    - classification: ``{"image": "a.jpg", "label": "cat"}`` (or ``"answers": ["cat"]``)
    - Hateful Memes: its own files as published (``train.jsonl``, ``dev_seen.jsonl``):
      ``{"id": 42953, "img": "img/42953.png", "label": 0, "text": "..."}``, label 1 for hateful
      (``"yes"``), 0 for not (``"no"``).

    ``check_images``: every image must exist, a missing one an error naming its ``path:line``
    (``fastflamingo evaluate`` checks so; :func:`~.harness.evaluate` checks every image anyway
    before it runs)."""
    from ..inputs import json_lines
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    out, missing = [], []
    for where, row, base in json_lines(path):
        image_key = "img" if task == "hateful_memes" else "image"
        if not isinstance(row.get(image_key), str):
            raise ValueError(f"{where} needs an \"{image_key}\" (a path), got keys {sorted(row)}")
        answers, text = _answers(where, row, task), None
        if task == "vqa" and not isinstance(row.get("question"), str):
            raise ValueError(f"{where}: a VQA example needs a \"question\" string")
        if task != "vqa" and "question" in row:  # its prompt has no question: it would be dropped
            raise ValueError(f"{where}: a {task} example has a \"question\" ({str(row['question'])[:60]!r}), which "
                             f"{task} prompts do not show: is this a VQA file? Evaluate it with task 'vqa' "
                             "(--task vqa), or remove the questions")
        if task == "hateful_memes":
            text = row.get("text")
            if not isinstance(text, str):
                raise ValueError(f"{where}: a Hateful Memes example needs its meme's \"text\" string, got {text!r}")
        used = (image_key, "question", "answers", "captions", "label", "text" if task == "hateful_memes" else None)
        extra = {k: v for k, v in row.items() if k not in used}
        image = os.path.join(base, row[image_key])
        if check_images and not os.path.isfile(image):
            missing.append((where, row[image_key]))
        out.append(Example(image, answers, row.get("question"), extra, text))
    if not out:
        raise ValueError(f"{path} holds no examples")
    if missing:  # every image there before hours of evaluation (after the lines' own errors)
        where, image = missing[0]
        raise FileNotFoundError(f"{where}: no image file {image!r} ({len(missing)} of the file's images are missing; "
                                "paths are relative to the file's folder)")
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


def _json(path: str, key: str, what: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file {path!r}")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise ValueError(f"{path} is not a {what} file: it needs a \"{key}\" list")
    return data[key]


def check_image_files(paths: list[str], source: str) -> None:
    """Every image is there before hours of evaluation, not discovered missing at query 10,000."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image file(s) of {source} are missing, the first {missing[:3]}: "
                                "is the image folder the right one?")


def load_vqa(questions: str, annotations: str | None, image_dir: str, dataset: str = "vqav2") -> list[Example]:
    """The examples of a VQA question file and its annotation file, as open_flamingo's
    ``VQADataset`` reads them: ``{"questions": [{"question_id", "image_id", "question"}]}`` and
    ``{"annotations": [{"question_id", "answers": [{"answer": ...}, ...]}]}`` (VQAv2's layout, in
    which open_flamingo's VizWiz and TextVQA files come too), the references all the human
    answers. The answers are matched to their question by ``question_id`` (open_flamingo pairs
    them by position, the same for files in the same order; here a file pair that disagrees is an
    error). ``extra`` holds ``question_id``, ``image_id`` and, where the annotations have them,
    ``answer_type`` and ``question_type`` (VQAv2's: the evaluation's per-type accuracies). The
    image of a question, by ``dataset``:

    - ``"vqav2"``: ``image_dir/COCO_{split}_{image_id:012d}.jpg``, the split the folder's name
      (``train2014``, ``val2014`` or ``test2015``, as COCO ships them);
    - ``"vizwiz"``: ``image_dir/{image_id}`` (VizWiz's ids are file names);
    - ``"textvqa"``: ``image_dir/{image_id}.jpg``.

    OK-VQA has VQAv2's layout (``dataset="vqav2"`` reads it), but its published scores stem the
    answers first (open_flamingo's ``ok_vqa_utils``, NLTK's tagger and WordNet), which this
    package does not: the accuracy of ``task="vqa"`` on it is unstemmed, not comparable with
    those (a plural or -ing form that the stemmed reference would match counts as wrong).

    ``annotations=None``: a split with no published answers (VQAv2's test-dev and test-std, whose
    images are in ``test2015``; VizWiz's and TextVQA's test): the examples have ``answers=None``;
    :func:`~.harness.evaluate` predicts their answers without scoring them, and the command line
    writes ``vqa_results_{shots}shot.json``, the file the evaluation server takes (VizWiz's keyed
    by image; ``--vqa-all-questions`` answers the whole test split's questions, as VQAv2's server
    wants even for test-dev)."""
    if dataset not in VQA_DATASETS:
        hint = " (OK-VQA: dataset='vqav2', see the docstring)" if dataset in ("ok_vqa", "okvqa") else ""
        raise ValueError(f"dataset must be one of {VQA_DATASETS}, got {dataset!r}{hint}")
    qs = _json(questions, "questions", "VQA questions")
    anns = [] if annotations is None else _json(annotations, "annotations", "VQA annotations")
    split = os.path.basename(os.path.normpath(image_dir))
    if dataset == "vqav2" and split not in ("train2014", "val2014", "test2015"):
        raise ValueError(f"VQAv2's images are named after their COCO folder: image_dir must end in train2014, "
                         f"val2014 or test2015, got {image_dir!r}")
    by_id, types = {}, {}
    for n, a in enumerate(anns):
        answers = [x.get("answer") for x in a.get("answers", []) if isinstance(x, dict)] if isinstance(a, dict) else []
        if not answers or not all(isinstance(x, str) for x in answers) or "question_id" not in a:
            raise ValueError(f"{annotations}: annotations[{n}] needs a \"question_id\" and \"answers\" "
                             "with \"answer\" strings")
        by_id[a["question_id"]] = answers
        types[a["question_id"]] = {k: a[k] for k in ("answer_type", "question_type") if isinstance(a.get(k), str)}
    out = []
    for n, q in enumerate(qs):
        if not (isinstance(q, dict) and isinstance(q.get("question"), str) and {"question_id", "image_id"} <= set(q)):
            raise ValueError(f"{questions}: questions[{n}] needs a \"question_id\", an \"image_id\" and a \"question\"")
        if annotations is not None and q["question_id"] not in by_id:
            raise ValueError(f"{questions}: question {q['question_id']!r} has no answers in {annotations}: "
                             "are they the files of the same split?")
        image_id = q["image_id"]
        if dataset == "vqav2":
            if not isinstance(image_id, int):
                raise ValueError(f"{questions}: questions[{n}] has image_id {image_id!r}; VQAv2's are integers")
            name = f"COCO_{split}_{image_id:012d}.jpg"
        else:
            name = str(image_id) if dataset == "vizwiz" else f"{image_id}.jpg"
        out.append(Example(os.path.join(image_dir, name), by_id.get(q["question_id"]), q["question"],
                           extra={"question_id": q["question_id"], "image_id": image_id,
                                  **types.get(q["question_id"], {})}))
    if not out:
        raise ValueError(f"{questions} holds no questions")
    check_image_files([e.image for e in out], questions)
    return out


def load_karpathy(path: str, image_dir: str, split: str, check_images: bool = False) -> list[Example]:
    """The captioning examples of one split of a Karpathy split file (``dataset_coco.json``,
    ``dataset_flickr30k.json``), as open_flamingo's ``CaptionDataset`` reads them: the images
    whose ``"split"`` is ``split`` (open_flamingo: ``"train"`` for demonstrations, ``"test"`` for
    queries; ``"restval"`` is neither), each at ``image_dir/filepath/filename`` (COCO's
    ``filepath`` is ``train2014`` or ``val2014``; Flickr30k has none), its references the raw
    sentences. ``extra["image_id"]`` is COCO's ``cocoid`` or the file name's stem.
    ``check_images``: every image of the split must exist (an error names the first missing
    ones; :func:`~.harness.evaluate` checks every image anyway before it runs)."""
    images = _json(path, "images", "Karpathy split")
    splits = sorted({im.get("split") for im in images if isinstance(im, dict)} - {None})
    out = []
    for n, im in enumerate(images):
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
    if check_images:
        check_image_files([e.image for e in out], f"{path}'s {split!r} split")
    return out


def load_image_folder(root: str, class_names: list[str] | None = None) -> tuple[list[Example], list[str]]:
    """A classification split laid out as torchvision's ``ImageFolder`` reads it (ImageNet's
    train and val folders, as open_flamingo's ImageNet evaluation loads them): one sub-folder per
    class, taken in sorted order, its images (any depth, ImageFolder's extensions) the class's
    examples. ``class_names``: the class's name for each folder in that order (ImageNet's
    folders are WordNet ids: ``n01440764`` is "tench"); None names the classes by their folders.

    Returns the examples (``answers`` ``[class name]``, ``extra["folder"]``) and the class names."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder {root!r}")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not folders:
        raise ValueError(f"{root} has no class folders: an image folder holds one sub-folder of images per class")
    if class_names is None:
        class_names = folders
    elif len(class_names) != len(folders):
        raise ValueError(f"{len(class_names)} class names for the {len(folders)} class folders of {root} "
                         f"(the first {folders[:3]}): give one name per folder, in the folders' sorted order")
    out, empty = [], []
    for folder, name in zip(folders, class_names):
        found = [os.path.join(d, f) for d, _, files in sorted(os.walk(os.path.join(root, folder), followlinks=True))
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not found:
            empty.append(folder)
        out += [Example(p, [name], extra={"folder": folder}) for p in found]
    if empty:
        raise ValueError(f"class folders of {root} hold no images ({', '.join(IMAGE_EXTENSIONS)}): {empty[:10]}")
    return out, list(class_names)
