"""``fastflamingo generate`` / ``score`` / ``convert`` from the command line: the text streamed,
the rows printed, the prompts' special tokens, the seed, few-shot files' paths, and bad input as
one line naming it (exit 2), before the model loads where it can be."""
import json
import re

import pytest
import torch

from fastflamingo import Flamingo
from fastflamingo.cli import main
from fastflamingo.generation import cli as gen_cli

from peers_idefics import tiny_tokenizer
from prompts import saved_tiny_with_tokenizer, tiny

SPECIALS = {"<unk>": 3, "<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 510, "<|endofchunk|>": 511}


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE tokenizer without merges (one token per byte: id 3 + byte), so
    that a character of several bytes is split over tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    to_char = dict(zip(bs, map(chr, cs)))  # GPT-2's bytes_to_unicode
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{to_char[b]: 3 + b for b in range(256)}, "<image>": 510,
             "<|endofchunk|>": 511}
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=["<image>", "<|endofchunk|>"])


def bos_tokenizer():
    """The tests' word-level tokenizer with LLaMA's post-processor: ``<s>`` (id 1) first."""
    from tokenizers import processors
    tok = tiny_tokenizer(512, SPECIALS)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Saved tiny models: "words" (word-level tokenizer, and its few-shot file), "bytes" (byte-level
    BPE), "bos" (a tokenizer that puts <s> first), "ids" (no tokenizer), "stops" (no tokenizer;
    <|endofchunk|>'s logit row 1.5 x token 42's, so that rows stop early)."""
    root = tmp_path_factory.mktemp("models")
    dirs = {name: root / name for name in ("words", "bytes", "bos", "ids", "stops")}
    saved_tiny_with_tokenizer(dirs["words"])
    for name, tok in (("bytes", byte_level_tokenizer()), ("bos", bos_tokenizer())):
        tiny().save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    tiny().save_pretrained(dirs["ids"])
    model = Flamingo.from_preset("tiny")
    with torch.no_grad():
        head = model.lang_encoder.get_output_embeddings().weight
        head[511] = head[42] * 1.5
    model.save_pretrained(dirs["stops"])
    return {k: str(v) for k, v in dirs.items()}


def fake_stream(tokens):
    """A stand-in for generation.stream that "generates" ``tokens``, one (1,) tensor a step."""
    return lambda *args, **kwargs: (torch.tensor([t]) for t in tokens)


# ------------------------------------------------------------------ 1. the streamed text
@pytest.mark.parametrize("name, text", [("bytes", "café au lait, naïve ☕"), ("words", "w436 w141 w149 w5")])
def test_streamed_text_is_the_text_of_all_the_tokens(saved, capsys, monkeypatch, name, text):
    """Streamed, the text is the tokenizer's decode of all the new tokens (word-level tokenizers'
    spaces kept), and no piece prints a character whose bytes are split over tokens as U+FFFD."""
    from transformers import AutoTokenizer
    import fastflamingo.generation as generation
    tok = AutoTokenizer.from_pretrained(saved[name])
    tokens = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(tokens) == text
    if name == "bytes":
        assert any("\ufffd" in tok.decode([t]) for t in tokens)  # some tokens are parts of a character
    monkeypatch.setattr(generation, "stream", fake_stream(tokens))
    assert main(["generate", "--model", saved[name], "--random-images", "1", "--prompt-ids", "510 5",
                 "--max-new-tokens", str(len(tokens))]) == 0
    out, err = capsys.readouterr()
    assert out == text + "\n"
    assert f"{len(tokens)} new tokens" in err
    pieces = gen_cli._TextStream(tok)  # what each step prints
    streamed = [pieces.put(t) for t in tokens] + [pieces.end()]
    assert "".join(streamed) == text and not any("\ufffd" in p for p in streamed), streamed


def test_streamed_and_batch_rows_print_the_same_text(saved, capsys, tmp_path):
    """A real greedy run: the streamed text of a prompt is the line the batch path prints for it
    (the first query's random image is the prompt's: both are the seed's first draw)."""
    shots = tmp_path / "two.json"
    shots.write_text(json.dumps({"queries": [{"text": "<image> w5 w6", "images": ["random"]}] * 2}))
    base = ["generate", "--model", saved["words"], "--max-new-tokens", "5"]
    assert main(base + ["--random-images", "1", "--prompt", "<image> w5 w6"]) == 0
    streamed = capsys.readouterr().out.rstrip("\n")
    assert main(base + ["--few-shot", str(shots)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert " " in streamed and len(rows) == 2 and rows[0] == f"[0] {streamed}", (streamed, rows)


# ------------------------------------------------------------------ 2. unreadable images
def test_unreadable_image_files_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gen_cli, "_load", lambda args: pytest.fail("the model loaded before the images were read"))
    monkeypatch.delenv("FASTFLAMINGO_TRACEBACK", raising=False)
    corrupt, text = tmp_path / "corrupt.png", tmp_path / "notes.jpg"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    text.write_text("hello")
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    shots = tmp_path / "shots.json"
    shots.write_text(json.dumps({"queries": [{"text": [510, 5], "images": ["corrupt.png"]}]}))
    cases = [(["generate", "--image", str(corrupt), "--prompt-ids", "510 5 6"], str(corrupt)),
             (["generate", "--image", str(text), "--prompt-ids", "510 5 6"], str(text)),
             (["generate", "--image", str(truncated), "--prompt-ids", "510 5 6"], str(truncated)),
             (["score", "--image", str(corrupt), "--prompt-ids", "510 5 6", "--candidate-ids", "7"], str(corrupt)),
             (["generate", "--few-shot", str(shots)], str(corrupt))]
    for args, path in cases:
        assert main(args[:1] + ["--preset", "tiny"] + args[1:]) == 2, args
        err = capsys.readouterr().err
        assert re.fullmatch(f"fastflamingo {args[0]}: error: image file {re.escape(repr(path))}: .*; give a PNG, "
                            r"JPEG or other image file\n", err), err


# ------------------------------------------------------------------ 3. flags that would be dropped
def test_flags_a_run_would_ignore_are_errors_or_warnings(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gen_cli, "_load", lambda args: pytest.fail("the model loaded before the flags were checked"))
    shots = tmp_path / "one.json"
    shots.write_text(json.dumps({"queries": [{"images": ["random"], "text": [510, 17, 42]}]}))
    for extra, flag in [(["--image", str(shots)], "--image"), (["--random-images", "2"], "--random-images")]:
        assert main(["generate", "--preset", "tiny", "--few-shot", str(shots)] + extra) == 2
        err = capsys.readouterr().err
        assert f"generate: error: {flag} goes with --prompt / --prompt-ids: a few-shot file names its own" in err, err
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42"]
    for option, value in [("--num-beams", "0"), ("--num-beams", "-2"), ("--num-return-sequences", "0"),
                          ("--num-return-sequences", "-1"), ("--max-new-tokens", "0")]:
        with pytest.raises(SystemExit) as e:
            main(args + [option, value])
        assert e.value.code == 2
        assert f"error: argument {option}: {option} must be >= 1, got {value}" in capsys.readouterr().err


def test_length_penalty_without_beams_warns(capsys):
    args = ["generate", "--preset", "tiny", "--random-images", "1", "--prompt-ids", "510 17 42",
            "--max-new-tokens", "2"]
    assert main(args + ["--length-penalty", "2"]) == 0
    out, err = capsys.readouterr()
    assert len(out.split()) == 2
    assert err.count("warning") == 1 and ("fastflamingo generate: warning: --length-penalty 2.0: only beam search reads "
                                          "it; add --num-beams N") in err, err
    assert main(args + ["--length-penalty", "2", "--num-beams", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------ 4. rows end at their stop
def test_rows_end_at_their_first_stop_token_and_are_counted_alike(saved, tmp_path, capsys):
    """Batch and beam rows print up to their first stop token (<|endofchunk|> here), not generate's
    fill after it; the timing line counts the tokens printed, stop tokens included, as streamed."""
    two, one = tmp_path / "two.json", tmp_path / "one.json"
    queries = [{"images": ["random"], "text": [510, 17, 42]}, {"images": ["random"], "text": [510, 5, 6]}]
    two.write_text(json.dumps({"queries": queries}))
    one.write_text(json.dumps({"queries": queries[:1]}))

    def run(shots, *extra):
        assert main(["generate", "--model", saved["stops"], "--few-shot", str(shots), "--max-new-tokens", "6",
                     *extra]) == 0
        out, err = capsys.readouterr()
        rows = [[int(t) for t in line.split("] ")[-1].split()] for line in out.splitlines()]
        return rows, int(re.search(r"(\d+) new tokens", err).group(1))

    batch, count = run(two)
    assert len(batch) == 2 and count == sum(map(len, batch))
    for row in batch:
        assert 511 not in row[:-1] and (row[-1] == 511 or len(row) == 6), row
    assert batch[0][-1] == 511 and len(batch[0]) < 6, batch  # the first query stops early
    streamed, streamed_count = run(one)
    assert streamed == batch[:1] and streamed_count == len(batch[0])
    beams, beam_count = run(one, "--num-beams", "2")
    assert beams[0][-1] == 511 and 511 not in beams[0][:-1] and beam_count == len(beams[0])


def test_until_stop():
    assert gen_cli._until_stop([95, 511, 511, 511], {511}) == [95, 511]
    assert gen_cli._until_stop([4, 5, 6], {511}) == [4, 5, 6]
    assert gen_cli._until_stop([4, 2, 0, 0], {2}) == [4, 2]  # IDEFICS-style: EOS, then the pad fill
    assert gen_cli._until_stop([4, 5], set()) == [4, 5]


# ------------------------------------------------------------------ 5. special tokens (BOS)
def test_sequences_start_with_the_tokenizers_special_tokens_as_the_harness_does(saved, tmp_path):
    """The prompt, a few-shot prefix and the queries of a file without a prefix get <s> first, as
    tokenizer(text) and the evaluation harness give it; a query after a prefix and a candidate
    do not."""
    from fastflamingo.cli import build_parser
    from fastflamingo.evaluation.harness import _batch_inputs
    from fastflamingo.generation.score_cli import _read_candidates
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(saved["bos"])
    model = Flamingo.from_pretrained(saved["bos"]).eval()

    def prepared(*args):
        parsed = build_parser().parse_args(["generate", "--model", saved["bos"], *args])
        _, _, ids, mask, _, prefix = gen_cli.prepare(parsed)
        return [r[m.bool()].tolist() for r, m in zip(ids, mask)], None if prefix is None else prefix[1][0].tolist()

    rows, _ = prepared("--random-images", "1", "--prompt", "<image> w5 w6")
    want = _batch_inputs(model, tok, None, ["<image> w5 w6"], [[]], "cpu", None)[1].tolist()
    assert rows == want == [[1, 510, 5, 6]]
    with_prefix = tmp_path / "prefix.json"
    with_prefix.write_text(json.dumps({"prefix": {"images": ["random"], "text": "<image> w7 <|endofchunk|>"},
                                       "queries": [{"images": ["random"], "text": "<image> w9"}, {"text": "w3 w4"}]}))
    rows, prefix = prepared("--few-shot", str(with_prefix))
    assert prefix == tok("<image> w7 <|endofchunk|>")["input_ids"] == [1, 510, 7, 511]
    assert rows == [[510, 9], [3, 4]]  # after the prefix: no <s>
    no_prefix = tmp_path / "queries.json"
    no_prefix.write_text(json.dumps({"queries": [{"images": ["random"], "text": "<image> w9"}, {"text": "w3 w4"}]}))
    rows, prefix = prepared("--few-shot", str(no_prefix))
    assert prefix is None and rows == [[1, 510, 9], [1, 3, 4]]
    rows, _ = prepared("--random-images", "1", "--prompt-ids", "510 5 6")
    assert rows == [[510, 5, 6]]  # ids as given
    args = build_parser().parse_args(["score", "--model", saved["bos"], "--prompt", "w5",
                                      "--candidates", "w7 w8", "w9"])
    assert _read_candidates(args, tok) == (["w7 w8", "w9"], [[7, 8], [9]])  # continuations: no <s>
    # candidates with the same tokens tied, ranked in the order given, without a word
    for cands, message in ((["--candidates", "w7", "w9", "w7"], r"\['w7', 'w7'\] all tokenize to \[7\]"),
                           (["--candidate-ids", "7 8", "9", "7  8"], r"\['7 8', '7  8'\] all tokenize to \[7, 8\]")):
        args = build_parser().parse_args(["score", "--model", saved["bos"], "--prompt", "w5", *cands])
        with pytest.raises(ValueError, match=r"candidates must tokenize differently \(a ranking cannot tell them "
                                             r"apart, the first of them would always win\): " + message):
            _read_candidates(args, tok)


# ------------------------------------------------------------------ 6. few-shot image paths
def test_few_shot_image_paths_are_relative_to_the_file(tmp_path, capsys, monkeypatch):
    from PIL import Image
    folder = tmp_path / "shots"
    folder.mkdir()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "cat.png")
    Image.new("RGB", (30, 40), (10, 200, 10)).save(tmp_path / "dog.png")
    queries = [{"images": ["cat.png"], "text": [510, 17, 42]},
               {"images": [str(tmp_path / "dog.png")], "text": [510, 5]},
               {"images": ["random"], "text": [510, 6]}]
    (folder / "shots.json").write_text(json.dumps({"prefix": {"images": ["cat.png"], "text": [510, 4]},
                                                   "queries": queries}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pre, queries = gen_cli._few_shot_spec("../shots/shots.json")
    assert pre["images"] == [str(folder / "cat.png")]
    assert [q["images"] for q in queries] == [[str(folder / "cat.png")], [str(tmp_path / "dog.png")], ["random"]]
    reads = []
    real_read = gen_cli.read_image
    monkeypatch.setattr(gen_cli, "read_image", lambda path: reads.append(path) or real_read(path))
    assert main(["generate", "--preset", "tiny", "--few-shot", "../shots/shots.json", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("[0] ")
    # each file decoded once, before the model loads (cat.png serves the prefix and a query)
    assert sorted(reads) == sorted([str(folder / "cat.png"), str(tmp_path / "dog.png")]), reads
    (folder / "missing.json").write_text(json.dumps({"queries": [{"images": ["dog.png"], "text": [510, 5]}]}))
    assert main(["generate", "--preset", "tiny", "--few-shot", "../shots/missing.json"]) == 2
    assert f"error: no image file {str(folder / 'dog.png')!r}" in capsys.readouterr().err  # not ./dog.png
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "relative to the file" in capsys.readouterr().out


# ------------------------------------------------------------------ 7. the seed
def test_seed_samples_what_manual_seed_then_generate_samples(saved, capsys):
    """``--seed S --do-sample`` draws what ``torch.manual_seed(S); model.generate(..., do_sample=True)``
    draws: the seed is set after the model loaded (loading draws random numbers)."""
    cmd = ["generate", "--model", saved["ids"], "--random-images", "1", "--prompt-ids", "510 5 6",
           "--max-new-tokens", "6", "--do-sample", "--seed", "3"]
    assert main(cmd) == 0
    got = [int(t) for t in capsys.readouterr().out.split()]
    model = Flamingo.from_pretrained(saved["ids"]).eval()
    image = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3))  # --random-images' first image
    torch.manual_seed(3)
    want = model.generate(image[None, None, None], torch.tensor([[510, 5, 6]]), max_new_tokens=6, do_sample=True)
    assert got == want[0, 3:].tolist()


# ------------------------------------------------------------------ 8. bad paths and texts
def test_bad_few_shot_files_and_prompts_are_one_line_naming_them(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(gen_cli, "_load", lambda args: pytest.fail("the model loaded before the input was checked"))
    monkeypatch.delenv("FASTFLAMINGO_TRACEBACK", raising=False)
    (tmp_path / "a_dir").mkdir()
    files = {}
    for name, spec in [("int", {"queries": [{"images": [], "text": 5}]}),
                       ("null", {"queries": [{"images": [], "text": None}]}),
                       ("empty", {"queries": [{"images": [], "text": [4]}, {"text": ""}]}),
                       ("prefix", {"prefix": {"text": {"a": 1}}, "queries": [{"text": [4]}]})]:
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(spec))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00binary")
    cases = [
        (["--few-shot", str(tmp_path / "a_dir")], f"{str(tmp_path / 'a_dir')!r} is a directory: --few-shot takes a "
                                                  "JSON file"),
        (["--few-shot", str(tmp_path / "none.json")], f"no few-shot file {str(tmp_path / 'none.json')!r}"),
        (["--few-shot", str(binary)], f"{binary}: not valid JSON"),
        (["--few-shot", str(files["int"])], f'{files["int"]}: query 0\'s "text" must be a string (with a tokenizer) '
                                            "or a list of token ids, got 5"),
        (["--few-shot", str(files["null"])], f'{files["null"]}: query 0\'s "text" must be a string (with a '
                                             "tokenizer) or a list of token ids, got None"),
        (["--few-shot", str(files["empty"])], f'{files["empty"]}: query 1\'s "text" is empty'),
        (["--few-shot", str(files["prefix"])], f'{files["prefix"]}: prefix\'s "text" must be a string'),
        (["--random-images", "0", "--prompt-ids", ""], "--prompt-ids is empty: give the prompt's token ids"),
        (["--prompt-ids", "  "], "--prompt-ids is empty"),
        (["--prompt", ""], "--prompt is empty"),
    ]
    for args, message in cases:
        for command in (["generate"], ["score", "--candidate-ids", "5"]):
            assert main(command[:1] + ["--preset", "tiny"] + args + command[1:]) == 2, args
            err = capsys.readouterr().err
            assert err.startswith(f"fastflamingo {command[0]}: error: {message}") and err.count("\n") == 1, err


def test_convert_to_a_path_that_is_a_file_is_one_line(tmp_path, capsys, monkeypatch):
    from peers_idefics import idefics_model, idefics_tokenizer
    monkeypatch.delenv("FASTFLAMINGO_TRACEBACK", raising=False)
    source = tmp_path / "idefics"
    idefics_model().save_pretrained(source)
    idefics_tokenizer().save_pretrained(source)
    target = tmp_path / "a_file"
    target.write_text("")
    capsys.readouterr()  # (the peer's save_pretrained progress bar)
    assert main(["convert", "idefics", str(source), str(target)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "[Errno" not in err, err
    assert re.search(f"\nfastflamingo convert: error: the output {re.escape(repr(str(target)))} is a file: give a "
                     "folder to write the model to\n$", "\n" + err), err
