"""Evaluation metrics as pure functions over tensors: zero-shot classification and image-text retrieval.

Legend: N samples, C classes, I unique images, J unique caption strings, D embedding width, Q queries
in one chunk. Scores are computed ``chunk`` queries at a time, so memory is O(chunk x items), never
O(queries x items).

Conventions (stated once, used by every caller):
- top-k: ``top5`` is top-min(5, C) accuracy, so it is 1.0 when C <= 5.
- Macro averages run over the classes with support (at least one true sample): a class absent from the
  labels has no defined recall, and the predictions it attracts already lower the recall of the true
  classes. A class with support that is never predicted has precision 0 (sklearn's zero_division=0);
  per-class F1 is 0 where P + R = 0; ``macro_f1`` is the mean of per-class F1 (not F1 of the macro P, R).
  ``per_class_recall`` lists the classes with support only; a name the class list repeats (open_clip's
  ImageNet names "crane" twice) is keyed "name [index]".
- Retrieval ranks are 1-based ranks of the best-scoring correct item, with ties counted against the
  query: rank = 1 + (wrong items scoring >= the best correct item). A collapsed model whose embeddings
  are all equal therefore scores R@1 = 0, not 1.
- Median rank is the usual median (the mean of the two middle ranks for an even count).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch

CHUNK = 1024
RECALL_AT = (1, 5, 10)


def _chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def zeroshot_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor, class_names: Sequence[str],
                     chunk: int = CHUNK) -> Dict[str, object]:
    """Accuracy, per-class recall, macro precision/recall/F1 and the confusion matrix.

    Args:
        logits_NC: [N, C] class scores (any monotone score: logits or cosine similarities).
        labels_N: [N] int true class indices in [0, C).
        class_names: C names, in the order of the logits' columns.
        chunk: rows scored at a time.
    Returns:
        {"top1", "top5", "per_class_recall": {name: recall}, "macro_precision", "macro_recall",
        "macro_f1", "confusion": C x C nested list of counts (rows true class, columns predicted),
        "classes_with_support", "samples"}.
    Raises:
        ValueError: mismatched shapes or a label outside [0, C).
    """
    N, C = logits_NC.shape
    if len(class_names) != C:
        raise ValueError(f"{len(class_names)} class names for {C} logit columns; give one name per column")
    labels_N = labels_N.long().reshape(-1)
    if labels_N.numel() != N:
        raise ValueError(f"{labels_N.numel()} labels for {N} rows of logits")
    if N and (int(labels_N.min()) < 0 or int(labels_N.max()) >= C):
        raise ValueError(f"labels range over [{int(labels_N.min())}, {int(labels_N.max())}] but there are {C} "
                         "classes; the labels must index the class names")
    k = min(5, C)
    top1 = topk = 0
    confusion_CC = torch.zeros(C * C, dtype=torch.long)
    for lo, hi in _chunks(N, chunk):
        pred_QK = logits_NC[lo:hi].topk(k, dim=1).indices
        hit_QK = pred_QK == labels_N[lo:hi, None]
        top1 += int(hit_QK[:, 0].sum())
        topk += int(hit_QK.any(dim=1).sum())
        confusion_CC += torch.bincount(labels_N[lo:hi] * C + pred_QK[:, 0], minlength=C * C)
    confusion_CC = confusion_CC.reshape(C, C)

    correct_C = confusion_CC.diagonal().double()
    support_C = confusion_CC.sum(dim=1).double()
    predicted_C = confusion_CC.sum(dim=0).double()
    present_C = support_C > 0
    recall_C = correct_C / support_C.clamp_min(1)
    precision_C = correct_C / predicted_C.clamp_min(1)  # 0 where never predicted
    f1_C = torch.where(precision_C + recall_C > 0,
                       2 * precision_C * recall_C / (precision_C + recall_C).clamp_min(1e-300),
                       torch.zeros_like(recall_C))

    def macro(values_C: torch.Tensor) -> float:
        return float(values_C[present_C].mean()) if bool(present_C.any()) else 0.0

    return {
        "top1": top1 / N if N else 0.0,
        "top5": topk / N if N else 0.0,
        "per_class_recall": {name: float(recall_C[c]) for c, name in enumerate(_unique(class_names)) if present_C[c]},
        "macro_precision": macro(precision_C),
        "macro_recall": macro(recall_C),
        "macro_f1": macro(f1_C),
        "confusion": confusion_CC.tolist(),
        "classes_with_support": int(present_C.sum()),
        "samples": N,
    }


def _unique(names: Sequence[str]) -> List[str]:
    """The names, with "name [c]" for a name that occurs more than once."""
    seen = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [name if seen[name] == 1 else f"{name} [{c}]" for c, name in enumerate(names)]


def _ranks(queries_QD: torch.Tensor, items_XD: torch.Tensor, positives: List[List[int]],
           chunk: int) -> torch.Tensor:
    """[Q] 1-based rank of each query's best correct item among all X items (ties count against it).

    ``positives[q]`` lists the correct item indices of query q (at least one)."""
    ranks = torch.empty(queries_QD.shape[0], dtype=torch.long)
    for lo, hi in _chunks(queries_QD.shape[0], chunk):
        scores_QX = queries_QD[lo:hi] @ items_XD.T
        rows = [q - lo for q in range(lo, hi) for _ in positives[q]]
        cols = [x for q in range(lo, hi) for x in positives[q]]
        correct_QX = torch.zeros_like(scores_QX, dtype=torch.bool)
        correct_QX[rows, cols] = True
        best_Q = scores_QX.masked_fill(~correct_QX, float("-inf")).amax(dim=1)
        ranks[lo:hi] = 1 + ((scores_QX >= best_Q[:, None]) & ~correct_QX).sum(dim=1)
    return ranks


def _rank_summary(prefix: str, ranks: torch.Tensor) -> Dict[str, float]:
    out = {f"{prefix}_R@{k}": float((ranks <= k).double().mean()) for k in RECALL_AT}
    values = ranks.double().sort().values
    n = values.numel()
    out[f"{prefix}_mean_rank"] = float(values.mean())
    out[f"{prefix}_median_rank"] = float((values[(n - 1) // 2] + values[n // 2]) / 2)
    return out


def retrieval_metrics(image_emb_ID: torch.Tensor, text_emb_JD: torch.Tensor, text_image_J: Sequence[Sequence[int]],
                      chunk: int = CHUNK) -> Dict[str, float]:
    """Recall@K and ranks in both directions over unique images and unique caption strings.

    Args:
        image_emb_ID: [I, D] normalised embeddings of the distinct images.
        text_emb_JD: [J, D] normalised embeddings of the distinct caption strings.
        text_image_J: J lists; ``text_image_J[j]`` holds the images caption j belongs to (several when the
            same string captions several images: each of them is a correct answer for it).
        chunk: queries scored at a time.
    Returns:
        ``image_to_text_R@{1,5,10}``, ``text_to_image_R@{1,5,10}``, ``{image_to_text,text_to_image}_mean_rank``
        and ``_median_rank``, plus ``images`` (I), ``texts`` (J) and ``duplicate_captions`` (captions
        belonging to more than one image). Image -> text: any caption of the image is a hit.
    Raises:
        ValueError: an empty set, a caption without an image or naming one outside [0, I), or an image
            without a caption.
    """
    I, J = image_emb_ID.shape[0], text_emb_JD.shape[0]
    if I == 0 or J == 0 or len(text_image_J) != J:
        raise ValueError(f"retrieval needs images and captions; got {I} images, {J} caption embeddings and "
                         f"{len(text_image_J)} caption -> image lists")
    text_images = [sorted(set(int(i) for i in images)) for images in text_image_J]
    image_texts: List[List[int]] = [[] for _ in range(I)]
    for j, images in enumerate(text_images):
        if not images or images[0] < 0 or images[-1] >= I:
            raise ValueError(f"caption {j} belongs to images {images}; each caption needs images in [0, {I})")
        for i in images:
            image_texts[i].append(j)
    orphans = [i for i, texts in enumerate(image_texts) if not texts]
    if orphans:
        raise ValueError(f"{len(orphans)} images have no caption (first: {orphans[0]}); every image needs one")
    out = _rank_summary("image_to_text", _ranks(image_emb_ID, text_emb_JD, image_texts, chunk))
    out.update(_rank_summary("text_to_image", _ranks(text_emb_JD, image_emb_ID, text_images, chunk)))
    out.update(images=I, texts=J, duplicate_captions=sum(len(images) > 1 for images in text_images))
    return out


def save_confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str,
                       title: str = "Zero-shot confusion matrix") -> None:
    """A row-normalised confusion matrix as a PNG fit for a paper (readable up to ~100 classes).

    Rows are true classes, each divided by its support (a class without support stays blank); columns
    are predicted classes. Cells carry their percentage when C <= 20; class names label both axes when
    C <= 100. Uses matplotlib's Agg canvas directly: no pyplot state, no display needed.

    Args:
        confusion: C x C counts (rows true class), as ``zeroshot_metrics`` returns.
        class_names: C names.
        path: output .png path (written atomically).
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..files import atomic_path

    counts_CC = torch.tensor(confusion, dtype=torch.float64).reshape(len(class_names), len(class_names))
    C = counts_CC.shape[0]
    support_C = counts_CC.sum(dim=1, keepdim=True)
    fraction_CC = torch.where(support_C > 0, counts_CC / support_C.clamp_min(1), torch.tensor(float("nan")))
    side = min(30.0, max(5.0, 0.12 * C + 2.5))  # inches; a cell stays ~0.1 in or larger up to ~250 classes
    cell_pt = 72 * 0.8 * side / max(C, 1)
    font = max(4.0, min(10.0, 0.75 * cell_pt))
    fig = Figure(figsize=(side + 1.2, side), dpi=200, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(fraction_CC.numpy(), cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, aspect=30, pad=0.02)
    colorbar.set_label("fraction of the true class", fontsize=11)
    ax.set_xlabel("predicted class", fontsize=12)
    ax.set_ylabel("true class", fontsize=12)
    ax.set_title(f"{title} ({int(counts_CC.sum())} samples, {C} classes)", fontsize=13)
    if C <= 100:
        ax.set_xticks(range(C), [str(n) for n in class_names], rotation=90, fontsize=font)
        ax.set_yticks(range(C), [str(n) for n in class_names], fontsize=font)
    if C <= 20:
        for t in range(C):
            for p in range(C):
                value = float(fraction_CC[t, p])
                if value == value and counts_CC[t, p] > 0:  # not NaN, not an empty cell
                    ax.text(p, t, f"{100 * value:.0f}", ha="center", va="center", fontsize=font,
                            color="white" if value > 0.5 else "black")
    with atomic_path(path, durable=False) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", pad_inches=0.1)
