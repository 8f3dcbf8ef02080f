"""Captioning and VQA metrics, computed here (no Java): BLEU-4, CIDEr-D, VQA answer normalisation and accuracy.

BLEU-4 and CIDEr-D follow the coco-caption reference implementation (pycocoevalcap's ``bleu_scorer.py`` and
``cider_scorer.py``) number for number; the tests hold them to its outputs on stated sentence pairs.
Sentences are tokenised by ``tokenize`` (lowercase, punctuation dropped, split on whitespace), which
stands in for coco-caption's Java PTB tokenizer.

BLEU-4 (corpus level, as coco-caption): clipped n-gram matches and hypothesis n-grams are summed over the
corpus for n = 1..4; the score is the geometric mean of the four precisions times the brevity penalty
exp(1 - r/c) when c < r, with c the total hypothesis length and r the total of each hypothesis's closest
reference length (ties to the shorter). coco-caption adds 1e-15 to matches and 1e-9 to counts.

CIDEr-D: per n = 1..4 each sentence is a TF-IDF vector of its n-grams (raw counts x (log N - log df),
df = how many images' references contain the n-gram, N images). For one hypothesis and one reference,
sim_n = sum over the hypothesis n-grams of min(h, r) * r / (|h| |r|), times exp(-(l_h - l_r)^2 / (2 * 6^2))
where l is the sentence's bigram count (coco-caption counts n-grams of n = 2 as "length"); the image's
score is 10 x the mean over n and over its references; CIDEr-D is the mean over images.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Dict, List, Mapping, Sequence, Tuple

_PUNCT = re.compile(r"[^\w\s]")
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}


def tokenize(sentence: str) -> List[str]:
    """Lowercase words with punctuation removed ("A cat, sitting." -> ["a", "cat", "sitting"])."""
    return _PUNCT.sub(" ", sentence.lower()).split()


def _ngrams(words: Sequence[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i:i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def bleu(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], n_max: int = 4) -> Dict[str, float]:
    """Corpus BLEU-1..n_max of ``hypotheses`` (key -> sentence) against ``references`` (key -> sentences).

    Returns {"bleu1": ..., "bleu4": ...} in [0, 1]; raises ValueError for a key without references."""
    tiny, small = 1e-15, 1e-9
    correct, guess = [0] * n_max, [0] * n_max
    hyp_len = ref_len = 0
    for key, hyp in hypotheses.items():
        refs = [tokenize(r) for r in _refs(references, key)]
        words = tokenize(hyp)
        counts = _ngrams(words, n_max)
        max_ref: Counter = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n_max)  # per n-gram, the most any one reference holds
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(count, max_ref[gram])
        for n in range(n_max):
            guess[n] += max(len(words) - n, 0)
        hyp_len += len(words)
        ref_len += min((len(r) for r in refs), key=lambda length: (abs(length - len(words)), length))
    ratio = (hyp_len + tiny) / (ref_len + small)
    penalty = math.exp(1 - 1 / ratio) if ratio < 1 else 1.0
    out, product = {}, 1.0
    for n in range(n_max):
        product *= (correct[n] + tiny) / (guess[n] + small)
        out[f"bleu{n + 1}"] = product ** (1 / (n + 1)) * penalty
    return out


def cider_d(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], sigma: float = 6.0) -> float:
    """CIDEr-D of ``hypotheses`` against ``references`` (document frequencies from these references)."""
    keys = list(hypotheses)
    refs = {k: [_ngrams(tokenize(r)) for r in _refs(references, k)] for k in keys}
    df: Counter = Counter()
    for k in keys:
        df.update({gram for ref in refs[k] for gram in ref})
    log_n = math.log(float(len(keys)))

    def vector(counts: Counter) -> Tuple[List[Dict[tuple, float]], List[float], int]:
        vec: List[Dict[tuple, float]] = [{} for _ in range(4)]
        norm = [0.0] * 4
        length = 0
        for gram, tf in counts.items():
            n = len(gram) - 1
            vec[n][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[n] += vec[n][gram] ** 2
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for k in keys:
        h_vec, h_norm, h_len = vector(_ngrams(tokenize(hypotheses[k])))
        total = 0.0
        for ref in refs[k]:
            r_vec, r_norm, r_len = vector(ref)
            gauss = math.exp(-((h_len - r_len) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                value = sum(min(v, r_vec[n].get(g, 0.0)) * r_vec[n].get(g, 0.0) for g, v in h_vec[n].items())
                if h_norm[n] and r_norm[n]:
                    value /= h_norm[n] * r_norm[n]
                total += value * gauss / 4
        scores.append(10.0 * total / len(refs[k]))
    return sum(scores) / len(scores) if scores else 0.0


def _refs(references: Mapping[str, Sequence[str]], key: str) -> Sequence[str]:
    refs = references.get(key)
    if not refs:
        raise ValueError(f"caption {key!r} has no reference caption; give every hypothesis at least one reference")
    return [refs] if isinstance(refs, str) else refs


def token_f1(hypothesis: str, reference: str) -> float:
    """F1 of the two sentences' words as bags (``tokenize``; SQuAD's answer F1): 2 P R / (P + R) with
    P = shared / hypothesis words, R = shared / reference words; 0 when either is empty."""
    h, r = Counter(tokenize(hypothesis)), Counter(tokenize(reference))
    shared = sum((h & r).values())
    if not shared:
        return 0.0
    precision, recall = shared / sum(h.values()), shared / sum(r.values())
    return 2 * precision * recall / (precision + recall)


def caption_metrics(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> Dict[str, float]:
    """{"bleu4", "cider_d", "exact_match", "token_f1", "distinct", "top_caption_share", "images"}.

    exact_match: the hypothesis equals a reference after ``tokenize``; token_f1: the mean over images of the
    best ``token_f1`` against the image's references; distinct: distinct hypotheses (after ``tokenize``) per
    image; top_caption_share: the share of images given the most frequent hypothesis (mode collapse shows
    as a low ``distinct`` and a high share)."""
    exact = sum(tokenize(h) in [tokenize(r) for r in _refs(references, k)] for k, h in hypotheses.items())
    f1 = sum(max(token_f1(h, r) for r in _refs(references, k)) for k, h in hypotheses.items())
    counts = Counter(tuple(tokenize(h)) for h in hypotheses.values())
    n = max(1, len(hypotheses))
    return {"bleu4": bleu(hypotheses, references)["bleu4"], "cider_d": cider_d(hypotheses, references),
            "exact_match": exact / n, "token_f1": f1 / n, "distinct": len(counts) / n,
            "top_caption_share": max(counts.values(), default=0) / n, "images": len(hypotheses)}


def normalize_answer(answer: str) -> str:
    """VQA-style: lowercase, punctuation and articles removed, number words as digits ("Two." -> "2")."""
    words = [NUMBER_WORDS.get(w, w) for w in tokenize(answer) if w not in ARTICLES]
    return " ".join(words)


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str], question_types: Sequence[str]
                 ) -> Dict[str, object]:
    """Exact-match accuracy after ``normalize_answer``, overall and per question type, and two baselines:
    ``majority_baseline`` answers each type with its most frequent answer in ``answers`` (the question-type
    prior), ``single_answer_baseline`` answers every question with the most frequent answer overall."""
    if not len(predictions) == len(answers) == len(question_types):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers, {len(question_types)} types")
    hits: Dict[str, List[bool]] = defaultdict(list)
    gold: Dict[str, Counter] = defaultdict(Counter)
    for pred, answer, qtype in zip(predictions, answers, question_types):
        hits[qtype].append(normalize_answer(pred) == normalize_answer(answer))
        gold[qtype][normalize_answer(answer)] += 1
    n = max(1, len(predictions))
    return {"accuracy": sum(sum(h) for h in hits.values()) / n,
            "majority_baseline": sum(c.most_common(1)[0][1] for c in gold.values()) / n,
            "single_answer_baseline": max(sum(gold.values(), Counter()).values(), default=0) / n,
            "questions": len(predictions),
            "per_type": {t: {"accuracy": sum(h) / len(h), "questions": len(h),
                             "majority_baseline": gold[t].most_common(1)[0][1] / len(h)}
                         for t, h in sorted(hits.items())}}


# ---------------------------------------------------------------------------------------------- eval passes
def check_vqa_data(spec: str, allow_pipe: bool = False) -> None:
    """ValueError unless the spec's first sample carries a question and an answer in its json."""
    from ..data.evalset import first_metadata
    from ..data.urls import shown_spec

    meta = first_metadata(spec, allow_pipe)
    missing = [k for k in ("question", "answer") if not str(meta.get(k, "")).strip()]
    if missing:
        raise ValueError(f"{shown_spec(spec)} is not VQA data: its samples' json lacks {' and '.join(missing)}; "
                         "make VQA shards with 'moe-dist-data synth --vqa' or 'moe-dist-data shard' of a file with "
                         "image, question and answer columns")


def generate_over(model, tokenizer, spec: str, task: str, cfg=None, batch_size: int = 32, rank: int = 0,
                  world_size: int = 1, allow_pipe: bool = False, progress: bool = False, workers: int = 0,
                  remote=None, image_features: bool = False):
    """Generate over every sample of ``spec`` once (this rank's shards); gathered from all ranks in canonical
    order. ``task`` "caption" decodes from an empty prompt, "vqa" from each sample's "question: Q answer:".

    Under ``world_size > 1`` with whole models on every rank (``load_pretrained``, ep_size=1) no rank waits
    on another until the final gather; an expert-parallel model needs ``cfg.lockstep``. Returns a list of
    dicts (key, image_id, caption, metadata, generated; with ``image_features`` also "image_features", the
    normalised image embedding [D] on the CPU, for retrieval captioning). ``remote``: ``RemoteOptions``."""
    import torch
    from tqdm import tqdm

    from ..data.evalset import EvalSet, default_eval_transform, eval_batches
    from ..data.urls import shown_spec
    from ..generation import GenerationConfig, generate, vqa_prompt

    cfg = cfg or GenerationConfig()
    model = getattr(model, "module", model)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    evalset = EvalSet(spec, default_eval_transform(model.cfg.vision.image_size), tokenizer, batch_size, rank,
                      world_size, allow_pipe, remote=remote)
    rows = []
    bar = tqdm(total=sum(evalset.shards[i].samples for i in evalset.mine), unit="img", disable=not progress,
               desc=task, dynamic_ncols=True)
    batches = (b for b in eval_batches(evalset, workers) if len(b.keys))
    if cfg.lockstep:  # expert parallelism: every rank calls the model equally often (None: a dummy batch)
        from .collect import lockstep

        batches = lockstep(batches, model, device)
    for batch in batches:
        if batch is None:
            size = model.cfg.vision.image_size
            dummy = torch.zeros(1, 3, size, size, device=device, dtype=dtype)
            generate(model, tokenizer, dummy, None, cfg)
            if image_features:
                _embed(model, dummy)
            continue
        prompts = None
        if task == "vqa":
            for meta, key in zip(batch.metadata, batch.keys.tolist()):
                if not str(meta.get("answer", "")).strip() or not str(meta.get("question", "")).strip():
                    raise ValueError(f"sample {key} of {shown_spec(spec)} has no question or answer in its json; "
                                     "every VQA sample needs both")
            prompts = [vqa_prompt(str(m["question"])) for m in batch.metadata]
        images = batch.images.to(device=device, dtype=dtype)
        texts = generate(model, tokenizer, images, prompts, cfg)
        features = _embed(model, images) if image_features else None
        for i, text in enumerate(texts):
            rows.append({"key": tuple(batch.keys[i].tolist()), "image_id": batch.image_ids[i],
                         "caption": batch.captions[i], "metadata": batch.metadata[i], "generated": text})
            if features is not None:
                rows[-1]["image_features"] = features[i]
        bar.update(len(batch.keys))
    bar.close()
    if world_size > 1:
        everything = [None] * world_size
        torch.distributed.all_gather_object(everything, rows)
        rows = [r for part in everything for r in part]
    return sorted(rows, key=lambda r: r["key"])


def _embed(model, images):
    """Normalised image embeddings [B, D] (fp32, CPU), dropless like generation."""
    import torch

    from ..models.moe_blocks import eval_routing

    with eval_routing(model, dropless=True), torch.no_grad():
        return model.encode_image(images).float().cpu()


def vqa_scores(rows) -> Dict[str, object]:
    """``vqa_accuracy`` of the generated answers (question type from the json's "question_type", else "all")."""
    return vqa_accuracy([r["generated"] for r in rows], [str(r["metadata"]["answer"]) for r in rows],
                        [str(r["metadata"].get("question_type", "all")) for r in rows])
