"""Flamingo's tokens: ``<image>`` marks where an image goes, ``<|endofchunk|>`` ends the text
that belongs to it. Adding them grows the LM's embeddings; only the new rows are trained."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from .warn import warn_caller

MEDIA_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


def setup_tokenizer(tokenizer, lang_encoder: nn.Module | None = None, *, num_base_tokens: int | None = None) -> dict:
    """Add ``<|endofchunk|>`` and ``<image>`` (and ``<PAD>`` when the tokenizer has no pad token),
    as open_flamingo does, and resize ``lang_encoder``'s embeddings to the new vocabulary.

    Returns:
        dict with ``media_token_id``, ``eoc_token_id``, ``pad_token_id`` and ``num_base_tokens``
        (the vocabulary size before the Flamingo tokens: embedding rows from there on are the
        trainable new ones). ``num_base_tokens`` given: returned as it is; else read from the
        tokenizer, also one that already holds them (open_flamingo's, or one fastflamingo saved):
        :func:`base_vocab_size`.
    """
    num_base = base_vocab_size(tokenizer) if num_base_tokens is None else num_base_tokens
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


def base_vocab_size(tokenizer) -> int:
    """The tokenizer's size without the Flamingo tokens it holds: where ``<|endofchunk|>``,
    ``<image>`` (and ``<PAD>`` as its pad token) are the last ids, the smallest of them; without
    them, its size. Held elsewhere it cannot be told: a warning asks for ``num_base_tokens=``."""
    n, vocab = len(tokenizer), tokenizer.get_vocab()
    held = {vocab[t] for t in (EOC_TOKEN, MEDIA_TOKEN) if t in vocab}
    if not held:
        return n
    pad = {vocab[PAD_TOKEN]} if tokenizer.pad_token == PAD_TOKEN and PAD_TOKEN in vocab else set()
    for ids in (held | pad, held):
        if ids == set(range(n - len(ids), n)):
            return n - len(ids)
    warn_caller(f"the tokenizer already holds the Flamingo tokens ({EOC_TOKEN} and {MEDIA_TOKEN}: ids "
                f"{sorted(held)}), not as its last ids (it has {n}), so where its base vocabulary ends cannot be "
                f"told: embedding rows from {min(held)} on are taken as the new, trainable ones. Pass "
                "num_base_tokens= (the vocabulary size before the Flamingo tokens) to choose")
    return min(held)


def train_new_embedding_rows(model: nn.Module, num_base_tokens: int | None, *, output: bool = True) -> None:
    """Make only the embedding rows ``>= num_base_tokens`` trainable (None: none), in the input
    embeddings and, when it is a separate matrix of the same rows and ``output``, the output
    embeddings too (IDEFICS trains both; open_flamingo only the input one; with tied embeddings
    they are one matrix, whose gradient through the output embedding is masked the same way).

    Each embedding stays one matrix (checkpoints keep their layout). The rows of the original
    vocabulary get no gradient, by masks in the modules' own forward: the input embedding's output
    passes gradient only at positions holding a new token, and an ``nn.Linear`` output embedding
    multiplies its weight by a row mask that only acts on the gradient (:class:`RowMaskedLinear`).
    The masks live in the graph, not on the parameter, so they survive what replaces parameters:
    FSDP2's ``fully_shard`` (a hook on the parameter was lost there, and the whole vocabulary
    trained). An output embedding that is not an ``nn.Linear`` gets a gradient hook on its weight.
    Use :meth:`Flamingo.parameter_groups` (no weight decay on embeddings) so the optimizer leaves
    the masked rows exactly as they are.
    """
    for handle in getattr(model, "_embedding_hooks", ()):
        handle.remove()
    model._embedding_hooks = []
    if num_base_tokens is None:
        return
    lm = model.lang_encoder
    inp, out = lm.get_input_embeddings(), lm.get_output_embeddings()
    for weight in embedding_matrices(model)[:None if output else 1]:
        if num_base_tokens < weight.shape[0]:
            weight.requires_grad_(True)
    if num_base_tokens >= inp.weight.shape[0]:
        return
    model._embedding_hooks.append(inp.register_forward_hook(_NewTokenPositions(num_base_tokens), with_kwargs=True))
    if out is None or getattr(out, "weight", None) is None or not out.weight.requires_grad:
        return
    if type(out) in (nn.Linear, RowMaskedLinear):
        model._embedding_hooks.append(_RowMaskSwitch(out, num_base_tokens))
    else:
        keep = _keep_rows(out.weight, num_base_tokens)
        model._embedding_hooks.append(out.weight.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype)))


def _keep_rows(weight: torch.Tensor, num_base_tokens: int) -> torch.Tensor:
    keep = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
    keep[num_base_tokens:] = True
    return keep


class _NewTokenPositions:
    """Forward hook of the input embedding: its output carries gradient only where the token is a
    new one (id >= ``num_base_tokens``), so only those rows of the matrix get any."""

    def __init__(self, num_base_tokens: int):
        self.num_base_tokens = num_base_tokens

    def __call__(self, module, args, kwargs, output):
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None  # inference: nothing to mask
        ids = args[0] if args else kwargs["input"]  # as given: accelerate's hook moves them only for forward
        new = (ids >= self.num_base_tokens).unsqueeze(-1).to(output.device)
        return torch.where(new, output, output.detach())


class _KeepRows(torch.autograd.Function):
    """The identity; its gradient keeps the rows where ``keep`` is True (zeros elsewhere). Its
    context is set apart from its forward (``setup_context``), and its forward is plain torch, so
    that ``torch.func`` transforms (grad, vjp, vmap) take it."""
    generate_vmap_rule = True

    @staticmethod
    def forward(weight, keep):
        return weight.view_as(weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.device, grad.dtype), None


class RowMaskedLinear(nn.Linear):
    """An ``nn.Linear`` output embedding whose weight gradient keeps only the rows where
    ``keep_rows`` is True. :func:`train_new_embedding_rows` switches a plain ``nn.Linear``'s class
    to this one and back: same parameters and state dict; the model still deep-copies and pickles."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = getattr(self, "keep_rows", None)  # None: a forward bound before the switch back
        weight = _KeepRows.apply(self.weight, keep) if keep is not None and torch.is_grad_enabled() else self.weight
        return F.linear(x, weight, self.bias)


class _RowMaskSwitch:
    """Makes ``linear`` a :class:`RowMaskedLinear`; ``remove()`` makes it a plain ``nn.Linear``
    again (a handle, like a hook's). A layer placed by accelerate (``device_map``) calls the
    forward its hook saved (``_old_forward``): that one is switched too."""

    def __init__(self, linear: nn.Linear, num_base_tokens: int):
        self.linear = linear
        linear.keep_rows = _keep_rows(linear.weight, num_base_tokens)
        self._switch(RowMaskedLinear)

    def _switch(self, cls: type) -> None:
        self.linear.__class__ = cls
        if "_old_forward" in self.linear.__dict__:
            self.linear._old_forward = types.MethodType(cls.forward, self.linear)

    def remove(self) -> None:
        if type(self.linear) is RowMaskedLinear:
            self._switch(nn.Linear)
            del self.linear.keep_rows


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
