"""The one test of "an integer" the public functions share (fastflamingo.checks)."""
import re

import numpy as np
import pytest
import torch

from fastflamingo import ops
from fastflamingo.checks import check_count, is_int


@pytest.mark.parametrize("value", [0, 7, np.int64(3), np.int32(1)])
def test_ints_and_numpy_ints_are_counts(value):
    assert is_int(value)
    check_count("n", value, 0)


@pytest.mark.parametrize("value", [True, False, 2.0, np.float32(2), "3", None, [1]])
def test_bools_floats_strings_are_not(value):
    assert not is_int(value)
    with pytest.raises(ValueError, match=f"n must be an int >= 0, got {re.escape(repr(value))}$"):
        check_count("n", value, 0)


def test_optional_counts_and_notes():
    check_count("n", None, 1, optional=True)
    with pytest.raises(ValueError, match=r"n must be an int >= 1 or None, got 0"):
        check_count("n", 0, 1, optional=True)
    with pytest.raises(ValueError, match=r"n must be an int >= 0 \(0: none\), got -1"):
        check_count("n", -1, 0, note=" (0: none)")


def test_every_caller_takes_a_numpy_int_and_refuses_true():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 4, 8)
    text_time = torch.tensor([[0, 1, 1]])
    got = ops.image_causal_attention(q, k, k, text_time=text_time, latents_per_media=np.int64(4))
    want = ops.image_causal_attention(q, k, k, text_time=text_time, latents_per_media=4)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match="latents_per_media=True must be an int"):
        ops.image_causal_attention(q, k, k, text_time=text_time, latents_per_media=True)
