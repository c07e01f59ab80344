"""The benchmarks' data files as published: VQAv2 / VizWiz / TextVQA question and annotation
files read as open_flamingo's ``VQADataset`` reads them, class folders as torchvision's
``ImageFolder`` reads them (checked against both, run here), the command line on each, and every
malformed file refused with what is wrong named."""
import json

import pytest

from fastflamingo.evaluation import evaluate, load_image_folder, load_vqa, synthetic


def _png(path, example=None, seed=0):
    """A real image file (JPEG for .jpg names: open_flamingo's loader opens them with PIL)."""
    from PIL import Image
    if example is None:
        example = synthetic.examples(1, "color", seed=seed)[0]
    pixels = (example.image[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


TYPES = [("other", "what is"), ("yes/no", "is the"), ("number", "how many")]  # VQAv2's answer types


def _vqa_files(tmp_path, image_ids, dataset="vqav2", split="val2014", order=None, examples=None):
    """Questions and annotations in VQAv2's layout, and the images where ``dataset`` looks."""
    name = {"vqav2": lambda i: f"COCO_{split}_{i:012d}.jpg", "vizwiz": str, "textvqa": lambda i: f"{i}.jpg"}[dataset]
    images = tmp_path / "images" / split
    questions, annotations = [], []
    for n, image_id in enumerate(image_ids):
        _png(images / name(image_id), None if examples is None else examples[n], seed=n)
        questions.append({"question_id": 100 + n, "image_id": image_id, "question": f"what is {n} ?"})
        annotations.append({"question_id": 100 + n, "image_id": image_id, "answer_type": TYPES[n % 3][0],
                            "question_type": TYPES[n % 3][1],
                            "answers": [{"answer": f"a{n}", "answer_id": k} for k in range(1, 4)]})
    if order is not None:
        annotations = [annotations[i] for i in order]
    q, a = tmp_path / f"{dataset}_questions.json", tmp_path / f"{dataset}_annotations.json"
    header = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": split, "license": {}}
    q.write_text(json.dumps({**header, "questions": questions}))
    a.write_text(json.dumps({**header, "annotations": annotations}))
    return str(q), str(a), str(images)


@pytest.mark.parametrize("dataset, image_ids", [("vqav2", [42, 7, 42]), ("vizwiz", ["VizWiz_val_00000001.jpg",
                                                                                    "VizWiz_val_00000002.jpg"]),
                                                ("textvqa", ["0054c91397f2fe05", "005635e119b9f32f"])])
def test_load_vqa_reads_what_open_flamingo_reads(tmp_path, dataset, image_ids):
    from open_flamingo.eval.eval_datasets import VQADataset
    q, a, images = _vqa_files(tmp_path, image_ids, dataset)
    ours = load_vqa(q, a, images, dataset)
    theirs = VQADataset(images, q, a, is_train=False, dataset_name=dataset)
    assert len(ours) == len(theirs) == len(image_ids)
    for n, ex in enumerate(ours):
        item = theirs[n]
        assert ex.image == theirs.get_img_path(theirs.questions[n])
        assert (ex.question, ex.answers, ex.extra["question_id"]) == (item["question"], item["answers"],
                                                                        item["question_id"])
    assert ours[0].answers == ["a0", "a0", "a0"] and ours[0].extra["image_id"] == image_ids[0]
    assert [(e.extra["answer_type"], e.extra["question_type"]) for e in ours] == [TYPES[n % 3] for n in range(len(ours))]


def test_vqa_accuracy_and_its_breakdown_equal_the_official_evaluation(tmp_path, world, capsys):
    """The whole VQAv2 path, files to score: the harness's accuracy, per answer type and per
    question type, equals the official evaluation's (open_flamingo's copy of it, run on the same
    files and a results file of the same predictions). The references are written after a first
    run so that some answers match the predictions fully, some partly, some after the official
    normalisation (case, punctuation), some not at all."""
    from open_flamingo.eval.vqa_metric import VQA, VQAEval
    model, tok, _, support = world
    examples = synthetic.examples(9, "shape", seed=12)
    q, a, images = _vqa_files(tmp_path, list(range(1, 10)), examples=examples)

    from fastflamingo.inputs import image_transform
    transform = image_transform("open_flamingo", model.config.vision.image_size)  # what the command line uses

    def run():
        return evaluate(model, tok, load_vqa(q, a, images), support, task="vqa", shots=1, num_beams=1,
                        max_new_tokens=2, seed=3, image_processor=transform, progress=False)[0]
    first = run()
    annotations = json.loads(open(a).read())
    for n, ann in enumerate(annotations["annotations"]):
        p, other = first.predictions[n], [f"w{k}" for k in range(10)]
        matching = {0: [p] * 10, 1: [p] * 2, 2: [], 3: [p.upper() + "."] * 3}[n % 4] if p.strip() else []
        ann["answers"] = [{"answer": x, "answer_id": k + 1} for k, x in enumerate((matching + other)[:10])]
    open(a, "w").write(json.dumps(annotations))
    r = run()
    assert r.predictions == first.predictions  # the references do not enter the prompts
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question_id": 100 + n, "answer": p} for n, p in enumerate(r.predictions)]))
    vqa = VQA(a, q)
    official = VQAEval(vqa, vqa.loadRes(str(results), q), n=2)
    official.evaluate()
    capsys.readouterr()
    assert 0 < official.accuracy["overall"] < 100, official.accuracy  # matches and misses both present
    assert r.score == pytest.approx(official.accuracy["overall"], abs=0.006)
    for ours, theirs in ((r.breakdown["answer_type"], official.accuracy["perAnswerType"]),
                         (r.breakdown["question_type"], official.accuracy["perQuestionType"])):
        assert sorted(ours) == sorted(theirs)
        assert all(ours[t] == pytest.approx(theirs[t], abs=0.006) for t in theirs), (ours, theirs)


def test_load_vqa_matches_answers_by_question_id(tmp_path):
    """open_flamingo pairs the n-th annotation with the n-th question; the files of one split
    are in the same order, but a pair that is not must not be scored against the wrong answers."""
    q, a, images = _vqa_files(tmp_path, [1, 2, 3], order=[2, 0, 1])
    assert [e.answers[0] for e in load_vqa(q, a, images)] == ["a0", "a1", "a2"]


def test_load_vqa_refuses_bad_files(tmp_path):
    q, a, images = _vqa_files(tmp_path, [1, 2])
    with pytest.raises(ValueError, match=r"dataset must be one of \('vqav2', 'vizwiz', 'textvqa'\), "
                                         r"got 'ok_vqa' \(OK-VQA: dataset='vqav2'"):
        load_vqa(q, a, images, "ok_vqa")
    with pytest.raises(ValueError, match="image_dir must end in train2014, val2014 or test2015, got"):
        load_vqa(q, a, str(tmp_path / "images"))
    with pytest.raises(FileNotFoundError, match="no VQA annotations file"):
        load_vqa(q, str(tmp_path / "none.json"), images)
    with pytest.raises(ValueError, match="is not a VQA questions file: it needs a \"questions\" list"):
        load_vqa(a, a, images)
    (tmp_path / "images" / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image file\(s\) of .* are missing, the first \['.*COCO_val2014_000000000002"
                                                r"\.jpg'\]: is the image folder the right one\?"):
        load_vqa(q, a, images)
    annotations = json.loads(open(a).read())
    json.dump({"annotations": annotations["annotations"][:1]}, open(a, "w"))
    with pytest.raises(ValueError, match="question 101 has no answers in .*: are they the files of the same split"):
        load_vqa(q, a, images)
    json.dump({"annotations": [{"question_id": 100, "answers": []}]}, open(a, "w"))
    with pytest.raises(ValueError, match=r"annotations\[0\] needs a \"question_id\" and \"answers\""):
        load_vqa(q, a, images)
    json.dump({"questions": [{"question_id": 100, "image_id": "x", "question": "q"}]}, open(q, "w"))
    json.dump({"annotations": [{"question_id": 100, "answers": [{"answer": "y"}]}]}, open(a, "w"))
    with pytest.raises(ValueError, match=r"questions\[0\] has image_id 'x'; VQAv2's are integers"):
        load_vqa(q, a, images)
    json.dump({"questions": [{"question_id": 100, "question": "q"}]}, open(q, "w"))
    with pytest.raises(ValueError, match=r"questions\[0\] needs a \"question_id\", an \"image_id\" and a \"question\""):
        load_vqa(q, a, images)
    open(q, "w").write("{not json")
    with pytest.raises(ValueError, match="is not JSON"):
        load_vqa(q, a, images)


def _class_folders(root, layout):
    """``{folder: [relative image paths]}`` written as image files under ``root``."""
    for folder, files in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for n, f in enumerate(files):
            _png(root / folder / f, seed=n)
    return str(root)


def test_load_image_folder_reads_what_imagefolder_reads(tmp_path):
    from torchvision.datasets import ImageFolder
    root = _class_folders(tmp_path / "val", {
        "n02": ["b.png", "a.JPEG", "sub/c.png"], "n01": ["z.jpg"], "n10": ["x.webp"]})
    (tmp_path / "val" / "n01" / "notes.txt").write_text("not an image")
    examples, names = load_image_folder(root, ["tench", "goldfish", "shark"])
    theirs = ImageFolder(root)
    assert theirs.classes == ["n01", "n02", "n10"] and names == ["tench", "goldfish", "shark"]
    assert [(e.image, names.index(e.answers[0])) for e in examples] == theirs.samples
    assert [e.extra["folder"] for e in examples] == ["n01", "n02", "n02", "n02", "n10"]
    examples, names = load_image_folder(root)
    assert names == ["n01", "n02", "n10"] and examples[0].answers == ["n01"]


def test_load_image_folder_refuses_bad_folders(tmp_path):
    root = _class_folders(tmp_path / "val", {"cat": ["a.png"], "dog": ["b.png"]})
    with pytest.raises(ValueError, match=r"3 class names for the 2 class folders of .* \(the first \['cat', 'dog'\]\): "
                                         "give one name per folder, in the folders' sorted order"):
        load_image_folder(root, ["a", "b", "c"])
    (tmp_path / "val" / "emu").mkdir()
    (tmp_path / "val" / "emu" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"class folders of .* hold no images .*: \['emu'\]"):
        load_image_folder(root)
    with pytest.raises(FileNotFoundError, match="no image folder"):
        load_image_folder(str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="has no class folders"):
        load_image_folder(str(tmp_path / "flat"))


def test_classification_refuses_labels_no_class_name_can_match(world):
    """A query labelled outside the class names could never be right: an error naming it, not a
    silently lower accuracy; nor can a ranking tell two copies of a name apart."""
    model, tok, queries, support = world
    names = sorted({q.answers[0] for q in queries})
    with pytest.raises(ValueError, match=r"classification queries' labels must be class names .*, got \['"):
        evaluate(model, tok, queries, support, task="classification", class_names=names[1:], shots=0, progress=False)
    with pytest.raises(ValueError, match=r"class names must be distinct .*: \['" + names[0]):
        evaluate(model, tok, queries, support, task="classification", class_names=names + names[:1], shots=0,
                 progress=False)
    # labels match class names as the accuracy does: stripped (any case too, which this world's
    # vocabulary cannot show: it reads every upper-cased name as <unk>, names that cannot be ranked)
    rs = evaluate(model, tok, queries, support, task="classification", class_names=[" " + n + " " for n in names],
                  shots=0, text_demos_at_zero=0, progress=False)
    assert len(rs[0].predictions) == len(queries)


# ------------------------------------------------------------------ command line
def test_cli_vqav2_files_and_class_folders(tmp_path, world, capsys):
    """The saved model on VQAv2-layout files (queries and support each a questions file, an
    annotations file and a COCO image folder), then on class folders (the folders the names)."""
    from fastflamingo.cli import main
    model, tok = world[:2]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    q_files = _vqa_files(tmp_path / "val", [1, 2, 3], examples=synthetic.examples(3, "shape", seed=5))
    s_files = _vqa_files(tmp_path / "train", [4, 5], split="train2014", examples=synthetic.examples(2, "shape", seed=6))
    out = tmp_path / "out"
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "vqa", "--vqa-format", "vqav2",
                 "--queries", q_files[0], "--queries-annotations", q_files[1], "--queries-images", q_files[2],
                 "--support", s_files[0], "--support-annotations", s_files[1], "--support-images", s_files[2],
                 "--shots", "0", "1", "--max-new-tokens", "2", "--out", str(out)]) == 0
    assert "vqa: 3 queries, demonstrations from 2" in capsys.readouterr().out
    rs = json.loads((out / "results.json").read_text())["results"]["vqa"]
    assert [r["shots"] for r in rs] == [0, 1]
    assert rs[0]["references"] == [["a0"] * 3, ["a1"] * 3, ["a2"] * 3] and len(rs[1]["predictions"]) == 3
    assert set(rs[1]["breakdown"]["answer_type"]) == {"other", "yes/no", "number"}
    official = json.loads((out / "vqa_results_1shot.json").read_text())  # the VQA results format
    assert official == [{"question_id": 100 + n, "answer": p} for n, p in enumerate(rs[1]["predictions"])]

    layout = {}
    for split, seed in (("val", 7), ("train", 8)):
        for n, ex in enumerate(synthetic.examples(6, "color", seed=seed)):
            _png(tmp_path / "folders" / split / ex.answers[0] / f"{n}.png", ex)
            layout.setdefault(split, set()).add(ex.answers[0])
    for missing in layout["val"] ^ layout["train"]:  # both splits need the same class folders
        for split in ("val", "train"):
            if not (tmp_path / "folders" / split / missing).exists():
                _png(tmp_path / "folders" / split / missing / "extra.png", seed=3)
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "classification",
                 "--queries", str(tmp_path / "folders" / "val"), "--support", str(tmp_path / "folders" / "train"),
                 "--shots", "0", "2", "--out", str(tmp_path / "out2")]) == 0
    rs = json.loads((tmp_path / "out2" / "results.json").read_text())["results"]["classification"]
    names = sorted(p.name for p in (tmp_path / "folders" / "val").iterdir())
    assert all(p in names for r in rs for p in r["predictions"])
    assert [r["references"] for r in rs][0] == [[p.parent.name] for name in names
                                                for p in sorted((tmp_path / "folders" / "val" / name).iterdir())]


def test_a_split_without_annotations_gets_predictions_for_the_evaluation_server(tmp_path, world, capsys):
    """VQAv2 test-dev has questions and images (test2015) but no published answers: without
    --queries-annotations the queries are answered, not scored, and vqa_results_{k}shot.json
    (what the server takes) holds the same predictions as a run with annotations made; the
    support still needs its answers, and a mix of queries with and without references is refused."""
    from fastflamingo.cli import main
    model, tok = world[:2]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    q_files = _vqa_files(tmp_path / "dev", [1, 2, 3], split="test2015", examples=synthetic.examples(3, "shape", seed=5))
    s_files = _vqa_files(tmp_path / "train", [4, 5], split="train2014", examples=synthetic.examples(2, "shape", seed=6))
    queries = load_vqa(q_files[0], None, q_files[2])
    assert [q.answers for q in queries] == [None] * 3 and queries[2].image.endswith("COCO_test2015_000000000003.jpg")
    common = ["evaluate", "--model", str(tmp_path / "model"), "--task", "vqa", "--vqa-format", "vqav2",
              "--queries", q_files[0], "--queries-images", q_files[2], "--support", s_files[0],
              "--support-annotations", s_files[1], "--support-images", s_files[2], "--shots", "0", "1",
              "--max-new-tokens", "2"]
    assert main(common + ["--out", str(tmp_path / "dev_out")]) == 0
    out = capsys.readouterr().out
    assert "0-shot: predictions only (no references)" in out and "3 queries with no references" in out
    rs = json.loads((tmp_path / "dev_out" / "results.json").read_text())["results"]["vqa"]
    assert [(r["score"], r["references"], r["breakdown"]) for r in rs] == [(None, None, None)] * 2
    assert not (tmp_path / "dev_out" / "few_shot.png").exists()  # nothing to plot
    (tmp_path / "scored").mkdir()
    (tmp_path / "scored" / "vqa_results_8shot.json").write_text("[]")  # an earlier run's, of other shots
    assert main(common + ["--queries-annotations", q_files[1], "--out", str(tmp_path / "scored")]) == 0
    assert sorted(p.name for p in (tmp_path / "scored").glob("vqa_results_*")) == [
        "vqa_results_0shot.json", "vqa_results_1shot.json"]  # (this run's only: the 8-shot one would be read as its)
    scored = json.loads((tmp_path / "scored" / "results.json").read_text())["results"]["vqa"]
    for r, s in zip(rs, scored):
        assert r["predictions"] == s["predictions"] and s["score"] is not None
        official = json.loads((tmp_path / "dev_out" / f"vqa_results_{r['shots']}shot.json").read_text())
        assert official == [{"question_id": 100 + n, "answer": p} for n, p in enumerate(r["predictions"])]
    # the whole test2015 questions file: every question answered, "" where not run (VQAv2's server wants them all)
    everything = json.loads((tmp_path / "dev" / "vqav2_questions.json").read_text())
    everything["questions"] += [{"question_id": 900 + n, "image_id": 50 + n, "question": "?"} for n in range(2)]
    (tmp_path / "test2015_questions.json").write_text(json.dumps(everything))
    assert main(common + ["--out", str(tmp_path / "filled"), "--vqa-all-questions",
                          str(tmp_path / "test2015_questions.json")]) == 0
    filled = json.loads((tmp_path / "filled" / "vqa_results_1shot.json").read_text())
    assert filled == [{"question_id": 100 + n, "answer": p} for n, p in enumerate(rs[1]["predictions"])] + [
        {"question_id": 900, "answer": ""}, {"question_id": 901, "answer": ""}]
    capsys.readouterr()
    labelled, pixels = load_vqa(*q_files), model.image_processor()
    with pytest.raises(ValueError, match=r"queries\[0\] has no references \(answers=None\) but queries\[1\] has: "
                                         r"1 of 3 queries have none"):
        evaluate(model, tok, queries[:1] + labelled[1:], labelled, task="vqa", shots=0, text_demos_at_zero=0,
                 image_processor=pixels)
    with pytest.raises(ValueError, match=r"support\[0\] has no references \(answers=None\), but demonstrations "
                                         r"show their answers"):
        evaluate(model, tok, labelled, queries, task="vqa", shots=1, image_processor=pixels)
    assert evaluate(model, tok, queries, queries, task="vqa", shots=0, text_demos_at_zero=0, max_new_tokens=2,
                    image_processor=pixels, progress=False)[0].score is None  # (a support never shown needs no answers)


def test_vizwiz_results_are_keyed_by_image_as_its_server_takes_them(tmp_path, world, capsys):
    """VizWiz's evaluation server takes [{"image": file name, "answer"}] (open_flamingo's
    fill_vizwiz_test_json writes that): the file was keyed by question_id, which it cannot read."""
    from fastflamingo.cli import main
    model, tok = world[:2]
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    names = ["VizWiz_test_00000001.jpg", "VizWiz_test_00000002.jpg"]
    q = _vqa_files(tmp_path / "test", names, dataset="vizwiz", split="test", examples=synthetic.examples(2, "shape", seed=5))
    s = _vqa_files(tmp_path / "train", ["VizWiz_train_00000001.jpg", "VizWiz_train_00000002.jpg"], dataset="vizwiz",
                   split="train", examples=synthetic.examples(2, "shape", seed=6))
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "vqa", "--vqa-format", "vizwiz",
                 "--queries", q[0], "--queries-images", q[2], "--support", s[0], "--support-annotations", s[1],
                 "--support-images", s[2], "--shots", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "out")]) == 0
    rs = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["vqa"]
    official = json.loads((tmp_path / "out" / "vqa_results_1shot.json").read_text())
    assert official == [{"image": name, "answer": p} for name, p in zip(names, rs[0]["predictions"])]


def test_cli_class_folders_must_match(tmp_path, capsys):
    from fastflamingo.cli import main
    _class_folders(tmp_path / "val", {"cat": ["a.png"], "dog": ["b.png"]})
    _class_folders(tmp_path / "train", {"cat": ["a.png"], "emu": ["b.png"]})
    (tmp_path / "model").mkdir()
    assert main(["evaluate", "--model", str(tmp_path / "model"), "--task", "classification",
                 "--queries", str(tmp_path / "val"), "--support", str(tmp_path / "train")]) == 2
    assert "must hold the same class folders; only in one: ['dog', 'emu']" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--task", "captioning", "--vqa-format", "vqav2"], "use it with --task vqa, not --task captioning"),
    (["--vqa-format", "vqav2"], "--vqa-format needs --queries-images, --support-annotations, --support-images"),
    (["--queries-images", "."], "--queries-images: only used with --vqa-format"),
    (["--vqa-format", "textvqa", "--queries-annotations", "a", "--queries-images", "/no/dir",
      "--support-annotations", "a", "--support-images", "."], "--queries-images: no folder '/no/dir'"),
    (["--task", "vqa", "--queries", "."], "--queries is a folder: folders of class folders are for --task "
                                          "classification"),
    (["--task", "classification", "--queries", ".", "--class-names-file", "c"], "--queries is a folder"),
])
def test_cli_data_bad_input_is_one_line_naming_it(capsys, args, message):
    from fastflamingo.cli import main
    base = ["evaluate", "--model", "m"]
    if "--queries" not in args:
        base += ["--queries", "q.json", "--support", "s.json"]
    elif "--support" not in args:
        base += ["--support", "s.json"]
    assert main(base + args) == 2
    assert message in capsys.readouterr().err


def test_synthetic_refuses_vqa_files(capsys):
    from fastflamingo.cli import main
    assert main(["evaluate", "--synthetic", "--vqa-format", "vqav2"]) == 2
    assert "--vqa-format: not used with --synthetic" in capsys.readouterr().err
