"""Reading a user's files: JSON-lines records and images (evaluation examples, training documents)."""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch


def json_lines(path: str) -> Iterator[tuple[str, dict, str]]:
    """``(where, record, base)`` for each non-blank line of a JSON-lines file: ``where`` is
    ``"path:line"`` for error messages, ``base`` the file's directory (image paths are relative to
    it). A line that is not a JSON object is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path!r}")
    base = os.path.dirname(os.path.abspath(path))
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n} is not a JSON object ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n} is not a JSON object, got {line.strip()[:80]!r}")
            yield f"{path}:{n}", row, base


def read_image(path: str):
    """An image file -> a PIL RGB image, or an error naming the file: a missing one
    (FileNotFoundError), one PIL cannot read (ValueError: not an image, corrupt, truncated)."""
    from PIL import Image, UnidentifiedImageError
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file {path!r}")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except UnidentifiedImageError:
        why = "not an image PIL can read (another kind of file, or a corrupt image)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = f"a corrupt or truncated image ({e})"
    raise ValueError(f"image file {path!r}: {why}; give a PNG, JPEG or other image file")


def image_tensor(image, image_processor) -> torch.Tensor:
    """(F, C, H, W): an image (a path, a PIL image, or a (C, H, W) / (F, C, H, W) tensor already
    processed), through ``image_processor`` unless already a tensor."""
    if isinstance(image, torch.Tensor):
        t = image
    else:
        if image_processor is None:
            raise ValueError(f"images are {type(image).__name__}, not tensors: pass the model's "
                             "image_processor (create_model_and_transforms returns it)")
        if isinstance(image, str):
            image = read_image(image)
        t = image_processor(image)
        t = t["pixel_values"][0] if isinstance(t, dict) or hasattr(t, "keys") else t
        t = torch.as_tensor(t)
    if t.dim() == 3:
        t = t.unsqueeze(0)
    if t.dim() != 4:
        raise ValueError(f"an image must be (C, H, W) or (F, C, H, W), got shape {tuple(t.shape)}")
    return t
