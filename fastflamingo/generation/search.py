"""Choosing tokens: logits processing, greedy / sampling, and beam search.

The rules are Hugging Face's (transformers 5.x ``generate``), so that outputs equal
open_flamingo's and IDEFICS's ``generate`` token for token: processors run on the logits for
greedy and sampling and on the log-probabilities for beam search; sampling applies temperature,
then top-k, then top-p; beam search keeps ``max(2, 1 + #eos) * num_beams`` candidates per row,
scores finished hypotheses by ``sum log p / generated_length ** length_penalty`` and stops a row
when its best running beam cannot beat its worst finished one (``early_stopping=False``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    """What turns logits into tokens (Hugging Face names and defaults)."""
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_new_tokens: int = 0
    eos_token_id: list[int] = field(default_factory=list)
    suppress_tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    # (device, eos banned too) -> the banned ids on that device: made once, not per step (a
    # tensor made from a Python list on a GPU is a host-to-device copy, which waits for the queue)
    _banned: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}; use do_sample=False for greedy")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def process(self, scores: torch.Tensor, num_new: int) -> torch.Tensor:
        """(B, V) logits (or log-probs) -> processed scores, before choosing token ``num_new``."""
        ban = self.banned(scores.device, num_new < self.min_new_tokens)
        if ban is not None:
            scores = scores.index_fill(-1, ban, float("-inf"))
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1)  # ascending, as Hugging Face's TopPLogitsWarper
            drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[..., -1] = False  # always keep the most likely token
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        return scores

    def banned(self, device: torch.device, eos_too: bool) -> torch.Tensor | None:
        """The token ids no step may choose (with the stop tokens before min_new_tokens), or None."""
        key = (str(device), eos_too)
        if key not in self._banned:
            ids = list(self.suppress_tokens) + (list(self.eos_token_id) if eos_too else [])
            self._banned[key] = torch.tensor(ids, device=device, dtype=torch.long) if ids else None
        return self._banned[key]

    def choose(self, logits: torch.Tensor, num_new: int) -> torch.Tensor:
        """(B, V) logits -> (B,) next tokens (greedy or sampled)."""
        scores = self.process(logits, num_new)
        if self.do_sample:
            return torch.multinomial(scores.softmax(-1), 1, generator=self.generator)[:, 0]
        return scores.argmax(-1)


def beam_search(session, logits: torch.Tensor, *, batch: int, num_beams: int, max_new_tokens: int,
                sampling: Sampling, pad_token_id: int, length_penalty: float = 1.0,
                early_stopping: bool | str = False) -> torch.Tensor:
    """Beam search over a prefilled ``session`` of batch x num_beams rows (beams of a row adjacent).

    Args:
        logits: (B·K, V) the prefill's last logits.

    Returns:
        (B, G) the best hypothesis' new tokens per row, G = the longest returned hypothesis,
        shorter ones filled as Hugging Face fills them.
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
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    offset = torch.arange(B, device=dev)[:, None] * K
    for cur in range(max_new_tokens):
        if cur:
            logits = session.step(running[:, :, cur - 1].reshape(-1))
        logp = sampling.process(logits.log_softmax(-1), cur).view(B, K, -1) + running_scores[:, :, None]
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
        finished = torch.isin(token, eos) | (cur + 1 >= max_new_tokens)     # (B, keep)
        # e. the best unfinished candidates continue
        alive_scores = cand_scores + finished.float() * -1e9
        nxt = alive_scores.topk(K).indices
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, max_new_tokens))
        running_scores = alive_scores.gather(1, nxt)
        running_parent = parent.gather(1, nxt)
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
        # g. stop when no row can improve
        best_len = max_new_tokens if (early_stopping == "never" and length_penalty > 0) else cur + 1
        best_running = running_scores[:, :1] / best_len ** length_penalty
        worst_done = torch.where(done, done_scores.min(-1, keepdim=True).values, -1e9)
        improvable = improvable & (best_running > worst_done).any(-1, keepdim=True)
        stop = ~improvable.any() | (done.all() & (early_stopping is True)) | finished.all()
        if bool(stop):
            break
        session.reorder((running_parent + offset).reshape(-1))
    best = done_seqs[:, 0]
    return best[:, :int(done_len[:, 0].max())]
