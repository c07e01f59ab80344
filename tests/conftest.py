"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter: the variable must be set
before any kernel is defined, hence here, before test modules import fastflamingo.kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
