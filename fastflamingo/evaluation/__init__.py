"""Few-shot evaluation: open_flamingo's protocol (prompts, random demonstrations, beam search, the
official VQA accuracy, COCO's CIDEr, Hateful Memes' ROC AUC) on fastflamingo's caches, the
benchmarks' data files as published (:mod:`.datasets`), and a synthetic few-shot world that trains
and evaluates a tiny Flamingo on a CPU (``fastflamingo evaluate --synthetic``)."""
from .datasets import VQA_DATASETS, load_examples, load_image_folder, load_karpathy, load_vqa
from .harness import Result, evaluate
from .metrics import (cider, exact_match, normalize_vqa_answer, postprocess_caption, postprocess_vqa, roc_auc,
                      vqa_accuracy)
from .prompts import TASKS, Example, few_shot_text

__all__ = ["TASKS", "VQA_DATASETS", "Example", "Result", "cider", "evaluate", "exact_match", "few_shot_text",
           "load_examples", "load_image_folder", "load_karpathy", "load_vqa", "normalize_vqa_answer",
           "postprocess_caption", "postprocess_vqa", "roc_auc", "vqa_accuracy"]
