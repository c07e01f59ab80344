"""Fine-tuning (fastflamingo.training): gradient accumulation equals one big batch, a resumed run
equals the uninterrupted one bit for bit, the low-memory setup (NF4 LM, activation
checkpointing, 8-bit AdamW) trains on a CPU with the frozen parts untouched, and the
command line trains from files, resumes, and refuses bad data naming it."""
import copy
import json
import re

import pytest
import torch

import fastflamingo
from fastflamingo.evaluation import synthetic
from fastflamingo.training import Document, DocumentBatches, HeldOut, fine_tune, load_documents, schedule


def _docs(n: int = 8, seed: int = 0) -> list[Document]:
    """Documents of 0-3 named pictures, texts of different lengths (some with no image at all)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        k = i % 4
        colors = [synthetic.NAMES[(i + j) % 6] for j in range(k)]
        shapes = [synthetic.SHAPES[(i * 3 + j) % 4] for j in range(k)]
        images = list(synthetic.render(colors, shapes, g)) if k else []
        text = " ".join(f"<image>Output:{c} {s}<|endofchunk|>" for c, s in zip(colors, shapes)) or "what is it ?"
        out.append(Document(images, text + " Output" * (i % 3)))
    return out


def _model():
    return fastflamingo.Flamingo.from_preset("tiny", seed=5)


def _open_gates(model):
    """Random tiny blocks start with closed tanh gates (no gradient reaches their weights): open them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_gate"):  # (not "gate" in name: every block weight is in gated_cross_attn_layer)
                p.fill_(0.5)
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradient_accumulation_equals_one_big_batch():
    tok = synthetic.tokenizer()
    docs = _docs()
    big, small = _open_gates(_model()), None
    small = copy.deepcopy(big)
    kw = dict(steps=1, lr=1e-3, progress=False)
    h_big = fine_tune(big, DocumentBatches(docs, tok, 510, batch_size=4, image_size=32), **kw)
    h_small = fine_tune(small, DocumentBatches(docs, tok, 510, batch_size=1, grad_accum=4, image_size=32), **kw)
    assert h_big[0]["tokens"] == h_small[0]["tokens"]
    assert h_small[0]["loss"] == pytest.approx(h_big[0]["loss"], rel=1e-5)
    a, b = _trainable(big), _trainable(small)
    moved = 0
    for n in a:
        # 2% of one step of lr=1e-3: Adam's first step is lr * g / (|g| + 1e-8), so a value whose
        # gradient is near 1e-8 moves by a share of lr that rounding of g changes (3 of ~10^5 values
        # here differ by 1e-5; all others by < 1e-6)
        assert torch.allclose(a[n], b[n], rtol=0, atol=2e-2 * 1e-3), n
        moved += int((a[n] != _trainable(_open_gates(_model()))[n]).any()) if n in a else 0
    assert moved > 10  # the step moved the blocks' weights, not just the gates


class _Stop(Exception):
    pass


def test_resume_equals_the_uninterrupted_run(tmp_path):
    tok = synthetic.tokenizer()
    docs = _docs(12)
    data = DocumentBatches(docs, tok, 510, batch_size=2, grad_accum=2, image_size=32, seed=3)
    kw = dict(steps=6, lr=1e-3, warmup=2, progress=False)
    whole = _open_gates(_model())
    h_whole = fine_tune(whole, data, out=str(tmp_path / "a"), **kw)

    def stops_at_4(step):
        if step == 4:
            raise _Stop
        return data(step)
    cut = _open_gates(_model())
    with pytest.raises(_Stop):
        fine_tune(cut, stops_at_4, out=str(tmp_path / "b"), save_every=2, **kw)
    resumed = _open_gates(_model())  # a new process: the base weights again, the trained ones from the checkpoint
    h = fine_tune(resumed, data, out=str(tmp_path / "b"), resume=True, **kw)
    assert [r["loss"] for r in h] == [r["loss"] for r in h_whole]  # the history carries on
    a, b = _trainable(whole), _trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [r["lr"] for r in h] == pytest.approx([1e-3 * schedule(s, 6, 2) for s in range(6)])
    with pytest.raises(ValueError, match="at step 6, not before steps=6"):
        fine_tune(_open_gates(_model()), data, out=str(tmp_path / "b"), resume=True, **kw)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fine_tune(_model(), data, out=str(tmp_path / "c"), resume=True, **kw)


def test_resume_with_dropout_draws_what_the_uninterrupted_run_draws(tmp_path):
    """A frozen LM with dropout (OPT's and GPT-2's 0.1) draws random numbers at every training
    forward: the checkpoint keeps the generators' states, so a run cut at step 3 and resumed
    in a process whose generator is elsewhere equals the uninterrupted run (its losses differed
    from step 4 on: 5.6853 vs 5.6824)."""
    from fastflamingo.presets import preset_config

    def dropping():
        return _open_gates(fastflamingo.Flamingo.from_preset(
            "tiny", seed=5, lm=dict(preset_config("tiny").lm, attention_dropout=0.3)))
    data = DocumentBatches(_docs(8), synthetic.tokenizer(), 510, batch_size=2, seed=3)
    kw = dict(steps=5, lr=1e-3, progress=False)
    torch.manual_seed(0)
    whole = dropping()
    h_whole = fine_tune(whole, data, **kw)
    torch.manual_seed(0)
    with pytest.raises(_Stop):
        fine_tune(dropping(), _stopping_at(data, 3), out=str(tmp_path), save_every=3, **kw)
    torch.manual_seed(99)  # (another process, another draw so far)
    resumed = dropping()
    h = fine_tune(resumed, data, out=str(tmp_path), resume=True, **kw)
    assert [r["loss"] for r in h] == [r["loss"] for r in h_whole]
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))


def test_low_memory_setup_trains_on_the_cpu_and_leaves_frozen_weights(tmp_path):
    """NF4 frozen LM, activation checkpointing and bitsandbytes' 8-bit AdamW together: the loss
    falls, the vision encoder and the LM's base weights do not move, and the trainable-only save
    loads back onto the 16-bit base LM (quantized again) with the trained model's logits."""
    from fastflamingo.model import build_lm
    from fastflamingo.presets import preset_config
    from fastflamingo.quant import quantize_model
    from fastflamingo.vision import build_vision_model
    config = preset_config("tiny")
    torch.manual_seed(0)
    lm, vision = build_lm(config), build_vision_model(config.vision)
    model = fastflamingo.Flamingo(config, vision_encoder=copy.deepcopy(vision), lang_encoder=copy.deepcopy(lm))
    quantize_model(model, "nf4")
    frozen = {n: t.clone() for n, t in model.state_dict().items()
              if n.startswith("vision_encoder.") or ("lang_encoder." in n and "gated_cross_attn" not in n
                                                     and "embed_tokens" not in n and "lm_head" not in n)}
    tok = synthetic.tokenizer()
    data = synthetic.batches(tok, 510, batch_size=8, seed=1)
    h = fine_tune(model, data, steps=40, lr=3e-3, optimizer="adamw8bit", activation_checkpointing=True,
                  out=str(tmp_path), progress=False)
    assert sum(r["loss"] for r in h[-5:]) < sum(r["loss"] for r in h[:5])
    after = model.state_dict()
    assert all(torch.equal(frozen[n], after[n]) for n in frozen) and len(frozen) > 20
    back = fastflamingo.Flamingo.from_pretrained(tmp_path / "model", lang_encoder=copy.deepcopy(lm),
                                                 vision_encoder=copy.deepcopy(vision), quantization="nf4")
    vx, ids, mask, _ = data(99)[0]
    with torch.no_grad():
        assert torch.allclose(back.eval()(vx, ids, attention_mask=mask).logits,
                              model.eval()(vx, ids, attention_mask=mask).logits, atol=1e-5)


def test_held_out_loss_is_the_mean_over_every_target_token_and_changes_no_weight():
    """eval_data's loss at every eval_every-th step and the last: the mean over all its target
    tokens (five documents in micro-batches of 2, 2 and 1: not the mean of the batches' means),
    in eval mode; the run's weights equal those of a run without it. Over two ranks each gets as
    many micro-batches (one padded with no target) and their targets are the documents' all."""
    tok = synthetic.tokenizer()
    docs, held = _docs(8), _docs(5, seed=3)
    plain, judged = _open_gates(_model()), _open_gates(_model())
    kw = dict(steps=4, lr=1e-3, progress=False)
    fine_tune(plain, DocumentBatches(docs, tok, 510, batch_size=4), **kw)
    h = fine_tune(judged, DocumentBatches(docs, tok, 510, batch_size=4), eval_data=HeldOut(held, tok, 510, batch_size=2),
                  eval_every=3, **kw)
    assert [r["step"] for r in h if "eval_loss" in r] == [3, 4]
    assert all(torch.equal(p, q) for p, q in zip(plain.parameters(), judged.parameters()))
    from fastflamingo.training import collate
    total = count = 0
    with torch.no_grad():
        for d in held:  # one document at a time, no padding
            vx, ids, mask, labels = collate([d], tok, 510, image_size=32)
            n = int((labels[:, 1:] != -100).sum())
            total += judged(vx, ids, attention_mask=mask, labels=labels).loss.double() * n
            count += n
    assert h[-1]["eval_loss"] == pytest.approx(float(total) / count, rel=1e-5)
    ranks = [list(HeldOut(held, tok, 510, batch_size=2, image_size=32, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(r) for r in ranks] == [2, 2] and not (ranks[1][1][3] != -100).any()
    assert sum(int((mb[3][:, 1:] != -100).sum()) for r in ranks for mb in r) == count
    with pytest.raises(ValueError, match=r"eval_every=2: .* it needs eval_data"):
        fine_tune(judged, DocumentBatches(docs, tok, 510, batch_size=4), eval_every=2, **kw)


def _tokens_model(dtype=torch.float32):
    """The tiny model, its 11 rows from 501 on (the Flamingo tokens and a few) trained."""
    return _open_gates(fastflamingo.Flamingo.from_preset("tiny", seed=5, num_base_tokens=501, dtype=dtype))


@pytest.mark.parametrize("optimizer, dtype", [("adamw8bit", torch.float32), ("adamw", torch.bfloat16)])
def test_the_added_tokens_rows_step_alone(tmp_path, optimizer, dtype):
    """Rows >= num_base_tokens train: the optimizer steps a float32 copy of those rows only, so
    its state holds 11 x 64 values per matrix, not 512 x 64, and the frozen rows stay exactly as
    they were. (Stepping the whole matrix, bitsandbytes' 8-bit blockwise state moved row 500:
    one 256-value block held it and trained rows, and its scale made their zero moments not 0.)
    A bfloat16 run cut at step 3 resumes exactly."""
    model = _tokens_model(dtype)
    lm = model.lang_encoder
    before = [w.detach().clone() for w in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)]
    data = synthetic.batches(synthetic.tokenizer(), 510, batch_size=4, seed=1)
    kw = dict(steps=5, lr=3e-3, optimizer=optimizer, progress=False)
    fine_tune(model, data, out=str(tmp_path / "a"), **kw)
    after = (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)
    for old, new in zip(before, after):
        assert torch.equal(old[:501], new[:501])
    assert not torch.equal(before[1][501:], after[1][501:])  # the new rows train
    state = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    sizes = {s.get("__bnb_optimizer_quant_state__", s)[
        "state1" if optimizer == "adamw8bit" else "exp_avg"].numel() for s in state["optimizer"]["state"].values()}
    assert 11 * 64 in sizes and 512 * 64 not in sizes
    embedding = "lang_encoder.model.embed_tokens.weight"
    assert state["trainable"][embedding].dtype == torch.float32  # (bfloat16's rows: their float32 copy)
    assert torch.equal(state["trainable"][embedding][:501], before[0][:501].float())
    if dtype != torch.bfloat16:
        return
    cut = _tokens_model(dtype)
    with pytest.raises(_Stop):
        fine_tune(cut, _stopping_at(data, 3), out=str(tmp_path / "b"), save_every=3, **kw)
    resumed = _tokens_model(dtype)
    fine_tune(resumed, data, out=str(tmp_path / "b"), resume=True, **kw)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


def test_a_checkpoint_with_whole_matrix_moments_resumes_on_the_trained_rows(tmp_path):
    """A checkpoint written when AdamW stepped the whole embedding matrix (its frozen rows'
    moments 0) resumes as the run that stepped its rows alone: the trained rows' moments are
    taken. A moment of another size is an error naming the weight."""
    data = synthetic.batches(synthetic.tokenizer(), 510, batch_size=4, seed=1)
    kw = dict(steps=4, lr=3e-3, progress=False)
    whole = _tokens_model()
    fine_tune(whole, data, **kw)
    with pytest.raises(_Stop):
        fine_tune(_tokens_model(), _stopping_at(data, 2), out=str(tmp_path), save_every=2, **kw)
    path = tmp_path / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    for entry in state["optimizer"]["state"].values():
        if entry["exp_avg"].shape == (11, 64):  # as the earlier layout held them: whole, zeros in the frozen rows
            for key in ("exp_avg", "exp_avg_sq"):
                entry[key] = torch.cat([torch.zeros(501, 64), entry[key]])
    torch.save(state, path)
    resumed = _tokens_model()
    fine_tune(resumed, data, out=str(tmp_path), resume=True, **kw)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters()))
    for entry in state["optimizer"]["state"].values():
        if entry["exp_avg"].shape == (512, 64):
            entry["exp_avg"] = entry["exp_avg"][:7]
    state["step"] = 2
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"optimizer state exp_avg of 448 values for lang_encoder\.\S+, which steps 704"):
        fine_tune(_tokens_model(), data, out=str(tmp_path), resume=True, **kw)


def test_data_errors_name_the_document(tmp_path):
    tok = synthetic.tokenizer()
    p = tmp_path / "d.jsonl"
    p.write_text('{"images": ["a.png"], "text": "<image>Output:red"}\n{"images": [], "text": "<image>x"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: the text has 1 <image> tag\(s\) for 0 image\(s\)"):
        load_documents(str(p))
    p.write_text('{"text": 5}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:1 needs a \"text\" string"):
        load_documents(str(p))
    long = _docs(4)
    long[2] = Document([], "Output " * 40)
    data = DocumentBatches(long, tok, 510, batch_size=4, image_size=32, max_length=30)
    with pytest.raises(ValueError, match=r"document \d is 40 tokens, more than max_length=30: split it"):
        data(0)
    with pytest.raises(ValueError, match="a step takes batch_size x grad_accum x world_size = 8 documents, but there are 4"):
        DocumentBatches(long, tok, 510, batch_size=4, grad_accum=2)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        fine_tune(_model(), data, steps=1, optimizer="sgd")
    from fastflamingo.quant import quantize_model
    with pytest.raises(ValueError, match=r"train='all' trains every weight, but \d+ layer\(s\) hold 4/8-bit weights"):
        fine_tune(quantize_model(_model(), "nf4"), data, steps=1, train="all")


def test_train_all_trains_every_weight_but_the_frozen_vision_encoder(tmp_path):
    """train="all": the LM's weights move too, but the vision encoder (run under no_grad) is not
    marked trainable, so it is neither stepped nor in the checkpoint's trained weights."""
    tok = synthetic.tokenizer()
    model = _open_gates(_model())
    vision = {n: p.detach().clone() for n, p in model.vision_encoder.named_parameters()}
    lm = {n: p.detach().clone() for n, p in model.lang_encoder.named_parameters()}
    fine_tune(model, DocumentBatches(_docs(), tok, 510, batch_size=4), steps=2, lr=1e-3, train="all",
              out=str(tmp_path / "run"), progress=False)
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert all(torch.equal(vision[n], p) for n, p in model.vision_encoder.named_parameters())
    moved = [n for n, p in model.lang_encoder.named_parameters() if not torch.equal(lm[n], p)]
    assert len(moved) > len(lm) // 2, f"{len(moved)} of {len(lm)} LM weights moved"
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert not [k for k in state["trainable"] if k.startswith("vision_encoder.")]
    assert any(k.startswith("lang_encoder.") for k in state["trainable"])


def test_a_batchnorm_vision_encoder_stays_as_it_was():
    """The frozen vision encoder stays in eval mode when the model trains: a timm ResNet's
    BatchNorm running statistics moved at every training forward (60 of resnet18's 120 state
    entries after two steps), unsaved, so the trained model and its save differed."""
    pytest.importorskip("timm")
    from fastflamingo.config import VisionConfig
    model = _open_gates(fastflamingo.Flamingo.from_preset(
        "tiny", seed=5, vision=VisionConfig(source="timm", timm_name="resnet18", dim=512, image_size=32)))
    before = {k: v.clone() for k, v in model.vision_encoder.state_dict().items()}
    fine_tune(model, DocumentBatches(_docs(), synthetic.tokenizer(), 510, batch_size=4), steps=2, lr=1e-3,
              progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.vision_encoder.state_dict().items())
    model.train()
    assert model.training and model.lang_encoder.training and not model.vision_encoder.training


def _files(tmp_path):
    """The tiny model and its tokenizer saved, and six documents as PNG files and JSON lines."""
    from PIL import Image
    saved = tmp_path / "model"
    _model().save_pretrained(saved)
    synthetic.tokenizer().save_pretrained(saved)
    lines = []
    for i, d in enumerate(_docs(6)):
        names = []
        for j, im in enumerate(d.images):
            names.append(f"{i}_{j}.png")
            Image.fromarray((im[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(tmp_path / names[-1])
        lines.append(json.dumps({"images": names, "text": d.text}))
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    return saved


def test_cli_finetune_from_files_then_resume(tmp_path, capsys):
    from fastflamingo.cli import main
    saved = _files(tmp_path)
    args = ["finetune", "--model", str(saved), "--data", str(tmp_path / "docs.jsonl"), "--batch-size", "2",
            "--grad-accum", "2", "--out", str(tmp_path / "run")]
    assert main(args + ["--steps", "2"]) == 0
    out, err = capsys.readouterr()
    assert "steps 1..2" in out
    # 6 documents in steps of 2 x 2: 2 sit out each epoch, said once
    assert err.count("warning:") == 1 and (
        "fastflamingo finetune: warning: 2 of the 6 documents sit out each epoch: an epoch is 1 step(s) of batch_size x "
        "grad_accum x world_size = 4 documents (each epoch's shuffle leaves out other ones); to train on every "
        "document every epoch, give a multiple of 4 documents, or a batch_size x grad_accum x world_size that "
        "divides 6\n") in err, err
    # stderr is no terminal here: a line at every 10th step and the last takes the progress bar's place
    assert re.findall(r"^step \d+/\d+", out, re.M) == ["step 2/2"]
    assert re.search(r"^step 2/2: loss \d+\.\d{4}, lr [\d.e-]+, \d+ target tokens, \d+\.\d\d s a step$", out, re.M), out
    assert main(args + ["--steps", "4", "--resume", "--log-every", "1", "--eval-data", str(tmp_path / "docs.jsonl"),
                        "--eval-every", "1"]) == 0
    out = capsys.readouterr().out
    assert "steps 3..4" in out and re.findall(r"^step \d+/\d+", out, re.M) == ["step 3/4", "step 4/4"]
    assert re.search(r"^step 4/4: loss [\d.]+, held-out loss [\d.]+, lr", out, re.M), out
    assert re.search(r"held-out loss at step 3 [\d.]+, at step 4 [\d.]+$", out, re.M), out
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history if "eval_loss" in h] == [3, 4]
    assert [h["step"] for h in history] == [1, 2, 3, 4] and (tmp_path / "run" / "loss.png").stat().st_size > 0
    # run/model loads with no argument (over the --model directory it records) and holds the tokenizer,
    # so `fastflamingo generate / evaluate --model run/model` take it as it is
    from transformers import AutoTokenizer
    trained = fastflamingo.Flamingo.from_pretrained(tmp_path / "run" / "model")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["trainable"]
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in state.items())
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "model").convert_tokens_to_ids("<image>") == 510
    assert main(["generate", "--model", str(tmp_path / "run" / "model"), "--random-images", "1", "--prompt",
                 "<image> red", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(args[:4] + ["/no/docs.jsonl", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "--data: no file '/no/docs.jsonl'" in capsys.readouterr().err


# ------------------------------------------------------------------ FSDP2: two CPU processes (gloo)
def _stopping_at(data, step):
    def at(s):
        if s == step:
            raise _Stop
        return data(s)
    return at


def _shard_docs() -> list[Document]:
    """Eight documents, all used in 4 steps of 2 micro-batches: text-only ones, and one with no
    target at all (a lone <image>: its rank still runs its forward, with zero gradient, not nan).
    fine_tune refuses such a document in DocumentBatches, naming it: the tests give their batches'
    ``__call__`` (a function of the step, which fine_tune does not check) to reach that rank."""
    docs = _docs(8)
    docs[5] = Document(list(synthetic.render(["red"], ["circle"], torch.Generator().manual_seed(0))), "<image>")
    return docs


def _shard_worker(rank: int, world: int, store: str, out: str) -> None:
    import os

    import torch.distributed as dist

    from fastflamingo.distribute import gather_state
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    data = DocumentBatches(_shard_docs(), synthetic.tokenizer(), 510, batch_size=1, image_size=32, seed=3,
                           rank=rank, world_size=world).__call__
    kw = dict(steps=4, lr=1e-3, warmup=1, shard=True, progress=False)
    whole = _open_gates(_model())
    held = HeldOut(_docs(5, seed=3), synthetic.tokenizer(), 510, batch_size=1, image_size=32, rank=rank, world_size=world)
    h = fine_tune(whole, data, out=f"{out}/a", eval_data=held, eval_every=2, **kw)
    try:
        fine_tune(_open_gates(_model()), _stopping_at(data, 2), out=f"{out}/b", save_every=2, **kw)
    except _Stop:
        pass
    resumed = _open_gates(_model())
    h2 = fine_tune(resumed, data, out=f"{out}/b", resume=True, **kw)
    names = [n for n, p in whole.named_parameters() if p.requires_grad]
    a, b = gather_state(whole, names), gather_state(resumed, names)
    if rank == 0:
        torch.save({"h": h, "h2": h2, "a": a, "b": b}, f"{out}/results.pt")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # see tests/test_fsdp.py: no C++ static destructors racing a gloo thread


def test_sharded_fine_tuning_equals_one_process_and_resumes(tmp_path):
    """FSDP2 data parallel over two ranks (one micro-batch each) makes the step one process makes
    with both micro-batches (token-weighted across the ranks), and measures the held-out loss one
    process measures; a sharded run stopped at step 2 and
    resumed from rank 0's checkpoint equals the uninterrupted one; the checkpoint's model/ loads."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.fail("torch.distributed with gloo is needed (it ships with every torch wheel)")
    mp.spawn(_shard_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    got = torch.load(tmp_path / "results.pt", weights_only=True)
    single = _open_gates(_model())
    data = DocumentBatches(_shard_docs(), synthetic.tokenizer(), 510, batch_size=1, grad_accum=2, image_size=32,
                           seed=3).__call__
    h = fine_tune(single, data, steps=4, lr=1e-3, warmup=1, progress=False,
                  eval_data=HeldOut(_docs(5, seed=3), synthetic.tokenizer(), 510, batch_size=1), eval_every=2)
    assert [r["tokens"] for r in got["h"]] == [r["tokens"] for r in h]
    # the held-out loss over both ranks' shares (3 and 2 documents, one rank's last micro-batch a padding one)
    assert [r["step"] for r in got["h"] if "eval_loss" in r] == [r["step"] for r in h if "eval_loss" in r] == [2, 4]
    assert [r["eval_loss"] for r in got["h"] if "eval_loss" in r] == pytest.approx(
        [r["eval_loss"] for r in h if "eval_loss" in r], rel=1e-5)
    assert [r["loss"] for r in got["h"]] == pytest.approx([r["loss"] for r in h], rel=1e-5)
    want = _trainable(single)
    assert got["a"].keys() == want.keys()
    for n in want:
        assert torch.allclose(got["a"][n], want[n], rtol=0, atol=1e-5), n
        assert torch.equal(got["a"][n], got["b"][n]), n
    assert [r["loss"] for r in got["h2"]] == [r["loss"] for r in got["h"]]
    assert all(torch.isfinite(t).all() for t in got["a"].values())
    from fastflamingo.model import build_lm
    from fastflamingo.presets import preset_config
    from fastflamingo.vision import build_vision_model
    config = preset_config("tiny")
    back = fastflamingo.Flamingo.from_pretrained(tmp_path / "a" / "model", lang_encoder=build_lm(config),
                                                 vision_encoder=build_vision_model(config.vision))
    assert all(torch.equal(dict(back.named_parameters())[n], got["a"][n]) for n in want)


def test_cli_finetune_sharded_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m fastflamingo.cli finetune ... --shard`` (gloo, two CPU
    processes, one micro-batch each) gives the losses of one process with --grad-accum 2."""
    import os
    import subprocess
    import sys

    from fastflamingo.cli import main
    saved = _files(tmp_path)
    common = ["finetune", "--model", str(saved), "--data", str(tmp_path / "docs.jsonl"), "--batch-size", "1",
              "--steps", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fastflamingo.cli", *common, "--shard", "--out", str(tmp_path / "sharded")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "steps 1..3" in run.stdout
    assert main(common + ["--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    sharded, one = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("sharded", "one"))
    assert [h["tokens"] for h in sharded] == [h["tokens"] for h in one]
    assert [h["loss"] for h in sharded] == pytest.approx([h["loss"] for h in one], rel=1e-5)
    assert main(common + ["--shard", "--out", str(tmp_path / "x")]) == 2  # not under torchrun


def test_finetune_memory_benchmark_runs_its_three_setups(tmp_path):
    """benchmarks/finetune_memory.py (what a GPU run measures at the 9B shape) on the tiny preset."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_memory.py"
    spec = importlib.util.spec_from_file_location("finetune_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--preset", "tiny", "--tokens", "64", "--images", "2", "--steps", "2", "--out", str(tmp_path)]) == 0
    info = json.loads((tmp_path / "finetune_memory.json").read_text())
    assert [r["setup"] for r in info["rows"]] == [s[0] for s in bench.SETUPS]
    assert all("error" not in r and r["peak_MiB"] > 0 and r["step_ms"] > 0 for r in info["rows"])
    plain, checkpointed = info["rows"][0]["peak_MiB"], info["rows"][1]["peak_MiB"]
    assert checkpointed < plain  # activations recomputed, not kept


def test_a_non_finite_loss_stops_before_the_weights_change(tmp_path):
    """A loss that is nan or inf (a float16 model overflowing) used to be stepped on: every trained
    weight became nan and the run finished and saved them. It stops at that step instead, naming
    it, with the other weights as the previous step left them and no checkpoint written."""
    tok = synthetic.tokenizer()
    data = DocumentBatches(_docs(4), tok, 510, batch_size=2, image_size=32, seed=1)
    model = _open_gates(_model())
    before = {}

    def batches(step):
        if step == 1:  # after step 1: a weight turns nan
            before.update(_trainable(model))
            with torch.no_grad():
                model.perceiver.latents.fill_(float("nan"))
        return data(step)
    with pytest.raises(FloatingPointError, match=r"step 2's loss is nan.*after step 1.*float32"):
        fine_tune(model, batches, steps=3, lr=1e-3, progress=False, out=str(tmp_path / "run"))
    after = _trainable(model)
    assert len(before) > 10
    for n in before:
        if n != "perceiver.latents":
            assert torch.equal(after[n], before[n]), n
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bfloat16_trained_weights_step_as_float32_master_copies(tmp_path):
    """AdamW on bfloat16 weights dropped each update under half the weight's rounding step: 30
    steps at lr 5e-5 moved 17% of the blocks' weights (a float32 run from the same weights: 97%).
    The optimizer steps float32 copies, saved in the checkpoint (a resume continues from them
    exactly); the model's weights are the copies rounded to bfloat16."""
    tok = synthetic.tokenizer()
    data = DocumentBatches(_docs(4), tok, 510, batch_size=4, image_size=32, seed=1)
    kw = dict(steps=30, lr=5e-5, progress=False)
    start = _open_gates(_model()).to(torch.bfloat16)
    before = _trainable(start)
    reference, whole = copy.deepcopy(start).float(), copy.deepcopy(start)
    fine_tune(reference, data, **kw)
    fine_tune(whole, data, **kw)

    def block_moves(model):  # the share of block weights that moved in bfloat16, the mean move
        after = _trainable(model)
        names = [n for n in after if "gated_cross_attn_layer." in n and after[n].dim() == 2]
        moved = torch.cat([(after[n].to(torch.bfloat16) != before[n]).flatten() for n in names])
        d = torch.cat([(after[n].float() - before[n].float()).abs().flatten() for n in names])
        return float(moved.float().mean()), float(d.mean())
    (ref_moved, ref_mean), (moved, mean) = block_moves(reference), block_moves(whole)
    assert ref_moved > 0.9
    assert moved > 0.95 * ref_moved and mean == pytest.approx(ref_mean, rel=0.2), (moved, mean, ref_moved, ref_mean)

    def stops_at_15(step):
        if step == 15:
            raise _Stop
        return data(step)
    cut = copy.deepcopy(start)
    with pytest.raises(_Stop):
        fine_tune(cut, stops_at_15, out=str(tmp_path / "run"), save_every=15, **kw)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["trainable"]
    for n, p in cut.named_parameters():
        if p.requires_grad:
            assert p.dtype == torch.bfloat16 and saved[n].dtype == torch.float32, n
            assert torch.equal(p.detach(), saved[n].to(torch.bfloat16)), n  # the copy, rounded
    resumed = copy.deepcopy(start)
    fine_tune(resumed, data, out=str(tmp_path / "run"), resume=True, **kw)
    a, b = _trainable(whole), _trainable(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_float16_trained_weights_are_refused():
    tok = synthetic.tokenizer()
    data = DocumentBatches(_docs(4), tok, 510, batch_size=4, image_size=32)
    model = _model().to(torch.float16)
    with pytest.raises(ValueError, match=r"float16 \(e.g. lang_encoder.*loss scaling.*bfloat16"):
        fine_tune(model, data, steps=1, progress=False)
    from fastflamingo.training import _check_trained_dtypes
    params = {n: p for n, p in _model().to(torch.bfloat16).named_parameters()}
    with pytest.raises(ValueError, match="shard=True with bfloat16 trained weights.*float32"):
        _check_trained_dtypes(params, shard=True)
