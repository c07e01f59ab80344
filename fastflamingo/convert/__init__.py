"""Importing weights users already have, and fastflamingo's own format.

* :mod:`.open_flamingo` — a live open_flamingo model; :mod:`.open_flamingo_ckpt` — its checkpoints.
* :mod:`.idefics` — Hugging Face IDEFICS, live or from a directory.
* :mod:`.pretrained` — ``save_pretrained`` / ``from_pretrained``.
* :mod:`.load` — building a model and loading a state dict, with errors that list what does not fit;
  :mod:`.io` — reading files without executing code; :mod:`.cli` — ``fastflamingo convert``.
"""
