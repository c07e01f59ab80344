"""fastflamingo: a fast, tested implementation of DeepMind's Flamingo visual language model.

Quick start::

    import fastflamingo
    model = fastflamingo.Flamingo.from_preset("tiny")
    out = model(vision_x, lang_x)          # vision_x (B, N, F, C, H, W), lang_x (B, T)
"""
from . import versions

versions.check()  # before anything imports transformers: an old one is refused by name

from . import ops  # noqa: E402
from .config import CrossAttentionConfig, FlamingoConfig, ResamplerConfig, VisionConfig
from .convert.idefics import from_idefics
from .convert.open_flamingo import from_open_flamingo
from .factory import create_model_and_transforms
from .model import Flamingo
from .presets import PRESETS, preset_config
from .tokens import setup_tokenizer
from .vision import vision_features
from .warn import InputWarning

from . import native as _native  # noqa: E402

# an up-to-date native build is loaded now: a first call of an op inside a torch.compile trace could
# not load it (no file access there) and would run the PyTorch path, or refuse backend="native"
_native.available()

__version__ = "0.1.0"

__all__ = ["Flamingo", "FlamingoConfig", "VisionConfig", "ResamplerConfig", "CrossAttentionConfig",
           "vision_features", "PRESETS", "preset_config", "setup_tokenizer", "ops", "__version__",
           "create_model_and_transforms", "from_open_flamingo", "from_idefics", "InputWarning"]
