"""A synthetic few-shot world, small enough to train and evaluate a Flamingo on a CPU in minutes.

Every image shows one shape (circle, square, triangle, cross) in one colour (red, green, blue,
yellow, magenta, cyan), at a random place and size, with noise. A training sequence
is eight images, each followed by its name, ``<image>Output:red<|endofchunk|>``, and the name
is of the same attribute all along the sequence: its colour in some sequences, its shape in
others. Shown one image with no context, a model cannot know which attribute is asked (both are
right names of the picture: at best 50%); shown demonstrations, it can read the task off them.
That is the in-context learning Flamingo does (recognising the task from a few examples), in
miniature, and the few-shot harness (:mod:`.harness`) measures it as it measures VQAv2: same
prompts, demonstrations drawn at random from a support set, rank classification.

The pictures the model sees (:func:`examples`, :func:`training_batch`) are what
``fastflamingo evaluate --model DIR`` makes of the pictures' 8-bit image files (open_flamingo's
image transform: CLIP normalisation; :func:`pixels`), so a saved model scores on PNG files of
them (:func:`to_image`) what it scores on the tensors.

The ``tiny`` preset's language model is random, not pretrained, so :func:`train` trains the whole
model here; a real Flamingo freezes a pretrained LM and trains the resampler and the
cross-attention layers (:meth:`~fastflamingo.Flamingo.set_trainable`).
"""
from __future__ import annotations

import random

import torch

from .prompts import SEPARATOR, Example, demonstration

COLORS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
          "yellow": (1.0, 1.0, 0.0), "magenta": (1.0, 0.0, 1.0), "cyan": (0.0, 1.0, 1.0)}
SHAPES = ("circle", "square", "triangle", "cross")
ATTRIBUTES = ("color", "shape")
NAMES = list(COLORS) + list(SHAPES)
NOISE = 0.1
IMAGES_PER_SEQUENCE = 8


def tokenizer(media_token_id: int = 510, eoc_token_id: int = 511):
    """A word-level tokenizer of this world's words, with the ``tiny`` preset's special ids
    (``<pad>`` 0, ``</s>`` 2, ``<image>`` 510, ``<|endofchunk|>`` 511), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = ["Output", ":", "Question", "Short", "answer", "what", "is", "it", "?"] + NAMES
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(words)},
             "<image>": media_token_id, "<|endofchunk|>": eoc_token_id}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>", "<|endofchunk|>"])


def _masks(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(len(SHAPES), ...) the shapes' masks at coordinates (x, y), each shape centred, radius ~1."""
    r2 = x * x + y * y
    return torch.stack([
        r2 < 1,                                                                   # circle
        (x.abs() < 0.8) & (y.abs() < 0.8),                                        # square
        (y > -0.8) & (y < 0.8) & (x.abs() < (0.8 - y) / 2),                       # triangle
        ((x.abs() < 0.25) | (y.abs() < 0.25)) & (x.abs() < 1) & (y.abs() < 1),   # cross
    ])


def render(colors: list[str], shapes: list[str], generator: torch.Generator, size: int = 32) -> torch.Tensor:
    """(n, 1, 3, size, size): one frame per (colour, shape), each at a random place and size, with noise."""
    bad = [c for c in colors if c not in COLORS] + [s for s in shapes if s not in SHAPES]
    if bad or len(colors) != len(shapes):
        raise ValueError(f"render needs as many colours ({list(COLORS)}) as shapes ({list(SHAPES)}); "
                         f"got {len(colors)} and {len(shapes)}{', unknown: ' + str(bad) if bad else ''}")
    n = len(colors)
    place = torch.rand(n, 3, generator=generator) * torch.tensor([0.4, 0.4, 0.2]) + torch.tensor([-0.2, -0.2, 0.6])
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    cx, cy, scale = (place[:, i, None, None] for i in range(3))
    masks = _masks((x - cx) / scale, (y - cy) / scale)                      # (shapes, n, H, W)
    mask = masks[torch.tensor([SHAPES.index(s) for s in shapes]), torch.arange(n)].float()
    rgb = torch.tensor([COLORS[c] for c in colors])[:, :, None, None]
    return (mask[:, None] * rgb + NOISE * torch.randn(n, 3, size, size, generator=generator))[:, None]


def _clip():
    from ..inputs import CLIP_MEAN, CLIP_STD
    return torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]


def pixels(pictures: torch.Tensor) -> torch.Tensor:
    """Pictures (..., 3, H, W) in [0, 1] (:func:`render`) -> the pixels the model takes: the
    picture's 8-bit image (clamped, rounded) CLIP-normalised, bit for bit what
    ``fastflamingo evaluate --model DIR`` gives for its image file
    (:func:`fastflamingo.inputs.image_transform`, open_flamingo's transform)."""
    mean, std = _clip()
    return ((pictures.clamp(0, 1) * 255).round() / 255 - mean) / std


def to_image(image: torch.Tensor):
    """The 8-bit PIL picture of one image of this world ((3, H, W) or (1, 3, H, W) :func:`pixels`):
    saved as a PNG, it reads back through the image transform as the same tensor."""
    from PIL import Image
    mean, std = _clip()
    x = image.reshape(-1, *image.shape[-3:])[0]
    q = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(q.permute(1, 2, 0).numpy())


def examples(n: int, attribute: str, seed: int, size: int = 32) -> list[Example]:
    """``n`` random pictures named by ``attribute`` (``"color"`` or ``"shape"``), as the model
    takes them (:func:`pixels`; :func:`to_image` gives each one's picture)."""
    if attribute not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
    if n < 1:
        raise ValueError(f"examples needs n >= 1, got {n}")
    rng = random.Random(seed)
    colors, shapes = [rng.choice(list(COLORS)) for _ in range(n)], [rng.choice(SHAPES) for _ in range(n)]
    images = pixels(render(colors, shapes, torch.Generator().manual_seed(seed), size))
    return [Example(im, [c if attribute == "color" else s], extra={"color": c, "shape": s})
            for im, c, s in zip(images, colors, shapes)]


def training_batch(tok, batch: int, rng: random.Random, generator: torch.Generator, size: int,
                   media_token_id: int):
    """(vision_x (B, 8, 1, 3, H, W), ids, attention_mask, labels): sequences of eight new pictures
    (:func:`pixels`) and their names, each sequence naming one attribute; labels on every text token (not
    ``<image>``, not padding)."""
    n = batch * IMAGES_PER_SEQUENCE
    colors, shapes = [rng.choice(list(COLORS)) for _ in range(n)], [rng.choice(SHAPES) for _ in range(n)]
    images = pixels(render(colors, shapes, generator, size)).view(batch, IMAGES_PER_SEQUENCE, 1, 3, size, size)
    from ..training.data import Document, collate
    docs = []
    for b in range(batch):
        names = colors if rng.choice(ATTRIBUTES) == "color" else shapes
        # joined as the evaluation's classification prompts join their demonstrations
        text = SEPARATOR["classification"].join(demonstration("classification", Example(None, [names[i]]))
                                                for i in range(b * IMAGES_PER_SEQUENCE, (b + 1) * IMAGES_PER_SEQUENCE))
        docs.append(Document(list(images[b]), text))
    return collate(docs, tok, media_token_id, image_size=size)


def batches(tok, media_token_id: int, *, batch_size: int = 32, seed: int = 0, size: int = 32):
    """``batches(step)`` -> ``[training_batch]``: new pictures every step, drawn from ``seed`` and
    the step (a resumed run sees the same data)."""
    def at(step: int):
        n = seed * 1_000_003 + step
        return [training_batch(tok, batch_size, random.Random(n), torch.Generator().manual_seed(n), size,
                               media_token_id)]
    return at


def train(model, tok, *, steps: int = 1500, batch_size: int = 32, lr: float = 3e-3, seed: int = 0,
          progress: bool | None = None) -> list[float]:
    """Train ``model`` (all its weights: the ``tiny`` LM is not pretrained) on sequences of this
    world with :func:`fastflamingo.training.fine_tune`; returns every step's loss. AdamW without
    weight decay or clipping, a linear warm-up over 5% of the steps, then a cosine decay to 10%."""
    from ..training import fine_tune
    data = batches(tok, model.config.media_token_id, batch_size=batch_size, seed=seed,
                   size=model.config.vision.image_size)
    history = fine_tune(model, data, steps=steps, lr=lr, weight_decay=0.0, warmup=max(1, steps // 20),
                        max_grad_norm=None, train="all", progress=progress)
    return [h["loss"] for h in history]
