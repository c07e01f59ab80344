"""Builders of the peers' own models, offline, for side-by-side tests: open_flamingo 2.0.1
(with a tiny open_clip ViT) and tiny Hugging Face LMs."""
from __future__ import annotations

import torch

from fastflamingo.bench.peers import register_open_clip_config

VOCAB = 128
MEDIA_ID, EOC_ID, PAD_ID, EOS_ID = 125, 126, 127, 2
TINY_VIT = "fastflamingo-tiny-vit"


def tiny_lm_config(family: str):
    from transformers import GPTNeoXConfig, LlamaConfig, MptConfig, OPTConfig, GPTJConfig, GPT2Config
    common = dict(vocab_size=VOCAB, eos_token_id=EOS_ID, bos_token_id=1, pad_token_id=PAD_ID)
    if family == "llama":
        return LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                             max_position_embeddings=256, **common)
    if family == "mpt":
        return MptConfig(d_model=48, n_heads=4, n_layers=4, expansion_ratio=2, max_seq_len=256, **common)
    if family == "opt":
        return OPTConfig(hidden_size=48, ffn_dim=96, num_hidden_layers=4, num_attention_heads=4,
                         word_embed_proj_dim=48, max_position_embeddings=256, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=48, n_layer=4, n_head=4, rotary_dim=8, n_positions=256, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=48, n_layer=4, n_head=4, n_positions=256, **common)
    raise ValueError(family)


def tiny_lm(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_config(tiny_lm_config(family), attn_implementation="eager")
    return lm.eval()


def tiny_open_clip(seed: int = 0):
    """A tiny open_clip CLIP (ViT width 32, 2 layers, 32x32 images, 16 patches), registered as a
    named model config the way open_clip's own configs are."""
    import open_clip
    if TINY_VIT not in open_clip.list_models():
        cfg = {"embed_dim": 16,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 8, "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}}
        register_open_clip_config(TINY_VIT, cfg)
    torch.manual_seed(seed)
    return open_clip.create_model(TINY_VIT, pretrained=None).eval()


def open_flamingo_model(family: str, every_n: int = 1, seed: int = 0, only_immediate: bool = True,
                        gates: float = 0.7):
    """open_flamingo's own ``Flamingo``, built as its create_model_and_transforms does, with every
    gate set to a non-zero value and the trainable blocks' norms perturbed (so nothing is trivial)."""
    from open_flamingo.src.flamingo import Flamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.utils import extend_instance
    from fastflamingo.lm import DECODER_LAYERS_ATTR
    clip = tiny_open_clip(seed)
    clip.visual.output_tokens = True
    lm = tiny_lm(family, seed)
    extend_instance(lm, FlamingoLMMixin)
    lm.set_decoder_layers_attr_name(DECODER_LAYERS_ATTR[family])
    torch.manual_seed(seed + 1)
    model = Flamingo(clip, lm, EOC_ID, MEDIA_ID, vis_dim=32, cross_attn_every_n_layers=every_n)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers:
            if block is None:
                continue
            block.attn_gate.fill_(gates)
            block.ff_gate.fill_(-gates)
            block.attn.only_attend_immediate_media = only_immediate
        for name, p in model.named_parameters():
            if "norm" in name or ".ff.0." in name or ".1.0." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def layouts(T: int = 24):
    """(name, token rows, attention mask) media layouts for parity tests: rows of one batch may
    have different image counts; N = the largest count."""
    g = torch.Generator().manual_seed(0)

    def text(n):
        return torch.randint(3, 120, (n,), generator=g)

    out = []
    ids = torch.stack([text(T), text(T)])
    ids[0, [0, 9]] = MEDIA_ID            # image at the start, then middle
    ids[1, [5, T - 1]] = MEDIA_ID        # tokens before the first image; image at the last token
    out.append(("start-middle-last", ids, torch.ones_like(ids)))
    ids = torch.stack([text(T), text(T)])
    ids[0, [3, 4, 5]] = MEDIA_ID         # consecutive images
    ids[1, [10]] = MEDIA_ID              # fewer images in this row
    out.append(("consecutive-uneven", ids, torch.ones_like(ids)))
    ids = torch.stack([text(T), text(T)])
    ids[0, :6] = PAD_ID                  # left padding
    ids[0, [6, 15]] = MEDIA_ID
    ids[1, [0, 12]] = MEDIA_ID
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    out.append(("left-padding", ids, mask))
    return out


def num_media(ids: torch.Tensor) -> int:
    return int((ids == MEDIA_ID).sum(-1).max())


def tiny_tokenizer(vocab_size: int = 120):
    """A word-level fast tokenizer built offline ("w3" -> id 3, ...), without <image> and pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
