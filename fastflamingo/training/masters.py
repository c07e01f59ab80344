"""float32 master weights for the trained parameters of a 16-bit model.

AdamW on bfloat16 weights loses every update under half the weight's rounding step (about 2^-8
of the weight): 30 steps at lr 5e-5 moved 17% of the tiny preset's block weights, against 97%
in float32 (``tests/test_training.py``). So, as mixed-precision training does, the optimizer
steps a float32 copy of each 16-bit trained weight, and the model's weight is that copy rounded
after each step. The gradients add up in float32 on the copy too (each 16-bit gradient is moved
there as the backward makes it). The model keeps its dtype (its forward, memory and saved
``model/`` are those of a bfloat16 model); the checkpoint holds the copies, so a resumed run
continues from them exactly.

Per 16-bit trained value this holds 10 bytes besides the optimizer's state: the weight 2, its
copy 4, the float32 gradient 4 (the 16-bit gradient lives only until the hook moves it); a
float32 weight takes 8, a bfloat16 one stepped as it is 4 (an embedding matrix with trainable
rows counts whole). openflamingo-9b's 1.38e9 trained values: 13.8 GB, against 11.1 GB trained in
float32 and 5.5 GB stepped (wrongly) in bfloat16.
"""
from __future__ import annotations

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


class Masters:
    """The float32 copies of the 16-bit ones among ``params`` (name -> trained parameter)."""

    def __init__(self, params: dict[str, torch.Tensor]):
        self.params = params
        with torch.no_grad():
            self.copies = {n: p.detach().float().clone() for n, p in params.items() if p.dtype in SIXTEEN_BIT}
        self._by_id = {id(params[n]): c for n, c in self.copies.items()}
        self._hooks = []

    def stepped(self, p: torch.Tensor) -> torch.Tensor:
        """What the optimizer steps for the trained parameter ``p``: its copy, or ``p``."""
        return self._by_id.get(id(p), p)

    def groups(self, groups: list[dict]) -> list[dict]:
        """Optimizer parameter groups with each 16-bit parameter replaced by its copy."""
        return [{**g, "params": [self.stepped(p) for p in g["params"]]} for g in groups]

    def stepped_params(self) -> list[torch.Tensor]:
        """Every trained parameter as the optimizer steps it (for clipping their gradients)."""
        return [self.stepped(p) for p in self.params.values()]

    def __enter__(self) -> "Masters":
        """While training: as the backward makes each 16-bit gradient, add it to its copy's (in
        float32) and free it (hooks on the parameters, removed on exit), so no whole set of
        16-bit gradients waits beside the float32 ones."""
        self._hooks = [self.params[n].register_post_accumulate_grad_hook(self._take(c)) for n, c in self.copies.items()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @staticmethod
    def _take(copy: torch.Tensor):
        def take(p: torch.Tensor) -> None:
            if copy.grad is None:
                copy.grad = p.grad.float()
            else:
                copy.grad.add_(p.grad)
            p.grad = None
        return take

    @torch.no_grad()
    def write_back(self) -> None:
        """After the optimizer step: each 16-bit weight is its copy, rounded."""
        for n, c in self.copies.items():
            self.params[n].copy_(c)

    def state(self, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``trainable`` (name -> saved value) with the float32 copies in place of the 16-bit values."""
        return {n: self.copies[n].detach().cpu() if n in self.copies else v for n, v in trainable.items()}

    @torch.no_grad()
    def load(self, trainable: dict[str, torch.Tensor]) -> None:
        """A checkpoint's values into the copies (exactly) and the parameters (rounded)."""
        for n, p in self.params.items():
            p.copy_(trainable[n])
            if n in self.copies:
                self.copies[n].copy_(trainable[n])
