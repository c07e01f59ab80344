"""Reading a user's files: JSON-lines records and images (evaluation examples, training documents),
and the image processors that turn images into a model's pixels."""
from __future__ import annotations

import functools
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
                             "image_processor (model.image_processor(), or the one create_model_and_transforms returns)")
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


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_flamingo, IDEFICS)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(style: str, size: int):
    """PIL image -> (3, size, size) pixels, as the model's own project prepares them for inference:
    IDEFICS's processor (transformers'), or open_flamingo's, which is open_clip's evaluation
    transform (resize the short side, crop the centre, CLIP normalisation). Without open_clip
    installed, the same steps written here, with torchvision's sizes and offsets."""
    if style == "idefics":
        try:
            from transformers import IdeficsImageProcessor
            processor = IdeficsImageProcessor(image_size=size)
        except ImportError:  # (transformers' processor needs torchvision) its PIL steps, written here
            return functools.partial(_resize_normalise, size=size)
        return lambda img: processor([img], return_tensors="pt")[0]
    try:
        import open_clip
        return open_clip.image_transform(size, is_train=False)
    except ImportError:
        return functools.partial(_resize_crop_normalise, size=size)


def _resize_crop_normalise(img, size: int) -> torch.Tensor:
    """open_clip's evaluation transform (torchvision's Resize(size) and CenterCrop(size), bicubic)."""
    from PIL import Image
    short, long = sorted(img.size)
    long = int(size * long / short)  # torchvision's resized size of the long side (truncated)
    img = img.resize((size, long) if img.width <= img.height else (long, size), Image.BICUBIC)
    left, top = int(round((img.width - size) / 2.0)), int(round((img.height - size) / 2.0))
    return _normalise(img.crop((left, top, left + size, top + size)))


def _resize_normalise(img, size: int) -> torch.Tensor:
    """IDEFICS's processor without torchvision: the whole image resized to the square (bicubic)."""
    from PIL import Image
    return _normalise(img.resize((size, size), Image.BICUBIC))


def _normalise(img) -> torch.Tensor:
    """A PIL image -> CLIP-normalised (3, H, W) pixels (RGBA, grayscale, palette: as RGB, as the
    peers' own transforms take them)."""
    img = img.convert("RGB") if img.mode != "RGB" else img
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return (x.float() / 255 - mean) / std
