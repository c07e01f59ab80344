"""Offline builders of tiny Hugging Face IDEFICS models and of their inputs, made by IDEFICS's own
processor logic, for side-by-side tests. Sizes follow the transformers test-suite (text hidden 32,
4 heads; vision embed 32, patch 2, image 30; resampler depth 2, 2 heads x 8, 16 latents)."""
from __future__ import annotations

import torch

from fastflamingo.convert.idefics import RELEASED_FREEZE

VOCAB, ADDITIONAL = 99, 2
FAKE_ID, IMAGE_ID = VOCAB, VOCAB + 1         # IDEFICS: <fake_token_around_image>, <image>
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_SIZE = 30


def tiny_tokenizer(vocab_size: int, specials: dict[str, int]):
    """A word-level ``PreTrainedTokenizerFast`` ("w<i>" words), built offline. ``specials`` maps
    special-token strings (``<s>``, ``</s>``, ``<unk>``, ``<image>``, ...) to their ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(vocab_size)}
    for token, i in specials.items():
        vocab.pop(f"w{i}", None)
        vocab[token] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    names = {"<s>": "bos_token", "</s>": "eos_token", "<unk>": "unk_token", "<pad>": "pad_token"}
    kwargs = {names[t]: t for t in specials if t in names}
    extra = [t for t in specials if t not in names]
    return PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=extra, **kwargs)


def idefics_tokenizer():
    return tiny_tokenizer(VOCAB + ADDITIONAL, {"<unk>": 3, "<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID,
                                               "<fake_token_around_image>": FAKE_ID, "<image>": IMAGE_ID})


def idefics_config(*, use_resampler=True, qk_layer_norms=True, alpha_type="vector", cross_layer_interval=1,
                   layers=4):
    from transformers import IdeficsConfig
    return IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=ADDITIONAL, hidden_size=32, intermediate_size=37,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128,
        alpha_type=alpha_type, alpha_initializer="zeros", cross_layer_interval=cross_layer_interval,
        qk_layer_norms=qk_layer_norms, use_resampler=use_resampler,
        **RELEASED_FREEZE,  # as the released models (IdeficsConfig's default freeze_lm_head is False)
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        vision_config=dict(embed_dim=32, image_size=IMAGE_SIZE, patch_size=2, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=37),
        perceiver_config=dict(use_resampler=use_resampler, resampler_n_latents=16, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=8,
                              qk_layer_norms_perceiver=qk_layer_norms))


def idefics_model(seed: int = 0, **config_kwargs):
    """A tiny ``IdeficsForVisionText2Text`` with random non-zero alphas and perturbed norms (so that
    no gate, norm weight or bias is trivially 0 or 1)."""
    from transformers import IdeficsForVisionText2Text
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(idefics_config(**config_kwargs), ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "alpha" in name:
                p.copy_(torch.randn(p.shape, generator=g) + 0.5)
            elif "norm" in name or name.endswith(".ln.weight") or name.endswith(".ln.bias"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif "additional" in name:
                p.normal_(0, 0.5, generator=g)
    return model


def idefics_inputs(seed: int = 0, *, pad: bool = True):
    """A batch the way IDEFICS's processor builds it: two rows, left padding, a row with two images
    separated by an EOS (after which text sees no image until the next image) and a row with one.

    Returns:
        dict with ``input_ids`` (B, T), ``attention_mask`` (B, T), ``pixel_values`` (B, N, 3, 30, 30)
        (zeros for a row's missing images) and ``image_attention_mask`` (B, T, N) one-hot.
    """
    g = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    image = [FAKE_ID, IMAGE_ID, FAKE_ID]
    rows = [[BOS_ID] + text(2) + image + text(4) + [EOS_ID] + text(3) + image + text(5),
            [BOS_ID] + text(3) + image + text(6)]
    if not pad:
        rows[1] += text(len(rows[0]) - len(rows[1]))
    return _processor_batch(rows, g)


def _processor_batch(rows: list[list[int]], g: torch.Generator) -> dict:
    """Token rows -> IDEFICS's processor output: left padding, random pixels for each row's images
    (zeros for its missing ones; one zero image for a batch without any), the one-hot image mask."""
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids,
                                                                incremental_to_binary_attention_mask)
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), PAD_ID)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    n_images = (ids == IMAGE_ID).sum(-1)
    N = max(int(n_images.max()), 1)
    pixels = torch.zeros(len(rows), N, 3, IMAGE_SIZE, IMAGE_SIZE)
    for i, n in enumerate(n_images.tolist()):
        pixels[i, :n] = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    incremental, _ = image_attention_mask_for_packed_input_ids(ids, idefics_tokenizer(), "pt")
    image_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=N)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_attention_mask": image_mask}


def text_time_from_image_mask(image_attention_mask: torch.Tensor) -> torch.Tensor:
    """IDEFICS's one-hot (B, T, N) image mask -> (B, T) 1-based image index, 0 = none."""
    m = image_attention_mask.bool()
    return torch.where(m.any(-1), m.to(torch.int64).argmax(-1) + 1, 0)


def random_idefics_inputs(seed: int):
    """A random batch the way IDEFICS's processor builds it: 1-3 rows of random segments (text,
    ``<fake><image><fake>``, a bare ``<image>``, EOS), with or without BOS, left padding, rows
    without images and text-only batches. Returns :func:`idefics_inputs`' dict."""
    import random
    r, g = random.Random(seed), torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(r.randint(1, 3)):
        row = [BOS_ID] if r.random() < 0.7 else []
        for _ in range(r.randint(0, 6)):
            c = r.random()
            row += ([FAKE_ID, IMAGE_ID, FAKE_ID] if c < 0.35 else [IMAGE_ID] if c < 0.45 else [EOS_ID] if c < 0.6
                    else [r.randint(4, VOCAB - 1) for _ in range(r.randint(1, 5))])
        rows.append(row or [r.randint(4, VOCAB - 1)])
    return _processor_batch(rows, g)
