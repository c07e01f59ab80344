"""Generation: every cached path gives the tokens of a plain no-cache loop over model.forward, and
greedy / beam search equal open_flamingo's and Hugging Face IDEFICS's own ``generate``."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastflamingo.generation import encode_prefix, generate, stream
from fastflamingo.generation.score import score_reference
from fastflamingo.generation.session import Session

import peers
from peers import EOC_ID, EOS_ID, MEDIA_ID, PAD_ID
from prompts import MPT, batch, plain_greedy, saved_tiny_with_tokenizer, tiny


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models are overhead-bound: one thread avoids waiting on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_TINY = {True: tiny(), False: tiny(only_attend_immediate_media=False)}

LAYOUTS = [([1, 1], [12, 12]), ([2, 1, 0], [14, 9, 11]), ([3, 2], [10, 16]), ([1, 0, 2, 1], [5, 13, 13, 8]),
           ([0, 0], [7, 10])]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_cached_greedy_equals_plain_loop(cache, layout):
    model = tiny()
    vx, ids, mask = batch(model, *LAYOUTS[layout], seed=layout)
    want = plain_greedy(model, vx, ids, mask, 8)
    got = generate(model, vx, ids, mask, max_new_tokens=8, eos_token_id=[], cache=cache)
    assert torch.equal(got, want), (got[:, ids.shape[1]:], want[:, ids.shape[1]:])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(4, 14)), min_size=1, max_size=4),
       st.sampled_from(["dynamic", "static"]), st.booleans(), st.integers(0, 2 ** 16))
def test_random_layouts_equal_plain_loop(rows, cache, immediate, seed):
    """Random batches: rows of different lengths (left padding) and image counts, both image-causal
    modes, both LM caches."""
    model = _TINY[immediate]
    images, lengths = zip(*[(min(n, t), t) for n, t in rows])
    vx, ids, mask = batch(model, list(images), list(lengths), seed=seed)
    got = generate(model, vx, ids, mask, max_new_tokens=5, eos_token_id=[], cache=cache)
    assert torch.equal(got, plain_greedy(model, vx, ids, mask, 5))


@pytest.mark.parametrize("eos_resets_media", [False, True])
def test_decode_steps_equal_forward_teacher_forced(eos_resets_media):
    """Logits of every decode step equal model.forward on the whole sequence, new tokens seeing
    what the prompt's last token sees, as the peers' generate: forced tokens include EOS, which
    under IDEFICS semantics resets nothing for generated tokens (IDEFICS's generate repeats the
    prompt's last image-mask row), and a prompt that ends in EOS leaves its image seen."""
    model = tiny(eos_resets_media=eos_resets_media)
    vx, ids, mask = batch(model, [2, 1], [10, 7], seed=3)
    ids[1, -1] = EOS_ID  # row 1's prompt ends in EOS (its text after it would see no image)
    forced = torch.tensor([[7, EOS_ID, 9, 11], [EOS_ID, 5, 6, 8]])
    prompt_tt = model.text_time(ids.masked_fill(mask == 0, -1))
    assert prompt_tt[:, -1].tolist() == [2, 1]
    for cache in ("dynamic", "static"):
        s = Session(model, ids, mask, model.encode_vision(vx), max_new_tokens=4, cache=cache)
        got = [s.prefill()] + [s.step(forced[:, i]) for i in range(3)]
        for i, logits in enumerate(got):
            seq = torch.cat([ids, forced[:, :i]], 1)
            m = torch.cat([mask, mask.new_ones(2, i)], 1)
            tt = torch.cat([prompt_tt, prompt_tt[:, -1:].expand(-1, i)], 1)
            with torch.no_grad():
                want = model(vx, seq, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0),
                             text_time=tt).logits[:, -1]
            assert (logits - want).abs().max() < 1e-4, (cache, i)
    assert s.tt.flatten().tolist() == [2, 1]
    # the model's own rule, which scoring follows, would reset row 1 (and row 0 after its EOS)
    rule = model.text_time(torch.cat([ids.masked_fill(mask == 0, -1), forced], 1))[:, -1].tolist()
    assert rule == ([0, 0] if eos_resets_media else [2, 1])


def test_compiled_static_step_equals_plain_loop():
    """torch.compile of the decode step (inductor's C++ backend on the CPU)."""
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [11, 8], seed=5)
    want = plain_greedy(model, vx, ids, mask, 6)
    got = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[], cache="static", compile=True)
    assert torch.equal(got, want)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    vx2, ids2, mask2 = batch(model, [1, 2], [9, 12], seed=6)  # another prompt reuses the compiled step
    got2 = generate(model, vx2, ids2, mask2, max_new_tokens=6, eos_token_id=[], cache="static", compile=True)
    assert torch.equal(got2, plain_greedy(model, vx2, ids2, mask2, 6))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "the second prompt recompiled"


def test_every_shape_stays_compiled_past_dynamos_recompile_limit():
    """Each static-cache shape gets its own compiled step (a code object of its own). One shared
    step function hit dynamo's recompile limit (8 per code object) at the ninth model or batch
    shape of a process and ran every later one eagerly, with only a log warning; here the limit is
    lowered to 2 and three batch shapes must each compile. The model, its caches and its compiled
    steps are freed together."""
    import gc
    import weakref
    model = tiny()
    counters = torch._dynamo.utils.counters
    counters.clear()
    with torch._dynamo.config.patch(recompile_limit=2):
        for B in (1, 2, 3):
            vx, ids, mask = batch(model, [1] * B, [8 + B] * B, seed=40 + B)
            got = generate(model, vx, ids, mask, max_new_tokens=4, eos_token_id=[], cache="static", compile=True)
            assert torch.equal(got, plain_greedy(model, vx, ids, mask, 4)), B
    assert dict(counters["frames"]) == {"total": 3, "ok": 3}, dict(counters["frames"])
    alive = weakref.ref(model)
    del model, vx, ids, mask, got
    gc.collect()
    assert alive() is None, "the compiled steps keep the model alive"


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_prefix_reuse_equals_plain_loop(lm, cache):
    """Demonstrations encoded once, then a batch of queries with padding, different image counts
    and a query of padding only (it continues the prefix). Each row equals its prefix and query
    written out alone: MPT's ALiBi counts tokens, so the padding between the prefix's K/V and a
    query does not move the prefix away (it did, by the row's padding, when ALiBi counted slots)."""
    model = tiny(**({"lm": MPT} if lm == "mpt" else {}))
    demo_vx, demo_ids, _ = batch(model, [2], [12], seed=7)
    prefix = encode_prefix(model, demo_vx, demo_ids)
    vx, ids, mask = batch(model, [1, 0, 2], [6, 9, 5], seed=8)
    vx, ids, mask = (torch.cat([t, torch.zeros_like(t[:1])]) for t in (vx, ids, mask))  # a row of padding only
    got = generate(model, vx, ids, mask, prefix=prefix, max_new_tokens=6, eos_token_id=[], cache=cache)
    B = ids.shape[0]
    # reference rows: [padding, prefix, query] with all their images
    pad_first = torch.where(mask.sum(-1) == 0, mask.shape[1], mask.argmax(-1))
    full = torch.stack([torch.cat([ids[i, :pad_first[i]], demo_ids[0], ids[i, pad_first[i]:]]) for i in range(B)])
    full_mask = torch.stack([torch.cat([mask[i, :pad_first[i]], torch.ones(demo_ids.shape[1], dtype=torch.long),
                                        mask[i, pad_first[i]:]]) for i in range(B)])
    full_vx = torch.cat([demo_vx.expand(B, -1, -1, -1, -1, -1), vx], 1)
    want = plain_greedy(model, full_vx, full, full_mask, 6)
    assert torch.equal(got[:, ids.shape[1]:], want[:, full.shape[1]:])
    beams = generate(model, vx, ids, mask, prefix=prefix, max_new_tokens=5, num_beams=3, cache=cache)
    beams_full = generate(model, full_vx, full, full_mask, max_new_tokens=5, num_beams=3, cache=cache)
    assert torch.equal(beams[:, ids.shape[1]:], beams_full[:, full.shape[1]:])
    text_only = generate(model, None, torch.randint(3, 500, (2, 3)), prefix=prefix, max_new_tokens=3,
                         eos_token_id=[], cache=cache)  # queries with no image of their own
    assert text_only.shape == (2, 6)


def test_prefix_of_another_model_is_refused():
    """A prefix holds K/V of the weights that encoded it: another model (even a copy with the same
    shapes, whose lookups would succeed and give wrong tokens) refuses it, in generate and score."""
    import copy
    model = tiny()
    other = copy.deepcopy(model)
    demo_vx, demo_ids, _ = batch(model, [1], [8], seed=7)
    prefix = encode_prefix(model, demo_vx, demo_ids)
    vx, ids, mask = batch(model, [1], [6], seed=8)
    for call in (lambda: generate(other, vx, ids, mask, prefix=prefix, max_new_tokens=2),
                 lambda: other.score(vx, ids, [[5, 6]], mask, prefix=prefix),
                 lambda: score_reference(other, vx, ids, [[5, 6]], mask, prefix=prefix)):
        with pytest.raises(ValueError, match="this prefix was encoded by another model"):
            call()
    generate(model, vx, ids, mask, prefix=prefix, max_new_tokens=2)


def test_stream_and_stops():
    model = tiny()
    vx, ids, mask = batch(model, [1, 2], [9, 12], seed=9)
    free = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[])
    steps = list(stream(model, vx, ids, mask, max_new_tokens=6, eos_token_id=[]))
    assert not any(t.requires_grad for t in steps)
    assert torch.equal(torch.stack(steps, 1), free[:, ids.shape[1]:])
    stop = int(free[0, ids.shape[1] + 2])  # the token row 0 makes third becomes a stop token
    got = generate(model, vx, ids, mask, max_new_tokens=6, eos_token_id=stop, pad_token_id=0)
    new, ref = got[:, ids.shape[1]:], free[:, ids.shape[1]:]
    first = int((ref[0] == stop).nonzero()[0])
    assert torch.equal(new[0, :first + 1], ref[0, :first + 1]) and (new[0, first + 1:] == 0).all()
    assert not (ref[1] == stop).any() or new.shape[1] <= ref.shape[1]
    eoc = model.generate(vx, ids, mask, max_new_tokens=6, min_new_tokens=6,
                         suppress_tokens=[model.config.eoc_token_id])  # default stops: eoc, eos
    assert eoc.shape[1] == ids.shape[1] + 6


def test_sampling():
    model = tiny()
    vx, ids, mask = batch(model, [1, 1], [8, 8], seed=10)
    greedy = generate(model, vx, ids, mask, max_new_tokens=5, eos_token_id=[])
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 1e-4}):
        assert torch.equal(generate(model, vx, ids, mask, max_new_tokens=5, eos_token_id=[], do_sample=True, **kw),
                           greedy), kw
    runs = [generate(model, vx, ids, mask, max_new_tokens=5, eos_token_id=[], do_sample=True, top_k=50, top_p=0.9,
                     temperature=5.0, cache=cache, generator=torch.Generator().manual_seed(1))
            for cache in ("dynamic", "static")]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], greedy)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, vx, ids, mask, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, vx, ids, mask, do_sample=True, top_p=1.5)


def test_bad_inputs_raise_clear_errors():
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [8, 6], seed=11)
    with pytest.raises(ValueError, match="left padding"):
        generate(model, vx, ids, mask.flip(-1))
    with pytest.raises(ValueError, match="<image> tokens"):
        generate(model, vx[:, :1], ids, mask)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, vx, ids, mask, num_beams=0)
    with pytest.raises(ValueError, match="cache="):
        generate(model, vx, ids, mask, cache="paged")
    with pytest.raises(TypeError, match="beam_groups"):
        generate(model, vx, ids, mask, num_beams=2, beam_groups=2)
    with pytest.raises(ValueError, match="early_stopping must be a boolean or 'never', but is 'foo'"):
        generate(model, vx, ids, mask, num_beams=2, early_stopping="foo")
    with pytest.warns(UserWarning, match="min_new_tokens=5 is more than max_new_tokens=3"):
        generate(model, vx, ids, mask, max_new_tokens=3, min_new_tokens=5)


# ------------------------------------------------------------------ peers' own generate
def _open_flamingo_generate(live, vx, ids, mask=None, **kwargs):
    """open_flamingo's generate on transformers 5.x: its LM mixin takes attention_mask positionally,
    and transformers drops an all-ones mask, so give it a forward with a default."""
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    lm = live.lang_encoder
    lm.forward = lambda input_ids=None, attention_mask=None, **kw: FlamingoLMMixin.forward(lm, input_ids,
                                                                                         attention_mask, **kw)
    with torch.no_grad():
        return live.generate(vx, ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kwargs)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mpt"])
def test_equals_open_flamingo_generate(family):
    """Greedy and 3-beam outputs equal open_flamingo's own generate on the same weights (unpadded
    rows; padded ones: test_random_settings_equal_open_flamingo_generate)."""
    pytest.importorskip("open_flamingo")
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    live = peers.open_flamingo_model(family, every_n=2)
    ours = from_open_flamingo(live)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 14), generator=g)
    ids[0, [0, 6]] = MEDIA_ID
    ids[1, [4]] = MEDIA_ID  # fewer images in this row
    vx = torch.randn(2, 2, 1, 3, 32, 32, generator=g)
    for beams in (1, 3):
        kw = dict(max_new_tokens=10, num_beams=beams, eos_token_id=[EOC_ID, EOS_ID], pad_token_id=PAD_ID,
                  suppress_tokens=[MEDIA_ID])  # open_flamingo misreads a generated <image>: keep it out
        want = _open_flamingo_generate(live, vx, ids, **kw)
        got = generate(ours, vx, ids, **kw)
        assert torch.equal(got, want), (family, beams, got[:, 14:], want[:, 14:])
        assert want.shape[1] > 14 + 3  # a real continuation, not an immediate stop


@pytest.mark.parametrize("cross_layer_interval", [1, 2])
def test_equals_idefics_generate(cross_layer_interval):
    """Greedy and 3-beam outputs equal Hugging Face IDEFICS's generate on the same weights: left
    padding, two images separated by an EOS (IDEFICS semantics), generated <image> tokens."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=cross_layer_interval)
    ours = from_idefics(live)
    inp = idefics_inputs()
    for beams in (1, 3):
        with torch.no_grad():
            want = live.generate(**inp, max_new_tokens=8, num_beams=beams, do_sample=False)
        got = generate(ours, inp["pixel_values"][:, :, None], inp["input_ids"], inp["attention_mask"],
                       max_new_tokens=8, num_beams=beams, eos_token_id=[I_EOS], pad_token_id=I_PAD)
        assert torch.equal(got, want), (beams, got[:, -8:], want[:, -8:])
        assert want.shape[1] > inp["input_ids"].shape[1] + 3


# ------------------------------------------------------------------ cache_media
def test_cache_media_scores_texts_against_cached_images():
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [9, 9], seed=12)
    model.cache_media(ids, vx)
    try:
        text = torch.randint(3, 500, (2, 5))
        with torch.no_grad():
            got = model(lang_x=text).logits
            again = model(None, text).logits
            want = model(vx, text, text_time=torch.tensor([[2] * 5, [1] * 5], dtype=torch.int32)).logits
            with_image = model(lang_x=ids).logits  # <image> tokens in the text: their own count
            full = model(vx, ids).logits
        assert torch.allclose(got, want, atol=1e-5) and torch.allclose(again, want, atol=1e-5)
        assert torch.allclose(with_image, full, atol=1e-5)
    finally:
        model.uncache_media()
    with torch.no_grad():
        assert not torch.allclose(model(lang_x=text).logits, want, atol=1e-3)  # text only again


def test_generate_and_score_use_cached_media():
    """After cache_media, generate and score given no images use the cached ones as a forward does:
    a prompt's <image> tokens place them; a prompt without any sees its row's last cached image.
    (They ran text-only, silently, before.)"""
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [9, 9], seed=12)
    text = torch.randint(3, 500, (2, 5), generator=torch.Generator().manual_seed(3))
    conts = [[5], [7, 8, 9]]
    with_images = generate(model, vx, ids, max_new_tokens=4, eos_token_id=[])
    with_images_score = model.score(vx, ids, conts, reduction="none")
    model.cache_media(ids, vx)
    try:
        assert torch.equal(generate(model, None, ids, max_new_tokens=4, eos_token_id=[]), with_images)
        assert torch.equal(model.score(None, ids, conts, reduction="none"), with_images_score)
        out = text  # the reference: the model's forward over the whole text, which reads the cache
        with torch.no_grad():
            for _ in range(4):
                out = torch.cat([out, model(None, out).logits[:, -1].argmax(-1, keepdim=True)], 1)
            want = torch.stack([torch.stack([
                model(None, torch.cat([text, torch.tensor([c] * 2)], 1)).logits[b, 4:-1].log_softmax(-1)
                .gather(-1, torch.tensor(c)[:, None])[:, 0].sum() for c in conts]) for b in range(2)])
        for cache in ("dynamic", "static"):
            assert torch.equal(generate(model, None, text, max_new_tokens=4, eos_token_id=[], cache=cache), out)
        torch.testing.assert_close(model.score(None, text, conts), want, atol=2e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="cached by cache_media has batch 2 but lang_x has batch 1"):
            generate(model, None, text[:1], max_new_tokens=2)
        prefix_ids = torch.tensor([[model.config.media_token_id, 5, 6]])
        prefix = encode_prefix(model, vx[:1, :1], prefix_ids)
        with pytest.raises(ValueError, match="without <image> tokens after a few-shot prefix"):
            model.score(None, text, conts, prefix=prefix)
        with pytest.raises(ValueError, match="uncache_media"):
            encode_prefix(model, None, prefix_ids[:, 1:])
    finally:
        model.uncache_media()
    assert not torch.allclose(model.score(None, text, conts), want, atol=1e-3)  # text only again
    with pytest.raises(ValueError, match=r"holds no image \(N = 0\)"):
        model.cache_media(ids, vx[:, :0])


def test_cached_media_is_decided_row_by_row():
    """After cache_media, a batch whose row 0 has <image> tokens and row 1 none: row 1 sees its
    last cached image, as in a batch of text alone, and row 0 its images by its tokens, as in a
    batch of such rows (whether a text had <image> tokens was decided for the whole batch: row 1
    saw no image at all, its tokens depending on its neighbour). A row with more <image> tokens
    than it has cached images is an error naming it (it attended to a zero padding image)."""
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [9, 9], seed=12)
    text = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(3))
    mixed = torch.stack([ids[0], text[1]])
    conts = [[5], [7, 8, 9]]
    model.cache_media(ids, vx)
    try:
        kw = dict(max_new_tokens=4, eos_token_id=[])
        by_images, by_text, got = (generate(model, None, x, **kw) for x in (ids, text, mixed))
        assert torch.equal(got[0], by_images[0]) and torch.equal(got[1], by_text[1])
        scores = [model.score(None, x, conts, reduction="none") for x in (ids, text, mixed)]
        assert torch.equal(scores[2][0], scores[0][0]) and torch.equal(scores[2][1], scores[1][1])
        with torch.no_grad():
            logits = [model(None, x).logits for x in (ids, text, mixed)]
        assert torch.equal(logits[2][0], logits[0][0]) and torch.equal(logits[2][1], logits[1][1])
        two = ids.clone()
        two[1, 2] = model.config.media_token_id  # row 1 had one image
        for call in (lambda: generate(model, None, two, **kw), lambda: model(None, two)):
            with pytest.raises(ValueError, match=r"row 1 has 2 <image> tokens but cache_media kept 1 image\(s\) for it"):
                call()
    finally:
        model.uncache_media()


# ------------------------------------------------------------------ command line
def test_cli_generate_preset_and_saved_model_with_tokenizer(tmp_path, capsys):
    from fastflamingo.cli import main
    assert main(["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42",
                 "--max-new-tokens", "3"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 3 and "3 new tokens" in err
    shots = saved_tiny_with_tokenizer(tmp_path)
    assert main(["generate", "--model", str(tmp_path), "--few-shot", str(shots), "--max-new-tokens", "2",
                 "--num-beams", "2"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith("[0] w") and "\n[1] " in out
    # --device-map (one device here: accelerate places everything on the CPU) gives the same tokens
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42", "--max-new-tokens", "3"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--device-map", "auto"]) == 0
    assert capsys.readouterr().out == plain
    assert main(args + ["--device-map", "auto", "--device", "cpu"]) == 2
    assert "fastflamingo generate: error: give --device or --device-map, not both" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--random-images", "2", "--prompt-ids", "510 17 42"],
     r"the prompt has 2 image\(s\) but 1 <image> token\(s\) \(id 510\) in its text"),
    (["--prompt-ids", "510 17 42"], r"the prompt has 0 image\(s\) but 1 <image> token\(s\)"),
    (["--random-images", "1", "--prompt-ids", "510 17 9999"],
     r"token id 9999 \(row 0, position 2\) but the LM's input embedding has 512 rows"),
    (["--image", "/no/such/cat.jpg", "--prompt-ids", "510 17"], r"no image file '/no/such/cat.jpg'"),
    (["--few-shot", "{shots}"], r'shots.json: query 1 must be \{"text": ..., "images": \[...\]\}, got \[1, 2\]'),
    (["--image", "{shots}", "--random-images", "1", "--prompt-ids", "510 17"],
     r"give --image files or --random-images, not both"),
    (["--few-shot", "{typo_key}"], r"typo.json: query 0 has unknown key\(s\) \['image'\]: an entry is"),
    (["--few-shot", "{typo_prefix}"], r"typo2.json: unknown key\(s\) \['prefx'\]: the file holds \"queries\""),
    (["--random-images", "1", "--prompt-ids", "510 1.5"], r"--prompt-ids: '1.5' is not a token id \(an integer\)"),
    (["--few-shot", "{float_id}"], r"query 0's text: 5.7 is not a token id"),  # not silently 5
    (["--random-images", "1", "--prompt-ids", "510 17", "--do-sample", "--min-p", "1.5"],
     r"min_p must be in \[0, 1\] \(None: off\), got 1.5"),
])
def test_cli_generate_bad_input_is_one_line_naming_it(tmp_path, capsys, monkeypatch, args, message):
    from fastflamingo.cli import main
    shots = tmp_path / "shots.json"
    shots.write_text('{"queries": [{"text": [510, 4], "images": ["random"]}, [1, 2]]}')
    typo_key, typo_prefix = tmp_path / "typo.json", tmp_path / "typo2.json"
    typo_key.write_text('{"queries": [{"text": [4, 5], "image": ["random"]}]}')
    typo_prefix.write_text('{"prefx": {"text": [4]}, "queries": [{"text": [4, 5]}]}')
    float_id = tmp_path / "float.json"
    float_id.write_text('{"queries": [{"text": [510, 5.7], "images": ["random"]}]}')
    args = ["generate", "--preset", "tiny", "--max-new-tokens", "2"] + [
        a.format(shots=shots, typo_key=typo_key, typo_prefix=typo_prefix, float_id=float_id) for a in args]
    monkeypatch.delenv("FASTFLAMINGO_TRACEBACK", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert re.search("fastflamingo generate: error: .*" + message, err), err
    assert "Traceback" not in err
    monkeypatch.setenv("FASTFLAMINGO_TRACEBACK", "1")  # the traceback on request
    with pytest.raises((ValueError, FileNotFoundError)):
        main(args)


@pytest.mark.parametrize("args, message", [
    (["generate", "--random-images", "-1"], r"argument --random-images: --random-images must be >= 0, got -1"),
    (["generate", "--device", "gpu"], r"argument --device: 'gpu' is not a device"),
    (["score", "--device", "cuda:99", "--candidate-ids", "5"], r"argument --device: 'cuda:99': "),
    (["bench", "--threads", "-2"], r"argument --threads: --threads must be >= 0, got -2"),
])
def test_cli_option_values_are_checked_as_they_are_parsed(capsys, args, message):
    """Option values that cannot work end the command at parsing, naming the option and value
    (no traceback from torch later, no silent fallback)."""
    from fastflamingo.cli import main
    if args[0] != "bench":
        args = args[:1] + ["--preset", "tiny", "--prompt-ids", "17 42"] + args[1:]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(f"fastflamingo {args[0]}: error: " + message, err), err
    assert "Traceback" not in err


def test_interleaved_streams_do_not_share_a_static_cache():
    model = tiny()
    vx, ids, mask = batch(model, [1, 1], [8, 8], seed=13)
    alone = generate(model, vx, ids, mask, max_new_tokens=4, eos_token_id=[])
    a = stream(model, vx, ids, mask, max_new_tokens=4, eos_token_id=[])
    b = stream(model, vx.flip(0), ids.flip(0), mask, max_new_tokens=4, eos_token_id=[])
    steps = [(next(a), next(b)) for _ in range(4)]
    assert torch.equal(torch.stack([s[0] for s in steps], 1), alone[:, 8:])
    assert torch.equal(torch.stack([s[1] for s in steps], 1), alone[:, 8:].flip(0))


def test_decode_steps_do_not_sync_where_no_row_can_stop():
    """On a GPU a host sync (``.item()``, ``bool(tensor)``) drains the queue: fastflamingo's prompt
    checks sync once each, and a decode step syncs only where a row may stop (a stop token is
    allowed); counted as the scalar reads torch dispatches from fastflamingo's own code (the same on
    the CPU; the LM's Hugging Face code has its own, which the compiled step traces away)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    def ours() -> bool:
        """Whether the innermost frame outside torch is fastflamingo's."""
        for frame in reversed(traceback.extract_stack()[:-2]):
            if "/torch/" not in frame.filename:
                return "/fastflamingo/" in frame.filename
        return False

    class Syncs(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and ours():
                Syncs.count += 1
            return func(*args, **(kwargs or {}))

    model = tiny()
    vx, ids, mask = batch(model, [1, 2], [9, 12], seed=3)

    def syncs(n, **kw):
        Syncs.count = 0
        with Syncs():
            generate(model, vx, ids, mask, max_new_tokens=n, cache="static", **kw)
        return Syncs.count

    base = syncs(2, eos_token_id=[])
    assert syncs(7, eos_token_id=[]) == base  # no stop token: none per step
    assert syncs(7, eos_token_id=[EOS_ID], min_new_tokens=7) == base  # stops banned until the end
    rules = dict(repetition_penalty=1.2, no_repeat_ngram_size=2, bad_words_ids=[[5, 6], [7]])
    assert syncs(7, eos_token_id=[], **rules) == syncs(2, eos_token_id=[], **rules)  # the rules run on the device
    assert syncs(7, eos_token_id=[EOS_ID], suppress_tokens=[MEDIA_ID]) > base  # may stop: checked per step


def test_cli_checks_files_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """A missing image or a broken few-shot file is reported before a (possibly 9B) model loads."""
    from fastflamingo.cli import main
    from fastflamingo.generation import cli
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("the model loaded before the inputs were checked"))
    shots = tmp_path / "shots.json"
    shots.write_text('{"queries": [{"text": [510, 4], "images": ["/no/such/dog.png"]}]}')
    for args, message in [(["--image", "/no/such/cat.jpg", "--prompt-ids", "510 17"], "no image file '/no/such/cat.jpg'"),
                          (["--few-shot", str(shots)], "no image file '/no/such/dog.png'")]:
        assert main(["generate", "--preset", "tiny"] + args) == 2
        assert message in capsys.readouterr().err


def test_a_finished_session_in_a_reference_cycle_does_not_cost_a_new_static_cache():
    """The pooled static cache (and the decode steps compiled for it) is reused once its last
    session is gone; a finished session that only a reference cycle keeps (an exception's
    traceback, say) is collected first, instead of a fresh cache whose step would compile again."""
    import gc
    model = tiny()
    vx, ids, mask = batch(model, [1, 2], [8, 8], seed=3)
    visual = model.encode_vision(vx).detach()
    gc.disable()
    try:
        first = Session(model, ids, mask, visual, max_new_tokens=4, cache="static", compile=True)
        cache = first.cache
        first.cycle = first  # unreachable once deleted, but not freed until the collector runs
        del first
        second = Session(model, ids, mask, visual, max_new_tokens=4, cache="static", compile=True)
        assert second.cache is cache
        third = Session(model, ids, mask, visual, max_new_tokens=4, cache="static", compile=True)
        assert third.cache is not cache  # the second still holds it (an open stream): a cache of its own
    finally:
        gc.enable()


# ------------------------------------------------------------------ rules over the sequence so far
RULES = [dict(repetition_penalty=1.8), dict(repetition_penalty=0.6), dict(no_repeat_ngram_size=1),
         dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=3),
         dict(bad_words_ids=[[5], [7, 9], [3, 4, 5], [2]]),
         dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[11, 12], [13]])]


def _hugging_face_processors(rules, eos, padding_lengths=None):
    from transformers.generation.logits_process import (LogitsProcessorList, NoBadWordsLogitsProcessor,
                                                        NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)
    out = LogitsProcessorList()
    if "repetition_penalty" in rules:
        out.append(RepetitionPenaltyLogitsProcessor(float(rules["repetition_penalty"]),
                                                    prompt_ignore_length=padding_lengths))
    if "no_repeat_ngram_size" in rules:
        out.append(NoRepeatNGramLogitsProcessor(rules["no_repeat_ngram_size"]))
    if "bad_words_ids" in rules:
        out.append(NoBadWordsLogitsProcessor(rules["bad_words_ids"], eos))
    return out


@pytest.mark.parametrize("rules", RULES)
def test_sequence_rules_equal_hugging_face_processors(rules):
    """Scores processed over random sequences with repeats (and ids past the scores' vocabulary, an
    embedding larger than the LM head) equal transformers' own processors' output exactly, the
    one-token stop word left allowed as Hugging Face leaves it."""
    from fastflamingo.generation import Sampling
    g = torch.Generator().manual_seed(len(str(rules)))
    V = 20
    sampling = Sampling(eos_token_id=[2], **rules)
    assert sampling.needs_history or rules.get("bad_words_ids")
    hf = _hugging_face_processors(rules, [2])
    changed = skipped = 0
    for L in (1, 2, 3, 7, 30):
        history = torch.randint(0, 16, (6, L), generator=g)
        history[0, -1] = 7  # rows ending in bad words' first tokens
        history[1, -2:] = torch.tensor([3, 4])[-L:]
        history[2, -1] = 11
        history[3, 0] = V + 4  # an id the scores do not have
        history[4] = torch.arange(L) % 3  # every n-gram repeats
        scores = torch.randn(6, V, generator=g)
        want = hf(history, scores.clone())
        got = sampling.process(scores, 0, history)
        assert torch.equal(got, want), (rules, L, got, want)
        changed += not torch.equal(got, scores)
        # left padding (of the prompt's first P <= L tokens), which the repetition penalty skips
        P = (L + 1) // 2
        lengths = torch.randint(0, P + 1, (6,), generator=g)
        padding = torch.arange(P)[None, :] < lengths[:, None]
        want = _hugging_face_processors(rules, [2], lengths)(history, scores.clone())
        assert torch.equal(sampling.process(scores, 0, history, padding), want), (rules, L, lengths)
        skipped += not torch.equal(got, want)
    assert changed >= 2, "the rules hardly bit: the comparison would not show a difference"
    assert skipped >= 2 or "repetition_penalty" not in rules, "no padding that the penalty skips made a difference"


def _rules_change(make, rules, want):
    """The rules make a difference here (the comparison is not vacuous)."""
    assert not torch.equal(make({}), want), rules


@pytest.mark.parametrize("rules", [dict(repetition_penalty=5.0), dict(no_repeat_ngram_size=2),
                                   dict(bad_words_ids=[[99], [8, 99], [100, 42, 5]]),
                                   dict(repetition_penalty=0.5, no_repeat_ngram_size=3, bad_words_ids=[[42, 4]])])
def test_sequence_rules_equal_idefics_generate(rules):
    """Greedy and 3-beam generate with repetition penalty, no-repeat n-grams and bad words equal
    Hugging Face IDEFICS's generate on the same weights (left padding, EOS inside a row)."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    for beams in (1, 3):
        kw = dict(max_new_tokens=8, num_beams=beams)

        def make(r):
            return generate(ours, inp["pixel_values"][:, :, None], inp["input_ids"], inp["attention_mask"],
                            eos_token_id=[I_EOS], pad_token_id=I_PAD, **kw, **r)
        with torch.no_grad():
            want = live.generate(**inp, do_sample=False, **kw, **rules)
        got = make(rules)
        assert torch.equal(got, want), (rules, beams, got[:, -8:], want[:, -8:])
        _rules_change(make, rules, want)


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_sequence_rules_equal_open_flamingo_generate(family):
    pytest.importorskip("open_flamingo")
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    live = peers.open_flamingo_model(family, every_n=2)
    ours = from_open_flamingo(live)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (2, 14), generator=g)
    ids[:, [1, 7]] = MEDIA_ID
    vx = torch.randn(2, 2, 1, 3, 32, 32, generator=g)
    rules = dict(repetition_penalty=1.5, no_repeat_ngram_size=2)
    for beams in (1, 3):
        kw = dict(max_new_tokens=10, num_beams=beams, eos_token_id=[EOC_ID, EOS_ID], pad_token_id=PAD_ID,
                  suppress_tokens=[MEDIA_ID])
        want = _open_flamingo_generate(live, vx, ids, **kw, **rules)
        got = generate(ours, vx, ids, **kw, **rules)
        assert torch.equal(got, want), (family, beams, got[:, 14:], want[:, 14:])
        _rules_change(lambda r: generate(ours, vx, ids, **kw, **r), rules, want)


def test_total_lengths_equal_idefics_generate():
    """Hugging Face's max_length / min_length (the whole sequence, prompt and padding included)."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    T = inp["input_ids"].shape[1]
    for kw in (dict(max_length=T + 5), dict(max_length=T + 7, min_length=T + 6), dict(max_new_tokens=6, min_length=T + 6)):
        with torch.no_grad():
            want = live.generate(**inp, do_sample=False, **kw)
        got = generate(ours, inp["pixel_values"][:, :, None], inp["input_ids"], inp["attention_mask"],
                       eos_token_id=[I_EOS], pad_token_id=I_PAD, **kw)
        assert torch.equal(got, want), (kw, got[:, T:], want[:, T:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=4, max_length=30), r"pass max_new_tokens \(4\) or max_length \(30\), not both"),
    (dict(max_length=9), r"max_length=9 leaves no room for a new token after the 9 tokens"),
    (dict(min_new_tokens=2, min_length=12), r"pass min_new_tokens \(2\) or min_length \(12\), not both"),
    (dict(repetition_penalty=0.0), r"repetition_penalty must be a number > 0 \(1.0: none\), got 0.0"),
    (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be an int >= 0 \(0: none\), got -1"),
    (dict(bad_words_ids=[5, 6]), r"bad_words_ids must be a list of non-empty lists of token ids >= 0, got \[5, 6\]"),
    (dict(bad_words_ids=[[5], []]), r"bad_words_ids must be a list of non-empty lists"),
    (dict(bad_words_ids=[[5, 999]]), r"bad_words_ids holds token id 999 but the LM has 512 tokens"),
    (dict(pad_token_id=512), r"pad_token_id=512 is not a token id of this LM \(0..511\): finished rows are fed it"),
    (dict(pad_token_id=-1), r"pad_token_id=-1 is not a token id of this LM"),
    # stop and suppressed ids out of range (a negative one counted from the end: -1 was <|endofchunk|>)
    (dict(eos_token_id=10000, pad_token_id=0), r"eos_token_id holds 10000, not a token id of this LM \(0..511\)"),
    (dict(eos_token_id=10000), r"eos_token_id holds 10000"),  # (not: pad_token_id=10000, which was not passed)
    (dict(eos_token_id=[2, -1], min_new_tokens=1), r"eos_token_id holds -1, not a token id"),
    (dict(suppress_tokens=[-1]), r"suppress_tokens holds token id -1 but the LM has 512 tokens"),
    # counts that are not ints (were torch TypeErrors, or True taken as 1)
    (dict(max_new_tokens=2.5), r"max_new_tokens must be an int >= 1, got 2.5"),
    (dict(max_new_tokens=True), r"max_new_tokens must be an int >= 1, got True"),
    (dict(max_new_tokens=2, min_new_tokens=1.5), r"min_new_tokens must be an int >= 0, got 1.5"),
    (dict(max_new_tokens=2, do_sample=True, top_k=2.5), r"top_k must be an int >= 0 \(or None\), got 2.5"),
    (dict(max_new_tokens=2, do_sample=True, temperature=0.0), r"temperature must be > 0 for sampling, got 0.0"),
])
def test_bad_generation_arguments_name_the_value(kwargs, message):
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    for beams in (1, 2):
        with pytest.raises(ValueError, match=message):
            generate(model, vx, ids, mask, num_beams=beams, **kwargs)


def test_token_id_arguments_take_tensors_and_refuse_what_is_no_id():
    """eos_token_id, suppress_tokens and pad_token_id as Hugging Face's generate takes them
    (integer tensors and numpy ints: were raw TypeErrors), the same tokens as lists of ints;
    floats, bools and a do_sample that is no bool are refused naming the value (suppress_tokens
    [2.5] was truncated to 2, the LM's EOS; do_sample="no" sampled); None top_p / top_k /
    temperature are unset (Hugging Face's GenerationConfig): no warning, the defaults; a
    non-finite temperature is refused; compile=True with cache="dynamic" says to pass the static
    cache (it said the LM did not support one)."""
    import warnings

    import numpy as np
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    kw = dict(max_new_tokens=4)
    want = generate(model, vx, ids, mask, eos_token_id=[2], suppress_tokens=[5, 6], pad_token_id=0, **kw)
    for eos, suppress, pad in ((torch.tensor(2), torch.tensor([5, 6]), torch.tensor(0)),
                               (np.int64(2), np.array([5, 6]), np.int32(0)), ([2], (5, 6), 0)):
        got = generate(model, vx, ids, mask, eos_token_id=eos, suppress_tokens=suppress, pad_token_id=pad, **kw)
        assert torch.equal(got, want)
    for bad, message in ((dict(suppress_tokens=[2.5]), r"suppress_tokens must be an int or a list of ints, got \[2.5\]"),
                         (dict(suppress_tokens=torch.tensor([2.5])), r"suppress_tokens must be integer token ids, got a "
                                                                      r"torch.float32 Tensor"),
                         (dict(eos_token_id=[True]), r"eos_token_id must be an int or a list of ints, got \[True\]"),
                         (dict(pad_token_id=2.5), r"pad_token_id must be a token id \(an int\), got 2.5"),
                         (dict(pad_token_id=[1, 2]), r"pad_token_id must be a token id \(an int\), got \[1, 2\]"),
                         (dict(do_sample="no"), r"do_sample must be True or False, got 'no'")):
        with pytest.raises(TypeError, match=message):
            generate(model, vx, ids, mask, **kw, **bad)
    with pytest.raises(ValueError, match=r"temperature must be a finite number, got nan"):
        generate(model, vx, ids, mask, do_sample=True, temperature=float("nan"), **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(generate(model, vx, ids, mask, top_k=None, top_p=None, temperature=None, **kw),
                           generate(model, vx, ids, mask, **kw))
    sampled = [generate(model, vx, ids, mask, do_sample=True, generator=torch.Generator().manual_seed(1), **extra, **kw)
               for extra in (dict(top_p=None, temperature=None), {})]
    assert torch.equal(*sampled)
    with pytest.raises(ValueError, match=r"compile=True needs the static cache: pass cache='static' or 'auto'"):
        generate(model, vx, ids, mask, compile=True, cache="dynamic", **kw)


def test_beam_counts_are_ints_and_greedy_takes_temperature_zero():
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    with pytest.raises(ValueError, match=r"num_beams must be an int >= 1, got 2.0"):
        generate(model, vx, ids, mask, max_new_tokens=2, num_beams=2.0)
    with pytest.raises(ValueError, match=r"length_penalty must be a number \(1.0: none\), got '1'"):
        generate(model, vx, ids, mask, max_new_tokens=2, num_beams=2, length_penalty="1")
    # temperature=0 with greedy decoding (a common way to ask for it): as Hugging Face, only a warning
    with pytest.warns(UserWarning, match="`temperature` is set to `0.0`"):
        got = generate(model, vx, ids, mask, max_new_tokens=3, temperature=0.0)
    assert torch.equal(got, generate(model, vx, ids, mask, max_new_tokens=3))


def test_visual_tokens_are_checked_and_cast_as_forward_does():
    """generate given encoded images takes what forward takes: (B, N, L, D) tokens (N and L swapped
    ran as L images of one token, silently), of the model's batch, cast to the blocks' dtype
    (fp32 tokens on a bf16 model crashed in a matmul)."""
    model = tiny()
    vx, ids, mask = batch(model, [1, 1], [9, 7])
    tokens = model.encode_vision(vx)
    with pytest.raises(ValueError, match=r"has L=1 tokens per image but the resampler makes 8"):
        generate(model, None, ids, mask, visual_tokens=tokens.transpose(1, 2), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"has batch 1 but lang_x has batch 2"):
        generate(model, None, ids, mask, visual_tokens=tokens[:1], max_new_tokens=2)
    assert torch.equal(generate(model, None, ids, mask, visual_tokens=tokens, max_new_tokens=3),
                       generate(model, vx, ids, mask, max_new_tokens=3))
    half = tiny().to(torch.bfloat16)
    want = generate(half, None, ids, mask, visual_tokens=tokens.to(torch.bfloat16), max_new_tokens=3)
    assert torch.equal(generate(half, None, ids, mask, visual_tokens=tokens, max_new_tokens=3), want)


def test_a_generation_config_max_length_gives_way_to_max_new_tokens():
    """Checkpoints' generation configs often set max_length (Llama-2: 4096): max_new_tokens passed
    by name wins, as in Hugging Face (it was 'pass max_new_tokens or max_length, not both')."""
    from transformers import GenerationConfig
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    got = model.generate(vx, ids, mask, generation_config=GenerationConfig(max_length=4096), max_new_tokens=4)
    assert torch.equal(got, model.generate(vx, ids, mask, max_new_tokens=4))
    got = model.generate(vx, ids, mask, generation_config=GenerationConfig(max_new_tokens=50), max_length=12)
    assert got.shape[1] == 12


def test_attention_mask_values_and_empty_rows_are_refused():
    """Positions are the mask's running sum: a 2 would shift them, a 0.5 (cast to long) drop a
    token; a row of padding only has nothing to continue from (unless a few-shot prefix precedes
    it). Each is an error naming the value or row, in generate, stream and score."""
    model = tiny()
    vx, ids, mask = batch(model, [1, 1], [9, 6])
    calls = [lambda m: generate(model, vx, ids, m, max_new_tokens=2),
             lambda m: next(stream(model, vx, ids, m, max_new_tokens=2)),
             lambda m: model.score(vx, ids, [[5, 6]], m)]
    for call in calls:
        for bad, message in ((mask * 2, r"attention_mask holds 2 \(row 0\): it must hold 1 for tokens and 0"),
                             (mask * 0.5, r"attention_mask holds 0.5 \(row 0\)"),
                             (torch.cat([mask[:1], torch.zeros_like(mask[1:])]),
                              r"row 1 of attention_mask is all padding: the row has no token to continue from")):
            with pytest.raises(ValueError, match=message):
                call(bad)
        call(mask.bool())  # bool and float 0 / 1 masks are fine
        call(mask.float())
    # after a few-shot prefix, a query of padding only continues the prefix
    demo = encode_prefix(model, None, torch.tensor([[5, 6, 7, 8]]))
    empty = torch.cat([mask[:1], torch.zeros_like(mask[1:])])
    text = ids.masked_fill(ids == model.config.media_token_id, 9)
    assert generate(model, None, text, empty, prefix=demo, max_new_tokens=2).shape == (2, ids.shape[1] + 2)


def test_flags_the_mode_ignores_warn_as_hugging_face_does():
    """temperature / top_k / top_p without do_sample, length_penalty / early_stopping without beams:
    Hugging Face's warning, at the caller's line; the defaults and the right mode say nothing."""
    import warnings
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    for kw, flag in ((dict(temperature=0.7), "temperature"), (dict(top_k=5), "top_k"), (dict(top_p=0.9), "top_p"),
                     (dict(length_penalty=2.0), "length_penalty"), (dict(early_stopping=True), "early_stopping")):
        with pytest.warns(UserWarning, match=rf"However, `{flag}` is set to .* this flag is only used in") as caught:
            generate(model, vx, ids, mask, max_new_tokens=2, **kw)
        assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, vx, ids, mask, max_new_tokens=2)
        generate(model, vx, ids, mask, max_new_tokens=2, do_sample=True, temperature=0.7, top_k=5, top_p=0.9)
        generate(model, vx, ids, mask, max_new_tokens=2, num_beams=2, length_penalty=2.0, early_stopping=True)


def test_cli_prepares_images_as_the_models_own_project_does(tmp_path):
    """`fastflamingo generate --image` gives the pixels of the source project's own preparation,
    exactly, for non-square images: IDEFICS's processor (the whole image resized to the square) and
    open_flamingo's (open_clip's evaluation transform: short side resized, centre cropped); the
    fallbacks written here (no torchvision / no open_clip) equal transformers' PIL processor and
    open_clip's transform. The earlier single transform was off by a pixel row for some sizes and
    cropped IDEFICS's images."""
    import numpy as np
    import open_clip
    from PIL import Image
    from transformers import IdeficsImageProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil
    from fastflamingo.generation.cli import load_image
    from fastflamingo.inputs import _resize_crop_normalise, _resize_normalise, image_transform
    for h, w in [(40, 64), (64, 41), (33, 33), (21, 90), (91, 20)]:
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray((np.random.RandomState(h * w).rand(h, w, 3) * 255).astype("uint8")).save(path)
        img = Image.open(path).convert("RGB")
        want_idefics = IdeficsImageProcessor(image_size=32)([img], return_tensors="pt")[0]
        want_of = open_clip.image_transform(32, is_train=False)(img)
        assert torch.equal(load_image(str(path), image_transform("idefics", 32)), want_idefics)
        assert torch.equal(load_image(str(path), image_transform("open_flamingo", 32)), want_of)
        pil = IdeficsImageProcessorPil(image_size=32)([img], return_tensors="pt")
        assert torch.equal(_resize_normalise(img, 32), pil["pixel_values"][0] if not torch.is_tensor(pil) else pil[0])
        assert torch.equal(_resize_crop_normalise(img, 32), want_of)


def test_cli_prints_input_warnings_as_its_own_lines(capsys):
    """A warning about the input reads like the command's errors (no source line of the console
    script it points at); the tokens still come."""
    from fastflamingo.cli import main
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42", "--max-new-tokens", "2"]
    assert main(args + ["--temperature", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 2
    # in the command's own flags (it said `do_sample=True`, an API argument), once
    assert err.count("warning") == 1 and ("fastflamingo generate: warning: --temperature 0.5: only sampling reads it; "
                                          "add --do-sample") in err, err
    assert "warnings.warn" not in err and ".py:" not in err


def test_cli_generate_repetition_rules(capsys):
    """``--no-repeat-ngram-size 1``: no token twice (prompt included); without it this prompt's
    continuation repeats tokens, and ``--repetition-penalty`` changes it."""
    from fastflamingo.cli import main
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42", "--max-new-tokens", "8"]
    runs = {}
    for extra in ([], ["--no-repeat-ngram-size", "1"], ["--repetition-penalty", "3"]):
        assert main(args + extra) == 0
        runs[tuple(extra)] = [int(t) for t in capsys.readouterr().out.split()]
    plain, once = runs[()], runs[("--no-repeat-ngram-size", "1")]
    assert len(set(plain)) < len(plain)
    assert len(set(once + [510, 17, 42])) == len(once) + 3, once
    assert runs[("--repetition-penalty", "3")] != plain


@pytest.mark.parametrize("kw", [dict(num_beams=3, num_return_sequences=2), dict(num_beams=3, num_return_sequences=3),
                                dict(do_sample=True, top_k=20, top_p=0.9, temperature=1.5, num_return_sequences=3),
                                dict(do_sample=True, num_beams=2, num_return_sequences=2),
                                dict(do_sample=True, num_return_sequences=2)])
def test_num_return_sequences_equal_idefics_generate(kw):
    """The best finished beams of each prompt, best first, and sampled continuations drawn from the
    same seeded global generator: the tokens of Hugging Face IDEFICS's generate (with its sampling
    defaults where none is given: top_k=50)."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    torch.manual_seed(5)
    with torch.no_grad():
        want = live.generate(**inp, max_new_tokens=8, **kw)
    torch.manual_seed(5)
    got = generate(ours, inp["pixel_values"][:, :, None], inp["input_ids"], inp["attention_mask"],
                   max_new_tokens=8, eos_token_id=[I_EOS], pad_token_id=I_PAD, **kw)
    R = kw["num_return_sequences"]
    assert got.shape[0] == 2 * R
    assert torch.equal(got, want), (kw, got[:, -8:], want[:, -8:])
    if R > 1:
        assert not torch.equal(got[0], got[1])  # R different continuations of the first prompt


def test_num_return_sequences_bad_values():
    model = tiny()
    vx, ids, mask = batch(model, [1], [9])
    for kw, message in [(dict(num_return_sequences=2), r"num_return_sequences=2 with greedy decoding"),
                        (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences=3 is more than num_beams=2"),
                        (dict(num_return_sequences=0), r"num_return_sequences must be an int >= 1, got 0")]:
        with pytest.raises(ValueError, match=message):
            generate(model, vx, ids, mask, max_new_tokens=2, **kw)


def test_cli_generate_several_sequences_per_prompt(capsys):
    from fastflamingo.cli import main
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42", "--max-new-tokens", "4"]
    assert main(args + ["--do-sample", "--num-return-sequences", "3"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [line.split("]")[0] for line in lines] == ["[0.0", "[0.1", "[0.2"], out
    assert len({line.split("] ")[1] for line in lines}) > 1 and "12 new tokens" in err
    assert main(args + ["--num-beams", "3", "--num-return-sequences", "2"]) == 0
    assert [line.split("]")[0] for line in capsys.readouterr().out.splitlines()] == ["[0.0", "[0.1"]
    assert main(args + ["--num-return-sequences", "2"]) == 2  # (in the flags' names, before the model loads)
    assert ("--num-return-sequences 2 with greedy decoding would print one sequence 2 times: add --do-sample"
            in capsys.readouterr().err)
    assert main(args + ["--num-beams", "2", "--num-return-sequences", "3"]) == 2
    assert "--num-return-sequences 3 is more than --num-beams 2" in capsys.readouterr().err


def test_idefics_processor_inputs_generate_as_they_are():
    """``model.generate(**inputs)`` with IDEFICS's processor output (input_ids, pixel_values,
    attention_mask, image_attention_mask) and IDEFICS's own arguments gives IDEFICS's tokens; an
    image mask that disagrees with the <image> tokens is an error naming the token."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    T = inp["input_ids"].shape[1]
    kw = dict(max_length=T + 6, bad_words_ids=[[99]], num_beams=2)
    with torch.no_grad():
        want = live.generate(**inp, **kw)
    assert torch.equal(ours.generate(**inp, **kw), want)
    wrong = dict(inp, image_attention_mask=inp["image_attention_mask"].clone())
    wrong["image_attention_mask"][0, -1] = torch.tensor([1, 0])  # row 0's last token: image 1, not 2
    with pytest.raises(ValueError, match=rf"gives token {T - 1} of row 0 image 1 \(0 = none\) but its <image> "
                                         r"tokens give image 2"):
        ours.generate(**wrong, max_new_tokens=2)
    with pytest.raises(ValueError, match="pass lang_x or input_ids, not both"):
        ours.generate(None, inp["input_ids"], input_ids=inp["input_ids"])


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_default_stops_and_fill_equal_open_flamingo_generate(family):
    """Called as open_flamingo's users call it, no stop or pad arguments, with the LM's EOS made
    the likeliest token of a row: open_flamingo's generate goes on past the EOS (it stops at
    <|endofchunk|> only) and fills finished rows as transformers does; the same tokens here."""
    pytest.importorskip("open_flamingo")
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    live = peers.open_flamingo_model(family, every_n=2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 14), generator=g)
    ids[0, [0, 6]] = MEDIA_ID
    ids[1, [4]] = MEDIA_ID
    vx = torch.randn(2, 2, 1, 3, 32, 32, generator=g)
    kw = dict(max_new_tokens=10, suppress_tokens=[MEDIA_ID])
    first = _open_flamingo_generate(live, vx, ids, **kw)[:, 14]
    with torch.no_grad():  # EOS wins wherever row 0's first new token would
        w = live.lang_encoder.get_output_embeddings().weight
        w[EOS_ID] = w[int(first[0])] * 1.01
        w[EOC_ID] = w[int(first[1])] * 1.01  # row 1 stops at once: its fill shows
    ours = from_open_flamingo(live)
    want = _open_flamingo_generate(live, vx, ids, **kw)
    got = generate(ours, vx, ids, **kw)
    fill = live.lang_encoder.generation_config.pad_token_id
    fill = EOC_ID if fill is None else fill
    # row 0 went on after its EOS, row 1 stopped at its <|endofchunk|> and was filled
    assert want[0, 14] == EOS_ID and (want[0, 15:] != fill).all(), want[0]
    assert want[1, 14] == EOC_ID and (want[1, 15:] == fill).all(), want[1]
    assert torch.equal(got, want), (family, got[:, 14:], want[:, 14:])


def test_outputs_are_ordinary_tensors_after_inference_mode_sessions():
    """Eager sessions compute in inference mode; what users get back (tokens of generate, beam
    search, stream; scores) are ordinary tensors: writable in place and usable in autograd, and the
    model trains right after generating."""
    from fastflamingo.generation import score
    model = tiny()
    vx, ids, mask = batch(model, [1, 2], [6, 9])
    outs = [generate(model, vx, ids, mask, max_new_tokens=3),
            generate(model, vx, ids, mask, max_new_tokens=3, num_beams=2),
            *stream(model, vx, ids, mask, max_new_tokens=3),
            score(model, vx, ids, [[5, 6], [7]], mask)]
    for out in outs:
        assert not out.is_inference()
        out.view(-1)[0] = out.view(-1)[0]  # an in-place write outside inference mode
    loss = model(vx, outs[0], labels=outs[0]).loss
    loss.backward()
    assert any(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------ Hugging Face's output classes, streamers
OUTPUT_MODES = [dict(), dict(num_beams=3), dict(num_beams=3, num_return_sequences=2, length_penalty=0.7),
                dict(do_sample=True, top_k=5, temperature=0.7), dict(do_sample=True, num_return_sequences=2),
                dict(repetition_penalty=1.5), dict(num_beams=2, repetition_penalty=0.7, no_repeat_ngram_size=2)]


def _chosen(sequences, scores, rows=None):
    """The score each step gave its token, read one by one (the test's own reading of the fields)."""
    G = len(scores)
    out = torch.zeros(sequences.shape[0], G)
    for r in range(sequences.shape[0]):
        for t in range(G):
            row = r if rows is None else int(rows[r, t])
            if row >= 0:
                out[r, t] = scores[t][row, sequences[r, sequences.shape[1] - G + t]]
    return out


@pytest.mark.parametrize("mode", range(len(OUTPUT_MODES)))
def test_return_dict_equals_idefics_generate(mode):
    """``return_dict_in_generate`` with ``output_scores`` and ``output_logits``: the output class,
    the sequences, every step's processed scores and raw logits, and for beam search the
    hypotheses' scores and beam indices equal Hugging Face IDEFICS's generate on the same weights
    (left padding: the repetition penalty skips it, as transformers >= 5.23). compute_transition_scores
    reads each token's score (transformers' own method cannot here: it reshapes by the config's
    vocab_size, 99, where IDEFICS's logits have 101 columns with the added tokens)."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    kw = dict(max_new_tokens=8, return_dict_in_generate=True, output_scores=True, output_logits=True,
              **OUTPUT_MODES[mode])
    torch.manual_seed(0)
    with torch.no_grad():
        want = live.generate(**inp, **kw)
    torch.manual_seed(0)
    got = ours.generate(**inp, eos_token_id=[I_EOS], pad_token_id=I_PAD, **kw)
    assert type(got) is type(want)
    assert torch.equal(got.sequences, want.sequences), (got.sequences[:, -8:], want.sequences[:, -8:])
    assert len(got.scores) == len(want.scores) == len(got.logits) == len(want.logits)
    for mine, theirs in zip(got.scores + got.logits, want.scores + want.logits):
        torch.testing.assert_close(mine, theirs)
    rows = getattr(want, "beam_indices", None)
    if rows is not None:
        assert torch.equal(got.beam_indices, rows)
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores)
    chosen = ours.compute_transition_scores(got.sequences, got.scores, getattr(got, "beam_indices", None))
    torch.testing.assert_close(chosen, _chosen(got.sequences, got.scores, rows))
    assert chosen.abs().sum() > 0
    logp = ours.compute_transition_scores(got.sequences, got.logits, getattr(got, "beam_indices", None),
                                          normalize_logits=True)
    torch.testing.assert_close(logp, _chosen(got.sequences, [t.log_softmax(-1) for t in got.logits], rows))
    if rows is not None and not kw.get("repetition_penalty"):
        # a beam's score is its tokens' log-probabilities' sum over its length ** length_penalty
        length = (rows >= 0).sum(-1)
        torch.testing.assert_close(chosen.sum(-1) / length ** kw.get("length_penalty", 1.0), got.sequences_scores)


@pytest.mark.parametrize("beams", [1, 3])
def test_return_dict_equals_open_flamingo_generate(beams):
    """The same through open_flamingo's generate (which hands its kwargs to transformers'), where
    transformers' own compute_transition_scores applies and agrees."""
    pytest.importorskip("open_flamingo")
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    live = peers.open_flamingo_model("llama", every_n=2)
    ours = from_open_flamingo(live)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 120, (2, 14), generator=g)
    ids[:, [0, 6]] = MEDIA_ID
    vx = torch.randn(2, 2, 1, 3, 32, 32, generator=g)
    kw = dict(max_new_tokens=10, num_beams=beams, eos_token_id=[EOC_ID, EOS_ID], pad_token_id=PAD_ID,
              suppress_tokens=[MEDIA_ID], return_dict_in_generate=True, output_scores=True)
    want = _open_flamingo_generate(live, vx, ids, **kw)
    got = generate(ours, vx, ids, **kw)
    assert torch.equal(got.sequences, want.sequences)
    for mine, theirs in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(mine, theirs)
    rows = getattr(want, "beam_indices", None)
    assert (rows is None) == (beams == 1)
    if rows is not None:
        assert torch.equal(got.beam_indices, rows)
        torch.testing.assert_close(got.sequences_scores, want.sequences_scores)
    torch.testing.assert_close(ours.compute_transition_scores(got.sequences, got.scores, rows),
                               live.lang_encoder.compute_transition_scores(want.sequences, want.scores, rows))


class _Recorder:
    """A transformers-style streamer (put / end) that keeps what it is given."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def test_streamer_is_fed_as_by_idefics_generate():
    """A streamer gets the prompt rows, then each step's tokens on the CPU, then end(), as from
    Hugging Face IDEFICS's generate; a transformers TextIteratorStreamer read in another thread gives
    the new text; beam search refuses a streamer; bad input is refused before the streamer hears
    anything; an error while decoding still ends the stream."""
    import threading

    from transformers import TextIteratorStreamer

    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model, idefics_tokenizer
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    inp = idefics_inputs()
    one = {k: v[1:] for k, v in inp.items()}  # text streamers take one row; this one has one image
    one["pixel_values"], one["image_attention_mask"] = one["pixel_values"][:, :1], one["image_attention_mask"][..., :1]
    mine, theirs = _Recorder(), _Recorder()
    with torch.no_grad():
        want = live.generate(**one, max_new_tokens=6, streamer=theirs)
    got = ours.generate(**one, max_new_tokens=6, eos_token_id=[I_EOS], pad_token_id=I_PAD, streamer=mine)
    assert torch.equal(got, want)
    assert len(mine.calls) == len(theirs.calls) == 1 + 6 + 1 and mine.calls[-1] == "end"
    for a, b in zip(mine.calls[:-1], theirs.calls[:-1]):
        assert a.device.type == "cpu" and torch.equal(a, b)

    tok = idefics_tokenizer()
    text = TextIteratorStreamer(tok, skip_prompt=True)
    chunks = []
    reader = threading.Thread(target=lambda: chunks.extend(text))
    reader.start()
    got = ours.generate(**one, max_new_tokens=6, eos_token_id=[I_EOS], pad_token_id=I_PAD, streamer=text)
    reader.join(timeout=60)
    assert not reader.is_alive()
    T = one["input_ids"].shape[1]
    assert "".join(chunks).split() == tok.decode(got[0, T:]).split()

    with pytest.raises(ValueError, match="`streamer` cannot be used with beam search"):
        ours.generate(**one, max_new_tokens=3, num_beams=2, streamer=_Recorder())
    quiet = _Recorder()
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        ours.generate(**one, max_new_tokens=0, streamer=quiet)
    assert quiet.calls == []

    class Failing(_Recorder):
        def put(self, value):
            super().put(value)
            if len(self.calls) == 3:
                raise RuntimeError("the reader went away")
    failing = Failing()
    with pytest.raises(RuntimeError, match="the reader went away"):
        ours.generate(**one, max_new_tokens=6, streamer=failing)
    assert failing.calls[-1] == "end" and len(failing.calls) == 4


def test_generation_config_and_arguments_generate_does_not_take():
    """A transformers GenerationConfig passes the settings it changes (arguments by name win); an
    argument fastflamingo's generate does not take is a TypeError naming it (and where it came
    from), not dropped; use_cache=False is refused, and output_scores without
    return_dict_in_generate warns, as Hugging Face's."""
    from transformers import GenerationConfig
    model = tiny()
    vx, ids, mask = batch(model, [1, 2], [9, 12])
    want = model.generate(vx, ids, mask, max_new_tokens=5, repetition_penalty=1.4, eos_token_id=[])
    config = GenerationConfig(max_new_tokens=5, repetition_penalty=1.4, eos_token_id=[], bos_token_id=1)
    assert torch.equal(model.generate(vx, ids, mask, generation_config=config), want)
    shorter = model.generate(vx, ids, mask, generation_config=config, max_new_tokens=3)
    assert torch.equal(shorter, want[:, :-2])
    with pytest.raises(TypeError, match=r"does not take typical_p \(set in generation_config\)"):
        model.generate(vx, ids, mask, generation_config=GenerationConfig(typical_p=0.5))
    with pytest.raises(TypeError, match=r"does not take logits_processor, output_attentions\. It takes"):
        model.generate(vx, ids, mask, output_attentions=True, logits_processor=[])
    with pytest.raises(TypeError, match="generation_config must be a transformers GenerationConfig, got dict"):
        model.generate(vx, ids, mask, generation_config={"max_new_tokens": 3})
    with pytest.raises(ValueError, match="use_cache=False: fastflamingo's generate always decodes with its"):
        model.generate(vx, ids, mask, use_cache=False)
    assert torch.equal(model.generate(vx, ids, mask, max_new_tokens=5, repetition_penalty=1.4, eos_token_id=[],
                                      use_cache=True), want)
    with pytest.warns(UserWarning, match="only returned with return_dict_in_generate=True"):
        assert torch.equal(model.generate(vx, ids, mask, max_new_tokens=5, repetition_penalty=1.4,
                                          eos_token_id=[], output_scores=True), want)


# ------------------------------------------------------------------ randomized settings against the peers
def _random_settings(seed: int, *, vocab: int, eos_choices, sample_returns: bool = True) -> dict:
    """A random mix of Hugging Face generate settings (beams, beam sampling, warpers, sequence
    rules, stop tokens, returned dict), reproducible from ``seed``."""
    import random
    r = random.Random(seed)
    kw = dict(max_new_tokens=r.choice([1, 2, 5, 9]))
    beams = r.choice([1, 1, 2, 3, 4])
    if beams > 1:
        kw["num_beams"] = beams
        if r.random() < 0.5:
            kw["length_penalty"] = r.choice([-1.0, 0.0, 0.5, 2.0])
        if r.random() < 0.4:
            kw["early_stopping"] = r.choice([True, False, "never"])
        if r.random() < 0.4:
            kw["num_return_sequences"] = r.randint(1, beams)
    if r.random() < 0.4:
        kw["do_sample"] = True
        if r.random() < 0.5:
            kw["temperature"] = r.choice([0.3, 0.9, 1.7])
        if r.random() < 0.5:
            kw["top_k"] = r.choice([0, 1, 3, 20])
        if r.random() < 0.5:
            kw["top_p"] = r.choice([0.3, 0.8, 1.0])
        if r.random() < 0.3:
            kw["min_p"] = r.choice([0.0, 0.05, 0.3, 0.9])
        if beams == 1 and sample_returns and r.random() < 0.4:
            kw["num_return_sequences"] = r.randint(1, 3)
    if r.random() < 0.3:
        kw["repetition_penalty"] = r.choice([0.6, 1.4, 3.0])
    if r.random() < 0.3:
        kw["no_repeat_ngram_size"] = r.choice([1, 2, 3])
    if r.random() < 0.3:
        kw["min_new_tokens"] = r.randint(0, kw["max_new_tokens"])
    if r.random() < 0.3:
        kw["suppress_tokens"] = r.sample(range(3, vocab), 3)
    if r.random() < 0.3:
        kw["bad_words_ids"] = [[r.randint(3, vocab - 1)] for _ in range(2)] + [[r.randint(3, vocab - 1)] * 2]
    kw["eos_token_id"] = r.choice(eos_choices)
    if r.random() < 0.5:
        kw.update(return_dict_in_generate=True, output_scores=True)
    return kw


def _same_output(got, want, kw) -> str | None:
    """None if ``generate``'s two outputs agree (tokens exactly; scores by the fp32 rule), else why."""
    dict_out = kw.get("return_dict_in_generate", False)
    gs, ws = (got.sequences, want.sequences) if dict_out else (got, want)
    if gs.shape != ws.shape or not torch.equal(gs, ws):
        return f"tokens {gs[:, -kw['max_new_tokens']:].tolist()} != {ws[:, -kw['max_new_tokens']:].tolist()}"
    if dict_out:
        if len(got.scores) != len(want.scores):
            return f"{len(got.scores)} steps of scores != {len(want.scores)}"
        for step, (a, b) in enumerate(zip(got.scores, want.scores)):
            if not torch.allclose(a, b, rtol=1.3e-6, atol=1e-5):
                return f"scores of step {step} differ by {(a - b).abs().nan_to_num().max()}"
        if getattr(want, "beam_indices", None) is not None:
            if not torch.equal(got.beam_indices, want.beam_indices):
                return "beam_indices differ"
            if not torch.allclose(got.sequences_scores, want.sequences_scores, rtol=1.3e-6, atol=1e-5):
                return "sequences_scores differ"
    return None


def test_random_settings_equal_idefics_generate():
    """120 random mixes of settings (greedy, sampling, beam search and beam sampling; temperature,
    top-k, top-p, repetition penalty, n-grams, bad words, suppressed and minimum tokens; stop tokens
    that leave the LM's EOS free to be generated, so that later tokens must go on seeing the image;
    rows with left padding): tokens, scores and beam indices equal Hugging Face IDEFICS's generate,
    the sampled ones from the same seed."""
    from fastflamingo.convert.idefics import from_idefics
    from peers_idefics import EOS_ID as I_EOS, PAD_ID as I_PAD, idefics_inputs, idefics_model
    live = idefics_model(cross_layer_interval=2)
    ours = from_idefics(live)
    failures = []
    for seed in range(120):
        inp = idefics_inputs(seed=seed % 5)
        kw = _random_settings(seed, vocab=99, eos_choices=[[I_EOS], [I_EOS, 5], [7]])
        torch.manual_seed(seed)
        with torch.no_grad():
            want = live.generate(**inp, **kw)
        torch.manual_seed(seed)
        why = _same_output(ours.generate(**inp, pad_token_id=I_PAD, **kw), want, kw)
        if why:
            failures.append((seed, kw, why))
    assert not failures, failures[:3]


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_random_settings_equal_open_flamingo_generate(family):
    """The same against open_flamingo's generate (generated <image> suppressed: see
    test_equals_open_flamingo_generate; sampling returns one sequence per prompt, as open_flamingo
    encodes its images for num_beams rows only). Every other batch has a left-padded row: open_flamingo
    gives it positions shifted by its padding, which its LMs' relative positions (rotary, ALiBi)
    do not see."""
    pytest.importorskip("open_flamingo")
    from fastflamingo.convert.open_flamingo import from_open_flamingo
    live = peers.open_flamingo_model(family, every_n=2)
    ours = from_open_flamingo(live)
    failures = []
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, 120, (2, 12), generator=g)
        ids[0, [0, 5]] = MEDIA_ID
        ids[1, [3]] = MEDIA_ID
        mask = torch.ones_like(ids)
        if seed % 2:
            ids[1, :3], mask[1, :3] = PAD_ID, 0
        vx = torch.randn(2, 2, 1, 3, 32, 32, generator=g)
        kw = _random_settings(seed, vocab=120, eos_choices=[[EOC_ID], [EOC_ID, EOS_ID], [7]], sample_returns=False)
        kw.update(pad_token_id=PAD_ID, suppress_tokens=kw.get("suppress_tokens", []) + [MEDIA_ID])
        torch.manual_seed(seed)
        want = _open_flamingo_generate(live, vx, ids, mask, **kw)
        torch.manual_seed(seed)
        why = _same_output(generate(ours, vx, ids, mask, **kw), want, kw)
        if why:
            failures.append((seed, kw, why))
    assert not failures, failures[:3]


def test_generated_tokens_log_probabilities_equal_score():
    """generate's own log-probabilities of the tokens it chose (return_dict_in_generate, read by
    compute_transition_scores) equal score's log-likelihood of the same continuation, token by
    token: generation and scoring read the same caches the same way."""
    model = tiny()
    vx, ids, mask = batch(model, [2, 1], [9, 12], seed=4)
    out = model.generate(vx, ids, mask, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True,
                         output_logits=True)
    per_token = model.compute_transition_scores(out.sequences, out.logits, normalize_logits=True)
    for row in range(2):
        cont, images = out.sequences[row, ids.shape[1]:], int((ids[row] == model.config.media_token_id).sum())
        got = model.score(vx[row:row + 1, :images], ids[row:row + 1, mask[row].bool()], [cont], reduction="none")
        torch.testing.assert_close(got[0, 0], per_token[row], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefix_reuse_with_sequence_rules_equals_the_prompt_written_out(cache):
    """With a few-shot prefix, the rules that read the sequence so far (repetition penalty, no-repeat
    n-grams, bad words) see what they see in the same prompt written out whole: each row's left
    padding first, then the demonstrations, then the query; greedy and 3-beam tokens equal that
    prompt's."""
    from fastflamingo.generation import _prompt_as_written
    model = tiny()
    demo_vx, demo_ids, _ = batch(model, [2], [12], seed=7)
    prefix = encode_prefix(model, demo_vx, demo_ids)
    vx, ids, mask = batch(model, [1, 0, 2], [6, 9, 5], seed=8)
    B, pad_first = ids.shape[0], mask.argmax(-1)
    full = torch.stack([torch.cat([ids[i, :pad_first[i]], demo_ids[0], ids[i, pad_first[i]:]]) for i in range(B)])
    full_mask = torch.stack([torch.cat([mask[i, :pad_first[i]], torch.ones(demo_ids.shape[1], dtype=torch.long),
                                        mask[i, pad_first[i]:]]) for i in range(B)])
    seen, padding = _prompt_as_written(ids, mask, prefix)
    assert torch.equal(seen, full) and torch.equal(padding, full_mask == 0)
    full_vx = torch.cat([demo_vx.expand(B, -1, -1, -1, -1, -1), vx], 1)
    last = int(demo_ids[0, -1])
    for rules in (dict(no_repeat_ngram_size=2, repetition_penalty=1.3), dict(bad_words_ids=[[last, 7], [3, 4]])):
        for beams in (1, 3):
            kw = dict(max_new_tokens=6, num_beams=beams, eos_token_id=[], cache=cache, **rules)
            got = generate(model, vx, ids, mask, prefix=prefix, **kw)
            want = generate(model, full_vx, full, full_mask, **kw)
            assert torch.equal(got[:, ids.shape[1]:], want[:, full.shape[1]:]), (rules, beams)


_WINDOWED = {  # LM families whose attention (some layers' or all) sees only the last `window` cache slots
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                    sliding_window=8),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, use_sliding_window=True,
                  sliding_window=8, max_window_layers=0),
    "gemma2": dict(model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                   max_position_embeddings=256, sliding_window=8),
    "gpt_neo": dict(model_type="gpt_neo", hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                    max_position_embeddings=256, attention_types=[[["local", "global"], 1]], window_size=8,
                    bos_token_id=1, eos_token_id=2),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                        max_position_embeddings=256, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("family", sorted(_WINDOWED))
def test_sliding_window_lm_with_prefix_and_padding_equals_the_prompt_written_out(family):
    """A sliding-window LM counts cache slots, padding included, against its window. A few-shot
    prefix (longer than the window) before left-padded queries: each row's padding goes before the
    prefix, as in the prompt written out whole (it sat between the prefix and the query and hid up
    to its length of prefix tokens from the query: first logits off by up to 0.45); the LM cache
    keeps every slot (Hugging Face's per-config DynamicCache cropped a prefix longer than the
    window, and scoring's per-pair caches read the cropped slots as the first ones). Greedy tokens
    with both caches equal the written-out prompt's, and score equals score_reference."""
    model = tiny(lm=_WINDOWED[family], **({"decoder_layers_attr": "transformer.h"} if family == "gpt_neo" else {}))
    demo_vx, demo_ids, _ = batch(model, [1], [13], seed=7)
    prefix = encode_prefix(model, demo_vx, demo_ids)
    vx, ids, mask = batch(model, [1, 1, 0], [3, 9, 6], seed=8)
    B, T = ids.shape
    pad = T - mask.sum(-1)
    full = torch.stack([torch.cat([ids[i, :pad[i]], demo_ids[0], ids[i, pad[i]:]]) for i in range(B)])
    full_mask = torch.stack([torch.cat([mask[i, :pad[i]], torch.ones(demo_ids.shape[1], dtype=torch.long),
                                        mask[i, pad[i]:]]) for i in range(B)])
    full_vx = torch.cat([demo_vx.expand(B, -1, -1, -1, -1, -1), vx], 1)
    want = plain_greedy(model, full_vx, full, full_mask, 6)[:, full.shape[1]:]
    for cache in ("dynamic", "auto"):  # auto: static where the family supports it (not GPT-Neo)
        got = generate(model, vx, ids, mask, prefix=prefix, max_new_tokens=6, eos_token_id=[], cache=cache)
        assert torch.equal(got[:, T:], want), (family, cache)
        plain = generate(model, full_vx, full, full_mask, max_new_tokens=6, eos_token_id=[], cache=cache)
        assert torch.equal(plain[:, full.shape[1]:], want), (family, cache, "no prefix")
    conts = [[5, 6, 7], [9], list(range(20, 32))]  # the longest runs past the window
    for pre, args in ((prefix, (vx, ids)), (None, (full_vx, full))):
        m = mask if pre is not None else full_mask
        fast = model.score(*args, conts, m, prefix=pre)
        ref = score_reference(model, *args, conts, m, prefix=pre)
        assert (fast - ref).abs().max() < 1e-4, (family, pre is not None, (fast - ref).abs().max())
