"""Captioning and Hateful Memes in the few-shot harness: CIDEr equals a readable CIDEr-D written
from its definition (and the COCO evaluation's tokenizer is the one applied), ROC AUC equals its
pairwise definition, prompts and post-processing are open_flamingo's, the batched harness equals a
plain one-prompt-at-a-time loop, and the data files (JSON lines, Karpathy splits, Hateful Memes'
own) load or are refused with the offending line named."""
import itertools
import json
import math
import random
import re
from collections import Counter

import pytest
import torch

from fastflamingo.evaluation import (Example, cider, evaluate, load_examples, load_karpathy, postprocess_caption,
                                     roc_auc, synthetic)
from fastflamingo.evaluation.prompts import few_shot_text
from fastflamingo.generation.score import score_reference


# ------------------------------------------------------------------ CIDEr
def _ngrams(words, n):
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def cider_d_reference(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D (Vedantam et al. 2015, as the COCO evaluation defines it) of captions already
    tokenized into space-separated words: n-grams n = 1..4 weighted by tf x log(#images / df), df
    counted over the references; per n the cosine of the candidate's and a reference's vectors,
    the candidate's counts clipped at the reference's, times exp(-(len difference)^2 / 2 sigma^2);
    averaged over n and references, x 10, then over images."""
    images = len(references)
    df = Counter()
    for refs in references:
        df.update({g for r in refs for n in range(1, 5) for g in _ngrams(r.split(), n)})

    def vectors(caption):
        words = caption.split()
        vec = [{g: tf * (math.log(images) - math.log(max(1.0, df[g]))) for g, tf in _ngrams(words, n).items()}
               for n in range(1, 5)]
        return vec, [math.sqrt(sum(v * v for v in vn.values())) for vn in vec], len(words)

    total = 0.0
    for pred, refs in zip(predictions, references):
        vh, nh, lh = vectors(pred)
        per_ref = []
        for r in refs:
            vr, nr, lr = vectors(r)
            sims = []
            for n in range(4):
                dot = sum(min(vh[n][g], vr[n][g]) * vr[n][g] for g in vh[n] if g in vr[n])
                cos = dot / (nh[n] * nr[n]) if nh[n] and nr[n] else 0.0
                sims.append(cos * math.exp(-((lh - lr) ** 2) / (2 * sigma ** 2)))
            per_ref.append(sum(sims) / 4)
        total += 10 * sum(per_ref) / len(per_ref)
    return total / images


WORDS = ["a", "man", "dog", "cat", "red", "blue", "riding", "on", "the", "street", "with", "two", "bike",
         "sitting", "table", "of", "in", "front", "large", "small"]


def test_cider_equals_cider_d_from_its_definition():
    rng = random.Random(0)
    refs = [[" ".join(rng.choices(WORDS, k=rng.randint(4, 12))) for _ in range(rng.randint(1, 5))]
            for _ in range(40)]
    preds = []
    for r in refs:  # near a reference, far from all, empty, a reference itself
        kind = rng.random()
        if kind < 0.4:
            words = rng.choice(r).split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            preds.append(" ".join(words))
        elif kind < 0.7:
            preds.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 15))))
        elif kind < 0.75:
            preds.append("")
        else:
            preds.append(r[0])
    ours = cider(preds, refs)
    assert ours == pytest.approx(cider_d_reference(preds, refs), rel=1e-9, abs=1e-12)
    assert 0.1 < ours < 10, ours  # a spread of good and bad captions, not a degenerate 0


def test_cider_tokenizes_as_the_coco_evaluation():
    """The Stanford PTB tokenizer lowercases and splits off punctuation, then the COCO evaluation
    drops the punctuation tokens: these captions score as their plain forms do. Its quirks are
    kept: "-lrb-" (a lowercased parenthesis) is not dropped."""
    refs = [["a man riding a bike on the street"], ["two dogs sitting at a table"], ["a red cat"]]
    plain = ["a man riding a bike", "two dogs at the table", "a red cat"]
    messy = ["A man, riding a bike!", "Two dogs... at the table.", "a  Red cat ?"]
    assert cider(messy, refs) == pytest.approx(cider(plain, refs), rel=1e-12)
    assert cider(plain, refs) == pytest.approx(cider_d_reference(plain, refs), rel=1e-9)
    assert cider(["a red (cat)"], [["a red cat"]]) == pytest.approx(
        cider_d_reference(["a red -lrb- cat -rrb-"], [["a red cat"]]), rel=1e-9)
    assert cider(["a man 's dog"], [["a man's dog"]]) == pytest.approx(
        cider_d_reference(["a man 's dog"], [["a man 's dog"]]), rel=1e-9)


def test_cider_refuses_bad_input():
    with pytest.raises(ValueError, match="one prediction per image, got 1 predictions and 2 reference lists"):
        cider(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match=r"images \[1\] have none"):
        cider(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="at least one image"):
        cider([], [])


def test_cider_names_what_is_missing(monkeypatch):
    import shutil

    from fastflamingo.evaluation import metrics
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="no `java` is on the PATH"):
        cider(["a"], [["a"]])
    monkeypatch.undo()
    import builtins
    real = builtins.__import__

    def no_pycocoevalcap(name, *a, **k):
        if name.startswith("pycocoevalcap"):
            raise ImportError(name)
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_pycocoevalcap)
    with pytest.raises(ImportError, match=r"pip install 'fastflamingo\[eval\]'"):
        metrics.check_cider_available()


def test_caption_postprocessing_equals_open_flamingo():
    cm = pytest.importorskip("open_flamingo.eval.coco_metric")
    for text in ['a dog Output: a cat', ' a "red" bus\nOutput', "plain", "", "OutputOutput", 'say "Output"']:
        assert postprocess_caption(text) == cm.postprocess_captioning_generation(text).replace('"', "")


# ------------------------------------------------------------------ ROC AUC
def _pairwise_auc(labels, scores):
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    return sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg) / (len(pos) * len(neg))


def test_roc_auc_equals_its_pairwise_definition():
    rng = random.Random(1)
    for trial in range(50):
        n = rng.randint(2, 60)
        labels = [rng.random() < 0.4 for _ in range(n)]
        labels[0], labels[1] = True, False
        # coarse scores: many ties, which count one half
        scores = [round(rng.random(), 1 if trial % 2 else 6) for _ in range(n)]
        assert roc_auc(labels, scores) == pytest.approx(_pairwise_auc(labels, scores), abs=1e-12)
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0 and roc_auc([True, False], [0.1, 0.9]) == 0.0
    assert roc_auc([True, False, True, False], [0.5] * 4) == 0.5


def test_roc_auc_refuses_bad_input():
    with pytest.raises(ValueError, match="got 1 positive and 0 negative"):
        roc_auc([True], [0.3])
    with pytest.raises(ValueError, match="a score per label, got 1 scores and 2 labels"):
        roc_auc([True, False], [0.3])
    with pytest.raises(ValueError, match=r"NaN scores at \[1\]"):
        roc_auc([True, False], [0.3, float("nan")])


# ------------------------------------------------------------------ prompts
def test_captioning_and_hateful_memes_prompts_are_open_flamingos():
    """open_flamingo's get_caption_prompt and get_hateful_memes_prompt, the caption stripped as its
    captioning evaluation strips it; captioning's (and VQA's) demonstrations each followed by a
    newline, classification's and Hateful Memes' by nothing, as its evaluate.py joins them (read
    from the installed open_flamingo below)."""
    demo, query = Example(None, [" a red bus  ", "a bus"]), Example(None, ["a cat"])
    assert few_shot_text("captioning", [demo, demo], query) == (
        "<image>Output:a red bus<|endofchunk|>\n" * 2 + "<image>Output:")
    assert few_shot_text("captioning", [demo], query, text_only=True) == (
        "Output:a red bus<|endofchunk|>\n<image>Output:")
    meme = Example(None, ["yes"], text="look at this")
    assert few_shot_text("hateful_memes", [meme], Example(None, ["no"], text="hi")) == (
        "<image>is an image with: 'look at this' written on it. Is it hateful? Answer:yes<|endofchunk|>"
        "<image>is an image with: 'hi' written on it. Is it hateful? Answer:")
    tench, goldfish = Example(None, ["tench"]), Example(None, ["goldfish"])
    assert few_shot_text("classification", [tench, goldfish], query) == (
        "<image>Output:tench<|endofchunk|><image>Output:goldfish<|endofchunk|><image>Output:")
    assert few_shot_text("vqa", [Example(None, ["red"], question="what colour?")], Example(None, ["x"], question="q?")) \
        == "<image>Question:what colour? Short answer:red<|endofchunk|>\n<image>Question:q? Short answer:"
    with pytest.raises(ValueError, match="needs its meme's text"):
        few_shot_text("hateful_memes", [], Example(None, ["no"]))


def test_the_separators_are_those_of_open_flamingos_evaluate():
    """The installed open_flamingo's evaluate.py: its captioning and VQA evaluations add "\\n" after
    each demonstration, its classification evaluation (ImageNet, Hateful Memes) joins them with
    nothing."""
    import ast
    import importlib.util
    from pathlib import Path

    from fastflamingo.evaluation.prompts import SEPARATOR
    # read, not imported (its imports need open_flamingo's training dependencies)
    path = Path(importlib.util.find_spec("open_flamingo").origin).parent / "eval" / "evaluate.py"
    text = path.read_text()
    source = {f.name: ast.get_source_segment(text, f) for f in ast.parse(text).body if isinstance(f, ast.FunctionDef)}
    assert 'get_caption_prompt(caption=x["caption"].strip()) + "\\n"' in source["evaluate_captioning"]
    assert re.search(r'get_vqa_prompt\([^)]*\)\s*\+\s*"\\n"', source["evaluate_vqa"], re.S)
    assert 'context_text = "".join([prompt_fn(x) for x in batch_demo_samples[i]])' in source["evaluate_classification"]
    assert SEPARATOR == {"vqa": "\n", "captioning": "\n", "classification": "", "hateful_memes": ""}


# ------------------------------------------------------------------ the harness vs a plain loop
def _captioned(examples):
    """The world's pictures with captions of both attributes (the first one the demonstration's)."""
    return [Example(e.image, [f"{e.extra['color']} {e.extra['shape']}", e.extra["color"], e.extra["shape"]],
                    extra=e.extra) for e in examples]


def _prompt_inputs(tok, text, images):
    ids = tok(text, return_tensors="pt")["input_ids"]
    return ids, (torch.stack(images)[None] if images else None)


def test_batched_captioning_equals_one_prompt_at_a_time(world):
    model, tok, queries, support = world
    queries, support = _captioned(queries), _captioned(support)
    results = evaluate(model, tok, queries, support, task="captioning", shots=(0, 2), batch_size=3, seed=4,
                       progress=False)
    for r in results:
        assert r.metric == "cider"
        rng, want = random.Random(4), []
        for q in queries:
            demos = rng.sample(support, r.shots or 2)
            text = few_shot_text("captioning", demos, q, text_only=r.shots == 0)
            ids, vx = _prompt_inputs(tok, text, ([] if r.shots == 0 else [d.image for d in demos]) + [q.image])
            # open_flamingo's captioning defaults: 3 beams, 20 new tokens, no length penalty
            new = model.generate(vx, ids, num_beams=3, max_new_tokens=20, length_penalty=0.0)[:, ids.shape[1]:]
            want.append(postprocess_caption(tok.decode(new[0], skip_special_tokens=True)))
        assert r.predictions == want, r.shots
        assert r.score == pytest.approx(100 * cider(want, [q.answers for q in queries]))
    assert any(p.strip() for r in results for p in r.predictions)


def _memes(examples, rng):
    """The world's pictures as memes: a text, and labelled "red" (the hateful class here: the
    synthetic tokenizer knows no "yes" or "no") or "blue"."""
    return [Example(e.image, ["red" if e.extra["color"] == "red" else "blue"], text=rng.choice(["red", "blue it"]),
                    extra=e.extra) for e in examples]


def test_hateful_memes_scores_the_probability_of_yes_as_open_flamingo(world):
    """The class ranking of "no" and "yes"; each query's score is the softmax of the two mean
    log-probabilities, taken for "yes"; the metric is the ROC AUC of that score (x 100)."""
    model, tok = world[:2]
    rng = random.Random(2)
    pool = synthetic.examples(60, "color", seed=41)
    reds = [e for e in pool if e.extra["color"] == "red"]
    queries = _memes(reds[:4] + [e for e in pool if e not in reds][:8], rng)  # ROC AUC needs both labels
    support = _memes(synthetic.examples(8, "color", seed=42), rng)
    r = evaluate(model, tok, queries, support, task="hateful_memes", class_names=["blue", "red"], shots=1,
                 batch_size=4, seed=6, progress=False)[0]
    draw, probs, names = random.Random(6), [], []
    cands = [tok(c, add_special_tokens=False)["input_ids"] for c in ("blue", "red")]
    assert cands[0] != cands[1]
    for q in queries:
        demos = draw.sample(support, 1)
        ids, vx = _prompt_inputs(tok, few_shot_text("hateful_memes", demos, q), [demos[0].image, q.image])
        lp = score_reference(model, vx, ids, cands, reduction="mean")[0]
        probs.append(float(lp.softmax(-1)[1]))
        names.append(["blue", "red"][int(lp.argmax())])
    assert r.metric == "roc_auc" and r.predictions == names
    assert r.positive_probabilities == pytest.approx(probs, abs=1e-5)
    assert max(abs(p - 0.5) for p in probs) > 0.05, probs  # the classes differ: the check can fail
    assert r.score == pytest.approx(100 * roc_auc([q.answers == ["red"] for q in queries], probs), abs=1e-6)


# ------------------------------------------------------------------ prompt ensembling
def test_orderings_are_distinct_and_the_drawn_one_first():
    from fastflamingo.evaluation.harness import _orderings
    assert _orderings(3, False, 0) == [(0, 1, 2)] and _orderings(1, True, 0) == [(0,)] and _orderings(0, True, 0) == [()]
    assert _orderings(2, True, 0) == [(0, 1), (1, 0)]
    three = _orderings(3, True, 0)
    assert three[0] == (0, 1, 2) and sorted(three) == sorted(itertools.permutations(range(3)))
    for k in (4, 8):
        orders = _orderings(k, True, 5)
        assert len(orders) == 6 == len(set(orders)) and orders[0] == tuple(range(k))
        assert all(sorted(o) == list(range(k)) for o in orders) and orders == _orderings(k, True, 5)


def _ensembled_reference(model, tok, task, queries, demos_of, cands, text_only=False):
    """open_flamingo's prompt ensembling one prompt at a time: every order of each query's
    demonstrations (k <= 3: all k! <= 6 of them), each class's mean log-probability per token
    averaged over the orders; the best class and the softmax of the averages."""
    names, probs = [], []
    for i, q in enumerate(queries):
        demos, lps = demos_of(i), []
        for order in itertools.permutations(range(len(demos))):
            shown = [demos[j] for j in order]
            images = ([] if text_only else [d.image for d in shown]) + [q.image]
            ids, vx = _prompt_inputs(tok, few_shot_text(task, shown, q, text_only=text_only), images)
            lps.append(score_reference(model, vx, ids, cands, reduction="mean")[0])
        lp = torch.stack(lps).mean(0)
        names.append(int(lp.argmax()))
        probs.append(lp.softmax(-1).tolist())
    return names, probs


@pytest.mark.parametrize("shared", [False, True])
def test_prompt_ensembling_averages_over_the_orders_as_open_flamingo(world, shared):
    """Hateful Memes' probabilities of "yes" (continuous: a wrong order or average shows) at 3
    shots (3! = 6 orders), per-query draws and one shared prefix per order."""
    model, tok = world[:2]
    rng = random.Random(3)
    pool = synthetic.examples(40, "color", seed=43)
    reds = [e for e in pool if e.extra["color"] == "red"]
    queries = _memes(reds[:3] + [e for e in pool if e not in reds][:4], rng)
    support = _memes(synthetic.examples(8, "color", seed=44), rng)
    names = ["blue", "red"]
    r = evaluate(model, tok, queries, support, task="hateful_memes", class_names=names, shots=3, batch_size=4,
                 seed=9, prompt_ensembling=True, shared_demonstrations=shared, progress=False)[0]
    draw = random.Random(9)
    fixed = draw.sample(support, 3) if shared else None
    drawn = [fixed if shared else draw.sample(support, 3) for _ in queries]
    cands = [tok(c, add_special_tokens=False)["input_ids"] for c in names]
    want, probs = _ensembled_reference(model, tok, "hateful_memes", queries, lambda i: drawn[i], cands)
    assert r.orderings == 6 and r.predictions == [names[j] for j in want]
    assert r.positive_probabilities == pytest.approx([p[1] for p in probs], abs=1e-4 if shared else 1e-5)
    plain = evaluate(model, tok, queries, support, task="hateful_memes", class_names=names, shots=3, batch_size=4,
                     seed=9, shared_demonstrations=shared, progress=False)[0]
    assert plain.orderings == 1
    assert max(abs(a - b) for a, b in zip(plain.positive_probabilities, r.positive_probabilities)) > 1e-4  # orders matter


def test_prompt_ensembling_at_zero_shots_orders_the_text_only_demonstrations(world):
    """At 0 shots the prompt still shows two text-only demonstrations (open_flamingo's effective
    shots): ensembling averages their 2 orders."""
    model, tok, queries, support = world
    r = evaluate(model, tok, queries, support, task="classification", class_names=synthetic.NAMES, shots=0,
                 batch_size=3, seed=2, prompt_ensembling=True, progress=False)[0]
    draw = random.Random(2)
    drawn = [draw.sample(support, 2) for _ in queries]
    cands = [tok(c, add_special_tokens=False)["input_ids"] for c in synthetic.NAMES]
    want, _ = _ensembled_reference(model, tok, "classification", queries, lambda i: drawn[i], cands, text_only=True)
    assert r.orderings == 2 and r.predictions == [synthetic.NAMES[j] for j in want]
    with pytest.raises(ValueError, match="prompt_ensembling averages the class rankings .* not 'vqa'"):
        evaluate(model, tok, queries, support, task="vqa", prompt_ensembling=True, progress=False)


# ------------------------------------------------------------------ data files
def test_load_captioning_and_hateful_memes_files(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"image": "a.png", "captions": ["x y", "z"]}\n{"image": "b.png", "answers": ["w"]}\n')
    ex = load_examples(str(p), "captioning")
    assert [e.answers for e in ex] == [["x y", "z"], ["w"]] and ex[1].image == str(tmp_path / "b.png")
    p.write_text('{"image": "a.png", "captions": "one caption"}\n')
    with pytest.raises(ValueError, match=r'c.jsonl:1 needs "answers" \(a non-empty list of strings\) or "captions"'):
        load_examples(str(p), "captioning")
    h = tmp_path / "train.jsonl"  # Hateful Memes' own format
    h.write_text('{"id": 42953, "img": "img/42953.png", "label": 0, "text": "its their character"}\n'
                 '{"id": 23058, "img": "img/23058.png", "label": 1, "text": "don\'t be afraid"}\n')
    ex = load_examples(str(h), "hateful_memes")
    assert [(e.answers, e.text, e.extra["id"]) for e in ex] == [
        (["no"], "its their character", 42953), (["yes"], "don't be afraid", 23058)]
    assert ex[0].image == str(tmp_path / "img" / "42953.png")
    for bad, message in [('{"img": "a.png", "label": 2, "text": "t"}', 'needs a "label" of 0'),
                         ('{"img": "a.png", "label": 1.0, "text": "t"}', 'needs a "label" of 0'),
                         ('{"img": "a.png", "label": 1}', "needs its meme's \"text\" string, got None"),
                         ('{"image": "a.png", "label": 1, "text": "t"}', 'needs an "img"')]:
        h.write_text(bad + "\n")
        with pytest.raises(ValueError, match="train.jsonl:1 " + message if "img" in message else message):
            load_examples(str(h), "hateful_memes")


def test_load_karpathy_splits_as_open_flamingo(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_1.jpg", "cocoid": 1, "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "a brown dog"}]},
        {"filepath": "train2014", "filename": "COCO_train2014_2.jpg", "cocoid": 2, "split": "train",
         "sentences": [{"raw": "A cat"}]},
        {"filepath": "val2014", "filename": "COCO_val2014_3.jpg", "cocoid": 3, "split": "restval",
         "sentences": [{"raw": "A bus"}]},
        {"filename": "4.jpg", "split": "test", "sentences": [{"raw": "a man"}]},  # Flickr30k: no filepath
    ]}
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps(data))
    test, train = load_karpathy(str(p), "/coco", "test"), load_karpathy(str(p), "/coco", "train")
    assert [(e.image, e.answers, e.extra["image_id"]) for e in test] == [
        ("/coco/val2014/COCO_val2014_1.jpg", ["A dog.", "a brown dog"], 1), ("/coco/4.jpg", ["a man"], "4")]
    assert [e.extra["image_id"] for e in train] == [2]  # restval is neither split, as in open_flamingo
    with pytest.raises(ValueError, match=r"no images in split 'val'; its splits are \['restval', 'test', 'train'\]"):
        load_karpathy(str(p), "/coco", "val")
    p.write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"images\[0\] needs a \"filename\" and \"sentences\""):
        load_karpathy(str(p), "/coco", "test")
    p.write_text("[]")
    with pytest.raises(ValueError, match="not a Karpathy split file"):
        load_karpathy(str(p), "/coco", "test")


def test_cli_captioning_on_a_karpathy_file(tmp_path, world, capsys):
    """A saved model, a Karpathy split file and its images folder: the test images are the queries,
    the train images the demonstrations, CIDEr the score."""
    from PIL import Image

    from fastflamingo.cli import main
    model, tok = world[:2]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "images" / "val2014").mkdir(parents=True)
    images = []
    for i, e in enumerate(_captioned(synthetic.examples(8, "color", seed=51))):
        pixels = (e.image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(tmp_path / "images" / "val2014" / f"{i}.png")
        images.append({"filepath": "val2014", "filename": f"{i}.png", "cocoid": i, "split": "test" if i < 4 else "train",
                       "sentences": [{"raw": c} for c in e.answers]})
    (tmp_path / "k.json").write_text(json.dumps({"images": images}))
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "captioning", "--karpathy",
                 str(tmp_path / "k.json"), "--image-dir", str(tmp_path / "images"), "--shots", "0", "2",
                 "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert "cider" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    rs = report["results"]["captioning"]
    assert [r["shots"] for r in rs] == [0, 2] and all(len(r["predictions"]) == 4 for r in rs)
    assert rs[1]["score"] == pytest.approx(100 * cider(rs[1]["predictions"], rs[1]["references"]))
    official = json.loads((out / "captioning_results_2shot.json").read_text())  # COCO's results format
    assert official == [{"image_id": i, "caption": p} for i, p in enumerate(rs[1]["predictions"])]


@pytest.mark.parametrize("args, message", [
    (["--model", "m", "--task", "vqa", "--karpathy", "k.json"], "use it with --task captioning, not --task vqa"),
    (["--model", "m", "--task", "captioning", "--karpathy", "k.json"], "--karpathy needs --image-dir"),
    (["--model", "m", "--task", "captioning", "--karpathy", "k.json", "--queries", "q"], "drop --queries and --support"),
    (["--model", "m", "--task", "captioning"], "needs --queries and --support (JSON-lines files), or --karpathy"),
    (["--model", "m", "--queries", "q", "--support", "s", "--image-dir", "."], "--image-dir is for --karpathy"),
    (["--model", "m", "--task", "hateful_memes", "--queries", "q", "--support", "s", "--max-new-tokens", "3"],
     "--max-new-tokens is for the generated tasks"),
    (["--model", "m", "--task", "vqa", "--queries", "q", "--support", "s", "--class-names-file", "c"],
     "--class-names-file is for classification and hateful_memes"),
    (["--synthetic", "--karpathy", "k.json"], "--karpathy: not used with --synthetic"),
    (["--model", "m", "--task", "vqa", "--queries", "q", "--support", "s", "--prompt-ensembling"],
     "--prompt-ensembling averages class rankings: it is for classification and hateful_memes, not --task vqa"),
])
def test_cli_captioning_bad_input_is_one_line_naming_it(capsys, args, message):
    from fastflamingo.cli import main
    assert main(["evaluate"] + args) == 2
    assert message in capsys.readouterr().err
