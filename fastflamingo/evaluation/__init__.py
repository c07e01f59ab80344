"""Few-shot evaluation: open_flamingo's protocol (prompts, random demonstrations, beam search,
the official VQA accuracy) on fastflamingo's caches, and a synthetic few-shot world that trains
and evaluates a tiny Flamingo on a CPU (``fastflamingo evaluate --synthetic``)."""
from .harness import Result, evaluate
from .metrics import exact_match, normalize_vqa_answer, postprocess_vqa, vqa_accuracy
from .prompts import Example, few_shot_text, load_examples

__all__ = ["Example", "Result", "evaluate", "exact_match", "few_shot_text", "load_examples",
           "normalize_vqa_answer", "postprocess_vqa", "vqa_accuracy"]
