"""Flamingo's tokens: ``<image>`` marks where an image goes, ``<|endofchunk|>`` ends the text
that belongs to it. Adding them grows the LM's embeddings; only the new rows are trained."""
from __future__ import annotations

import torch
from torch import nn

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def setup_tokenizer(tokenizer, lang_encoder: nn.Module | None = None) -> dict:
    """Add ``<|endofchunk|>`` and ``<image>`` (and ``<PAD>`` when the tokenizer has no pad token),
    as open_flamingo does, and resize ``lang_encoder``'s embeddings to the new vocabulary.

    Returns:
        dict with ``media_token_id``, ``eoc_token_id``, ``pad_token_id`` and ``num_base_tokens``
        (the tokenizer's size before the new tokens: embedding rows from there on are the
        trainable new ones).
    """
    num_base = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [EOC_TOKEN, MEDIA_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if lang_encoder is not None and len(tokenizer) != lang_encoder.get_input_embeddings().weight.shape[0]:
        lang_encoder.resize_token_embeddings(len(tokenizer))
    return {
        "media_token_id": tokenizer.convert_tokens_to_ids(MEDIA_TOKEN),
        "eoc_token_id": tokenizer.convert_tokens_to_ids(EOC_TOKEN),
        "pad_token_id": tokenizer.pad_token_id,
        "num_base_tokens": num_base,
    }


def train_new_embedding_rows(model: nn.Module, num_base_tokens: int | None) -> None:
    """Make only the embedding rows ``>= num_base_tokens`` trainable (None: none), in the input
    embeddings and, when it is a separate matrix of the same rows, the output embeddings too
    (IDEFICS trains both; with tied embeddings they are one matrix).

    Each embedding stays one matrix (checkpoints keep their layout); a gradient hook zeroes the
    rows of the original vocabulary. Use :meth:`Flamingo.parameter_groups` (no weight decay on
    embeddings) so the optimizer leaves those rows exactly as they are.
    """
    for handle in getattr(model, "_embedding_hooks", ()):
        handle.remove()
    model._embedding_hooks = []
    if num_base_tokens is None:
        return
    for weight in embedding_matrices(model):
        if num_base_tokens >= weight.shape[0]:
            continue
        weight.requires_grad_(True)
        keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
        keep[num_base_tokens:] = True
        model._embedding_hooks.append(weight.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype)))


def embedding_matrices(model: nn.Module) -> list[torch.Tensor]:
    """The LM's input embedding matrix, and its output one when that is a separate matrix with
    the same rows (untied)."""
    lm = model.lang_encoder
    inp = lm.get_input_embeddings().weight
    out = lm.get_output_embeddings()
    out = getattr(out, "weight", None)
    if out is None or out is inp or out.shape[0] != inp.shape[0] or not isinstance(out, nn.Parameter):
        return [inp]
    return [inp, out]
