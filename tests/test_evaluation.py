"""Few-shot evaluation: the metric equals the official VQA script (open_flamingo's copy), prompts
are open_flamingo's, batched and prefix-shared evaluation equals a plain one-prompt-at-a-time
loop, and the synthetic world is learned in context (shots help) by the tiny model on a CPU."""
import json
import random
import re

import pytest
import torch

from fastflamingo.evaluation import Example, evaluate, load_examples, postprocess_vqa, synthetic, vqa_accuracy
from fastflamingo.evaluation.metrics import exact_match, normalize_vqa_answer
from fastflamingo.evaluation.prompts import few_shot_text
from fastflamingo.generation.score import score_reference

WORDS = ["2", "two", "a dog", "the dog", "dog.", "dogs", "dont", "don't", "1,000", "1000", "yes", "yes!", "no",
         "red/blue", "red blue", "U.S.", "3.5", "(cat)", "cat", "an apple", "Apple", "it's", "its", "none", "0",
         "ten", "10", "x-ray", "x ray", "Im", "somebodyd", "hello , world", "a", "..", "well...", "  dog  ",
         "dog\tdog", "2 dogs"]


def _official_accuracies(tmp_path, questions):
    """Per-question accuracy (0-100) from open_flamingo's copy of the official VQA evaluation."""
    vm = pytest.importorskip("open_flamingo.eval.vqa_metric")
    anns = {"annotations": [{"question_id": i, "image_id": i, "question_type": "what", "answer_type": "other",
                             "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]}
                            for i, (_, answers) in enumerate(questions)]}
    qs = {"questions": [{"question_id": i, "image_id": i, "question": "q"} for i in range(len(questions))],
          "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {}}
    res = [{"question_id": i, "answer": pred} for i, (pred, _) in enumerate(questions)]
    paths = {}
    for name, obj in (("ann", anns), ("q", qs), ("res", res)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(obj))
    vqa = vm.VQA(str(paths["ann"]), str(paths["q"]))
    ev = vm.VQAEval(vqa, vqa.loadRes(str(paths["res"]), str(paths["q"])), n=8)
    ev.evaluate()
    return [ev.evalQA[i] for i in range(len(questions))], ev.accuracy["overall"]


def test_vqa_accuracy_equals_the_official_script(tmp_path, capsys):
    rng = random.Random(0)
    questions = []
    for _ in range(300):
        answers = [rng.choice(WORDS[:12]) if rng.random() < 0.6 else rng.choice(WORDS) for _ in range(10)]
        pred = rng.choice(answers) if rng.random() < 0.5 else rng.choice(WORDS)
        questions.append((pred, answers))
    questions.append(("two", ["2"] * 10))   # number words
    questions.append(("Dog", ["the dog"] * 2 + ["cat"] * 8))   # articles, case: 2 matches
    per_q, overall = _official_accuracies(tmp_path, questions)
    ours = [100 * vqa_accuracy(p, a) for p, a in questions]
    assert ours == pytest.approx(per_q, abs=1e-6)
    assert round(sum(ours) / len(ours), 8) == pytest.approx(overall, abs=1e-6)
    assert ours[-2] == 100 and ours[-1] == pytest.approx(100 * (2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert len({round(x, 4) for x in ours}) > 3  # the draw covers partial credit, not just 0 and 100


def test_normalization_and_postprocessing_equal_open_flamingo():
    vm = pytest.importorskip("open_flamingo.eval.vqa_metric")
    ev = vm.VQAEval(None, None)
    for w in WORDS + ["." * 40 + "a", "1.5.", "a.b", "what's up? it's 3,5"]:
        assert normalize_vqa_answer(w) == ev.processDigitArticle(ev.processPunctuation(w.replace("\t", " ").strip()))
    for text in ["dog Question: what", "yes, it is", "red Short answer: no", "cat Answer dog", "plain", ""]:
        assert postprocess_vqa(text) == vm.postprocess_vqa_generation(text)


def test_metrics_refuse_empty_references():
    with pytest.raises(ValueError, match="at least one reference"):
        vqa_accuracy("dog", [])
    with pytest.raises(ValueError, match="at least one reference"):
        exact_match("dog", [])
    assert exact_match(" Dog ", ["cat", "dog"]) == 1.0


def test_prompts_are_open_flamingos():
    demo = Example(None, ["yes", "no"], "is it red?")
    query = Example(None, ["no"], "is it blue?")
    assert few_shot_text("vqa", [demo, demo], query) == (
        "<image>Question:is it red? Short answer:yes<|endofchunk|>\n" * 2 + "<image>Question:is it blue? Short answer:")
    assert few_shot_text("vqa", [demo], query, text_only=True) == (
        "Question:is it red? Short answer:yes<|endofchunk|>\n<image>Question:is it blue? Short answer:")
    assert few_shot_text("classification", [Example(None, ["cat"])], Example(None, ["dog"])) == (
        "<image>Output:cat<|endofchunk|><image>Output:")  # (open_flamingo's classification: no newline)
    with pytest.raises(ValueError, match="non-empty list"):
        Example(None, "cat")


# ----------------------------------------------------------------- the harness vs a plain loop
def _plain(model, tok, text, images, **kw):
    """One prompt alone, no padding: open_flamingo's generate as its evaluation calls it."""
    ids = tok(text, return_tensors="pt")["input_ids"]
    vx = torch.stack(images)[None] if images else None
    return ids, vx


def _plain_answers(model, tok, queries, support, shots, seed, zero, **gen):
    rng = random.Random(seed)
    out = []
    for q in queries:  # DemonstrationSampler's draw: shots + copies positions, the query's copies dropped
        k = shots or zero
        own = [j for j, s in enumerate(support) if s is q]
        demos = [support[j] for j in rng.sample(range(len(support)), k + len(own)) if j not in own][:k]
        text = few_shot_text("vqa", demos, q, text_only=shots == 0)
        ids, vx = _plain(model, tok, text, ([] if shots == 0 else [d.image for d in demos]) + [q.image])
        new = model.generate(vx, ids, **gen)[:, ids.shape[1]:]
        out.append(postprocess_vqa(tok.decode(new[0], skip_special_tokens=True)).strip())
    return out


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_vqa_equals_one_prompt_at_a_time(world, num_beams):
    model, tok, queries, support = world
    results = evaluate(model, tok, queries, support, task="vqa", shots=(0, 1, 3), batch_size=3, seed=5,
                       num_beams=num_beams, max_new_tokens=4, progress=False)
    for r in results:
        beams = dict(num_beams=num_beams, length_penalty=0.0) if num_beams > 1 else {}
        want = _plain_answers(model, tok, queries, support, r.shots, 5, 2, max_new_tokens=4, **beams)
        assert r.predictions == want, r.shots
        assert r.score == pytest.approx(100 * sum(vqa_accuracy(p, q.answers) for p, q in zip(want, queries)) / 7)
    assert any(p for r in results for p in r.predictions)  # answers are words, not all cut to nothing


def test_shared_demonstrations_equal_them_written_in_every_prompt(world):
    model, tok, queries, support = world
    for shots in (0, 2):
        shared = evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES,
                          shots=shots, batch_size=4, seed=9, shared_demonstrations=True, progress=False)[0]
        demos = random.Random(9).sample(support, shots or 2)
        scores = []
        for q in queries:
            text = few_shot_text("classification", demos, q, text_only=shots == 0)
            ids, vx = _plain(model, tok, text, ([] if shots == 0 else [d.image for d in demos]) + [q.image])
            cands = [tok(c, add_special_tokens=False)["input_ids"] for c in synthetic.NAMES]
            scores.append(score_reference(model, vx, ids, cands, reduction="mean")[0])
        want = [synthetic.NAMES[int(s.argmax())] for s in scores]
        assert shared.predictions == want
        g = evaluate(model, tok, queries, support, task="vqa", shots=shots, batch_size=4, seed=9, num_beams=3,
                     max_new_tokens=3, shared_demonstrations=True, progress=False)[0]
        plain = []
        for q in queries:
            text = few_shot_text("vqa", demos, q, text_only=shots == 0)
            ids, vx = _plain(model, tok, text, ([] if shots == 0 else [d.image for d in demos]) + [q.image])
            new = model.generate(vx, ids, num_beams=3, max_new_tokens=3, length_penalty=0.0)[:, ids.shape[1]:]
            plain.append(postprocess_vqa(tok.decode(new[0], skip_special_tokens=True)).strip())
        assert g.predictions == plain


def test_the_tiny_model_learns_the_synthetic_world_in_context(world):
    """Trained 400 steps (~15 s), it reads off one demonstration which attribute is asked: with
    none it can only guess (50% at best over the two attributes), with one it does far better."""
    model, tok = world[:2]
    by = {}
    for i, attribute in enumerate(synthetic.ATTRIBUTES):
        queries = synthetic.examples(100, attribute, seed=100 + i)
        support = synthetic.examples(32, attribute, seed=200 + i)
        rs = evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES,
                      shots=(0, 1, 2), text_demos_at_zero=0, batch_size=50, progress=False)
        by[attribute] = [r.score for r in rs]
        assert rs[1].score >= rs[0].score, (attribute, by)
    zero, one = (sum(v[k] for v in by.values()) / 2 for k in (0, 1))
    assert zero <= 55 and one >= zero + 15, by


def test_similar_demonstrations_are_the_nearest_images_most_similar_last(world):
    """RICES: each query's k demonstrations are the support images nearest its own by the cosine
    of the model's averaged visual tokens, ordered as open_flamingo orders them; the query itself
    is never its own demonstration."""
    model, tok = world[:2]
    from fastflamingo.evaluation.harness import _picker, image_features
    queries = synthetic.examples(12, "color", seed=31)
    support = synthetic.examples(20, "color", seed=32) + queries[:3]
    r = evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=3,
                 demonstrations="similar", progress=False)[0]
    qf, sf = image_features(model, queries), image_features(model, support)
    for i, q in enumerate(queries):
        sims = [(float(qf[i] @ sf[j]), j) for j in range(len(support)) if support[j] is not q]
        want = [support[j] for _, j in sorted(sims, reverse=True)[:3]][::-1]
        assert _picker(model, None, queries, support, "similar", 0, 8, 3)(i, q, 3) == want
        text = few_shot_text("classification", want, q)
        ids, vx = _plain(model, tok, text, [d.image for d in want] + [q.image])
        cands = [tok(c, add_special_tokens=False)["input_ids"] for c in synthetic.NAMES]
        assert r.predictions[i] == synthetic.NAMES[int(score_reference(model, vx, ids, cands, reduction="mean").argmax())]
    assert float(qf[0] @ sf[20]) == pytest.approx(1.0)  # queries[0] is in the support, its own nearest: excluded
    # the features mean something: the nearest image shares the query's colour far more often than chance (1/6)
    many, pool = synthetic.examples(60, "color", seed=33), synthetic.examples(60, "color", seed=34)
    pick = _picker(model, None, many, pool, "similar", 0, 30, 1)
    same = sum(pick(i, q, 1)[0].answers == q.answers for i, q in enumerate(many)) / len(many)
    assert same >= 0.5, same


@pytest.mark.parametrize("demonstrations", ["random", "similar"])
def test_a_query_loaded_again_in_the_support_is_never_its_own_demonstration(world, tmp_path, demonstrations):
    """Queries and support read from one file (`fastflamingo evaluate --queries f --support f`) are
    other objects but the same examples: a query was shown itself, answer included (with
    "similar", always, as the last demonstration). Examples are the same by Example.key."""
    model, tok = world[:2]
    from fastflamingo.evaluation import harness
    exs = synthetic.examples(6, "color", seed=41)
    rows = []
    for i, e in enumerate(exs):
        synthetic.to_image(e.image).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "label": e.answers[0]}))
    (tmp_path / "data.jsonl").write_text("\n".join(rows) + "\n")
    queries, support = (load_examples(str(tmp_path / "data.jsonl"), "classification") for _ in range(2))
    assert all(q is not s and q.key == s.key for q, s in zip(queries, support))
    assert len({q.key for q in queries}) == 6
    seen = []
    real = harness._prompts

    def spy(task, qs, demos, order, text_only):
        seen.extend((q.key, [d.key for d in ds]) for q, ds in zip(qs, demos or []))
        return real(task, qs, demos, order, text_only)
    from fastflamingo.inputs import image_transform
    transform = image_transform("open_flamingo", model.config.vision.image_size)  # what the command line uses
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "_prompts", spy)
        evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=[5],
                 image_processor=transform, demonstrations=demonstrations, progress=False)
    assert len(seen) == 6 and all(len(ds) == 5 and q not in ds for q, ds in seen), seen
    with pytest.raises(ValueError, match=r"6 shots need at least 6 support examples besides the query's image, the support "
                                         r"set has 6 \(1 of them of a query's image\)"):
        evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=[6],
                 image_processor=transform, demonstrations=demonstrations, progress=False)


def test_bad_evaluation_input_is_refused(world):
    model, tok, queries, support = world
    for kw, message in ((dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
                        (dict(batch_size=2.0), "batch_size must be an int >= 1, got 2.0"),
                        (dict(num_beams=0), "num_beams must be an int >= 1, got 0"),  # (ran greedy)
                        (dict(text_demos_at_zero=-1), "text_demos_at_zero must be an int >= 0, got -1"),
                        (dict(length_penalty="0"), "length_penalty must be a number, got '0'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            evaluate(model, tok, queries, support, shots=1, progress=False, **kw)
    with pytest.raises(ValueError, match="at least 13 support examples"):
        evaluate(model, tok, queries, support, shots=13, progress=False)
    with pytest.raises(ValueError, match="task must be one of"):
        evaluate(model, tok, queries, support, task="detection", progress=False)
    with pytest.raises(ValueError, match="class_names"):
        evaluate(model, tok, queries, support, task="classification", progress=False)
    with pytest.raises(ValueError, match="max_new_tokens is for the generated tasks"):
        evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, max_new_tokens=3,
                 progress=False)
    with pytest.raises(ValueError, match="two class names"):
        evaluate(model, tok, queries, support, task="hateful_memes", class_names=["a", "b", "c"], progress=False)
    with pytest.raises(ValueError, match=r"labels must be class names \['no', 'yes'\], got \['"):
        evaluate(model, tok, queries, support, task="hateful_memes", progress=False)
    with pytest.raises(ValueError, match="demonstrations must be one of"):
        evaluate(model, tok, queries, support, demonstrations="nearest", progress=False)
    with pytest.raises(ValueError, match="use one or the other"):
        evaluate(model, tok, queries, support, demonstrations="similar", shared_demonstrations=True, progress=False)
    with pytest.raises(ValueError, match="at least 13 support examples"):
        evaluate(model, tok, queries, support, shots=13, demonstrations="similar", progress=False)
    for shots in [(-1,), True, (0, 2.0)]:  # True was taken as 1 shot, 2.0 failed deep in sampling
        with pytest.raises(ValueError, match="shots must be (integers|an int or a non-empty list of ints) >= 0"):
            evaluate(model, tok, queries, support, shots=shots, progress=False)
    from peers import tiny_tokenizer
    with pytest.raises(ValueError, match="no '<image>' token"):
        evaluate(model, tiny_tokenizer(), queries, support, progress=False)


def test_load_examples(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"image": "a.png", "question": "q?", "answers": ["x", "y"]}\n\n{"image": "b.png", "label": "z"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: a VQA example needs a \"question\""):
        load_examples(str(p), "vqa")
    # a VQA row read for another task: its question would be dropped (it was, silently)
    for task in ("classification", "captioning"):
        with pytest.raises(ValueError, match=rf"d.jsonl:1: a {task} example has a \"question\" \('q\?'\).*--task vqa"):
            load_examples(str(p), task)
    p.write_text('{"image": "a.png", "answers": ["x", "y"]}\n\n{"image": "b.png", "label": "z"}\n')
    ex = load_examples(str(p), "classification")
    assert [e.answers for e in ex] == [["x", "y"], ["z"]] and ex[0].image == str(tmp_path / "a.png")
    p.write_text('{"image": "a.png", "answers": []}\n')
    with pytest.raises(ValueError, match="non-empty list of strings"):
        load_examples(str(p), "classification")
    p.write_text('not json\n')
    with pytest.raises(ValueError, match="d.jsonl:1 is not a JSON object"):
        load_examples(str(p), "vqa")


# ------------------------------------------------------------------ command line
def _write_split(directory, examples, task):
    """Examples -> PNG files and a JSON-lines file beside them, as a user's data would be."""
    from PIL import Image
    directory.mkdir(exist_ok=True)
    lines = []
    for i, ex in enumerate(examples):
        pixels = (ex.image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(directory / f"{i}.png")
        row = {"image": f"{i}.png", "answers": ex.answers}
        if task == "vqa":
            row["question"] = "what is it ?"
        lines.append(json.dumps(row))
    (directory / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(directory / "data.jsonl")


def test_cli_synthetic_then_the_saved_model_on_files(tmp_path, capsys):
    from fastflamingo.cli import main
    out, saved = tmp_path / "out", tmp_path / "model"
    assert main(["evaluate", "--synthetic", "--steps", "20", "--num-queries", "8", "--shots", "0", "1",
                 "--out", str(out), "--save", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "trained 20 steps" in printed and "color" in printed and "shape" in printed
    report = json.loads((out / "results.json").read_text())
    assert set(report["results"]) == {"color", "shape"} and report["steps"] == 20
    assert [r["shots"] for r in report["results"]["color"]] == [0, 1]
    assert len(report["results"]["shape"][1]["predictions"]) == 8 and (out / "few_shot.png").stat().st_size > 0
    # the saved model, evaluated from image files as a user's own data
    queries = _write_split(tmp_path / "q", synthetic.examples(6, "color", seed=7), "classification")
    support = _write_split(tmp_path / "s", synthetic.examples(6, "color", seed=8), "classification")
    (tmp_path / "names.txt").write_text("\n".join(synthetic.NAMES) + "\n")
    assert main(["evaluate", "--model", str(saved), "--task", "classification", "--queries", queries,
                 "--support", support, "--class-names-file", str(tmp_path / "names.txt"), "--shots", "0", "2",
                 "--out", str(tmp_path / "out2")]) == 0
    report = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert [r["shots"] for r in report["results"]["classification"]] == [0, 2]
    assert all(p in synthetic.NAMES for p in report["results"]["classification"][1]["predictions"])
    # zero shots with no text demonstrations show no demonstration: no --support needed (it was)
    zero = ["evaluate", "--model", str(saved), "--task", "classification", "--queries", queries,
            "--class-names-file", str(tmp_path / "names.txt"), "--shots", "0", "--out", str(tmp_path / "out0")]
    assert main(zero + ["--text-demos-at-zero", "0"]) == 0
    alone = json.loads((tmp_path / "out0" / "results.json").read_text())
    assert alone["support"] is None
    assert main(zero[:-1] + [str(tmp_path / "out0s"), "--support", support, "--text-demos-at-zero", "0"]) == 0
    with_support = json.loads((tmp_path / "out0s" / "results.json").read_text())
    assert all(alone["results"]["classification"][0][k] == with_support["results"]["classification"][0][k]
               for k in ("predictions", "score"))  # (the support shows nothing here)
    capsys.readouterr()
    assert main(zero) == 2  # (two text-only demonstrations by default: drawn from the support)
    assert "evaluating --model needs --support" in capsys.readouterr().err
    vq = _write_split(tmp_path / "vq", synthetic.examples(4, "shape", seed=9), "vqa")
    vs = _write_split(tmp_path / "vs", synthetic.examples(3, "shape", seed=10), "vqa")
    assert main(["evaluate", "--model", str(saved), "--task", "vqa", "--queries", vq, "--support", vs,
                 "--shots", "1", "--shared-demonstrations", "--out", str(tmp_path / "out3")]) == 0
    assert "vqa_accuracy" in capsys.readouterr().out
    # one shared draw for all queries is none of them: from the queries' own file there is none
    assert main(["evaluate", "--model", str(saved), "--task", "vqa", "--queries", vq, "--support", vq,
                 "--shots", "1", "--shared-demonstrations", "--out", str(tmp_path / "out4")]) == 2
    assert "4 of them of a query's image" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--synthetic", "--queries", "q.jsonl"], "--queries: not used with --synthetic"),
    (["--model", "m"], "evaluating --model needs --queries and --support"),
    (["--model", "m", "--queries", "/no/q.jsonl", "--support", "/no/s.jsonl"], "--queries: no file '/no/q.jsonl'"),
    (["--synthetic", "--shots", "-1"], "--shots must be >= 0, got -1"),
    (["--synthetic", "--num-beams", "0"], "--num-beams must be >= 1, got 0"),
    (["--synthetic", "--task", "vqa"], "--task: not used with --synthetic"),
    (["--synthetic", "--num-queries", "0"], "--num-queries must be >= 1, got 0"),
    # beam search settings where nothing is generated (were accepted and dropped)
    (["--synthetic", "--num-beams", "5", "--length-penalty", "1"], "--num-beams, --length-penalty: not used with "
                                                                   "--synthetic"),
    (["--model", "m", "--task", "hateful_memes", "--queries", "q", "--support", "s", "--num-beams", "7"],
     "--num-beams is for the generated tasks (vqa, captioning), not --task hateful_memes"),
    (["--model", "m", "--task", "hateful_memes", "--queries", "q", "--support", "s", "--length-penalty", "2.5"],
     "--length-penalty is for the generated tasks"),
    (["--model", "m", "--queries", "q", "--support", "s", "--save", "d"], "--save: only used with --synthetic"),
])
def test_cli_evaluate_bad_input_is_one_line_naming_it(capsys, args, message):
    from fastflamingo.cli import main
    try:
        code = main(["evaluate"] + args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_the_few_shot_plot_shows_scores_above_100(tmp_path):
    """Captioning's CIDEr x 100 passes 100 (real models: ~80-115 on COCO): the axis grows to show it."""
    pytest.importorskip("matplotlib")
    from unittest import mock

    from fastflamingo.evaluation.plot import few_shot_plot
    report = {"results": {"coco": [{"shots": 0, "score": 79.5}, {"shots": 4, "score": 104.2},
                                   {"shots": 8, "score": 112.8}]},
              "metric": "cider", "kind": "captioning", "device": "cpu"}
    import matplotlib.axes
    limits = []
    real = matplotlib.axes.Axes.set_ylim
    with mock.patch.object(matplotlib.axes.Axes, "set_ylim", lambda ax, *a, **k: limits.append(a) or real(ax, *a, **k)):
        assert few_shot_plot(report, str(tmp_path / "p.png")) == str(tmp_path / "p.png")
    assert limits and limits[-1][0] == 0 and limits[-1][1] >= 112.8, limits
    assert (tmp_path / "p.png").stat().st_size > 0


def test_shared_demonstrations_are_none_of_the_queries():
    """One draw for all queries, from a support set holding some of them (one file, overlapping
    splits): a query was shown itself, answer included, as a shared demonstration."""
    from fastflamingo.evaluation.harness import _check_support, _picker
    exs = synthetic.examples(10, "color", seed=61)
    queries, support = exs[:6], exs
    for seed in range(40):
        shared = _picker(None, None, queries, support, "random", seed, 8, 4)(None, None, 4)
        assert len(shared) == 4 and not {d.key for d in shared} & {q.key for q in queries}
    with pytest.raises(ValueError, match=r"5 shots need at least 5 .* \(6 of them of a query's image\)"):
        _check_support(queries, support, [5], 2, "random", True)


def test_random_draws_never_show_a_query_its_own_image_and_cover_the_rest():
    """Nor the query's image with another question (a split used as its own support: VQAv2 asks
    several questions of each image, and the answer to one tells another's), as "similar" draws."""
    from fastflamingo.evaluation.prompts import DemonstrationSampler
    exs = synthetic.examples(8, "color", seed=62)
    for e in exs:
        e.question = "what color is it?"
    support = exs + [Example(e.image, e.answers, question=e.question) for e in exs[:2]]  # copies: same key
    support.append(Example(exs[0].image.clone(), ["one"], question="how many are there?"))  # its image, another question
    sampler = DemonstrationSampler(support, random.Random(0))
    seen = set()
    for _ in range(300):
        demos = sampler.draw(3, exs[0])
        assert len(demos) == 3 and len({id(d) for d in demos}) == 3
        assert exs[0].image_key not in {d.image_key for d in demos}
        seen |= {id(d) for d in demos}
    assert seen == {id(s) for s in support if s.image_key != exs[0].image_key}  # every other one drawn sometimes
    with pytest.raises(ValueError, match=r"9 shots need at least 9 support examples besides the query's image, the "
                                         r"support set has 11 \(3 of them of the query's image\)"):
        sampler.draw(9, exs[0])
    shared = sampler.draw_shared(8, exs[:1])
    assert exs[0].image_key not in {d.image_key for d in shared}
    with pytest.raises(ValueError, match=r"9 shared shots need at least 9 support examples of no query's image, "
                                         r"the support set has 8"):
        sampler.draw_shared(9, exs[:1])


@pytest.mark.parametrize("block", [1, 7, 1 << 24])
def test_nearest_support_equals_the_full_stable_sort(block):
    """RICES kept the whole (queries, support) similarity matrix and its argsort (1 TB for VQAv2):
    now per block of queries, top-k only, the same positions, ties in support order."""
    from fastflamingo.evaluation.harness import nearest_support
    g = torch.Generator().manual_seed(0)
    sf = torch.nn.functional.normalize(torch.randn(23, 5, generator=g), dim=-1)
    sf[10:14] = sf[3]  # tied similarities (the same image under several questions)
    qf = torch.cat([sf[[3, 0, 10]], torch.nn.functional.normalize(torch.randn(6, 5, generator=g), dim=-1)])
    own = [[3, 10, 11, 12, 13], [0], [], [], [1, 2], [], [], [], [22]]
    got = nearest_support(qf, sf, own, 6, block=block * sf.shape[0])
    sim = qf @ sf.T
    for i, js in enumerate(own):
        sim[i, js] = float("-inf")
    torch.testing.assert_close(got, sim.argsort(dim=-1, descending=True, stable=True)[:, :6], rtol=0, atol=0)
    assert nearest_support(qf, sf, own, 50).shape == (9, 23)


def test_mismatched_ids_classes_by_case_and_missing_questions_are_refused_up_front(world, monkeypatch):
    model, tok, queries, support = world
    with pytest.raises(ValueError, match=r"\[\['red', 'Red'\]\] differ only in case"):
        evaluate(model, tok, queries, support, task="classification", class_names=[*synthetic.NAMES, "Red"],
                 progress=False)
    monkeypatch.setattr(model.config, "eoc_token_id", model.config.eoc_token_id + 1)
    with pytest.raises(ValueError, match=r"'<\|endofchunk\|>' is id \d+, the model's config.eoc_token_id is \d+"):
        evaluate(model, tok, queries, support, progress=False)
    monkeypatch.undo()
    broken = [*support[:3], Example(support[3].image, support[3].answers, question=None), *support[4:]]
    with pytest.raises(ValueError, match=r"support\[3\] \(image Tensor.*needs a question"):
        evaluate(model, tok, queries, broken, shots=(0, 4), progress=False)
    evaluate(model, tok, queries, broken, shots=0, text_demos_at_zero=0, progress=False)  # no demonstration shown


def test_each_shot_count_is_saved_as_it_finishes(world, tmp_path, capsys):
    """A support image that cannot be read, first met at 7 shots: the finished 0-shot run was
    thrown away with it (results.json was written after every number of shots)."""
    model, tok = world[:2]
    seen = []
    rs = evaluate(model, tok, world[2][:3], world[3], shots=(0, 1), max_new_tokens=2, num_beams=1,
                  progress=False, on_result=seen.append)
    assert seen == rs and [r.shots for r in seen] == [0, 1]
    from fastflamingo.cli import main
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    q = _write_split(tmp_path / "q", synthetic.examples(3, "color", seed=71), "vqa")
    s = _write_split(tmp_path / "s", synthetic.examples(7, "color", seed=72), "vqa")
    (tmp_path / "s" / "6.png").write_bytes(b"not a png")
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "vqa", "--queries", q, "--support", s,
                 "--shots", "0", "7", "--num-beams", "1", "--out", str(tmp_path / "out")]) == 2
    assert "not an image PIL can read" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["shots"] for r in report["results"]["vqa"]] == [0] and len(report["results"]["vqa"][0]["predictions"]) == 3


def test_vqa_accuracy_by_the_official_script_normalizes_references_as_it_does():
    """vqaEval.py (the VQA challenge's, its test server's): the prediction normalized fully, the
    human answers only of punctuation and only where they disagree; open_flamingo's copy
    normalizes them fully (the default: its published numbers)."""
    cases = [("Yes", ["Yes"] * 10, 0.0, 1.0), ("two", ["2"] * 10, 1.0, 1.0), ("2", ["two"] * 10, 0.0, 1.0),
             ("dog", ["the dog"] * 10, 0.0, 1.0), ("dog", ["dog."] * 9 + ["cat"], 1.0, 1.0),
             ("dog", ["Dog"] * 9 + ["cat"], 0.0, 1.0)]
    for pred, answers, official, of in cases:
        assert vqa_accuracy(pred, answers, "official") == pytest.approx(official), (pred, answers)
        assert vqa_accuracy(pred, answers) == pytest.approx(of), (pred, answers)
    with pytest.raises(ValueError, match="script='eval_ai' is not one of"):
        vqa_accuracy("dog", ["dog"], "eval_ai")


def test_similar_demonstrations_never_show_the_querys_own_image():
    """A VQA split as its own support: each image with two questions. RICES compared the query's
    own image with itself, so that image, with its other question and answer, was always the
    nearest demonstration; now no copy of the query's image is shown to it."""
    import fastflamingo
    from fastflamingo.evaluation import synthetic
    from fastflamingo.evaluation.harness import _picker
    model = fastflamingo.Flamingo.from_preset("tiny", seed=0)
    pictures = synthetic.examples(10, "color", seed=1)
    queries = [Example(e.image, e.answers, "what is it ?") for e in pictures[:3]]
    support = [Example(e.image, e.answers, q) for e in pictures for q in ("what is it ?", "what color is it ?")]
    pick = _picker(model, None, queries, support, "similar", 0, 8, 2)
    for i, q in enumerate(queries):
        assert not any(torch.equal(d.image, q.image) for d in pick(i, q, 2))
