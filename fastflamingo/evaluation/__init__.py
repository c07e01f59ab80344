"""Few-shot evaluation: open_flamingo's protocol (prompts, random demonstrations, beam search, the
official VQA accuracy, COCO's CIDEr, Hateful Memes' ROC AUC) on fastflamingo's caches, and a
synthetic few-shot world that trains and evaluates a tiny Flamingo on a CPU
(``fastflamingo evaluate --synthetic``)."""
from .harness import Result, evaluate
from .metrics import (cider, exact_match, normalize_vqa_answer, postprocess_caption, postprocess_vqa, roc_auc,
                      vqa_accuracy)
from .prompts import TASKS, Example, few_shot_text, load_examples, load_karpathy

__all__ = ["TASKS", "Example", "Result", "cider", "evaluate", "exact_match", "few_shot_text", "load_examples",
           "load_karpathy", "normalize_vqa_answer", "postprocess_caption", "postprocess_vqa", "roc_auc",
           "vqa_accuracy"]
