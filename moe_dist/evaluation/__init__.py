"""Evaluation of trained models: zero-shot classification, image-text retrieval, contrastive loss.

    metrics.py  pure metric functions over tensors (accuracy, macro P/R/F1, R@K, ranks) and the confusion PNG
    zeroshot.py class names and templates, labels, the text classifier
    collect.py  what one rank's pass records, gathered from all ranks in canonical order
    tasks.py    ``evaluate(model, tokenizer, spec, tasks=...)``: the pass, the gather, the metrics

``moe-dist eval`` (moe_dist/cli/eval.py) and the trainer's periodic eval both call ``evaluate``.
"""

from .metrics import retrieval_metrics, save_confusion_png, zeroshot_metrics
from .tasks import TASKS, EvalResult, evaluate, eval_routing, parse_tasks
from .zeroshot import ClassSet, load_classes

__all__ = ["TASKS", "ClassSet", "EvalResult", "eval_routing", "evaluate", "load_classes", "parse_tasks",
           "retrieval_metrics", "save_confusion_png", "zeroshot_metrics"]
