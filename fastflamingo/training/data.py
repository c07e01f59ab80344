"""Training data: interleaved documents (images and text) as batches for the LM loss.

A document is a JSON line ``{"images": ["a.png", "b.png"], "text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>"}``:
one ``<image>`` tag in the text per image, in order (paths relative to the file). Batches are
right-padded (as open_flamingo trains: a left-padded row's first label would be predicted from a
padding position), a row with fewer images than the batch's most gets zero images after its own
(no token sees them), and the labels are the text tokens: ``<image>`` and padding are -100.
A document longer than ``max_length`` tokens is an error naming it (``file:line``), never cut;
so is an image file that is not there. Both are checked for every document before training
starts (:meth:`DocumentBatches.check`, which :func:`~fastflamingo.training.fine_tune` calls), not
when the document's batch comes.

:class:`DocumentBatches` gives the micro-batches of a step as a function of the step alone (the
order is a permutation per epoch, drawn from the seed), so a run resumed from a checkpoint sees
exactly the data the uninterrupted run would have.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from ..warn import warn_caller


@dataclass(eq=False)
class Document:
    """One interleaved document: its images (paths, PIL images, or (C, H, W) / (F, C, H, W)
    tensors already processed) and its text, one ``<image>`` tag per image. ``where``: where it
    comes from, for error messages (``"train.jsonl:4"``; None: ``"document {index}"``)."""
    images: list
    text: str
    where: str | None = None


def load_documents(path: str, tokenizer=None, max_length: int | None = None) -> list[Document]:
    """Documents from a JSON-lines file (see the module's docstring). Every image file must
    exist; with ``tokenizer`` and ``max_length``, every document must be at most ``max_length``
    tokens: errors name the document as ``path:line``."""
    from ..inputs import json_lines
    out = []
    for where, row, base in json_lines(path):
        if not isinstance(row.get("text"), str):
            raise ValueError(f"{where} needs a \"text\" string (and \"images\": a list of paths), "
                             f"got keys {sorted(row)}")
        images = row.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise ValueError(f"{where}: \"images\" must be a list of paths, got {images!r}")
        tags = row["text"].count("<image>")
        if tags != len(images):
            raise ValueError(f"{where}: the text has {tags} <image> tag(s) for {len(images)} image(s); "
                             "put one <image> in the text where each image goes")
        out.append(Document([os.path.join(base, p) for p in images], row["text"], where))
    if not out:
        raise ValueError(f"{path} holds no documents")
    check_documents(out, tokenizer if max_length is not None else None, max_length)
    return out


def _where(doc: Document, i: int) -> str:
    return doc.where or f"document {i}"


def check_documents(docs: list[Document], tokenizer=None, max_length: int | None = None) -> None:
    """Before any training: every image given as a path is a file, and with ``tokenizer`` and
    ``max_length`` every document is at most ``max_length`` tokens; an error names the first
    document that is not (``file:line``, or ``document {index}``)."""
    for i, d in enumerate(docs):
        for p in d.images:
            if isinstance(p, str) and not os.path.isfile(p):
                missing = sum(isinstance(q, str) and not os.path.isfile(q) for e in docs[i:] for q in e.images)
                raise FileNotFoundError(f"{_where(d, i)}: no image file {p!r} ({missing} missing from here on): "
                                        "image paths are relative to the data file's folder")
    if tokenizer is None or max_length is None:
        return
    for start in range(0, len(docs), 1024):
        chunk = docs[start:start + 1024]
        lengths = [len(ids) for ids in tokenizer([d.text for d in chunk])["input_ids"]]
        for j, (d, n) in enumerate(zip(chunk, lengths)):
            if n > max_length:
                raise ValueError(f"{_where(d, start + j)} is {n} tokens, more than max_length={max_length}: split it, "
                                 "or raise max_length (documents are never cut)")


def collate(docs: list[Document], tokenizer, media_token_id: int, *, image_processor=None, image_size: int,
            max_length: int | None = None, index: list[int] | None = None, min_images: int = 0):
    """(vision_x (B, N, F, C, H, W) or None, input_ids, attention_mask, labels) of ``docs``.
    ``min_images``: N at least this (zero images no token sees), so that a batch of text only
    still runs the vision path: under FSDP2 every rank must run the same modules."""
    from ..inputs import image_tensor
    enc = tokenizer([d.text for d in docs], return_tensors="pt", padding="longest", padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(-1).tolist()
    for i, (d, n) in enumerate(zip(docs, lengths)):
        where = _where(d, index[i] if index else i)
        if max_length is not None and n > max_length:
            raise ValueError(f"{where} is {n} tokens, more than max_length={max_length}: split it, or raise "
                             "max_length (documents are never cut)")
        tags = int((ids[i] == media_token_id).sum())
        if tags != len(d.images):
            raise ValueError(f"{where} tokenizes to {tags} <image> token(s) (id {media_token_id}) for "
                             f"{len(d.images)} image(s): use the tokenizer the model was built with")
    labels = ids.masked_fill((ids == media_token_id) | (mask == 0), -100)
    most = max(min_images, *(len(d.images) for d in docs))
    if most == 0:
        return None, ids, mask, labels
    rows = []
    for d in docs:
        frames = [image_tensor(im, image_processor) for im in d.images]
        shape = frames[0].shape if frames else (1, 3, image_size, image_size)
        rows.append(torch.stack(frames + [torch.zeros(shape)] * (most - len(frames))))
    return torch.stack(rows), ids, mask, labels


class DocumentBatches:
    """``batches(step)`` -> this process's micro-batches of the step: a step takes ``grad_accum x
    world_size`` micro-batches of ``batch_size`` documents, in a per-epoch shuffled order drawn
    from ``seed``; rank r gets micro-batches r, r + world_size, ... (data parallel: with
    ``world_size`` ranks, the step is the one a single process makes with ``grad_accum x
    world_size``).

    An epoch is ``len(docs) // (batch_size x grad_accum x world_size)`` steps: the ``len(docs) %
    (batch_size x grad_accum x world_size)`` documents left over sit out each epoch (the last ones
    of its shuffled order, so other ones each epoch), and building the batches warns, giving how
    many; a number of documents that is a multiple of ``batch_size x grad_accum x world_size``
    uses every one of them every epoch. :meth:`settings` (the seed, batch_size, grad_accum,
    world_size and the number of documents) fix the order: a resumed
    :func:`~fastflamingo.training.fine_tune` refuses others than its checkpoint's."""

    def __init__(self, docs: list[Document], tokenizer, media_token_id: int, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, image_processor=None, image_size: int = 224,
                 max_length: int | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        per_step = batch_size * grad_accum * world_size
        if per_step > len(docs):
            raise ValueError(f"a step takes batch_size x grad_accum x world_size = {per_step} documents, "
                             f"but there are {len(docs)}")
        self.docs, self.tokenizer, self.media = docs, tokenizer, media_token_id
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.rank, self.world_size = rank, world_size
        self.image_processor, self.image_size, self.max_length = image_processor, image_size, max_length
        # the len(docs) % per_step documents left over sit out the epoch (the next epoch draws another order)
        self.per_epoch = len(docs) // per_step
        if len(docs) % per_step and rank == 0:  # once, not once a process
            left = len(docs) % per_step
            warn_caller(f"{left} of the {len(docs)} documents sit out each epoch: an epoch is {self.per_epoch} "
                        f"step(s) of batch_size x grad_accum x world_size = {per_step} documents (each epoch's "
                        f"shuffle leaves out other ones); to train on every document every epoch, give a multiple "
                        f"of {per_step} documents, or a batch_size x grad_accum x world_size that divides {len(docs)}")
        self._orders: dict[int, list[int]] = {}
        self._checked = False

    def settings(self) -> dict:
        """What fixes which documents every step takes: a resumed
        :func:`~fastflamingo.training.fine_tune` checks them against its checkpoint's."""
        return {"seed": self.seed, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size, "documents": len(self.docs)}

    def check(self) -> None:
        """Every document's image files and (with ``max_length``) length, at once: what a batch
        would find when it comes (:func:`check_documents`). :func:`~fastflamingo.training.fine_tune`
        calls it before the first step."""
        if not self._checked:
            check_documents(self.docs, self.tokenizer, self.max_length)
            self._checked = True

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.docs)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._orders = {epoch: order}  # one epoch at a time
        return self._orders[epoch]

    def __call__(self, step: int) -> list[tuple]:
        epoch, k = divmod(step, self.per_epoch)
        order = self._order(epoch)
        micro = self.grad_accum * self.world_size
        start = k * self.batch_size * micro
        out = []
        for m in range(self.rank, micro, self.world_size):
            index = order[start + m * self.batch_size: start + (m + 1) * self.batch_size]
            out.append(collate([self.docs[i] for i in index], self.tokenizer, self.media,
                               image_processor=self.image_processor, image_size=self.image_size,
                               max_length=self.max_length, index=index, min_images=int(self.world_size > 1)))
        return out
