"""The metrics of few-shot evaluation, as the benchmarks' scripts compute them.

:func:`vqa_accuracy` is the VQA challenge's accuracy (VQAv2, OK-VQA, VizWiz, TextVQA): an answer
scores ``min(1, matches / 3)`` against each leave-one-out subset of the ten human answers, and
the scores are averaged. The prediction is normalized by :func:`normalize_vqa_answer`, the
official script's ``processPunctuation`` and ``processDigitArticle``, quirks included (the
lowercase text never meets the table's capitalised keys "Im", "Ive", "Id've"; at most 32 periods
are stripped: the script passes ``re.UNICODE`` where ``re.sub`` takes its count). The human
answers are normalized two ways (``script=``): ``"open_flamingo"`` (the default), as
open_flamingo's copy of the script does, fully, the numbers OpenFlamingo published; ``"official"``,
as the VQA challenge's own ``vqaEval.py`` (and its test server) does: punctuation only, and only
where the answers disagree. They differ only for answers not already normalized (capitals,
number words, articles: VizWiz, TextVQA, a user's own files; VQAv2's annotations are).
``tests/test_evaluation.py`` checks the first against open_flamingo's copy, the second against
the official logic.
"""
from __future__ import annotations

import re

_CONTRACTIONS = {
    'aint': "ain't", 'arent': "aren't", 'cant': "can't", 'couldve': "could've", 'couldnt': "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", 'didnt': "didn't", 'doesnt': "doesn't",
    'dont': "don't", 'hadnt': "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", 'hasnt': "hasn't",
    'havent': "haven't", 'hed': "he'd", "hed've": "he'd've", "he'dve": "he'd've", 'hes': "he's",
    'howd': "how'd", 'howll': "how'll", 'hows': "how's", "Id've": "I'd've", "I'dve": "I'd've", 'Im': "I'm",
    'Ive': "I've", 'isnt': "isn't", 'itd': "it'd", "itd've": "it'd've", "it'dve": "it'd've", 'itll': "it'll",
    "let's": "let's", 'maam': "ma'am", 'mightnt': "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", 'mightve': "might've", 'mustnt': "mustn't", 'mustve': "must've",
    'neednt': "needn't", 'notve': "not've", 'oclock': "o'clock", 'oughtnt': "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", 'shant': "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", 'shouldve': "should've",
    'shouldnt': "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": 'somebodyd', "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    'somebodyll': "somebody'll", 'somebodys': "somebody's", 'someoned': "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", 'someonell': "someone'll",
    'someones': "someone's", 'somethingd': "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", 'somethingll': "something'll", 'thats': "that's", 'thered': "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", 'therere': "there're", 'theres': "there's",
    'theyd': "they'd", "theyd've": "they'd've", "they'dve": "they'd've", 'theyll': "they'll",
    'theyre': "they're", 'theyve': "they've", 'twas': "'twas", 'wasnt': "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", 'weve': "we've", 'werent': "weren't", 'whatll': "what'll", 'whatre': "what're",
    'whats': "what's", 'whatve': "what've", 'whens': "when's", 'whered': "where'd", 'wheres': "where's",
    'whereve': "where've", 'whod': "who'd", "whod've": "who'd've", "who'dve": "who'd've", 'wholl': "who'll",
    'whos': "who's", 'whove': "who've", 'whyll': "why'll", 'whyre': "why're", 'whys': "why's",
    'wont': "won't", 'wouldve': "would've", 'wouldnt': "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", 'yall': "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", 'youd': "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", 'youll': "you'll", 'youre': "you're", 'youve': "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: a lookahead, as in the official script
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out, count=re.UNICODE)  # sic: the script's count of 32


def _digits_and_articles(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """An answer as the VQA script compares it: whitespace, punctuation, number words, articles
    and contractions normalized."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


VQA_SCRIPTS = ("open_flamingo", "official")


def vqa_accuracy(prediction: str, answers: list[str], script: str = "open_flamingo") -> float:
    """The VQA accuracy (0 to 1) of one predicted answer against the human answers (ten in VQAv2):
    the mean over each answer left out of ``min(1, #other answers equal to the prediction / 3)``.
    ``script``: how the human answers are normalized (:data:`VQA_SCRIPTS`, the module's text)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer, got none")
    if script not in VQA_SCRIPTS:
        raise ValueError(f"script={script!r} is not one of {VQA_SCRIPTS}")
    pred = normalize_vqa_answer(prediction)
    if script == "open_flamingo":
        refs = [normalize_vqa_answer(a) for a in answers]
    else:  # vqaEval.py: stripped only as its JSON loader leaves them, punctuation where they disagree
        refs = [_punctuation(a) for a in answers] if len(set(answers)) > 1 else list(answers)
    equal = [r == pred for r in refs]
    total = sum(equal)
    return sum(min(1.0, (total - e) / 3) for e in equal) / len(refs)


def postprocess_vqa(generated: str) -> str:
    """The answer in a generated continuation, as open_flamingo's evaluation cuts it: the text
    before any "Question", "Answer" or "Short" (the model starting the next demonstration), and
    before the first ", "."""
    return re.split(", ", re.split("Question|Answer|Short", generated, maxsplit=1)[0], maxsplit=1)[0]


def exact_match(prediction: str, answers: list[str]) -> float:
    """1.0 when the prediction, stripped and lowercased, equals one of the answers so treated."""
    if not answers:
        raise ValueError("exact_match needs at least one reference answer, got none")
    p = prediction.strip().lower()
    return float(any(p == a.strip().lower() for a in answers))


def postprocess_caption(generated: str) -> str:
    """The caption in a generated continuation, as open_flamingo's captioning evaluation cuts it:
    the text before any "Output" (the model starting the next demonstration), double quotes removed."""
    return generated.split("Output", 1)[0].replace('"', "")


def check_cider_available():
    """Raises the error :func:`cider` would raise for a missing pycocoevalcap or Java."""
    _pycocoevalcap()


def _pycocoevalcap():
    import shutil
    try:
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as e:
        raise ImportError("captioning's CIDEr is the COCO caption evaluation's (pycocoevalcap), which is not "
                          "installed: pip install 'fastflamingo[eval]' (or pip install pycocoevalcap)") from e
    if shutil.which("java") is None:
        raise RuntimeError("captioning's CIDEr tokenizes captions with the Stanford PTB tokenizer, a Java program "
                           "(as the COCO caption evaluation does), and no `java` is on the PATH: install a Java "
                           "runtime (e.g. apt install default-jre) and run again")
    return PTBTokenizer, Cider


def cider(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus CIDEr-D (its usual scale: 0 to about 10; papers report it x 100) of one caption per
    image against that image's reference captions, exactly as the COCO caption evaluation
    (pycocoevalcap, which open_flamingo's ``compute_cider`` runs) computes it: every caption
    tokenized by the Stanford PTB tokenizer (lowercased, punctuation tokens dropped), then
    CIDEr-D's tf-idf n-gram cosines (n = 1 to 4, the document frequencies over these references,
    sigma = 6 length penalty, clipped counts). A corpus metric: the score of a caption depends on
    all the references, so it is not a mean of per-caption scores computed apart."""
    if len(predictions) != len(references):
        raise ValueError(f"cider needs one prediction per image, got {len(predictions)} predictions "
                         f"and {len(references)} reference lists")
    if not predictions:
        raise ValueError("cider needs at least one image, got none")
    empty = [i for i, r in enumerate(references) if not r]
    if empty:
        raise ValueError(f"cider needs reference captions for every image; images {empty[:10]} have none")
    tokenizer_cls, cider_cls = _pycocoevalcap()
    tokenizer = tokenizer_cls()
    refs = tokenizer.tokenize({i: [{"caption": c} for c in r] for i, r in enumerate(references)})
    preds = tokenizer.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    score, _ = cider_cls().compute_score(refs, preds)
    return float(score)


def roc_auc(labels: list[bool], scores: list[float]) -> float:
    """The area under the ROC curve (0 to 1) of ``scores`` for the binary ``labels``: the chance
    that a random positive scores above a random negative, ties counting one half (what
    scikit-learn's ``roc_auc_score``, run by open_flamingo's Hateful Memes evaluation, computes)."""
    if len(labels) != len(scores):
        raise ValueError(f"roc_auc needs a score per label, got {len(scores)} scores and {len(labels)} labels")
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        raise ValueError(f"roc_auc needs positive and negative examples, got {pos} positive and {neg} negative")
    bad = [i for i, s in enumerate(scores) if s != s]
    if bad:
        raise ValueError(f"roc_auc got NaN scores at {bad[:10]}")
    # Mann-Whitney U: the rank sum of the positives, tied scores sharing their mean rank
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1
        rank_sum += mean_rank * sum(1 for t in order[i:j + 1] if labels[t])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)
