"""float32 master weights for the trained parameters of a 16-bit model, and for the trained
rows of a partly trained embedding matrix.

AdamW on bfloat16 weights loses every update under half the weight's rounding step (about 2^-8
of the weight): 30 steps at lr 5e-5 moved 17% of the tiny preset's block weights, against 97%
in float32 (``tests/test_training.py``). So, as mixed-precision training does, the optimizer
steps a float32 copy of each 16-bit trained weight, and the model's weight is that copy rounded
after each step. The gradients add up in float32 on the copy too (each 16-bit gradient is moved
there as the backward makes it). The model keeps its dtype (its forward, memory and saved
``model/`` are those of a bfloat16 model); the checkpoint holds the copies, so a resumed run
continues from them exactly.

An embedding matrix of which only the rows from ``first`` on train (the tokens Flamingo adds:
three of openflamingo-9b's 50,280) gets a float32 copy of those rows only, in any dtype: the
optimizer steps them alone, so its state, the float32 gradient and the copy are a few rows, not
the vocabulary (openflamingo-9b's tied embedding: 206e6 values, 2.1 GB of copy, gradient and
8-bit state saved in bfloat16), and no frozen row can move (an optimizer stepping the whole
matrix keeps them only while their moments stay exactly 0: bitsandbytes' 8-bit blockwise state
did not, in a block shared with trained rows).

Per 16-bit trained value this holds 10 bytes besides the optimizer's state: the weight 2, its
copy 4, the float32 gradient 4 (the 16-bit gradient lives only until the hook moves it); a
float32 weight takes 8, a bfloat16 one stepped as it is 4. openflamingo-9b's trained values
besides its embedding, 1.18e9: 11.8 GB, against 9.4 GB trained in float32.
"""
from __future__ import annotations

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class Masters:
    """The float32 copies of the 16-bit ones among ``params`` (name -> trained parameter), and of
    the trained rows of the matrices in ``rows`` (name -> its first trained row)."""

    def __init__(self, params: dict[str, torch.Tensor], rows: dict[str, int] | None = None):
        self.params, self.first = params, dict(rows or {})
        with torch.no_grad():
            self.copies = {n: p.detach()[self.first.get(n, 0):].to(torch.float32, copy=True) for n, p in params.items()
                           if p.dtype in SIXTEEN_BIT or n in self.first}
        self._by_id = {id(params[n]): c for n, c in self.copies.items()}
        self._hooks = []

    def stepped(self, p: torch.Tensor) -> torch.Tensor:
        """What the optimizer steps for the trained parameter ``p``: its copy, or ``p``."""
        return self._by_id.get(id(p), p)

    def groups(self, groups: list[dict]) -> list[dict]:
        """Optimizer parameter groups with each copied parameter replaced by its copy."""
        return [{**g, "params": [self.stepped(p) for p in g["params"]]} for g in groups]

    def stepped_params(self) -> list[torch.Tensor]:
        """Every trained parameter as the optimizer steps it (for clipping their gradients: a
        row copy's gradient is the matrix's whole, the frozen rows' being zero)."""
        return [self.stepped(p) for p in self.params.values()]

    def __enter__(self) -> "Masters":
        """While training: as the backward makes each copied parameter's gradient, add it (its
        trained rows) to its copy's in float32 and free it (hooks on the parameters, removed on
        exit), so no whole set of 16-bit gradients, nor a vocabulary's, waits beside the copies'."""
        self._hooks = [self.params[n].register_post_accumulate_grad_hook(self._take(c, self.first.get(n, 0)))
                       for n, c in self.copies.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _take(copy: torch.Tensor, first: int):
        def take(p: torch.Tensor) -> None:
            g = p.grad[first:]
            if copy.grad is None:
                copy.grad = g.to(torch.float32, copy=True)  # (a copy: not a view holding the whole gradient)
            else:
                copy.grad.add_(g)
            p.grad = None
        return take

    @torch.no_grad()
    def write_back(self) -> None:
        """After the optimizer step: each copied weight (its trained rows) is its copy, rounded."""
        for n, c in self.copies.items():
            self.params[n][self.first.get(n, 0):].copy_(c)

    def state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trainable`` (name -> saved value) with the float32 copies in place of the copied
        values: a 16-bit weight in float32, a row-copied matrix whole with its trained rows the
        copy's (in float32 where the matrix is 16-bit)."""
        out = dict(trainable)
        for n, c in self.copies.items():
            first = self.first.get(n, 0)
            full = trainable[n].to(torch.float32, copy=True) if first else None
            if full is None:
                out[n] = c.detach().cpu()
            else:
                full[first:] = c.detach().cpu()
                out[n] = full
        return out

    @torch.no_grad()
    def load(self, trainable: dict[str, torch.Tensor]) -> None:
        """A checkpoint's values into the copies (exactly) and the parameters (rounded)."""
        for n, p in self.params.items():
            p.copy_(trainable[n])
            if n in self.copies:
                self.copies[n].copy_(trainable[n][self.first.get(n, 0):])
