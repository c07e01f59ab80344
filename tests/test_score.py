"""``score``: log-likelihoods of candidate continuations on the generation caches, against
``score_reference`` (each prompt + candidate through ``model.forward`` alone, no cache of any kind)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastflamingo.generation import encode_prefix, score
from fastflamingo.generation.score import score_reference
from prompts import MPT, batch, saved_tiny_with_tokenizer, tiny

MEDIA_ID, EOS_ID = 510, 2  # the tiny preset's <image> and EOS

_MODELS = {}


def model_for(lm):
    if lm not in _MODELS:
        _MODELS[lm] = tiny(**({"lm": MPT} if lm == "mpt" else {})).eval()
        c = _MODELS[lm].config
        assert (c.media_token_id, c.eos_token_id) == (MEDIA_ID, EOS_ID)
    return _MODELS[lm]


@pytest.mark.parametrize("lm", ["llama", "mpt"])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_score_equals_plain_forward(lm, chunk_size):
    model = model_for(lm)
    images = [2, 0, 1]  # a row with no image, rows with different image counts
    vx, ids, mask = batch(model, images, [9, 5, 12], seed=3)
    conts = [[5], [7, 8, 9], [100, 2, 3, 4, 5], [1, EOS_ID, 2], [511]]  # lengths 1-5; an EOS inside
    want = score_reference(model, vx, ids, conts, mask, reduction="none")
    per_token = score(model, vx, ids, conts, mask, reduction="none", chunk_size=chunk_size)
    torch.testing.assert_close(per_token, want, atol=2e-5, rtol=1e-5)
    lengths = torch.tensor([len(c) for c in conts])
    torch.testing.assert_close(score(model, vx, ids, conts, mask, chunk_size=chunk_size), want.sum(-1),
                               atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(model.score(vx, ids, conts, mask, reduction="mean"), want.sum(-1) / lengths,
                               atol=5e-5, rtol=1e-5)


def test_score_after_an_eos_sees_no_image_under_idefics_rules():
    model = tiny(eos_resets_media=True).eval()
    vx, ids, mask = batch(model, [1, 2], [6, 9], seed=5)
    conts = [[4, EOS_ID, 6, 7], [8, 9]]
    want = score_reference(model, vx, ids, conts, mask, reduction="none")
    torch.testing.assert_close(score(model, vx, ids, conts, mask, reduction="none"), want, atol=2e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(2, 10)), min_size=1, max_size=3),
       st.lists(st.lists(st.integers(3, 500), min_size=1, max_size=4), min_size=1, max_size=4),
       st.integers(0, 2 ** 16))
def test_score_with_a_prefix_equals_plain_forward(rows, conts, seed):
    model = model_for("llama")
    conts = [[t if t != MEDIA_ID else 7 for t in c] for c in conts]
    images, lengths = zip(*[(min(n, t), t) for n, t in rows])
    vx, ids, mask = batch(model, list(images), list(lengths), seed=seed)
    g = torch.Generator().manual_seed(seed)
    pre_ids = torch.randint(3, 500, (1, 7), generator=g)
    pre_ids[0, [0, 4]] = MEDIA_ID
    pre_vx = torch.randn(1, 2, 1, 3, 32, 32, generator=g)
    prefix = encode_prefix(model, pre_vx, pre_ids)
    want = score_reference(model, vx, ids, conts, mask, prefix=prefix, reduction="none")
    got = score(model, vx, ids, conts, mask, prefix=prefix, reduction="none", chunk_size=3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("lm", ["llama", "mpt"])
def test_score_after_a_prefix_does_not_depend_on_the_batch(lm):
    """After a few-shot prefix, each query's scores equal those of its prefix and tokens written
    out alone, whatever padding the batch gives it (MPT's ALiBi counts tokens, not the padding
    between the prefix's K/V and the query), and a query of padding only scores its candidates
    right after the prefix (from the prefix's own last logits)."""
    model = model_for(lm)
    g = torch.Generator().manual_seed(11)
    pre_ids = torch.randint(3, 500, (1, 9), generator=g)
    pre_ids[0, [0, 5]] = MEDIA_ID
    pre_vx = torch.randn(1, 2, 1, 3, 32, 32, generator=g)
    prefix = encode_prefix(model, pre_vx, pre_ids)
    vx, ids, mask = batch(model, [1, 0, 2], [4, 20, 7], seed=12)  # up to 16 columns of padding
    vx, ids, mask = (torch.cat([t, torch.zeros_like(t[:1])]) for t in (vx, ids, mask))  # padding only
    conts = [[5], [7, 8, 9], [100, 2, 3, 4]]
    got = score(model, vx, ids, conts, mask, prefix=prefix, reduction="none")
    for b in range(ids.shape[0]):  # the whole sequence through forward, no cache, no padding
        row = torch.cat([pre_ids, ids[b:b + 1, mask[b] == 1]], 1)
        row_vx = torch.cat([pre_vx, vx[b:b + 1, :int((row == MEDIA_ID).sum()) - 2]], 1)
        for c, cont in enumerate(conts):
            with torch.no_grad():
                logits = model(row_vx, torch.cat([row, torch.tensor([cont])], 1)).logits[0, row.shape[1] - 1:-1]
            want = logits.float().log_softmax(-1).gather(-1, torch.tensor(cont)[:, None])[:, 0]
            torch.testing.assert_close(got[b, c, :len(cont)], want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got, score_reference(model, vx, ids, conts, mask, prefix=prefix, reduction="none"),
                               atol=2e-5, rtol=1e-5)


def test_one_token_candidates_cost_no_lm_call_beyond_the_prompt():
    model = model_for("llama")
    vx, ids, mask = batch(model, [1, 1], [6, 6], seed=2)
    calls = []
    hook = model.lang_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        got = score(model, vx, ids, [[t] for t in range(20, 40)], mask)
    finally:
        hook.remove()
    assert len(calls) == 1 and got.shape == (2, 20)
    # 20 candidates of 3 tokens after 2 prompts, 16 pairs a call: each prompt's candidates in 2 calls
    # of their own (16 + 4: its K/V read through views); 4 candidates: both prompts in one call
    calls.clear()
    hook = model.lang_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        score(model, vx, ids, [[t, t + 1, t + 2] for t in range(20, 40)], mask, chunk_size=16)
    finally:
        hook.remove()
    assert len(calls) == 1 + 4
    calls.clear()
    hook = model.lang_encoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        score(model, vx, ids, [[t, t + 1] for t in range(20, 24)], mask, chunk_size=16)
    finally:
        hook.remove()
    assert len(calls) == 1 + 1


def test_score_input_errors_name_the_problem():
    model = model_for("llama")
    vx, ids, mask = batch(model, [1], [6], seed=2)
    for conts, err, message in [
        ([], ValueError, "non-empty list of token-id sequences"),
        (torch.tensor([[1, 2]]), ValueError, "non-empty list of token-id sequences"),
        ([[1, 2], []], ValueError, r"continuation 1 must be a non-empty 1-D sequence"),
        ([[1, 2], [4, MEDIA_ID]], ValueError, rf"continuation 1 holds an <image> token \(id {MEDIA_ID}\)"),
        ([[1, 9999]], ValueError, r"continuation 0 holds token id 9999 but the LM's input embedding has 512 rows"),
        ([torch.tensor([1.0])], TypeError, "continuation 0 must hold integer token ids"),
    ]:
        with pytest.raises(err, match=message):
            score(model, vx, ids, conts, mask)
    with pytest.raises(ValueError, match="reduction='max' is not one of"):
        score(model, vx, ids, [[1]], mask, reduction="max")
    for chunk in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"chunk_size must be an int >= 1 \(or None: by memory\), got {chunk}"):
            score(model, vx, ids, [[1]], mask, chunk_size=chunk)
    for conts, shown in (([5, 6, 7], "5"), (["cat", "dog"], "'cat'")):  # one flat sequence; texts
        with pytest.raises(ValueError, match=rf"continuation 0 is {shown}: continuations are a list of token-id "
                                             r"sequences.*tokenize texts first"):
            score(model, vx, ids, conts, mask)
    tokens = model.encode_vision(vx)
    with pytest.raises(ValueError, match=r"has L=1 tokens per image but the resampler makes"):  # N and L swapped
        score(model, None, ids, [[1]], mask, visual_tokens=tokens.transpose(1, 2))
    model.cache_media(ids, vx)
    try:
        with pytest.raises(ValueError, match=r"score_reference runs each .* pair alone.*uncache_media\(\)"):
            score_reference(model, None, ids, [[1]], mask)
    finally:
        model.uncache_media()


def test_score_on_the_triton_kernel_reads_broadcast_visual_kv():
    """Each prompt's candidates read its visual K/V through stride-0 (broadcast) views: the Triton
    kernel (here in the interpreter) takes them by their strides, as the PyTorch path does."""
    model = model_for("llama")
    vx, ids, mask = batch(model, [2, 1], [7, 5], seed=4)
    conts = [[5, 6, 7], [8, 9], [10, 11, 12]]
    want = score_reference(model, vx, ids, conts, mask, reduction="none")
    from fastflamingo.kernels import image_causal
    strides, launch = [], image_causal.image_causal_fwd
    model.set_attention_backend("triton")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(image_causal, "image_causal_fwd", lambda q, k, *a: strides.append(k.stride(0)) or launch(q, k, *a))
            got = score(model, vx, ids, conts, mask, reduction="none", chunk_size=2)  # 2 + 1 per prompt: views
    finally:
        model.set_attention_backend("auto")
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert 0 in strides  # the kernel ran, on broadcast K/V


def test_chunk_size_by_memory_keeps_copies_within_the_budget(monkeypatch):
    """chunk_size=None: as many pairs per LM call as CHUNK_BYTES of copied prompt K/V allow."""
    import importlib
    score_module = importlib.import_module("fastflamingo.generation.score")  # (the package's `score` is the function)
    model = model_for("llama")
    vx, ids, mask = batch(model, [1, 2], [8, 8], seed=6)
    conts = [[t, t + 1] for t in range(20, 30)]
    want = score_reference(model, vx, ids, conts, mask)
    sizes = []
    original = score_module.lm_cache.fill
    monkeypatch.setattr(score_module.lm_cache, "fill", lambda cache, kv, n: sizes.append(n) or original(cache, kv, n))
    torch.testing.assert_close(score(model, vx, ids, conts, mask), want, atol=5e-5, rtol=1e-5)
    assert sizes == [20]  # tiny: every pair in one call
    per_pair = 4 * 2 * 4 * 8 * 16 * 4  # 4 layers x (k, v) x 4 heads x 8 cached tokens x 16 x fp32
    monkeypatch.setattr(score_module, "CHUNK_BYTES", 3 * per_pair + 1)  # (visual K/V counted too)
    sizes.clear()
    torch.testing.assert_close(score(model, vx, ids, conts, mask), want, atol=5e-5, rtol=1e-5)
    assert max(sizes) <= 3 and sum(sizes) == 20, sizes


def test_cli_score_ranks_candidates_as_the_api_scores_them(tmp_path, capsys):
    from fastflamingo.cli import main
    assert main(["score", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42",
                 "--candidate-ids", "5 6", "7", "8 9 10", "--by", "mean"]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) == 3 and "3 candidates x 1 prompt(s) scored" in err
    means = [float(line.split()[2].split("/")[0]) for line in lines]
    assert means == sorted(means, reverse=True)  # best first, by the mean
    shots = saved_tiny_with_tokenizer(tmp_path)
    classes = tmp_path / "classes.txt"
    classes.write_text("w7 w8\nw9\n\nw10 w11 w12\n")
    assert main(["score", "--model", str(tmp_path), "--few-shot", str(shots), "--candidates-file", str(classes),
                 "--top", "2"]) == 0
    out, _ = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == "[0]" and lines[3] == "[1]" and len(lines) == 6  # two queries, the best 2 each
    labels = [line.split("/token")[1].strip().strip("'") for line in lines if not line.startswith("[")]
    assert len(labels) == 4 and set(labels) <= {"w7 w8", "w9", "w10 w11 w12"}, labels
    for args, message in [(["--top", "0"], "--top must be >= 1, got 0"),
                          (["--candidates-file", str(tmp_path / "none.txt")], "no candidates file"),
                          (["--candidate-ids", "5 x"], "--candidate-ids: 'x' is not a token id (an integer)"),
                          # (it said "continuation 0 must be a non-empty 1-D sequence", naming no candidate)
                          (["--candidates", "", "w9"], "candidate '' tokenizes to nothing (1 of 2 do)")]:
        base = ["score", "--model", str(tmp_path), "--few-shot", str(shots)]
        extra = [] if args[0] in ("--candidates-file", "--candidate-ids", "--candidates") else ["--candidates", "w7"]
        assert main(base + extra + args) == 2
        assert message in capsys.readouterr().err


def test_progress_bar_over_the_lm_calls_when_asked(capsys):
    model = model_for("llama")
    vx, ids, mask = batch(model, [1], [6], seed=2)
    conts = [[t, t + 1] for t in range(20, 30)]
    quiet = score(model, vx, ids, conts, mask, chunk_size=1, progress=False)
    assert "score" not in capsys.readouterr().err
    shown = score(model, vx, ids, conts, mask, chunk_size=1, progress=True)
    err = capsys.readouterr().err
    assert "score: 100%" in err and "10/10" in err, err
    torch.testing.assert_close(shown, quiet)
