"""Choosing tokens: logits processing, greedy / sampling, and beam search.

The rules are Hugging Face's (transformers 5.x ``generate``), so that outputs equal
open_flamingo's and IDEFICS's ``generate`` token for token: processors (repetition penalty,
no-repeat n-grams, bad words, the stop tokens' ban before ``min_new_tokens``, suppressed tokens)
run on the logits for greedy and sampling and on the log-probabilities for beam search, over the
sequence so far (the prompt with its padding, then the new tokens, as Hugging Face's
``input_ids``); sampling applies temperature, then top-k, top-p and min-p (keeping at least
``#eos + 1`` tokens in beam sampling); beam search keeps
``max(2, 1 + #eos) * num_beams`` candidates per row, scores finished hypotheses by
``sum log p / generated_length ** length_penalty`` and stops a row when its best running beam
cannot beat its worst finished one (``early_stopping=False``).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..checks import check_count
from .outputs import Record


@dataclass
class Sampling:
    """What turns logits into tokens (Hugging Face names and defaults)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50  # sampling keeps the 50 most likely tokens, as Hugging Face; 0 or None: all
    top_p: float = 1.0
    min_p: float | None = None  # drop tokens less likely than min_p x the most likely one's probability
    min_tokens_to_keep: int = 1  # top-k and top-p keep at least this many (Hugging Face: #stops + 1 for beams)
    min_new_tokens: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    suppress_tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    bad_words_ids: list[list[int]] = field(default_factory=list)
    # (device, eos banned too) -> the banned ids on that device: made once, not per step (a
    # tensor made from a Python list on a GPU is a host-to-device copy, which waits for the queue)
    _banned: dict = field(default_factory=dict, repr=False, compare=False)
    # the bad words of one token (banned like suppress_tokens) and of several; the latter per
    # device as (their other tokens, their last token)
    _single_bad: list = field(default_factory=list, init=False, repr=False, compare=False)
    _multi_bad: list = field(default_factory=list, init=False, repr=False, compare=False)
    _sequences: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        if not isinstance(self.do_sample, bool):  # (a string "no" would be truthy: sampling)
            raise TypeError(f"do_sample must be True or False, got {self.do_sample!r}")
        # None, as Hugging Face's GenerationConfig leaves a field it was not given: the default
        self.temperature = 1.0 if self.temperature is None else self.temperature
        self.top_p = 1.0 if self.top_p is None else self.top_p
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, numbers.Real) \
                or not math.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number, got {self.temperature!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, numbers.Real):
            raise ValueError(f"top_p must be a number in (0, 1] (None: 1.0), got {self.top_p!r}")
        for name in ("suppress_tokens", "eos_token_id"):
            ids = getattr(self, name)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{name} must be token ids (ints), got {ids!r}")
        if self.do_sample and self.temperature <= 0:  # (greedy decoding reads no temperature: 0 is fine there)
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}; use do_sample=False for "
                             "greedy decoding")
        check_count("top_k", self.top_k, 0, optional=True, note=" (or None)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (None: off), got {self.min_p}")
        if isinstance(self.repetition_penalty, bool) or not isinstance(self.repetition_penalty, (int, float)) \
                or not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0 (1.0: none), got {self.repetition_penalty!r}")
        check_count("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, note=" (0: none)")
        words = self.bad_words_ids
        if not isinstance(words, list) or not all(
                isinstance(w, list) and w and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in w)
                for w in words):
            raise ValueError(f"bad_words_ids must be a list of non-empty lists of token ids >= 0, got {words!r}")
        # as Hugging Face: a one-token bad word that is a stop token is dropped (stopping stays possible)
        words = [w for w in words if not (len(w) == 1 and w[0] in self.eos_token_id)]
        self._single_bad = [w[0] for w in words if len(w) == 1]
        self._multi_bad = [w for w in words if len(w) > 1]

    @property
    def needs_history(self) -> bool:
        """Whether :meth:`process` reads the sequence so far."""
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0 or bool(self._multi_bad)

    def process(self, scores: torch.Tensor, num_new: int, history: torch.Tensor | None = None,
                padding: torch.Tensor | None = None) -> torch.Tensor:
        """(B, V) logits (or log-probs) -> processed scores, before choosing token ``num_new``.

        ``history`` (B, L): the token ids so far (prompt with its padding, then the new ones),
        needed where :attr:`needs_history`; ``padding`` (B, P <= L): True at the prompt's padding,
        which the repetition penalty skips (as transformers >= 5.23 does; the n-gram and bad-word
        rules read the padding's ids, as there)."""
        if self.needs_history:
            if history is None:
                raise ValueError("this Sampling reads the sequence so far: pass history")
            scores = self._history_rules(scores, history, padding)
        ban = self.banned(scores.device, num_new < self.min_new_tokens)
        if ban is not None:
            scores = scores.index_fill(-1, ban, float("-inf"))
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(max(self.top_k, self.min_tokens_to_keep), scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1)  # ascending, as Hugging Face's TopPLogitsWarper
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -self.min_tokens_to_keep:] = False  # always keep the most likely token(s)
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        if self.min_p is not None:  # Hugging Face's MinPLogitsWarper, after temperature, top-k, top-p
            probs = scores.softmax(-1)
            drop = probs < self.min_p * probs.amax(-1, keepdim=True)
            order = torch.argsort(scores, descending=True, dim=-1)
            drop = drop.gather(-1, order)
            drop[..., :self.min_tokens_to_keep] = False
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def _history_rules(self, scores: torch.Tensor, history: torch.Tensor,
                       padding: torch.Tensor | None) -> torch.Tensor:
        """Hugging Face's repetition penalty, no-repeat n-grams and multi-token bad words, in its
        order, on the device (no host sync)."""
        B, V = scores.shape
        L = history.shape[1]
        if self.repetition_penalty != 1.0:
            # ids past the scores' vocabulary (an embedding larger than the LM head), and padding, go
            # to a spare column
            ids = history.clamp(max=V)
            if padding is not None:
                P = padding.shape[1]
                ids = torch.cat([ids[:, :P].masked_fill(padding, V), ids[:, P:]], 1)
            padded = torch.nn.functional.pad(scores, (0, 1))
            seen = padded.gather(1, ids)
            p = float(self.repetition_penalty)
            scores = padded.scatter(1, ids, torch.where(seen < 0, seen * p, seen / p))[:, :V]
        n = self.no_repeat_ngram_size
        if n and L >= n:
            # a window whose first n-1 tokens are the last n-1 tokens bans its own last token
            windows = history.unfold(1, n, 1)
            matches = (windows[..., :-1] == history[:, L + 1 - n:].unsqueeze(1)).all(-1)
            banned = scores.new_zeros((B, V + 1), dtype=torch.bool)
            banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
            scores = scores.masked_fill(banned[:, :V], float("-inf"))
        if self._multi_bad:
            # a bad word's last token is banned after its other tokens (transformers 5.24 skips a
            # word whose other tokens outnumber the sequence so far)
            banned = scores.new_zeros((B, V), dtype=torch.bool)
            for prefix, last in self._bad_sequences(history.device):
                if prefix.numel() <= L:
                    banned[:, last] |= (history[:, L - prefix.numel():] == prefix).all(-1)
            scores = scores.masked_fill(banned, float("-inf"))
        return scores

    def _bad_sequences(self, device: torch.device) -> list[tuple[torch.Tensor, int]]:
        """The multi-token bad words as (their first tokens on ``device``, their last token)."""
        key = str(device)
        if key not in self._sequences:
            self._sequences[key] = [(torch.tensor(w[:-1], device=device), w[-1]) for w in self._multi_bad]
        return self._sequences[key]

    def banned(self, device: torch.device, eos_too: bool) -> torch.Tensor | None:
        """The token ids no step may choose (with the stop tokens before min_new_tokens), or None."""
        key = (str(device), eos_too)
        if key not in self._banned:
            ids = list(self.suppress_tokens) + self._single_bad + (list(self.eos_token_id) if eos_too else [])
            self._banned[key] = torch.tensor(ids, device=device, dtype=torch.long) if ids else None
        return self._banned[key]

    def pick(self, scores: torch.Tensor) -> torch.Tensor:
        """(B, V) processed scores -> (B,) next tokens: the most likely, or sampled."""
        if self.do_sample:
            return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        return scores.argmax(-1)


def beam_search(session, logits: torch.Tensor, *, batch: int, num_beams: int, max_new_tokens: int,
                sampling: Sampling, pad_token_id: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False, prompt: torch.Tensor | None = None,
                padding: torch.Tensor | None = None, num_return: int = 1,
                record: Record | None = None) -> torch.Tensor:
    """Beam search over a prefilled ``session`` of batch x num_beams rows (beams of a row adjacent).

    Args:
        logits: (B·K, V) the prefill's last logits.
        prompt: (B·K, L) the token ids before the new ones (prefix and prompt, padding
            included), for the rules that read the sequence so far (``sampling.needs_history``);
            ``padding`` (B·K, L): True at its padding (see :meth:`Sampling.process`).
        num_return: hypotheses returned per row, the best first.
        record: collects each step's logits and processed log-probabilities, and the returned
            hypotheses' final scores and beam indices (Hugging Face's ``output_scores``).

    Returns:
        (B·num_return, G) the best hypotheses' new tokens per row, G = the longest returned
        hypothesis, shorter ones filled as Hugging Face fills them.
    """
    B, K, dev = batch, num_beams, logits.device
    eos = torch.tensor(sampling.eos_token_id, device=dev)
    keep = max(2, 1 + len(sampling.eos_token_id)) * K
    top_k_mask = torch.arange(keep, device=dev) < K
    # Hugging Face fills with `pad_token_id or eos_token_id[0]`: a pad id of 0 gives eos
    fill = pad_token_id or (sampling.eos_token_id[0] if sampling.eos_token_id else -1)
    running = torch.full((B, K, max_new_tokens), fill, dtype=torch.long, device=dev)
    running_scores = torch.zeros(B, K, device=dev)
    running_scores[:, 1:] = -1e9  # only the first beam's tokens count at the first step
    running_len = torch.zeros(B, K, dtype=torch.long, device=dev)
    done_seqs, done_len = running.clone(), running_len.clone()
    done_scores = torch.full((B, K), -1e9, device=dev)
    done = torch.zeros(B, K, dtype=torch.bool, device=dev)
    # per hypothesis and step, the row (of B·K) whose log-probabilities chose its token; -1: none
    # yet (Hugging Face's beam_indices, int32 as there)
    running_rows = torch.full((B, K, max_new_tokens), -1, dtype=torch.int32, device=dev) if record else None
    done_rows = None if running_rows is None else running_rows.clone()
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offset = torch.arange(B, device=dev)[:, None] * K
    for cur in range(max_new_tokens):
        if cur:
            logits = session.step(running[:, :, cur - 1].reshape(-1))
        seen = None
        if sampling.needs_history:
            seen = torch.cat([prompt, running[:, :, :cur].reshape(B * K, cur)], 1)
        processed = sampling.process(logits.log_softmax(-1), cur, seen, padding)
        if record is not None:
            record.step(logits, processed)
        logp = processed.view(B, K, -1) + running_scores[:, :, None]
        V = logp.shape[-1]
        flat = logp.view(B, K * V)
        if sampling.do_sample:
            idx = torch.multinomial(flat.softmax(-1), keep, generator=sampling.generator)
            cand_scores, order = flat.gather(1, idx).sort(dim=-1, descending=True)
            idx = idx.gather(1, order)
        else:
            cand_scores, idx = flat.topk(keep)
        parent, token = idx // V, idx % V                                   # (B, keep)
        cand = running.gather(1, parent[:, :, None].expand(-1, -1, max_new_tokens)).clone()
        cand[:, :, cur] = token
        if record is not None:
            cand_rows = running_rows.gather(1, parent[:, :, None].expand(-1, -1, max_new_tokens)).clone()
            cand_rows[:, :, cur] = (parent + offset).int()
        finished = torch.isin(token, eos) | (cur + 1 >= max_new_tokens)     # (B, keep)
        # e. the best unfinished candidates continue
        alive_scores = cand_scores + finished.float() * -1e9
        nxt = alive_scores.topk(K).indices
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores = alive_scores.gather(1, nxt)
        running_parent = parent.gather(1, nxt)
        if record is not None:
            running_rows = cand_rows.gather(1, nxt[:, :, None].expand(-1, -1, max_new_tokens))
        # f. finished candidates among the top K enter the finished pool if they beat it
        just_done = finished & top_k_mask
        scored = cand_scores / (cur + 1) ** length_penalty
        scored = scored + (done.all(-1, keepdim=True) & (early_stopping is True)).float() * -1e9
        scored = scored + (~improvable).float() * -1e9 + (~just_done).float() * -1e9
        merged = torch.cat([done_scores, scored], 1).topk(K).indices
        done_seqs = torch.cat([done_seqs, cand], 1).gather(1, merged[:, :, None].expand(-1, -1, max_new_tokens))
        done_len = torch.cat([done_len, torch.full_like(cand_scores, cur + 1, dtype=torch.long)], 1).gather(1, merged)
        done_scores = torch.cat([done_scores, scored], 1).gather(1, merged)
        done = torch.cat([done, just_done], 1).gather(1, merged)
        if record is not None:
            done_rows = torch.cat([done_rows, cand_rows], 1).gather(
                1, merged[:, :, None].expand(-1, -1, max_new_tokens))
        # g. stop when no row can improve
        best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else cur + 1
        best_running = running_scores[:, :1] / best_len ** length_penalty
        worst_done = torch.where(done, done_scores.min(-1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        stop = ~improvable.any() | (done.all() & (early_stopping is True)) | finished.all()
        if bool(stop):
            break
        session.reorder((running_parent + offset).reshape(-1))
    best = done_seqs[:, :num_return]  # the finished pool is kept sorted, the best first
    G = int(done_len[:, :num_return].max())
    if record is not None:
        record.finish_beams(done_scores[:, :num_return].reshape(-1),
                            done_rows[:, :num_return].reshape(B * num_return, -1)[:, :G])
    return best.reshape(B * num_return, -1)[:, :G]
