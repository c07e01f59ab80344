"""The oldest versions of fastflamingo's dependencies that it works with, checked at import.

- transformers >= 5.10. Its cache and configuration APIs changed through 4.x and early 5.x.
  Under 4.57, fastflamingo's LM caches were written where that version does not read them (its
  ``StaticCache`` writes at the ``cache_position`` it is passed, else at slot 0; 5.x keeps its
  own count), so generation *silently* gave other tokens than the model's own forward; under 5.0
  several LM families' masks failed, and up to 5.5 the IDEFICS import did (other state-dict
  names); under 5.7 and 5.8 transformers itself fails on the repository's ``kernels/`` folder
  when run from the repository root (``is_kernels_available``). The whole test suite passes
  under 5.10.4 and 5.24.0 except, before 5.24, the tests that compare with Hugging Face's own
  IDEFICS ``generate`` and logits processors, whose behaviour changed until 5.24 (beam sampling
  sorts its draws from 5.24; before 5.20 its IDEFICS beam search failed; setup.py's ``test``
  extra asks for 5.24). Under 5.14.1, 5.17.0, 5.20.2, 5.22.2 and 5.23.0 the 103 tests that
  failed under 5.0.0 were run again, with the same outcome.
- torch >= 2.11 (the GPU machine's version; the whole suite passes under 2.11.0 and 2.14.1).
  Under torch 2.6 the compiled paths failed (dynamo could not trace what transformers 5.x and
  fastflamingo's compiled decode step do).

accelerate (``device_map`` placement, transformers' quantized loading) >= 1.0 in setup.py's
extras: the placement, pretrained and quantization tests pass under 1.0.1, 1.6.0 and 1.15.0.

Checked by running the suite under each version (tests/test_versions.py says how). An older
version is refused at import, naming the version and the fix, rather than computing something
else. (Triton's CPU interpreter, which the kernel tests use without a GPU, fails under Triton 3.6
with numpy >= 2.4 on a conversion of a 1-element array to a scalar; Triton 3.8 does not.)
"""
from __future__ import annotations

from importlib import metadata

MINIMUM = {"transformers": "5.10", "torch": "2.11"}
# optional dependencies, checked where they are first used: bitsandbytes before 0.46 quantizes on
# CUDA only ("Device type not supported for FP4 quantization: cpu"); 0.46-0.50 tested on the CPU
OPTIONAL = {"bitsandbytes": "0.46"}


def _release(version: str) -> tuple[int, ...]:
    """``"5.10.4"``, ``"2.14.1+cu130"``, ``"5.0.0rc1"`` -> (5, 10, 4), (2, 14, 1), (5, 0, 0)."""
    parts = []
    for piece in version.split("+")[0].split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):  # "0rc1": a pre-release of 0
            break
    return tuple(parts)


def too_old(installed: str, minimum: str) -> bool:
    """Whether ``installed`` is a release before ``minimum`` (pre-releases of ``minimum`` count as it)."""
    return _release(installed) < _release(minimum)


def require(name: str, installed: str) -> None:
    """Raise ImportError where ``installed`` is older than ``name``'s minimum."""
    minimum = {**MINIMUM, **OPTIONAL}[name]
    if too_old(installed, minimum):
        raise ImportError(f"fastflamingo needs {name} >= {minimum}, but {name} {installed} is installed "
                          f"(see fastflamingo/versions.py for why). Upgrade it: "
                          f"pip install -U '{name}>={minimum}'")


def check() -> None:
    """Raise ImportError where an installed dependency is older than :data:`MINIMUM`."""
    for name in MINIMUM:
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # the import itself reports a missing package
        require(name, installed)
