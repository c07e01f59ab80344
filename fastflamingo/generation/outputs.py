"""What ``generate(..., return_dict_in_generate=True)`` returns, as Hugging Face returns it.

Hugging Face's own output classes, with their fields' meaning:

* greedy and sampling: ``GenerateDecoderOnlyOutput`` with ``sequences`` (the prompt, then the new
  tokens), ``scores`` (``output_scores``: per step the (rows, V) scores the token was chosen from,
  after the processors, temperature, top-k and top-p) and ``logits`` (``output_logits``: per step
  the raw (rows, V) logits);
* beam search: ``GenerateBeamDecoderOnlyOutput``, also with ``sequences_scores`` (each returned
  hypothesis' length-penalised score) and ``beam_indices`` ((rows, new tokens): the row of the
  step's scores that chose each token, -1 past the hypothesis' end); ``scores`` are then the
  processed log-probabilities of the B x num_beams rows.

:func:`transition_scores` (Hugging Face's ``compute_transition_scores``) reads the score of each
chosen token back from them.
"""
from __future__ import annotations

import torch


class Record:
    """Collects, while decoding, what :meth:`output` returns beside the tokens."""

    def __init__(self, scores: bool, logits: bool):
        self.scores: list[torch.Tensor] | None = [] if scores else None
        self.logits: list[torch.Tensor] | None = [] if logits else None
        self.sequences_scores: torch.Tensor | None = None
        self.beam_indices: torch.Tensor | None = None

    def step(self, logits: torch.Tensor, scores: torch.Tensor) -> None:
        """One decoding step's raw logits and the processed scores its tokens were chosen from."""
        if self.scores is not None:
            self.scores.append(scores)
        if self.logits is not None:
            self.logits.append(logits)

    def finish_beams(self, sequences_scores: torch.Tensor, beam_indices: torch.Tensor) -> None:
        self.sequences_scores, self.beam_indices = sequences_scores, beam_indices

    def output(self, sequences: torch.Tensor, *, beams: bool):
        from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
        scores = None if self.scores is None else tuple(self.scores)
        logits = None if self.logits is None else tuple(self.logits)
        if not beams:
            return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, logits=logits)
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences, sequences_scores=None if scores is None else self.sequences_scores, scores=scores,
            logits=logits, beam_indices=self.beam_indices)


def transition_scores(sequences: torch.Tensor, scores: tuple[torch.Tensor, ...],
                      beam_indices: torch.Tensor | None = None, normalize_logits: bool = False) -> torch.Tensor:
    """(rows, G): the score each step gave the token it chose, from ``generate``'s
    ``return_dict_in_generate`` output, as Hugging Face's ``compute_transition_scores``.

    Args:
        sequences: (rows, T + G) the output's ``sequences``; its last G columns are the new tokens.
        scores: the output's ``scores`` (one (rows scored, V) tensor per step) or ``logits``.
        beam_indices: the output's ``beam_indices`` after beam search (which row of each step's
            scores chose the token; -1 past a hypothesis' end, where the result is 0); None after
            greedy search or sampling (row i of the sequences is row i of the scores).
        normalize_logits: log-softmax each step's scores first (for raw ``logits``, or sampling's
            temperature-scaled scores, to get log-probabilities).
    """
    if not scores:
        raise ValueError("scores is empty: pass the output's scores (generate(..., return_dict_in_generate=True, "
                         "output_scores=True))")
    if beam_indices is None:
        beam_indices = torch.arange(scores[0].shape[0], device=sequences.device)[:, None].expand(-1, len(scores))
    missing = beam_indices < 0
    G = int((~missing).sum(-1).max())
    if G > sequences.shape[1] or G > len(scores):
        raise ValueError(f"{G} new tokens per row in beam_indices, but sequences has {sequences.shape[1]} tokens per "
                         f"row and scores {len(scores)} steps: pass the three from the same generate output")
    rows, missing = beam_indices[:, :G].long().clamp(min=0), missing[:, :G]
    tokens = sequences[:, sequences.shape[1] - G:].to(rows.device)
    table = torch.stack(scores[:G])  # (G, rows scored, V)
    if normalize_logits:
        table = table.log_softmax(-1)
    steps = torch.arange(G, device=rows.device)[None, :].expand_as(rows)
    return table[steps, rows, tokens].masked_fill(missing, 0.0)
