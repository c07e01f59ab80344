"""Tiny models, prompt batches and the no-cache greedy reference shared by the tests."""
import torch

from fastflamingo import Flamingo

# a 4-layer MPT (OpenFlamingo-3B/9B's LM family) under the tiny preset: cross-attention before
# layers 0 and 2
MPT = dict(model_type="mpt", d_model=64, n_layers=4, n_heads=4, expansion_ratio=4, max_seq_len=256, vocab_size=512)


def tiny(**overrides):
    """The tiny preset with non-zero gates (random weights, fp32): the cross-attention reaches
    the logits. ``lm=MPT`` for the MPT family."""
    model = Flamingo.from_preset("tiny", **overrides)
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(-0.5)
    return model


def batch(model, images_per_row, lengths, seed=0):
    """Left-padded rows: row i has lengths[i] tokens with images_per_row[i] <image> tokens at random
    places; returns vision_x (B, N, 1, 3, S, S) at the model's image size S (zeros for missing
    images; None when no row has an image), ids, mask."""
    c, g = model.config, torch.Generator().manual_seed(seed)
    B, T, N = len(lengths), max(lengths), max(images_per_row)
    ids = torch.full((B, T), c.pad_token_id)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (n, t) in enumerate(zip(images_per_row, lengths)):
        row = torch.randint(3, min(500, model.vocab_size), (t,), generator=g)
        row[torch.randperm(t, generator=g)[:n]] = c.media_token_id
        ids[i, T - t:], mask[i, T - t:] = row, 1
    S = c.vision.image_size
    vx = torch.zeros(B, N, 1, 3, S, S)
    for i, n in enumerate(images_per_row):
        vx[i, :n] = torch.randn(n, 1, 3, S, S, generator=g)
    return (vx if N else None), ids, mask


def training_labels(ids, mask, media_token_id):
    """Labels for a left-padded batch as a training script should make them: -100 at padding, at
    ``<image>`` tokens and at each row's first token (predicted from nothing but padding)."""
    labels = ids.masked_fill((mask == 0) | (ids == media_token_id), -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    return labels


@torch.no_grad()
def plain_greedy(model, vx, ids, mask, steps):
    """The reference: the whole sequence through model.forward at every step, no cache of any kind;
    new tokens see what the prompt's last token sees (the peers' generate: IDEFICS's repeats the
    prompt's last image-mask row, so a generated EOS resets nothing)."""
    out, m = ids, mask
    tt = model.text_time(ids.masked_fill(mask == 0, -1))
    for _ in range(steps):
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        tt = torch.cat([tt, tt[:, -1:]], 1)[:, :out.shape[1]]
        logits = model(vx, out, attention_mask=m, position_ids=pos, text_time=tt).logits[:, -1]
        out = torch.cat([out, logits.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, m.new_ones(m.shape[0], 1)], 1)
    return out


SHOTS = ('{"prefix": {"images": ["random"], "text": "<image> w5 w6 <|endofchunk|>"}, '
         '"queries": [{"images": ["random"], "text": "<image> w9"}, {"text": "w3 w4 w5"}]}')


def saved_tiny_with_tokenizer(directory):
    """The tiny model saved with a word-level tokenizer (w<i> = id i) to ``directory`` (a
    pathlib.Path), and a few-shot file (a prefix and two queries) beside it: its path."""
    from peers_idefics import tiny_tokenizer
    tiny().save_pretrained(directory)
    tiny_tokenizer(512, {"<unk>": 3, "<pad>": 0, "</s>": 2, "<image>": 510, "<|endofchunk|>": 511}).save_pretrained(
        directory)
    shots = directory / "shots.json"
    shots.write_text(SHOTS)
    return shots
