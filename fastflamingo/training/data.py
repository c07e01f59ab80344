"""Training data: interleaved documents (images and text) as batches for the LM loss.

A document is a JSON line ``{"images": ["a.png", "b.png"], "text": "<image>A cat.<|endofchunk|><image>A dog.<|endofchunk|>"}``:
one ``<image>`` tag in the text per image, in order (paths relative to the file). Batches are
right-padded (as open_flamingo trains: a left-padded row's first label would be predicted from a
padding position), a row with fewer images than the batch's most gets zero images after its own
(no token sees them), and the labels are the text tokens: ``<image>`` and padding are -100.
A document longer than ``max_length`` tokens is an error naming it (``file:line``), never cut;
so is an image file that is not there, a document with no token to learn from (text of
``<image>`` tags only), and one with more images than the model takes (``max_num_media``). All
are checked for every document before training starts (:meth:`DocumentBatches.check`, which
:func:`~fastflamingo.training.fine_tune` calls with the model), not when the document's batch
comes.

:class:`DocumentBatches` gives the micro-batches of a step as a function of the step alone (the
order is a permutation per epoch, drawn from the seed), so a run resumed from a checkpoint sees
exactly the data the uninterrupted run would have.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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
        other = sorted(set(row) - {"text", "images"})
        if other:  # (a misspelt "images" trained the document text-only, without a word)
            hint = ' (did you mean "images", a list of paths?)' \
                if any(k.lower().startswith("image") for k in other) else ""
            raise ValueError(f"{where}: unknown key(s) {other}{hint}: a document line holds \"text\" and "
                             "\"images\" only")
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


def check_documents(docs: list[Document], tokenizer=None, max_length: int | None = None, *,
                    media_token_id: int | None = None, max_images: int | None = None) -> None:
    """Before any training: every image given as a path is a file, and no document has more than
    ``max_images`` images (the model's ``max_num_media``). With ``tokenizer``: every document is at
    most ``max_length`` tokens (when given), and with ``media_token_id`` it tokenizes to one
    ``<image>`` token per image and has a token to learn from (a label: a token after its first
    that is not ``<image>``). An error names the first document that fails (``file:line``, or
    ``document {index}``)."""
    for i, d in enumerate(docs):
        if max_images is not None and len(d.images) > max_images:
            over = sum(len(e.images) > max_images for e in docs[i:])
            raise ValueError(f"{_where(d, i)} has {len(d.images)} images, more than the model's max_num_media="
                             f"{max_images} ({over} such document(s) from here on): split it into documents of at "
                             f"most {max_images} images")
        for p in d.images:
            if isinstance(p, str) and not os.path.isfile(p):
                missing = sum(isinstance(q, str) and not os.path.isfile(q) for e in docs[i:] for q in e.images)
                raise FileNotFoundError(f"{_where(d, i)}: no image file {p!r} ({missing} missing from here on): "
                                        "image paths are relative to the data file's folder")
    if tokenizer is None or (max_length is None and media_token_id is None):
        return
    for start in tqdm(range(0, len(docs), 1024), desc="checking documents", unit_scale=1024, unit="doc",
                      disable=None if len(docs) > 16384 else True, leave=False):
        chunk = docs[start:start + 1024]
        for j, (d, ids) in enumerate(zip(chunk, tokenizer([d.text for d in chunk])["input_ids"])):
            where = _where(d, start + j)
            _check_tokens(where, d, len(ids), None if media_token_id is None else ids.count(media_token_id),
                          media_token_id, max_length)
            if media_token_id is None:
                continue
            if not any(t != media_token_id for t in ids[1:]):
                raise ValueError(f"{where} has no token to learn from: its text {d.text[:80]!r} is {len(ids)} "
                                 "token(s), and the labels are the tokens after the first that are not <image>. "
                                 "Give it text, or leave it out")


def _check_tokens(where: str, doc: Document, length: int, tags: int | None, media_token_id: int | None,
                  max_length: int | None) -> None:
    """A tokenized document is at most ``max_length`` tokens and holds one ``<image>`` token per
    image (``tags``: how many it holds; None: not counted): what :func:`check_documents` checks
    up front and :func:`collate` again."""
    if max_length is not None and length > max_length:
        raise ValueError(f"{where} is {length} tokens, more than max_length={max_length}: split it, or raise "
                         "max_length (documents are never cut)")
    if tags is not None and tags != len(doc.images):
        raise ValueError(f"{where} tokenizes to {tags} <image> token(s) (id {media_token_id}) for "
                         f"{len(doc.images)} image(s): use the tokenizer the model was built with")


def collate(docs: list[Document], tokenizer, media_token_id: int, *, image_processor=None,
            image_size: int | None = None, max_length: int | None = None, index: list[int] | None = None,
            min_images: int = 0):
    """(vision_x (B, N, F, C, H, W) or None, input_ids, attention_mask, labels) of ``docs``. A row
    with fewer images than the batch's most gets zero images shaped as the batch's images (which
    must all be one (F, C, H, W) shape). ``min_images``: N at least this (zero images no token
    sees), so that a batch of text only still runs the vision path: under FSDP2 every rank must
    run the same modules; such a batch's zero images are (1, 3, image_size, image_size)."""
    from ..inputs import image_tensor
    enc = tokenizer([d.text for d in docs], return_tensors="pt", padding="longest", padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    lengths = mask.sum(-1).tolist()
    where = [_where(d, index[i] if index else i) for i, d in enumerate(docs)]
    for i, (d, n) in enumerate(zip(docs, lengths)):
        _check_tokens(where[i], d, n, int((ids[i] == media_token_id).sum()), media_token_id, max_length)
    labels = ids.masked_fill((ids == media_token_id) | (mask == 0), -100)
    most = max(min_images, *(len(d.images) for d in docs))
    if most == 0:
        return None, ids, mask, labels
    frames = [[image_tensor(im, image_processor) for im in d.images] for d in docs]
    first = next(((i, t) for i, row in enumerate(frames) for t in row), None)
    if first is not None:
        shape, dtype = first[1].shape, first[1].dtype
        for i, row in enumerate(frames):
            for k, t in enumerate(row):
                if t.shape != shape:
                    raise ValueError(f"{where[i]}'s image {k} is {tuple(t.shape)} (frames, channels, height, width) "
                                     f"but {where[first[0]]}'s is {tuple(shape)}: a batch's images must be one shape "
                                     "(process them alike; clips with the same number of frames)")
    elif image_size is None:
        raise ValueError("a batch of text only under min_images > 0 gets zero images: pass image_size (the "
                         "model's config.vision.image_size)")
    else:
        shape, dtype = (1, 3, image_size, image_size), torch.float32
    rows = [torch.stack(row + [torch.zeros(shape, dtype=dtype)] * (most - len(row))) for row in frames]
    return torch.stack(rows), ids, mask, labels


class _Documents:
    """What :class:`DocumentBatches` and :class:`HeldOut` share: the documents, how a micro-batch
    of them is made, and :meth:`check`."""

    def __init__(self, docs, tokenizer, media_token_id, *, batch_size, image_processor, image_size, max_length,
                 rank, world_size):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if not docs:
            raise ValueError("no documents")
        self.docs, self.tokenizer, self.media = docs, tokenizer, media_token_id
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.image_processor, self.image_size, self.max_length = image_processor, image_size, max_length
        self._checked: tuple | None = None  # (the max_images it was checked against,)

    def check(self, model=None) -> None:
        """Every document at once, as a batch would find it when it comes
        (:func:`check_documents`): its image files, its ``<image>`` tokens, that it has a token to
        learn from, its length (with ``max_length``), and with ``model`` its number of images
        (``max_num_media``) and the ``<image>`` token id; ``image_size`` None becomes the model's.
        :func:`~fastflamingo.training.fine_tune` calls it with the model before the first step."""
        limit = None
        if model is not None:
            c = model.config
            if c.media_token_id != self.media:
                raise ValueError(f"these {type(self).__name__} take <image> as token id {self.media}, but the "
                                 f"model's is {c.media_token_id}: build them with "
                                 "media_token_id=model.config.media_token_id")
            if self.image_size is None:
                self.image_size = c.vision.image_size
            elif self.world_size > 1 and self.image_size != c.vision.image_size:
                raise ValueError(f"image_size={self.image_size} (the zero images of a batch of text only), but the "
                                 f"model takes {c.vision.image_size}-pixel images: leave image_size out (None: the "
                                 "model's) or give model.config.vision.image_size")
            limit = c.resampler.max_num_media
        if self._checked != (limit,):
            check_documents(self.docs, self.tokenizer, self.max_length, media_token_id=self.media, max_images=limit)
            self._checked = (limit,)

    def _collate(self, index: list[int]) -> tuple:
        return collate([self.docs[i] for i in index], self.tokenizer, self.media, image_processor=self.image_processor,
                       image_size=self.image_size, max_length=self.max_length, index=index,
                       min_images=int(self.world_size > 1))


class DocumentBatches(_Documents):
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
    :func:`~fastflamingo.training.fine_tune` refuses others than its checkpoint's.
    ``image_size``: the pixels of the zero images a batch of text only gets under ``world_size >
    1`` (None: the model's, read by :meth:`check`, which fine_tune calls)."""

    def __init__(self, docs: list[Document], tokenizer, media_token_id: int, *, batch_size: int,
                 grad_accum: int = 1, seed: int = 0, image_processor=None, image_size: int | None = None,
                 max_length: int | None = None, rank: int = 0, world_size: int = 1):
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size and grad_accum must be >= 1, got {batch_size} and {grad_accum}")
        super().__init__(docs, tokenizer, media_token_id, batch_size=batch_size, image_processor=image_processor,
                         image_size=image_size, max_length=max_length, rank=rank, world_size=world_size)
        per_step = batch_size * grad_accum * world_size
        if per_step > len(docs):
            raise ValueError(f"a step takes batch_size x grad_accum x world_size = {per_step} documents, "
                             f"but there are {len(docs)}")
        self.grad_accum, self.seed = grad_accum, seed
        # the len(docs) % per_step documents left over sit out the epoch (the next epoch draws another order)
        self.per_epoch = len(docs) // per_step
        if len(docs) % per_step and rank == 0:  # once, not once a process
            left = len(docs) % per_step
            warn_caller(f"{left} of the {len(docs)} documents sit out each epoch: an epoch is {self.per_epoch} "
                        f"step(s) of batch_size x grad_accum x world_size = {per_step} documents (each epoch's "
                        f"shuffle leaves out other ones); to train on every document every epoch, give a multiple "
                        f"of {per_step} documents, or a batch_size x grad_accum x world_size that divides {len(docs)}")
        self._orders: dict[int, list[int]] = {}

    def settings(self) -> dict:
        """What fixes which documents every step takes: a resumed
        :func:`~fastflamingo.training.fine_tune` checks them against its checkpoint's."""
        return {"seed": self.seed, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
                "world_size": self.world_size, "documents": len(self.docs)}

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
            out.append(self._collate(order[start + m * self.batch_size: start + (m + 1) * self.batch_size]))
        return out


class HeldOut(_Documents):
    """Held-out documents, for :func:`~fastflamingo.training.fine_tune`'s evaluation loss
    (``eval_data=``): iterating gives this process's micro-batches of every document once, in
    order, ``batch_size`` at a time (rank r of ``world_size``: micro-batches r, r + world_size,
    ...). Every rank gets as many (FSDP2 needs every rank to run the same forwards): a rank short
    of one gets a copy of the first with no target (all labels -100), which adds nothing.
    :meth:`check` checks the documents as :class:`DocumentBatches` does, and reads every image
    (held-out sets are small; an unreadable image found at the first evaluation, after the steps
    before it, would stop the run there)."""

    def check(self, model=None) -> None:
        super().check(model)
        if not getattr(self, "_read", False):
            from ..inputs import read_image
            for i, d in enumerate(self.docs):
                for p in d.images:
                    if isinstance(p, str):
                        try:
                            read_image(p)
                        except ValueError as e:
                            raise ValueError(f"{_where(d, i)}: {e}") from None
            self._read = True

    def __init__(self, docs: list[Document], tokenizer, media_token_id: int, *, batch_size: int = 8,
                 image_processor=None, image_size: int | None = None, max_length: int | None = None,
                 rank: int = 0, world_size: int = 1):
        super().__init__(docs, tokenizer, media_token_id, batch_size=batch_size, image_processor=image_processor,
                         image_size=image_size, max_length=max_length, rank=rank, world_size=world_size)
        self.micro = -(-len(docs) // batch_size)  # micro-batches in all, over the ranks

    def __len__(self) -> int:
        """Micro-batches each rank runs."""
        return -(-self.micro // self.world_size)

    def __iter__(self):
        for k in range(len(self)):
            m = self.rank + k * self.world_size
            if m < self.micro:
                yield self._collate(list(range(m * self.batch_size, min(len(self.docs), (m + 1) * self.batch_size))))
            else:  # (this rank's share ran out: the same forward as the others, no target)
                vx, ids, mask, labels = self._collate(list(range(min(len(self.docs), self.batch_size))))
                yield vx, ids, mask, torch.full_like(labels, -100)
