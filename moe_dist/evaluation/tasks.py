"""``evaluate``: zero-shot classification, image-text retrieval and contrastive loss over a full eval set.

Outline:
    1. eval mode and dropless routing (capacity mode on request), both restored afterwards;
    2. zero-shot: the text classifier [D, C] from class names x templates (the same on every rank);
    3. one exact pass over this rank's shards (data.EvalSet): per batch the image embeddings, and the text
       embeddings plus the batch's contrastive loss when retrieval or loss is asked; under expert
       parallelism every rank calls the model equally often (a rank out of data runs a dummy batch);
    4. every rank gathers all ranks' results and sorts them by (shard, position): the canonical order;
    5. every rank computes the same metrics from it (metrics.py). Batches never span shards, so each
       sample's embedding and each batch's loss are the same at any world size: an N-rank eval equals a
       1-process eval exactly.

The result groups metrics by task with open_clip's key names inside (``result.groups["zeroshot"]["top1"]``,
``result.groups["retrieval"]["image_to_text_R@1"]``); ``result.scalars()`` flattens the numbers to
"task/key" for TensorBoard and metrics.jsonl; ``result.to_json()`` is what ``moe-dist eval --json`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

from ..data.evalset import EvalBatch, EvalSet, default_eval_transform, eval_batches
from ..models.clip import text_to_device
from ..models.moe_blocks import collect_moe_outputs, eval_routing, moe_mlps
from .collect import BatchOutput, Gathered, PassRecord, gather_records, lockstep
from .metrics import retrieval_metrics, zeroshot_metrics
from .zeroshot import ClassSet, build_classifier, load_classes, resolve_labels

TASKS = ("zeroshot", "retrieval", "loss", "caption", "vqa")
CONTRASTIVE_TASKS = TASKS[:3]
GENERATIVE_TASKS = ("caption", "vqa")  # CoCa models: captioning.py generates over the set


@dataclass
class EvalResult:
    """Metrics grouped by task ("zeroshot", "retrieval", "loss", "routing", "samples"), plus the zero-shot
    confusion matrix (C x C counts, rows true class) and class names for ``save_confusion_png``."""

    groups: Dict[str, Dict[str, object]]
    confusion: Optional[List[List[int]]] = None
    class_names: Optional[List[str]] = None

    def scalars(self) -> Dict[str, float]:
        """{"zeroshot/top1": ..., "retrieval/image_to_text_R@1": ..., "loss/contrastive": ...}: every
        top-level number of every group (per-class and per-layer breakdowns stay in ``groups``)."""
        return {f"{group}/{key}": value for group, values in self.groups.items() for key, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool)}

    def to_json(self) -> Dict[str, object]:
        out: Dict[str, object] = {group: dict(values) for group, values in self.groups.items()}
        if self.confusion is not None:
            out["zeroshot"]["confusion"] = self.confusion
            out["zeroshot"]["class_names"] = self.class_names
        return out


def parse_tasks(tasks: Union[str, Sequence[str]]) -> List[str]:
    """Task names from a list and/or comma lists, deduplicated, in TASKS order; ValueError for others."""
    names = {t.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for t in item.split(",")}
    names.discard("")
    unknown = sorted(names - set(TASKS))
    if unknown or not names:
        raise ValueError(f"unknown eval task(s) {unknown or '(none given)'}; use any of {', '.join(TASKS)}")
    return [t for t in TASKS if t in names]


def evaluate(model: torch.nn.Module, tokenizer: Callable, spec: str, tasks: Sequence[str] = CONTRASTIVE_TASKS,
             batch_size: int = 64, classes: Union[None, str, Sequence[str]] = None, templates=None, rank: int = 0,
             world_size: int = 1, dropless: bool = True, allow_pipe: bool = False, label_key: str = "label",
             progress: bool = True, workers: int = 0, remote=None, caption_pool: Optional[Sequence[str]] = None,
             generation=None) -> EvalResult:
    """Evaluate ``model`` on every sample of ``spec`` exactly once over ``world_size`` ranks.

    Args:
        model: an MoECLIP or LIMoE (``engine.module`` when training under DeepSpeed), on its device.
        tokenizer: callable ``texts -> LongTensor [B, C]`` fitting the model's vocabulary.
        spec: shard spec of the eval set (brace pattern, tars, shard directories joined by "::").
        tasks: any of "zeroshot", "retrieval", "loss", and for CoCa models "caption" (BLEU-4, CIDEr-D, exact
            match of greedy captions) and "vqa" (answer accuracy, per question type) (comma lists allowed).
        batch_size: samples per forward (batches never span shards).
        classes, templates: zero-shot class names and prompt templates (see ``zeroshot.load_classes``).
        rank, world_size: this process and the ranks sharing the eval (torch.distributed initialised
            when world_size > 1); every rank must call ``evaluate`` and gets the same result.
        dropless: dropless MoE dispatch (the default); False uses each layer's eval capacity and reports
            ``routing/dropped_fraction``.
        allow_pipe: allow ``pipe:`` shard URLs.
        label_key: the metadata key holding a sample's class (int index or class name).
        progress: a progress bar on rank 0.
        workers: DataLoader worker processes decoding this rank's shards (0: in this process).
        remote: ``RemoteOptions`` of http(s):// and s3:// shards and their index files (None: the defaults;
            training passes ``data.remote_*``).
        caption_pool: training captions (``caption_baselines.read_caption_pool``): the caption task then
            reports the best constant caption and retrieval captioning beside the model's scores.
        generation: the caption task's ``GenerationConfig`` (None: its defaults; VQA decodes greedily).
    Returns:
        EvalResult; ``groups`` holds "zeroshot" (metrics.zeroshot_metrics without "confusion"),
        "retrieval" (metrics.retrieval_metrics), "loss" (batch-size-weighted means of the total loss and
        each unweighted part: "total", "contrastive", MoE losses), "routing" (capacity mode only:
        "dropped_fraction", the mean over MoE layers, and "dropped_fraction_per_layer") and "samples"
        ("evaluated", "failed", "failures" by reason, "ranks").
    Raises:
        ValueError: unknown tasks, class names that do not match the labels, a bad class file.
        DataError: no sample of the spec could be decoded.
    """
    tasks = parse_tasks(tasks)
    if world_size > 1 and not torch.distributed.is_initialized():
        raise ValueError(f"world_size={world_size} needs torch.distributed initialised before evaluate()")
    model = getattr(model, "module", model)  # a DeepSpeed engine evaluates its module
    generated = {t: _generative(model, tokenizer, spec, t, batch_size, rank, world_size, allow_pipe, remote,
                                caption_pool, generation)
                 for t in tasks if t in GENERATIVE_TASKS}
    tasks = [t for t in tasks if t not in GENERATIVE_TASKS]
    if not tasks:
        groups = dict(generated)
        groups["samples"] = {"evaluated": max(int(g.get("images", g.get("questions", 0))) for g in generated.values()),
                             "failed": 0, "failures": {}, "ranks": world_size}
        return EvalResult(groups)
    result = _evaluate(model, tokenizer, spec, tasks, batch_size, classes, templates, rank, world_size, dropless,
                       allow_pipe, label_key, progress, workers, remote)
    result.groups.update(generated)
    return result


def _generative(model, tokenizer, spec, task, batch_size, rank, world_size, allow_pipe, remote, pool,
                generation) -> Dict[str, object]:
    """Generation over the set and its scores (captions: with the baselines when a pool is given); under
    expert parallelism every rank decodes in lockstep."""
    import dataclasses

    from ..generation import GenerationConfig, check_generative
    from .caption_baselines import caption_scores, encode_pool
    from .captioning import check_vqa_data, generate_over, vqa_scores

    check_generative(model, f"eval task {task!r}: the model")
    if task == "vqa":
        check_vqa_data(spec, allow_pipe)
    expert_parallel = any(m.moe.ep_size > 1 for m in moe_mlps(model))
    if task == "caption" and generation is not None:
        cfg = dataclasses.replace(generation, lockstep=expert_parallel)
    else:
        cfg = GenerationConfig(max_new=8 if task == "vqa" else 30, lockstep=expert_parallel)
    with_pool = task == "caption" and pool is not None
    rows = generate_over(model, tokenizer, spec, task, cfg, batch_size, rank, world_size, allow_pipe, remote=remote,
                         image_features=with_pool)
    if task == "caption":
        scores = caption_scores(rows, pool, encode_pool(model, tokenizer, pool, batch_size) if with_pool else None)
    else:
        scores = vqa_scores(rows)
    return {k: v for k, v in scores.items() if k != "per_type"} | {
        f"{t}_accuracy": s["accuracy"] for t, s in scores.get("per_type", {}).items()}


def _evaluate(model, tokenizer, spec, tasks, batch_size, classes, templates, rank, world_size, dropless,
              allow_pipe, label_key, progress, workers, remote) -> EvalResult:
    """The embedding tasks: zeroshot, retrieval, loss (outline steps 1-5)."""
    device = next(model.parameters()).device
    class_set = load_classes(classes, templates) if "zeroshot" in tasks else None
    evalset = EvalSet(spec, default_eval_transform(model.cfg.vision.image_size), tokenizer, batch_size, rank,
                      world_size, allow_pipe, remote=remote)
    with eval_routing(model, dropless), torch.no_grad():
        classifier_DC = build_classifier(model, tokenizer, class_set, device).cpu() if class_set else None
        if class_set:
            collect_moe_outputs(model, torch.zeros(()))  # drop what the classifier's text passes left in the layers
        record = _run_pass(model, evalset, tasks, device, label_key, progress and rank == 0, workers)
    data = gather_records(record, world_size)
    return _metrics(data, tasks, class_set, classifier_DC, label_key, dropless, world_size)


def _forward(model, images: torch.Tensor, tokens: torch.Tensor, need_text: bool, loss_fn) -> BatchOutput:
    """One batch: both towers through ``model(images, tokens)`` when text is needed (retrieval, loss; the
    loss needs the logit scale), else the image tower alone."""
    if need_text:
        out = model(images, tokens)
        return BatchOutput(out.image_features, out.text_features, out.moe, loss_fn(out) if loss_fn else None)
    image_emb = model.encode_image(images)
    return BatchOutput(image_emb, None, collect_moe_outputs(model, image_emb))


def _run_pass(model, evalset: EvalSet, tasks: List[str], device, label_key: str, progress: bool,
              workers: int) -> PassRecord:
    """Step 3 of the outline: this rank's per-sample embeddings and labels, per-batch losses and routing."""
    from tqdm import tqdm

    from ..models import build_loss

    need_text = "retrieval" in tasks or "loss" in tasks
    # per batch: rank 0 of 1 (coca: + caption)
    loss_fn = build_loss(model.cfg, tokenizer=evalset.tokenizer) if "loss" in tasks else None
    dtype = next(model.parameters()).dtype
    keep = {"image"} if "zeroshot" in tasks or "retrieval" in tasks else set()
    keep |= ({"labels"} if "zeroshot" in tasks else set()) | ({"text"} if "retrieval" in tasks else set())
    record = PassRecord(keep)
    size = model.cfg.vision.image_size
    bar = tqdm(total=sum(evalset.shards[i].samples for i in evalset.mine), unit="img", disable=not progress,
               desc="eval", dynamic_ncols=True)

    def nonempty() -> Iterator[EvalBatch]:
        for batch in eval_batches(evalset, workers):
            record.failures.update(batch.failures)
            if len(batch.keys):
                yield batch

    for batch in lockstep(nonempty(), model, device):
        if batch is None:  # a dummy batch keeps the expert-parallel all-to-alls paired
            _forward(model, torch.zeros(1, 3, size, size, device=device, dtype=dtype),
                     evalset.tokenizer(["."]).to(device), need_text, loss_fn)
            continue
        images = batch.images.to(device=device, dtype=dtype, non_blocking=True)
        tokens = text_to_device(model, batch.tokens, device)  # cut after the last EOS on the host
        record.add(batch, _forward(model, images, tokens, need_text, loss_fn), label_key)
        bar.update(len(batch.keys))
    bar.close()
    return record


def _metrics(data: Gathered, tasks: List[str], class_set: Optional[ClassSet], classifier_DC: Optional[torch.Tensor],
             label_key: str, dropless: bool, world_size: int) -> EvalResult:
    """Step 5: the same metrics on every rank from the gathered, canonically ordered data."""
    groups: Dict[str, Dict[str, object]] = {}
    result = EvalResult(groups)
    if "zeroshot" in tasks:
        labels_N = resolve_labels(data.labels, data.where(), class_set, label_key)
        zeroshot = zeroshot_metrics(data.image_emb @ classifier_DC, labels_N, class_set.names)
        result.confusion, result.class_names = zeroshot.pop("confusion"), list(class_set.names)
        groups["zeroshot"] = zeroshot
    if "retrieval" in tasks:
        image_emb_ID, text_emb_JD, text_image_J = data.unique_pairs()
        groups["retrieval"] = retrieval_metrics(image_emb_ID, text_emb_JD, text_image_J)
    if "loss" in tasks:
        groups["loss"] = data.mean_losses()
    if not dropless:
        groups["routing"] = data.dropped_fractions()
    groups["samples"] = {"evaluated": data.samples, "failed": sum(data.failures.values()),
                         "failures": dict(data.failures), "ranks": world_size}
    return result


__all__ = ["TASKS", "EvalResult", "evaluate", "eval_routing", "parse_tasks"]
