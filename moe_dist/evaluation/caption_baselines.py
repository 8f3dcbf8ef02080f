"""The two baselines a caption score is read against, from a pool of training captions (issue 28).

Shape legend: N pool captions, I images, R reference captions (all images'), V words, D embedding width.

- **Best constant caption** (chosen in hindsight): the pool caption that, given to every image, scores the
  highest mean token F1 (``captioning.token_f1``: best over each image's references) on the eval
  references. The search is exact over the whole pool: a caption's shared words with a reference are
  ``sum_w min(h_w, r_w) = sum_k [h_w >= k] [r_w >= k]``, so with one 0/1 matrix per repeat count k the
  shared counts of every (candidate, reference) pair are a sum of sparse products, and
  F1 = 2 shared / (|h| + |r|). It scores against the references it is tested on: an upper bound of what
  any one caption can reach, flagged ``chosen_in_hindsight``.
- **Retrieval captioning**: for each image, the pool caption whose text embedding (the same model's text
  tower) is nearest to the image embedding. A captioner that cannot beat it has learnt nothing the
  contrastive towers do not already know.

The pool is the distinct captions (after ``tokenize``) of a shard spec, read in canonical order without
decoding any image, up to ``limit``: during training ``eval.caption_pool`` (default ``data.train``), in the
CLIs ``--caption-pool``.
"""

from __future__ import annotations

import warnings
from collections import Counter, defaultdict
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .captioning import caption_metrics, tokenize

DEFAULT_POOL_LIMIT = 10000


def read_caption_pool(spec: str, limit: int = DEFAULT_POOL_LIMIT, allow_pipe: bool = False, remote=None) -> List[str]:
    """The first ``limit`` distinct captions (distinct after ``tokenize``; empty ones skipped) of ``spec``'s
    shards in spec order; images are passed over unread. ValueError if the spec holds no caption."""
    from ..data.decode import SampleError, decode_caption
    from ..data.remote import RemoteOptions
    from ..data.spec import resolve_spec
    from ..data.stream import SampleCounter, raw_samples
    from ..data.urls import shown_spec

    if limit < 1:
        raise ValueError(f"caption pool size {limit} must be >= 1")
    remote = remote or RemoteOptions()
    shards = resolve_spec(spec, allow_pipe=allow_pipe, options=remote)
    seen, pool = set(), []
    for sample in raw_samples(iter(shards), SampleCounter(remote), allow_pipe, keep=frozenset({"txt"})):
        try:
            text = decode_caption(sample.get("txt"))
        except SampleError:
            continue
        words = tuple(tokenize(text))
        if words and words not in seen:
            seen.add(words)
            pool.append(text)
            if len(pool) >= limit:
                break
    if not pool:
        raise ValueError(f"caption pool {shown_spec(spec)} holds no caption; give a shard spec of training data "
                         "(eval.caption_pool or --caption-pool)")
    return pool


def _bag_layers(sentences: Sequence[List[str]], vocab: Dict[str, int]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Per repeat count k = 1, 2, ...: a sparse [S, V] 0/1 matrix of "word w occurs >= k times"; and lengths [S]."""
    entries: Dict[int, Tuple[List[int], List[int]]] = defaultdict(lambda: ([], []))
    for row, words in enumerate(sentences):
        for word, count in Counter(words).items():
            for k in range(1, count + 1):
                entries[k][0].append(row)
                entries[k][1].append(vocab[word])
    shape = (len(sentences), len(vocab))
    layers = [torch.sparse_coo_tensor(torch.tensor([rows, cols]), torch.ones(len(rows)), shape,
                                      check_invariants=True).coalesce()
              for k, (rows, cols) in sorted(entries.items())]
    return layers, torch.tensor([len(w) for w in sentences], dtype=torch.float32)


def constant_token_f1(candidates: Sequence[str], references: Mapping[str, Sequence[str]],
                      chunk: int = 4096) -> torch.Tensor:
    """[N] the mean over images of each candidate's best token F1 against the image's references: the score
    of captioning every image with that one candidate. Exact (see the module docstring); ``chunk``
    references at a time bound the memory to N x chunk."""
    cand = [tokenize(c) for c in candidates]
    images = list(references)
    refs, owner = [], []
    for i, key in enumerate(images):
        for r in ([references[key]] if isinstance(references[key], str) else references[key]):
            refs.append(tokenize(r))
            owner.append(i)
    vocab: Dict[str, int] = {}
    for words in cand + refs:
        for w in words:
            vocab.setdefault(w, len(vocab))
    h_layers, h_len = _bag_layers(cand, vocab)
    best_NI = torch.zeros(len(cand), len(images))
    owner_R = torch.tensor(owner)
    for start in range(0, len(refs), chunk):
        r_layers, r_len = _bag_layers(refs[start:start + chunk], vocab)
        shared_NR = torch.zeros(len(cand), len(r_len))
        with warnings.catch_warnings():  # torch.sparse.mm's product is a CSR tensor, "in beta state"
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            for h, r in zip(h_layers, r_layers):  # repeat counts beyond either side's maximum share nothing
                shared_NR += torch.sparse.mm(h, r.t()).to_dense()
        f1_NR = 2 * shared_NR / (h_len[:, None] + r_len[None, :]).clamp(min=1)
        index = owner_R[start:start + chunk].expand_as(f1_NR)
        best_NI.scatter_reduce_(1, index, f1_NR, reduce="amax")
    return best_NI.mean(1)


def best_constant(pool: Sequence[str], references: Mapping[str, Sequence[str]]) -> Dict[str, object]:
    """The pool caption with the highest ``constant_token_f1`` and ``caption_metrics`` of giving it to every
    image, as {"caption", "bleu4", "cider_d", "token_f1", ...}."""
    scores_N = constant_token_f1(pool, references)
    caption = pool[int(scores_N.argmax())]
    metrics = caption_metrics({k: caption for k in references}, references)
    return {"caption": caption, **metrics}


@torch.no_grad()
def encode_pool(model, tokenizer: Callable, pool: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """[N, D] normalised text embeddings of the pool (fp32, on the CPU), ``batch_size`` captions per call;
    every rank encodes the whole pool in the same batches (expert parallelism needs equal calls)."""
    from ..models.clip import text_to_device
    from ..models.moe_blocks import eval_routing

    model = getattr(model, "module", model)
    device = next(model.parameters()).device
    out = []
    with eval_routing(model, dropless=True):
        for start in range(0, len(pool), batch_size):
            tokens = text_to_device(model, tokenizer(list(pool[start:start + batch_size])), device)
            out.append(model.encode_text(tokens).float().cpu())
    return torch.cat(out)


def retrieval_captions(image_features_ID: torch.Tensor, pool_features_ND: torch.Tensor,
                       pool: Sequence[str]) -> List[str]:
    """For each image, the pool caption with the highest cosine similarity (features normalised)."""
    return [pool[i] for i in (image_features_ID.float() @ pool_features_ND.float().t()).argmax(1).tolist()]


def caption_baselines(hypotheses: Mapping[str, str], references: Mapping[str, Sequence[str]], pool: Sequence[str],
                      retrieved: Optional[Mapping[str, str]] = None) -> Dict[str, object]:
    """The model's ``caption_metrics`` with the baselines beside them, flat for the logs:
    "constant_<metric>" (+ "constant_caption", "constant_chosen_in_hindsight") and, given the retrieved
    caption per image, "retrieval_<metric>"; "pool_captions" is the pool size."""
    out: Dict[str, object] = dict(caption_metrics(hypotheses, references))
    constant = best_constant(pool, references)
    for key in ("bleu4", "cider_d", "token_f1", "exact_match"):
        out[f"constant_{key}"] = constant[key]
    out["constant_caption"] = constant["caption"]
    out["constant_chosen_in_hindsight"] = True
    if retrieved is not None:
        retrieval = caption_metrics(retrieved, references)
        for key in ("bleu4", "cider_d", "token_f1", "exact_match", "distinct", "top_caption_share"):
            out[f"retrieval_{key}"] = retrieval[key]
    out["pool_captions"] = len(pool)
    return out


def caption_scores(rows, pool: Optional[Sequence[str]] = None, pool_features=None) -> Dict[str, object]:
    """``caption_metrics`` of the generated captions, one hypothesis per image (its first sample's) against
    every caption stored for that image (COCO shards hold one sample per caption). Given a ``pool`` of
    training captions, the baselines beside them (``caption_baselines``): the best constant caption and,
    with ``pool_features`` [N, D] and rows carrying "image_features", retrieval captioning."""
    hypotheses: Dict[str, str] = {}
    first: Dict[str, dict] = {}
    references: Dict[str, List[str]] = defaultdict(list)
    for r in rows:
        hypotheses.setdefault(r["image_id"], r["generated"])
        first.setdefault(r["image_id"], r)
        references[r["image_id"]].append(r["caption"])
    if pool is None:
        return caption_metrics(hypotheses, references)
    retrieved = None
    if pool_features is not None:
        keys = list(first)
        features_ID = torch.stack([first[k]["image_features"] for k in keys])
        retrieved = dict(zip(keys, retrieval_captions(features_ID, pool_features, pool)))
    return caption_baselines(hypotheses, references, pool, retrieved)


TABLE_ROWS = ("bleu4", "cider_d", "token_f1", "exact_match", "distinct", "top_caption_share")


def caption_table(values: Mapping[str, object]) -> str:
    """``caption_baselines``' output as text: one metric per row, the model beside the two baselines."""
    lines = [f"caption ({values['images']} images; baselines from {values['pool_captions']} training captions)",
             f"  {'':20s} {'model':>10s} {'constant*':>10s} {'retrieval':>10s}"]
    for key in TABLE_ROWS:
        cells = [values.get(key), values.get(f"constant_{key}"), values.get(f"retrieval_{key}")]
        lines.append(f"  {key:20s} " + " ".join(f"{c:10.4f}" if isinstance(c, float) else f"{'-':>10s}"
                                                  for c in cells))
    lines.append("  * one caption for every image, the pool's best token F1 on these references (chosen in "
                 f"hindsight): {values['constant_caption']!r}")
    return "\n".join(lines)
