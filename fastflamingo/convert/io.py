"""Reading checkpoints without executing code from them: safetensors, or ``torch.load`` with
``weights_only=True`` (a pickle that holds anything but tensors and plain containers is refused)."""
from __future__ import annotations

import contextlib
import json
import pickle
from pathlib import Path

import torch

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_checkpoint_file(path: str | Path):
    """What a .safetensors file or a torch.save file (``weights_only=True``: no code runs) holds,
    on the CPU; a truncated or corrupt file, or one holding other objects, an error saying so."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {str(path)!r} holds objects other than tensors and plain containers; "
                         f"fastflamingo never executes code from a checkpoint (weights_only=True): {e}") from e
    except Exception as e:  # a truncated or corrupt file: say so, with the reader's own message
        raise ValueError(f"cannot read the checkpoint {str(path)!r} ({path.stat().st_size} bytes): is the file "
                         f"complete? {type(e).__name__}: {e}") from e


def load_state_file(path: str | Path) -> dict[str, torch.Tensor]:
    """One checkpoint file -> a flat ``{name: tensor}`` state dict, on the CPU.

    Training checkpoints that wrap the weights (open_flamingo's ``{"model_state_dict": ...}``,
    ``{"state_dict": ...}``) are unwrapped, and a DDP ``module.`` prefix on every key is removed.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {str(path)!r} is a directory, not a checkpoint file: give the file "
                                "(open_flamingo's checkpoint.pt; a fastflamingo model directory loads with "
                                "Flamingo.from_pretrained)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {str(path)!r} does not exist")
    if path.suffix not in TORCH_SUFFIXES + (".safetensors",):
        raise ValueError(f"checkpoint {str(path)!r}: unknown format {path.suffix!r}; expected .safetensors or one "
                         f"of {TORCH_SUFFIXES} (a torch.save file, loaded with weights_only=True)")
    obj = read_checkpoint_file(path)
    for wrapper in ("model_state_dict", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if isinstance(obj, dict) and {"step", "trainable", "optimizer", "settings"} <= set(obj):
        raise ValueError(f"checkpoint {str(path)!r} is a `fastflamingo finetune` checkpoint (optimizer state to "
                         f"resume from), not an open_flamingo one: the run's model is the model/ folder beside it "
                         f"({str(path.parent / 'model')!r}), which Flamingo.from_pretrained and --model load")
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not hold a state dict of tensors "
                         f"(found {type(obj).__name__} with keys {list(obj)[:5] if isinstance(obj, dict) else ''})")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_state_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """A Hugging Face model directory (single file or sharded, safetensors or .bin) -> state dict."""
    d = Path(directory)
    for stem in ("model", "pytorch_model"):
        for suffix in (".safetensors", ".bin"):
            index = d / f"{stem}{suffix}.index.json"
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (ValueError, KeyError, TypeError, AttributeError) as e:
                    raise ValueError(f"the shard index {str(index)!r} is not a Hugging Face index (JSON with a "
                                     f"\"weight_map\" of tensor names to files): {type(e).__name__}: {e}") from e
                state = {}
                for shard in shards:
                    state.update(load_state_file(d / shard))
                return state
            single = d / f"{stem}{suffix}"
            if single.is_file():
                return load_state_file(single)
    raise FileNotFoundError(f"{str(d)!r} holds no model.safetensors, pytorch_model.bin or sharded index of them")


def has_tokenizer(directory: str | Path) -> bool:
    """Whether a Hugging Face directory holds tokenizer files."""
    return any((Path(directory) / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def saved_tokenizer(directory: str | Path, *, required_by: str | None = None):
    """The tokenizer saved in a model directory (local files only), or None where it holds none;
    with ``required_by`` (the command that needs it) an error saying how to add one. A tokenizer
    that is there but fails to load fails with its own error."""
    if not has_tokenizer(directory):
        if required_by is None:
            return None
        raise ValueError(f"{required_by}: {str(directory)!r} has no tokenizer (no tokenizer.json or "
                         f"tokenizer_config.json; a model written by save_pretrained alone has none): save the LM's "
                         f"tokenizer, set up with fastflamingo.setup_tokenizer, into it "
                         f"(tokenizer.save_pretrained({str(directory)!r}); `fastflamingo convert` writes one)")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


@contextlib.contextmanager
def skip_init():
    """Build modules without running their (slow, soon overwritten) random initialisation."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialise normally, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        yield


def load_hf_causal_lm(path: str, *, trust_remote_code: bool = False, cache_dir: str | None = None,
                      local_files_only: bool = True, dtype: torch.dtype | None = None,
                      attn_implementation: str | None = None):
    """A causal LM from a local Hugging Face directory (or hub name with ``local_files_only=False``).
    Remote code runs only when the caller passes ``trust_remote_code=True``. Weights the LM needs
    that the directory lacks are a :class:`~fastflamingo.convert.load.CheckpointMismatchError`
    naming them (transformers fills them with random values, and only logs it)."""
    from transformers import AutoModelForCausalLM

    from .load import CheckpointMismatchError
    kwargs = {k: v for k, v in (("dtype", dtype), ("attn_implementation", attn_implementation)) if v is not None}
    lm, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=local_files_only, cache_dir=cache_dir,
                                                    trust_remote_code=trust_remote_code, output_loading_info=True,
                                                    **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = [tuple(m) if len(m) == 3 else (str(m), (), ()) for m in info.get("mismatched_keys") or []]
    if missing or mismatched:
        raise CheckpointMismatchError(missing, [], mismatched,
                                      f"the LM in {str(path)!r} lacks weights its config needs: a partial download, or "
                                      "another model's files (transformers would have filled them with random values)")
    return lm
