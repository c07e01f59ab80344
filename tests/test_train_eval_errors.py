"""Fine-tuning and few-shot evaluation refuse what they cannot do before they start, naming it:
documents over --max-length and missing image files (training and evaluation), a max_grad_norm
that is not > 0 (or None), a resume with another learning rate, weight decay, warm-up,
max_grad_norm or data order (a longer --steps takes the new schedule from the first resumed
step), documents left out of every epoch (a warning), more shots than the support set holds,
class names that tokenize alike; and the synthetic world's pictures are pixels as image files
give them, so a saved synthetic model scores on PNG files what it scores in-process."""
import json
import re

import pytest
import torch

import fastflamingo
from fastflamingo.evaluation import Example, evaluate, load_examples, load_karpathy, synthetic
from fastflamingo.training import Document, DocumentBatches, fine_tune, load_documents, schedule


def _model(seed: int = 5):
    model = fastflamingo.Flamingo.from_preset("tiny", seed=seed)
    with torch.no_grad():  # random tiny blocks start with closed gates: open them (gradients reach the blocks)
        for name, p in model.named_parameters():
            if name.endswith("_gate"):  # (every block weight is in a gated_cross_attn_layer)
                p.fill_(0.5)
    return model


def _saved(path, seed: int = 5):
    _model(seed).save_pretrained(path)
    synthetic.tokenizer().save_pretrained(path)
    return str(path)


def _png(path, example):
    synthetic.to_image(example.image).save(path)
    return path


def _docs_file(tmp_path, n: int = 8, long_line: int | None = None, missing_line: int | None = None):
    """n one-picture documents as PNGs and JSON lines; line ``long_line`` over-long, line
    ``missing_line``'s image not there."""
    lines = []
    for i, ex in enumerate(synthetic.examples(n, "color", seed=1)):
        name = f"{i}.png"
        _png(tmp_path / name, ex)
        text = f"<image>Output:{ex.answers[0]}<|endofchunk|>"
        if i + 1 == long_line:
            text += " Output red" * 30
        lines.append(json.dumps({"images": ["nope.png" if i + 1 == missing_line else name], "text": text}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "docs.jsonl")


class _Counting:
    """Counts a model method's calls (generate, score): what ran before an error."""

    def __init__(self, model, name):
        self.calls, self.orig = 0, getattr(model, name)
        setattr(model, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.orig(*args, **kwargs)


# ------------------------------------------------------------------ 1. fine-tuning data, checked up front
@pytest.mark.parametrize("case, message", [
    ("long", r"docs.jsonl:8 is \d+ tokens, more than max_length=20: split it"),
    ("missing", r"docs.jsonl:7: no image file '.*nope.png' \(1 missing from here on\)"),
    ("misspelt", r"docs.jsonl:3: unknown key\(s\) \['image'\] \(did you mean \"images\", a list of paths\?\): a "
                 r"document line holds \"text\" and \"images\" only"),  # (it trained text-only, without a word)
])
def test_finetune_checks_every_document_before_training(tmp_path, capsys, case, message):
    """The over-long document is the last line (3 steps of 2 documents never draw it) and the
    missing image comes late: both are errors naming file:line before any step."""
    from fastflamingo.cli import main
    data = _docs_file(tmp_path, long_line=8 if case == "long" else None, missing_line=7 if case == "missing" else None)
    if case == "misspelt":
        lines = open(data).read().splitlines()
        lines[2] = json.dumps({"image": "2.png", "text": "Output:red<|endofchunk|>"})
        open(data, "w").write("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["finetune", "--model", _saved(tmp_path / "model"), "--data", data, "--batch-size", "2", "--steps", "3",
            "--save-every", "1", "--out", str(out)]
    assert main(args + (["--max-length", "20"] if case == "long" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastflamingo finetune: error: ") and len(err.strip().splitlines()) == 1
    import re
    assert re.search(message, err), err
    assert not out.exists()  # not one step trained


def test_fine_tune_checks_document_batches_before_the_first_step(tmp_path):
    tok = synthetic.tokenizer()
    docs = [Document(list(synthetic.examples(1, "color", seed=i)[0].image[None]), "<image>Output:red<|endofchunk|>")
            for i in range(6)]
    docs[5] = Document([], "Output " * 40)
    data = DocumentBatches(docs, tok, 510, batch_size=2, image_size=32, max_length=30, seed=0)
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"document 5 is 40 tokens, more than max_length=30"):
        fine_tune(model, data, steps=2, lr=1e-2, out=str(tmp_path / "run"), progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    docs[5] = Document([str(tmp_path / "gone.png")], "<image>Output:red<|endofchunk|>")
    data = DocumentBatches(docs, tok, 510, batch_size=2, image_size=32, seed=0)
    with pytest.raises(FileNotFoundError, match=r"document 5: no image file '.*gone.png'"):
        fine_tune(model, data, steps=2, progress=False)
    with pytest.raises(FileNotFoundError, match=r"docs.jsonl:3: no image file"):
        load_documents(_docs_file(tmp_path, missing_line=3))
    with pytest.raises(ValueError, match=r"docs.jsonl:2 is \d+ tokens, more than max_length=20"):
        load_documents(_docs_file(tmp_path, long_line=2), tok, max_length=20)


def test_documents_without_a_target_or_with_too_many_images_are_named_before_the_first_step(tmp_path):
    """A document of <image> tags only (nothing to learn), one with more images than the model's
    max_num_media, and batches built for another <image> token id: errors before any step, naming
    the document, where they failed at the step that drew them (or, for the first, never alone)."""
    import dataclasses
    from fastflamingo.presets import preset_config
    tok = synthetic.tokenizer()
    image = synthetic.examples(1, "color", seed=0)[0].image
    docs = [Document([image], "<image>Output:red<|endofchunk|>") for _ in range(6)]
    model = fastflamingo.Flamingo.from_preset(
        "tiny", seed=5, resampler=dataclasses.replace(preset_config("tiny").resampler, max_num_media=2))
    before = {n: p.clone() for n, p in model.named_parameters()}
    for bad, message in [(Document([image], "<image>"), r"document 5 has no token to learn from: its text '<image>'"),
                         (Document([], ""), r"document 5 has no token to learn from"),
                         (Document([image] * 3, "<image>a<image>b<image>c"),
                          r"document 5 has 3 images, more than the model's max_num_media=2 \(1 such document")]:
        data = DocumentBatches(docs[:5] + [bad], tok, 510, batch_size=2, seed=0)
        with pytest.raises(ValueError, match=message):
            fine_tune(model, data, steps=2, lr=1e-2, progress=False)
    with pytest.raises(ValueError, match=r"token id 511, but the model's is 510"):
        fine_tune(model, DocumentBatches(docs, tok, 511, batch_size=2, seed=0), steps=1, progress=False)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_batch_pads_with_zero_images_of_its_own_images_shape():
    """A text-only document beside a 2-frame clip of 32-pixel frames gets a zero clip of that shape
    (not a 224-pixel single frame: torch.stack failed); images of two shapes in one batch are an
    error naming both documents; under world_size > 1 a batch of text only gets zero images of the
    model's size (image_size None: fine_tune's check reads it)."""
    from fastflamingo.training import collate
    tok = synthetic.tokenizer()
    clip = torch.rand(2, 3, 32, 32)
    vx, ids, mask, labels = collate([Document([clip], "<image>Output:red"), Document([], "Output: blue")], tok, 510)
    assert vx.shape == (2, 1, 2, 3, 32, 32) and torch.equal(vx[0, 0], clip) and not vx[1].any()
    with pytest.raises(ValueError, match=r"document 1's image 0 is \(1, 3, 32, 32\) .* but document 0's is "
                                         r"\(2, 3, 32, 32\): a batch's images must be one shape"):
        collate([Document([clip], "<image>a"), Document([clip[0]], "<image>b")], tok, 510)
    docs = [Document([], "Output: blue") for _ in range(4)]
    data = DocumentBatches(docs, tok, 510, batch_size=1, rank=1, world_size=2)
    data.check(_model())
    [(vx, *_)] = data(0)
    assert vx.shape == (1, 1, 1, 3, 32, 32) and not vx.any()
    data = DocumentBatches(docs, tok, 510, batch_size=1, rank=1, world_size=2, image_size=224)
    with pytest.raises(ValueError, match=r"image_size=224 .* but the model takes 32-pixel images"):
        data.check(_model())


def test_bad_held_out_data_is_refused_before_training_and_an_evaluation_failure_keeps_the_step(tmp_path):
    """eval_data is first read at the first evaluation, after the steps before it, and before that
    step's checkpoint: a list of Documents, a generator (the first evaluation used it up: the
    second said "every label is -100") and a HeldOut image PIL cannot read lost the whole run.
    Now they are refused before the first step; a failure at an evaluation writes that step's
    checkpoint first (resume once eval_data is mended)."""
    from fastflamingo.training import HeldOut
    tok = synthetic.tokenizer()
    image = synthetic.examples(1, "color", seed=0)[0].image
    docs = [Document([image], "<image>Output:red<|endofchunk|>") for _ in range(4)]
    data = DocumentBatches(docs, tok, 510, batch_size=2, seed=0)
    held = HeldOut(docs[:2], tok, 510, batch_size=2)
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    (tmp_path / "bad.png").write_bytes(b"")
    for bad, message in [(docs[:2], r"eval_data\[0\] is a Document: wrap the documents in HeldOut"),
                         ((mb for mb in held), r"eval_data is an iterator \(generator\): the first evaluation would "
                                               r"use it up"),
                         (HeldOut([Document([str(tmp_path / "bad.png")], "<image>Output:red")], tok, 510),
                          r"document 0: image file '.*bad\.png': not an image PIL can read")]:
        with pytest.raises(ValueError, match=message):
            fine_tune(model, data, steps=2, lr=1e-2, progress=False, out=str(tmp_path / "run"), eval_data=bad)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()) and not (tmp_path / "run").exists()
    vx, ids, mask, labels = list(held)[0]
    broken = [(vx, ids.masked_fill(ids == 510, 600), mask, labels)]  # (an id past the vocabulary: fails in the forward)
    with pytest.raises(ValueError, match=r"600"):
        fine_tune(model, data, steps=2, lr=1e-2, progress=False, out=str(tmp_path / "run"), eval_data=broken)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2  # the trained steps are kept


def test_adamw8bit_without_bitsandbytes_names_the_optimizer(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # a blocked import
    tok = synthetic.tokenizer()
    docs = [Document(list(ex.image[None]), f"<image>Output:{ex.answers[0]}<|endofchunk|>")
            for ex in synthetic.examples(2, "color", seed=0)]
    data = DocumentBatches(docs, tok, 510, batch_size=2, image_size=32, seed=0)
    with pytest.raises(ImportError, match=r'optimizer="adamw8bit" needs bitsandbytes: pip install bitsandbytes'):
        fine_tune(_model(), data, steps=1, optimizer="adamw8bit", progress=False)


@pytest.mark.parametrize("value", [-1.0, -0.5, 0, 0.0, float("nan"), float("inf")])
def test_max_grad_norm_must_be_positive_or_none(value):
    """clip_grad_norm_ scales the gradients by max_grad_norm / norm: a negative one flips every
    gradient (gradient ascent, the loss rising with no error). Refused before any weight moves."""
    data = _resume_setup(None)
    model = _model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError) as e:
        fine_tune(model, data, steps=2, lr=1e-2, max_grad_norm=value, progress=False)
    assert str(e.value) == (f"max_grad_norm must be > 0 (the norm to clip the gradients to) or None (no clipping), "
                            f"got {value}")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_cli_max_grad_norm_refuses_negative_and_non_finite_values(capsys):
    from fastflamingo.cli import build_parser
    args = ["finetune", "--model", "m", "--data", "d.jsonl", "--steps", "1", "--out", "o"]
    assert build_parser().parse_args(args + ["--max-grad-norm", "0"]).max_grad_norm == 0.0  # no clipping
    assert build_parser().parse_args(args + ["--max-grad-norm", "2.5"]).max_grad_norm == 2.5
    assert build_parser().parse_args(args).max_grad_norm == 1.0
    for value in ["-1", "-0.1", "nan", "inf"]:
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(args + ["--max-grad-norm", value])
        assert e.value.code == 2
        assert ("fastflamingo finetune: error: argument --max-grad-norm: --max-grad-norm must be > 0 (the norm to "
                f"clip the gradients to) or 0 (no clipping), got {value}\n") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(args + ["--max-grad-norm", "one"])
    assert "error: argument --max-grad-norm: 'one' is not a number" in capsys.readouterr().err


def test_document_batches_warn_once_of_the_documents_left_out_of_every_epoch():
    """7 documents in steps of 4: 3 sit out each epoch (other ones each epoch); said once, when
    the batches are built, at the caller's line, and which documents a step takes is unchanged."""
    import warnings

    from fastflamingo.warn import InputWarning
    data = _resume_setup(None)
    docs, tok = data.docs[:7], data.tokenizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        b = DocumentBatches(docs, tok, 510, batch_size=2, grad_accum=2, image_size=32, seed=1)
        for step in range(3):
            b(step)
        DocumentBatches(docs[:4], tok, 510, batch_size=2, grad_accum=2, image_size=32)  # none left over
        DocumentBatches(docs, tok, 510, batch_size=1, image_size=32)
        DocumentBatches(docs[:6], tok, 510, batch_size=2, image_size=32, rank=1, world_size=2)  # rank 0 says it
    assert [(w.category, str(w.message)) for w in caught] == [(InputWarning, (
        "3 of the 7 documents sit out each epoch: an epoch is 1 step(s) of batch_size x grad_accum x world_size = "
        "4 documents (each epoch's shuffle leaves out other ones); to train on every document every epoch, give a "
        "multiple of 4 documents, or a batch_size x grad_accum x world_size that divides 7"))]
    assert caught[0].filename == __file__
    assert b.per_epoch == 1
    import random

    from fastflamingo.training import collate
    for step in range(3):  # step k (epoch k) takes the first 4 of epoch k's shuffle, as before the warning
        order = list(range(7))
        random.Random(1 * 1_000_003 + step).shuffle(order)
        got = b(step)
        for m, index in enumerate((order[:2], order[2:4])):
            assert torch.equal(got[m][1], collate([docs[i] for i in index], tok, 510, image_size=32)[1])


# ------------------------------------------------------------------ 5. resume: the same settings, or an error
def _resume_setup(tmp_path):
    tok = synthetic.tokenizer()
    docs = [Document(list(ex.image[None]), f"<image>Output:{ex.answers[0]}<|endofchunk|>")
            for ex in synthetic.examples(8, "shape", seed=4)]
    return DocumentBatches(docs, tok, 510, batch_size=2, image_size=32, seed=1)


def test_sharded_data_must_be_built_for_this_rank(tmp_path):
    """Under shard=True, DocumentBatches (and HeldOut) built without rank= / world_size= gave every
    rank the same documents, silently; now an error naming both."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        data = _resume_setup(tmp_path)
        wrong = DocumentBatches(data.docs, data.tokenizer, 510, batch_size=2, seed=1, rank=1, world_size=2)
        with pytest.raises(ValueError, match=r"batches is rank 1 of world_size 2, but this process is rank 0 of 1"):
            fine_tune(_model(), wrong, steps=1, shard=True, progress=False)
    finally:
        dist.destroy_process_group()


def test_finetune_writes_the_tokenizer_beside_the_first_checkpoint(tmp_path, monkeypatch):
    """model/ got its tokenizer only when the run finished: one cut short left weights that
    `fastflamingo generate --model run/model` could not read. Now it is there before the first step."""
    import fastflamingo.training as training
    from fastflamingo.cli import main
    real, seen = training.fine_tune, []

    def watching(*args, **kwargs):
        seen.append(sorted(p.name for p in (tmp_path / "run" / "model").iterdir()))
        return real(*args, **kwargs)
    monkeypatch.setattr(training, "fine_tune", watching)
    data = _docs_file(tmp_path, n=4)
    assert main(["finetune", "--model", _saved(tmp_path / "model"), "--data", data, "--batch-size", "2", "--steps",
                 "1", "--out", str(tmp_path / "run")]) == 0
    assert seen and "tokenizer_config.json" in seen[0], seen
    # --resume with no checkpoint there: the error, and nothing written (a tokenizer was left behind)
    assert main(["finetune", "--model", _saved(tmp_path / "model2"), "--data", data, "--batch-size", "2", "--steps",
                 "1", "--out", str(tmp_path / "other"), "--resume"]) == 2
    assert not (tmp_path / "other").exists()


def test_resume_refuses_another_dtype_or_quantization(tmp_path):
    """A bfloat16 run resumed in float32, or over an NF4 LM (--dtype or --quantization forgotten
    or added), went on with other steps, silently; now an error naming both values."""
    data = _resume_setup(tmp_path)
    out = str(tmp_path / "run")
    kw = dict(steps=2, lr=1e-3, progress=False)
    fine_tune(_model().to(torch.bfloat16), data, out=out, **kw)
    with pytest.raises(ValueError, match=r"the trained weights' dtype \(--dtype\) 'bfloat16' -> 'float32'"):
        fine_tune(_model(), data, out=out, resume=True, **dict(kw, steps=3))
    from fastflamingo.quant import quantize_model
    with pytest.raises(ValueError, match=r"the LM's quantization \(--quantization\) None -> 'nf4'"):
        fine_tune(quantize_model(_model().to(torch.bfloat16), "nf4"), data, out=out, resume=True, **dict(kw, steps=3))
    fine_tune(_model().to(torch.bfloat16), data, out=out, resume=True, **dict(kw, steps=3))  # the same: resumes


def test_resume_from_a_truncated_checkpoint_says_so(tmp_path):
    """A damaged copy of checkpoint.pt was a raw "OSError: [Errno 22]" traceback from torch.load."""
    import os
    data = _resume_setup(tmp_path)
    out = str(tmp_path / "run")
    kw = dict(steps=2, lr=1e-3, progress=False)
    fine_tune(_model(), data, out=out, **kw)
    path = os.path.join(out, "checkpoint.pt")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=r"cannot read the checkpoint '.*checkpoint\.pt' \(\d+ bytes\): is the file "
                                         r"complete\?"):
        fine_tune(_model(), data, out=out, resume=True, **dict(kw, steps=3))


def test_resume_refuses_another_lr_weight_decay_or_warmup(tmp_path):
    data = _resume_setup(tmp_path)
    out = str(tmp_path / "run")
    kw = dict(lr=1e-3, weight_decay=0.1, warmup=1, progress=False)
    fine_tune(_model(), data, steps=2, out=out, **kw)
    for change, message in [(dict(lr=5e-2), r"lr \(--lr\) 0.001 -> 0.05"),
                            (dict(weight_decay=0.0), r"weight_decay \(--weight-decay\) 0.1 -> 0.0"),
                            (dict(warmup=3), r"warmup \(--warmup\) 1 -> 3"),
                            (dict(optimizer="adamw8bit"), r"optimizer \(--optimizer\) 'adamw' -> 'adamw8bit'")]:
        with pytest.raises(ValueError, match=r"resume: the checkpoint .* was trained with other settings: " + message):
            fine_tune(_model(), data, steps=4, out=out, resume=True, **{**kw, **change})
    # a checkpoint saved before the settings were: its lr is the scheduler's, still checked
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["settings"]
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"lr \(--lr\) 0.001 -> 0.05"):
        fine_tune(_model(), data, steps=4, out=out, resume=True, **{**kw, "lr": 5e-2})
    h = fine_tune(_model(), data, steps=3, out=out, resume=True, **kw)
    assert [r["step"] for r in h] == [1, 2, 3]


def test_resume_refuses_another_max_grad_norm_or_data_order(tmp_path):
    """max_grad_norm and DocumentBatches' seed, batch_size, grad_accum, world_size and number of
    documents are the checkpoint's settings too: another one would read other documents (or clip
    otherwise) than the uninterrupted run; a checkpoint written before they were saved resumes."""
    import re
    data = _resume_setup(tmp_path)  # 8 documents, batch_size 2, seed 1
    out = str(tmp_path / "run")
    path = str(tmp_path / "run" / "checkpoint.pt")
    kw = dict(lr=1e-3, progress=False)
    fine_tune(_model(), data, steps=2, out=out, **kw)
    assert torch.load(path, weights_only=True)["settings"] == {
        "lr": 1e-3, "weight_decay": 0.1, "warmup": 0, "optimizer": "adamw", "steps": 2, "max_grad_norm": 1.0,
        "seed": 1, "batch_size": 2, "grad_accum": 1, "world_size": 1, "documents": 8, "dtype": "float32",
        "quantization": None}
    docs, tok = data.docs, data.tokenizer

    def batches(**change):
        return DocumentBatches(change.pop("docs", docs), tok, 510, **{**dict(batch_size=2, image_size=32, seed=1),
                                                                       **change})
    for change, message in [
            (dict(max_grad_norm=None), "max_grad_norm (--max-grad-norm) 1.0 -> None"),
            (dict(max_grad_norm=0.5), "max_grad_norm (--max-grad-norm) 1.0 -> 0.5"),
            (dict(data=batches(seed=2)), "seed (--seed) 1 -> 2"),
            (dict(data=batches(batch_size=4)), "batch_size (--batch-size) 2 -> 4"),
            (dict(data=batches(grad_accum=2)), "grad_accum (--grad-accum) 1 -> 2"),
            (dict(data=batches(world_size=2)), "world_size (torchrun --nproc-per-node) 1 -> 2"),
            (dict(data=batches(docs=docs[:6])), "documents (in --data) 8 -> 6"),
            (dict(data=batches(seed=0, grad_accum=2), max_grad_norm=None),
             "max_grad_norm (--max-grad-norm) 1.0 -> None; seed (--seed) 1 -> 0; grad_accum (--grad-accum) 1 -> 2")]:
        given = change.pop("data", data)
        with pytest.raises(ValueError) as e:
            fine_tune(_model(), given, steps=4, out=out, resume=True, **{**kw, **change})
        assert str(e.value) == (f"resume: the checkpoint {path} was trained with other settings: {message}; resume "
                                "with the checkpoint's, or start a new run in another out directory (steps may "
                                "change on resume)")
    with pytest.raises(ValueError, match=re.escape("max_grad_norm (--max-grad-norm) 1.0 -> None")):
        fine_tune(_model(), lambda step: data(step), steps=4, out=out, resume=True, **kw, max_grad_norm=None)
    # the same settings resume; so does data that is no DocumentBatches (it has no data settings to check)
    assert [r["step"] for r in fine_tune(_model(), lambda step: data(step), steps=3, out=out, resume=True,
                                         **kw)] == [1, 2, 3]
    assert [r["step"] for r in fine_tune(_model(), data, steps=4, out=out, resume=True, **kw)] == [1, 2, 3, 4]
    # a checkpoint written before max_grad_norm and the data settings were saved: not checked, it resumes
    state = torch.load(path, weights_only=True)
    state["settings"] = {k: state["settings"][k] for k in ("lr", "weight_decay", "warmup", "optimizer", "steps")}
    torch.save(state, path)
    h = fine_tune(_model(), batches(seed=2), steps=5, out=out, resume=True, max_grad_norm=None, **kw)
    assert [r["step"] for r in h] == [1, 2, 3, 4, 5]
    assert torch.load(path, weights_only=True)["settings"]["seed"] == 2  # recorded from now on


def test_cli_resume_with_another_lr_is_one_line(tmp_path, capsys):
    from fastflamingo.cli import main
    args = ["finetune", "--model", _saved(tmp_path / "model"), "--data", _docs_file(tmp_path), "--batch-size", "2",
            "--out", str(tmp_path / "run")]
    assert main(args + ["--steps", "1", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert main(args + ["--steps", "2", "--lr", "5e-2", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "error: resume: the checkpoint" in err and "lr (--lr) 0.001 -> 0.05" in err and len(err.strip().splitlines()) == 1
    for flags, message in [(["--seed", "3"], "seed (--seed) 0 -> 3"),
                           (["--batch-size", "4"], "batch_size (--batch-size) 2 -> 4"),
                           (["--max-grad-norm", "0"], "max_grad_norm (--max-grad-norm) 1.0 -> None")]:
        assert main(args + ["--steps", "2", "--lr", "1e-3", "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastflamingo finetune: error: resume: the checkpoint ") and message in err, err
        assert len(err.strip().splitlines()) == 1


def test_resume_with_more_steps_follows_the_new_schedule_from_the_first_resumed_step(tmp_path):
    data = _resume_setup(tmp_path)
    out = str(tmp_path / "run")
    kw = dict(lr=1e-2, warmup=1, progress=False)
    first = fine_tune(_model(), data, steps=3, out=out, **kw)
    assert [r["lr"] for r in first] == pytest.approx([1e-2 * schedule(s, 3, 1) for s in range(3)])
    h = fine_tune(_model(), data, steps=6, out=out, resume=True, **kw)
    rates = [r["lr"] for r in h]
    assert rates[:3] == [r["lr"] for r in first]  # the steps made keep their rates
    assert rates[3:] == [1e-2 * schedule(s, 6, 1) for s in range(3, 6)]  # the new schedule, its first step included
    assert rates[3] > rates[2]  # the old schedule had decayed to its floor at step 3


# ------------------------------------------------------------------ 2. evaluation: every image checked first
def _tiny_eval():
    return _model(1).eval(), synthetic.tokenizer()


def test_evaluation_inputs_that_cannot_score_are_said_before_any_prompt_runs(tmp_path):
    """Hateful Memes queries of one label (ROC AUC needs both: it raised after every prompt ran,
    the predictions lost), VQA queries with fewer than 4 answers (VQA accuracy scores an exact
    answer 0 with 1 answer: a warning saying so), shots that are no int or list (a TypeError
    naming nothing) or an empty list (evaluated nothing, silently); the plot runs in order of
    shots, and a predictions-only run removes an earlier run's plot beside its results."""
    from fastflamingo.evaluation.plot import few_shot_plot
    model, tok = _model(), synthetic.tokenizer()
    pictures = synthetic.examples(4, "color", seed=2)
    calls = _Counting(model, "score")
    memes = [Example(e.image, ["no"], text="a meme") for e in pictures]
    with pytest.raises(ValueError, match=r"needs queries of both labels \['no', 'yes'\]; all 4 are \['no'\]"):
        evaluate(model, tok, memes, memes, task="hateful_memes", shots=0, text_demos_at_zero=0, progress=False)
    assert calls.calls == 0
    vqa = [Example(e.image, [e.answers[0]], question="what colour?") for e in pictures]
    with pytest.warns(UserWarning, match=r"4 of 4 VQA queries have fewer than 4 reference answers \(queries\[0\] has "
                                         r"1\): .* an exact answer scores at most 0% there"):
        evaluate(model, tok, vqa, vqa, task="vqa", shots=0, text_demos_at_zero=0, max_new_tokens=1, progress=False)
    for shots in (4.0, [], "4"):
        with pytest.raises(ValueError, match=r"shots must be an int or a non-empty list of ints >= 0"):
            evaluate(model, tok, vqa, vqa, task="vqa", shots=shots)
    # arguments the task does not read were accepted and ignored (max_new_tokens alone was refused)
    colours = [Example(e.image, e.answers) for e in pictures]
    for task, examples, kw, message in [
            ("classification", colours, dict(num_beams=5, class_names=synthetic.NAMES), r"num_beams=5: task='classification'"),
            ("classification", colours, dict(length_penalty=1.0, class_names=synthetic.NAMES), r"length_penalty=1.0"),
            ("classification", colours, dict(vqa_script="official", class_names=synthetic.NAMES), r"vqa_script='official'"),
            ("vqa", vqa, dict(class_names=["red"]), r"class_names=\[1 names\]: task='vqa' does not read it")]:
        with pytest.raises(ValueError, match=message):
            evaluate(model, tok, examples, examples, task=task, shots=0, text_demos_at_zero=0, **kw)
    report = {"kind": "vqa", "device": "cpu", "metric": "vqa_accuracy",
              "results": {"vqa": [{"shots": s, "score": v} for s, v in ((4, 30.0), (0, 10.0), (2, 20.0))]}}
    import matplotlib.pyplot as plt
    shown = []
    real = plt.Axes.plot

    def spy(ax, xs, ys, *args, **kwargs):
        shown.append((list(xs), list(ys)))
        return real(ax, xs, ys, *args, **kwargs)
    plt.Axes.plot = spy
    try:
        assert few_shot_plot(report, str(tmp_path / "few_shot.png"))
    finally:
        plt.Axes.plot = real
    assert shown == [([0, 2, 4], [10.0, 20.0, 30.0])]  # (it went 4 -> 0 -> 2)
    report["results"]["vqa"] = [{"shots": 0, "score": None}]
    assert few_shot_plot(report, str(tmp_path / "few_shot.png")) is None and not (tmp_path / "few_shot.png").exists()


def test_evaluate_checks_every_image_before_it_runs(tmp_path):
    from fastflamingo.inputs import image_transform
    model, tok = _tiny_eval()
    examples = synthetic.examples(6, "color", seed=3)
    queries = [Example(str(_png(tmp_path / f"q{i}.png", e)), e.answers) for i, e in enumerate(examples[:4])]
    support = [Example(str(_png(tmp_path / f"s{i}.png", e)), e.answers) for i, e in enumerate(examples)]
    queries[-1] = Example(str(tmp_path / "missing.png"), ["red"])
    score = _Counting(model, "score")
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) of the queries and support are missing, the "
                                                r"first \['.*missing.png'\]"):
        evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=(0, 2),
                 image_processor=image_transform("open_flamingo", 32), batch_size=2, progress=False)
    assert score.calls == 0


def test_loaders_check_images_naming_the_line(tmp_path, capsys):
    p = tmp_path / "q.jsonl"
    _png(tmp_path / "a.png", synthetic.examples(1, "color", seed=0)[0])
    p.write_text('{"image": "a.png", "label": "red"}\n\n{"image": "gone.png", "label": "blue"}\n')
    with pytest.raises(FileNotFoundError, match=r"q.jsonl:3: no image file 'gone.png' \(1 of the file's images"):
        load_examples(str(p), "classification", check_images=True)
    k = tmp_path / "k.json"
    k.write_text(json.dumps({"images": [{"split": "test", "filename": "nope.jpg", "filepath": "val2014",
                                         "cocoid": 1, "sentences": [{"raw": "a cat"}]}]}))
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) of .*k.json's 'test' split are missing, the first "
                                                r"\['.*val2014/nope.jpg'\]"):
        load_karpathy(str(k), str(tmp_path), "test", check_images=True)
    # the command line: a missing support image, before the model loads
    from fastflamingo.cli import main
    (tmp_path / "names.txt").write_text("\n".join(synthetic.NAMES) + "\n")
    s = tmp_path / "s.jsonl"
    s.write_text('{"image": "a.png", "label": "red"}\n{"image": "gone.png", "label": "blue"}\n')
    p.write_text('{"image": "a.png", "label": "red"}\n')
    assert main(["evaluate", "--model", str(tmp_path / "no-model-needed"), "--task", "classification", "--queries", str(p),
                 "--support", str(s), "--class-names-file", str(tmp_path / "names.txt"), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "s.jsonl:2: no image file 'gone.png'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ 6. shots beyond the support set, up front
def test_shots_beyond_the_support_set_are_refused_before_any_runs():
    model, tok = _tiny_eval()
    queries, support = synthetic.examples(3, "color", seed=5), synthetic.examples(6, "color", seed=6)
    for ex in queries + support:
        ex.question = "what is it ?"
    generate = _Counting(model, "generate")
    kw = dict(task="vqa", num_beams=1, max_new_tokens=1, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=r"7 shots need at least 7 support examples besides the query's image, the support "
                                         r"set has 6: pass fewer shots"):
        evaluate(model, tok, queries, support, shots=(0, 2, 7), **kw)
    with pytest.raises(ValueError, match=r"0 shots \(with text_demos_at_zero=7\) need at least 7"):
        evaluate(model, tok, queries, support, shots=(0, 2), text_demos_at_zero=7, **kw)
    # a query in the support is never its own demonstration: 6 shots from 6 need 7
    with pytest.raises(ValueError, match=r"6 shots need at least 6 .* the support set has 6 \(1 of them of a query's image\)"):
        evaluate(model, tok, support[:2], support, shots=(1, 6), **kw)
    with pytest.raises(ValueError, match=r"6 shots need at least 6 .* \(1 of them of a query's image\)"):
        evaluate(model, tok, support[:2], support, shots=(1, 6), demonstrations="similar", **kw)
    assert generate.calls == 0
    # one shared draw is none of the queries either
    with pytest.raises(ValueError, match=r"6 shots need at least 6 .* \(1 of them of a query's image\)"):
        evaluate(model, tok, support[:1], support, shots=(6,), shared_demonstrations=True, **kw)
    assert generate.calls == 0
    # what fits runs: 6 of 6 with queries outside the support, 5 shared from 6 holding the query
    assert [r.shots for r in evaluate(model, tok, queries[:1], support, shots=(6,), **kw)] == [6]
    assert [r.shots for r in evaluate(model, tok, support[:1], support, shots=(5,), shared_demonstrations=True,
                                      **kw)] == [5]


# ------------------------------------------------------------------ 7. class names the ranking cannot tell apart
def test_class_names_that_tokenize_alike_are_named_before_the_ranking():
    """Names with the same tokens score the same (the first would always win; Hateful Memes' AUC
    would be 50): an error before any prompt runs, naming the names and their ids."""
    model, tok = _tiny_eval()
    queries = synthetic.examples(2, "color", seed=7)
    score = _Counting(model, "score")
    memes = [Example(q.image, [["no", "yes"][i % 2]], text="red square") for i, q in enumerate(queries)]
    with pytest.raises(ValueError, match=r"class names must tokenize differently .*: \['no', 'yes'\] all "
                                         r"tokenize to \[1\] \(the tokenizer's unknown token"):
        evaluate(model, tok, memes, memes, task="hateful_memes", shots=(0,), text_demos_at_zero=0, progress=False)
    assert score.calls == 0
    named = [Example(q.image, [["purple", "red"][i % 2]]) for i, q in enumerate(queries)]
    with pytest.raises(ValueError, match=r"\['purple', 'pink'\] all tokenize to \[1\]"):
        evaluate(model, tok, named, named, task="classification", class_names=["purple", "red", "pink"],
                 shots=(0,), text_demos_at_zero=0, progress=False)
    assert score.calls == 0
    # distinct tokens: it runs
    evaluate(model, tok, named, named, task="classification", class_names=["blue", "red", "purple"],
             shots=(0,), text_demos_at_zero=0, progress=False)
    assert score.calls > 0


# ------------------------------------------------------------------ 4. the synthetic world as image files give it
def test_synthetic_pictures_are_the_pixels_of_their_image_files(tmp_path):
    """The world's tensors are bit for bit what the image transform of ``evaluate --model`` makes
    of their PNG files (training batches too), so a saved synthetic model scores the same on
    the files through the command line as on the tensors in-process."""
    from PIL import Image

    from fastflamingo.cli import main
    from fastflamingo.inputs import image_transform
    transform = image_transform("open_flamingo", 32)
    queries, support = synthetic.examples(8, "color", seed=11), synthetic.examples(8, "color", seed=12)
    for i, e in enumerate(queries):
        _png(tmp_path / f"{i}.png", e)
        with Image.open(tmp_path / f"{i}.png") as im:
            assert torch.equal(transform(im.convert("RGB")), e.image[0]), i
    tok = synthetic.tokenizer()
    g = torch.Generator().manual_seed(0)
    vx = synthetic.training_batch(tok, 2, __import__("random").Random(0), g, 32, 510)[0]
    assert vx.min() < -1.5 and vx.max() > 1.5  # CLIP-normalised, not [0, 1]
    picture = synthetic.to_image(vx[0, 0])
    assert torch.equal(transform(picture), vx[0, 0, 0])

    model = fastflamingo.Flamingo.from_preset("tiny", seed=0)
    synthetic.train(model, tok, steps=20, batch_size=8, lr=3e-3, progress=False)
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    files = {}
    for split, examples in (("q", queries), ("s", support)):
        lines = [json.dumps({"image": _png(tmp_path / f"{split}{i}.png", e).name, "label": e.answers[0]})
                 for i, e in enumerate(examples)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        files[split] = str(tmp_path / f"{split}.jsonl")
    (tmp_path / "names.txt").write_text("\n".join(synthetic.NAMES) + "\n")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "classification", "--queries", files["q"],
                 "--support", files["s"], "--class-names-file", str(tmp_path / "names.txt"), "--shots", "0", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "out")]) == 0
    on_files = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["classification"]
    in_process = evaluate(model.eval(), tok, queries, support, task="classification", class_names=synthetic.NAMES,
                          shots=(0, 2), batch_size=4, seed=42, progress=False)
    assert [r["predictions"] for r in on_files] == [r.predictions for r in in_process]
    assert [r["score"] for r in on_files] == [r.score for r in in_process]


# ------------------------------------------------------------------ 4. what a new user gets wrong (README audit)
def test_model_directories_that_are_not_say_what_they_are(tmp_path, capsys):
    """finetune / evaluate --model given a directory without a tokenizer (what save_pretrained
    alone writes) said to install sentencepiece or tiktoken; given a finetune run's checkpoint.pt
    (a file), finetune printed transformers' traceback and generate said the file did not exist.
    Now each names what the path is and what to give instead; generate still runs a model without
    a tokenizer on token ids."""
    from fastflamingo.cli import main
    bare = tmp_path / "bare"
    _model().save_pretrained(bare)  # no tokenizer
    data = _docs_file(tmp_path)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"step": 1}, ckpt)
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"image": "0.png", "question": "what colour?", "answers": ["red"]}\n')
    cases = [
        (["finetune", "--model", str(bare), "--data", data, "--steps", "1", "--out", str(tmp_path / "r")],
         r"finetune --model: '.*bare' has no tokenizer .*tokenizer.save_pretrained"),
        (["evaluate", "--model", str(bare), "--task", "vqa", "--queries", str(queries),
          "--support", str(queries)], r"evaluate --model: '.*bare' has no tokenizer"),
        (["finetune", "--model", str(ckpt), "--data", data, "--steps", "1", "--out", str(tmp_path / "r")],
         r"checkpoint.pt' is a file: .*its model/ folder, not checkpoint.pt"),
        (["generate", "--model", str(ckpt), "--prompt-ids", "5 6"], r"checkpoint.pt' is a file"),
    ]
    for args, message in cases:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert main(["generate", "--model", str(bare), "--prompt-ids", "5 6", "--max-new-tokens", "2"]) == 0


def test_the_model_gives_its_own_image_processor():
    """model.image_processor(): the README's evaluate(..., image_processor=...) for a model from
    from_pretrained / from_preset (only create_model_and_transforms returned one)."""
    from fastflamingo.inputs import image_transform
    model = _model()
    ex = synthetic.examples(1, "color", seed=2)[0]
    img = synthetic.to_image(ex.image)
    want = image_transform("open_flamingo", model.config.vision.image_size)(img)
    assert torch.equal(model.image_processor()(img), want) and want.shape == (3, 32, 32)


def test_a_new_run_into_an_earlier_runs_directory_is_refused(tmp_path, capsys):
    """fine_tune without resume into an out that holds a checkpoint replaced it (and model/,
    history.json) without a word: forgetting --resume cost the run."""
    from fastflamingo.cli import main
    data = _resume_setup(tmp_path)
    out = str(tmp_path / "run")
    fine_tune(_model(), data, steps=1, out=out, progress=False)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds an earlier run's checkpoint .*resume=True \(--resume\)"):
        fine_tune(_model(), data, steps=2, out=out, progress=False)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before
    assert len(fine_tune(_model(), data, steps=2, out=out, resume=True, progress=False)) == 2


def test_abbreviated_flags_are_not_taken_for_the_flag(capsys):
    """argparse's prefix matching read --random-image as --random-images and --max-new-token as
    --max-new-tokens: a typo passed silently."""
    from fastflamingo.cli import main
    with pytest.raises(SystemExit) as e:
        main(["generate", "--preset", "tiny", "--random-image", "1", "--prompt-ids", "510 5"])
    assert e.value.code == 2 and "unrecognized arguments: --random-image 1" in capsys.readouterr().err


def test_a_finetune_checkpoint_given_to_convert_names_the_model_folder(tmp_path):
    from fastflamingo.convert.io import load_state_file
    fine_tune(_model(), _resume_setup(tmp_path), steps=1, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match=r"is a `fastflamingo finetune` checkpoint .*the model/ folder beside it"):
        load_state_file(tmp_path / "run" / "checkpoint.pt")


def test_an_idefics_model_is_refused_by_the_evaluation_harness_saying_why():
    """The harness's prompts are open_flamingo's: an imported IDEFICS model was refused with "the
    tokenizer has no '<|endofchunk|>' token: use the tokenizer the model was built with", which
    it was."""
    from peers_idefics import idefics_model, idefics_tokenizer
    model = fastflamingo.from_idefics(idefics_model())
    queries = synthetic.examples(2, "color", seed=3)
    for q in queries:
        q.question = "what color is it?"
    with pytest.raises(ValueError, match=r"the evaluation's prompts are open_flamingo's .* this IDEFICS model was not "
                                         r"trained on .* build its prompts with IDEFICS's processor"):
        evaluate(model, idefics_tokenizer(), queries, queries, task="vqa", shots=[0], text_demos_at_zero=0,
                 progress=False)
