"""What one rank's eval pass collects, and gathering it from every rank into one canonical order.

Legend: B batch, N samples over all ranks, D embedding width, E experts of a layer, I unique images, J unique
caption strings. A sample's canonical key is (shard index in the spec, position in the shard); sorting by
it makes the gathered data independent of how shards were split over ranks and workers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch

from ..data.evalset import EvalBatch
from ..data.loader import DataError
from ..models.moe_blocks import moe_mlps

_SHARD_STRIDE = 1 << 32  # key -> one int64: shard * stride + position (positions stay far below 2^32)


@dataclass
class BatchOutput:
    """What the model gave for one batch (on its device, its dtype)."""

    image_emb: torch.Tensor  # [B, D] normalised
    text_emb: Optional[torch.Tensor]  # [B, D] normalised; None when only the image tower ran
    moe: object  # models.moe_blocks.MoEAux (per-layer routing stats)
    loss: object = None  # models.loss.LossOutput of the batch, when the loss task runs


@dataclass
class BatchLoss:
    """One batch's loss parts, placed by the canonical key of its first sample."""

    key: int
    size: int
    parts: Dict[str, float]


@dataclass
class PassRecord:
    """One rank's pass: per-sample fields in the order read, per-batch losses, summed routing counts.

    ``keep`` names the per-sample fields to keep: "image" (embeddings), "text" (embeddings, captions,
    image identities) and "labels" (raw metadata labels)."""

    keep: Set[str] = field(default_factory=set)
    keys: List[torch.Tensor] = field(default_factory=list)  # [B, 2] each
    image_emb: List[torch.Tensor] = field(default_factory=list)  # [B, D] fp32 CPU each
    text_emb: List[torch.Tensor] = field(default_factory=list)  # [B, D] fp32 CPU each
    captions: List[str] = field(default_factory=list)
    image_ids: List[str] = field(default_factory=list)
    labels: List[object] = field(default_factory=list)
    losses: List[BatchLoss] = field(default_factory=list)
    routed: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [E] assignments chosen
    kept: Dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [E] assignments served
    failures: Counter = field(default_factory=Counter)

    def add(self, batch: EvalBatch, out: BatchOutput, label_key: str) -> None:
        """Record one batch and the model's output for it."""
        self.keys.append(batch.keys)
        if "image" in self.keep:
            self.image_emb.append(out.image_emb.detach().float().cpu())
        if "text" in self.keep:
            self.text_emb.append(out.text_emb.detach().float().cpu())
            self.captions += batch.captions
            self.image_ids += batch.image_ids
        if "labels" in self.keep:
            self.labels += [meta.get(label_key) for meta in batch.metadata]
        if out.loss is not None:
            parts = {"total": float(out.loss.total), **{k: float(v) for k, v in out.loss.parts.items()}}
            self.losses.append(BatchLoss(int(_flat(batch.keys[:1])[0]), len(batch.keys), parts))
        for layer, stats in out.moe.layer_stats.items():
            if "slot_weight_per_expert" in stats:  # Soft MoE: slot weights, nothing dropped (moe/soft.py)
                weights = stats["slot_weight_per_expert"].detach().double().cpu()
                _add_counts(self.routed, {layer: weights})
                _add_counts(self.kept, {layer: weights})
                continue
            _add_counts(self.routed, {layer: stats["routed_per_expert"].detach().long().cpu()})
            _add_counts(self.kept, {layer: stats["tokens_per_expert"].detach().long().cpu()})


def _add_counts(into: Dict[str, torch.Tensor], counts: Dict[str, torch.Tensor]) -> None:
    """Sum per-layer [E] counts into ``into``."""
    for layer, counts_E in counts.items():
        into[layer] = into[layer] + counts_E if layer in into else counts_E


def _flat(keys_N2: torch.Tensor) -> torch.Tensor:
    return keys_N2[:, 0] * _SHARD_STRIDE + keys_N2[:, 1]


@dataclass
class Gathered:
    """Every rank's records merged, per-sample fields sorted by canonical key (N samples)."""

    keys: torch.Tensor  # [N, 2]
    image_emb: torch.Tensor  # [N, D] (empty if not kept)
    text_emb: torch.Tensor  # [N, D] (empty if not kept)
    captions: List[str]
    image_ids: List[str]
    labels: List[object]
    losses: List[BatchLoss]  # sorted by key
    routed: Dict[str, torch.Tensor]
    kept: Dict[str, torch.Tensor]
    failures: Counter

    @property
    def samples(self) -> int:
        return int(self.keys.shape[0])

    def where(self) -> List[Tuple[int, int]]:
        """(shard index, position) of each sample, for messages."""
        return [tuple(k) for k in self.keys.tolist()]

    def unique_pairs(self) -> Tuple[torch.Tensor, torch.Tensor, List[List[int]]]:
        """(image_emb [I, D], text_emb [J, D], text_image_J): images by identity and captions by string, each
        embedded as at its first occurrence; ``text_image_J[j]`` lists the images caption j belongs to."""
        image_index: Dict[str, int] = {}
        text_index: Dict[str, int] = {}
        image_rows, text_rows, text_images = [], [], []
        for n, (identity, caption) in enumerate(zip(self.image_ids, self.captions)):
            if identity not in image_index:
                image_index[identity] = len(image_rows)
                image_rows.append(n)
            if caption not in text_index:
                text_index[caption] = len(text_rows)
                text_rows.append(n)
                text_images.append([])
            images = text_images[text_index[caption]]
            if image_index[identity] not in images:
                images.append(image_index[identity])
        return self.image_emb[image_rows], self.text_emb[text_rows], text_images

    def mean_losses(self) -> Dict[str, float]:
        """Each loss part averaged over batches weighted by batch size (fp64, canonical order)."""
        total = sum(loss.size for loss in self.losses)
        names = self.losses[0].parts.keys() if self.losses else ()
        return {name: sum(loss.size * loss.parts[name] for loss in self.losses) / total for name in names}

    def dropped_fractions(self) -> Dict[str, object]:
        """Per MoE layer 1 - served / chosen assignments over the whole set, and their mean over layers."""
        per_layer = {layer: 1.0 - float(self.kept[layer].sum()) / max(1, float(self.routed[layer].sum()))
                     for layer in sorted(self.routed)}
        mean = sum(per_layer.values()) / len(per_layer) if per_layer else 0.0
        return {"dropped_fraction": mean, "dropped_fraction_per_layer": per_layer}


def _cat(parts: Sequence[List[torch.Tensor]], order: torch.Tensor) -> torch.Tensor:
    tensors = [t for part in parts for t in part]
    return torch.cat(tensors)[order] if tensors else torch.zeros(0)


def gather_records(record: PassRecord, world_size: int = 1) -> Gathered:
    """Every rank's ``record`` (all_gather_object when world_size > 1) merged in canonical order; the same
    result on every rank. Raises DataError when no sample decoded on any rank."""
    records = [record]
    if world_size > 1:
        records = [None] * world_size
        torch.distributed.all_gather_object(records, record)
    keys = torch.cat([k for r in records for k in r.keys]) if any(r.keys for r in records) \
        else torch.zeros(0, 2, dtype=torch.long)
    order = torch.argsort(_flat(keys), stable=True)
    failures = sum((r.failures for r in records), Counter())
    if not keys.shape[0]:
        reasons = ", ".join(f"{n} {reason}" for reason, n in failures.most_common()) or "no samples at all"
        raise DataError(f"no sample of the eval set could be used ({reasons}); check it with "
                        "'moe-dist-data validate SPEC'")

    def strings(name: str) -> List:
        values = [v for r in records for v in getattr(r, name)]
        return [values[i] for i in order.tolist()] if values else []

    routed, kept = {}, {}
    for r in records:
        _add_counts(routed, r.routed)
        _add_counts(kept, r.kept)
    return Gathered(keys[order], _cat([r.image_emb for r in records], order),
                    _cat([r.text_emb for r in records], order), strings("captions"), strings("image_ids"),
                    strings("labels"), sorted((loss for r in records for loss in r.losses), key=lambda loss: loss.key),
                    routed, kept, failures)


def lockstep(batches: Iterator[EvalBatch], model, device) -> Iterator[Optional[EvalBatch]]:
    """The batches; under expert parallelism (an all-to-all in every MoE forward) each rank then yields None
    (run a dummy forward) until every rank has run out, so all ranks call the model equally often."""
    expert_parallel = torch.distributed.is_initialized() and any(m.moe.ep_size > 1 for m in moe_mlps(model))
    flag = torch.ones(1, device=device)
    for batch in batches:
        if expert_parallel:
            torch.distributed.all_reduce(flag.fill_(1.0), op=torch.distributed.ReduceOp.MAX)
        yield batch
    while expert_parallel:
        torch.distributed.all_reduce(flag.fill_(0.0), op=torch.distributed.ReduceOp.MAX)
        if not flag.item():
            return
        yield None
