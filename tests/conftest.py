"""Test-wide set-up. Without a GPU, Triton kernels run in the interpreter: the variable must be set
before any kernel is defined, hence here, before test modules import fastflamingo.kernels."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The models in the tests are tiny: one thread is faster than two fighting over a busy 2-core
# machine (a tiny linear measured 0.05 ms on 1 thread vs ~27 ms on 2 under load).
torch.set_num_threads(1)
