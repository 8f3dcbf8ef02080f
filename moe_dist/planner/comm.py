"""Bytes one GPU sends per training step, and which of them cross nodes.

All figures are bytes *sent by one rank to other ranks* (what its links carry), per optimizer step.

MoE all-to-all (moe/dispatch.py): per MoE layer and micro batch, a rank sends S rows of D values (its kept
assignments of experts on the other R - 1 ranks of its expert-parallel group) in the dispatch and again in
the combine's backward, and the Q rows it received for its own experts back in the combine and in the
dispatch's backward: 2 (S + Q) rows, 3 (S + Q) when a checkpointed forward runs again.
    dropless, from token counts:   rows = the kept assignments of experts on other ranks, and the
                                   per-expert counts (R - 1) L int64 once per forward;
    dropless, planned:             S = Q = T K (R - 1) / R (balanced routing);
    capacity:                      S = Q = C L (R - 1), C = max(min_capacity, ceil(factor T K / E)) with T
                                   every token, padding included: the fixed [L, C] blocks training
                                   exchanges whatever the routing (no counts);
    Expert-Choice:                 the same with C = clamp(ceil(factor T / E), 1, T), exactly C per expert;
    Soft MoE:                      the same with C = slots_per_expert x the call's sequences (no padding).
Each MoE layer uses its tower's MoEConfig (``model.<tower>.moe.overrides``).
Load balance (moe/balance.py), per layer with ``load_balance="global_batch"``: one all-reduce of its M x E
float64 loads in every training forward (again in a checkpointed recompute); and per optimizer step, when
any layer has ``router_bias`` or a global-batch loss, one all-reduce of all those layers' M x E int64
step loads together. Both over all W ranks (ring: 2 (W - 1) / W of the bytes); M = the modality rows
(2, CoCa 3).
Gradients: ZeRO 0 all-reduces them once per step (ring: 2 (d - 1) / d of the group's bytes). ZeRO 1/2
all-reduce them too, bucket by bucket (DeepSpeed 0.19's default use_multi_rank_bucket_allreduce: each
bucket is one all_reduce, and every rank keeps the slice of its partition; not a reduce-scatter): ZeRO 2
after every micro batch's backward (its gradient hooks), ZeRO 1 once, at the accumulation boundary; and
they all-gather the updated parameters once per
step ((d - 1) / d of the padded flat group); non-expert groups over all W ranks, expert groups over the
W / R expert-data-parallel ranks. moe_dist/distributed/comm_count.py counts DeepSpeed's calls.
Contrastive loss (open_clip ClipLoss, gather_with_grad): every rank all-gathers the image and text
embeddings of the others, and the backward reduce-scatters their gradients.

Placement: expert-parallel groups are consecutive ranks, so a group of R <= G GPUs per node (G % R == 0)
stays inside a node; a collective whose group spans nodes is counted as inter-node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from .memory import DTYPE_BYTES, zero_partition
from .params import ModelFacts, capacity  # noqa: F401  (capacity: planner.comm.capacity)

@dataclass(frozen=True)
class Cluster:
    """World size W = nodes x gpus_per_node; ranks are numbered node by node."""

    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ValueError(f"--nodes ({self.nodes}) and --gpus-per-node ({self.gpus_per_node}) must be >= 1")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def inter_fraction(self, ep_size: int) -> float:
        """Share of an EP group's peers that sit on another node (the worst group's worst rank)."""
        if ep_size == 1:
            return 0.0
        worst = 0
        for first in range(0, self.world, ep_size):
            for rank in range(first, first + ep_size):
                node = rank // self.gpus_per_node
                worst = max(worst, sum(1 for p in range(first, first + ep_size) if p // self.gpus_per_node != node))
        return worst / (ep_size - 1)

    def spans_nodes(self, group_size: int, stride: int = 1) -> bool:
        """Does a group of ``group_size`` ranks, ``stride`` apart, leave one node?"""
        return len({r // self.gpus_per_node for r in range(0, group_size * stride, stride)}) > 1


def all_to_all_bytes(hidden: int, dtype_bytes: int, ep_size: int, num_experts: int, rows: float,
                     received: Optional[float] = None, recompute: bool = False,
                     counted: bool = True) -> Dict[str, float]:
    """Bytes one rank sends in one MoE layer's all-to-alls for one micro batch.

    Args:
        hidden: D; dtype_bytes: bytes per activation value.
        ep_size: R; num_experts: E (L = E / R local experts).
        rows: S, kept assignments this rank sends to experts on other ranks.
        received: Q, rows other ranks send to this rank's experts (default: S, balanced).
        recompute: the forward runs twice (activation checkpointing of the MoE layer or its block).
        counted: the counted exchange (dropless) also sends the per-expert counts; the fixed one does not.
    Returns:
        {"rows": ..., "counts": ..., "total": ...}
    """
    if ep_size == 1:
        return {"rows": 0, "counts": 0, "total": 0}
    forwards = 2 if recompute else 1
    received = rows if received is None else received
    rows_bytes = (forwards + 1) * (rows + received) * hidden * dtype_bytes
    counts_bytes = forwards * (ep_size - 1) * (num_experts // ep_size) * 8 if counted else 0
    return {"rows": rows_bytes, "counts": counts_bytes, "total": rows_bytes + counts_bytes}


def remote_rows(kept_per_expert: Sequence[int], ep_size: int, ep_rank: int) -> int:
    """S: kept assignments of experts that live on other EP ranks (experts [r L, (r + 1) L) on rank r)."""
    L = len(kept_per_expert) // ep_size
    return sum(int(c) for e, c in enumerate(kept_per_expert) if e // L != ep_rank)


def received_rows(kept_by_rank: Sequence[Sequence[int]], ep_rank: int) -> int:
    """Q: the other EP ranks' kept assignments of this rank's experts (``kept_by_rank[q]`` per EP rank q)."""
    L = len(kept_by_rank[0]) // len(kept_by_rank)
    return sum(int(c) for q, kept in enumerate(kept_by_rank) if q != ep_rank
               for c in kept[ep_rank * L:(ep_rank + 1) * L])


def planned_rows(layer, micro_batch: int, ep_size: int, dropless: Optional[bool] = None) -> float:
    """Rows one rank sends per exchange for one call of ``micro_batch`` samples through ``layer`` (a
    ``MoELayerShape``): balanced dropless routing, T K (R - 1) / R, or the fixed [L, C] block per remote
    rank of a capacity, Expert-Choice or Soft MoE: the exchange's E C rows x (R - 1) / R."""
    from ..moe import cost

    cfg = layer.config if dropless is None else layer.config.replace(dropless=dropless)
    rows = cost.buffer_rows(cfg, layer.call_tokens(micro_batch), micro_batch * len(layer.parts), ep_size,
                            routed=micro_batch * layer.tokens_per_sample)
    return rows * (ep_size - 1) / ep_size


def moe_all_to_all(facts: ModelFacts, cluster: Cluster, ep_size: int, micro_batch: int, grad_accum: int,
                   precision: str, checkpointing: str = "none") -> Dict[str, object]:
    """Planned all-to-all bytes per step: per layer, total, and the intra / inter-node split."""
    from ..moe import cost

    b = DTYPE_BYTES[precision]
    per_layer: List[Dict[str, object]] = []
    for layer in facts.moe_layers:
        cfg = layer.config
        sent = all_to_all_bytes(layer.hidden, b, ep_size, cfg.num_experts, planned_rows(layer, micro_batch, ep_size),
                                recompute=checkpointing != "none", counted=not cost.fixed_exchange(cfg))
        per_layer.append({"layer": layer.name, "router": cfg.router, "bytes": int(sent["total"] * grad_accum)})
    total = sum(x["bytes"] for x in per_layer)
    inter = cluster.inter_fraction(ep_size)
    return {"per_layer": per_layer, "total": total, "intra_node": int(total * (1 - inter)),
            "inter_node": int(total * inter)}


def balance_bytes(facts: ModelFacts, cluster: Cluster, grad_accum: int, checkpointing: str = "none") -> Dict[str, int]:
    """The load-balance all-reduces per step (module docstring): "forward_all_reduce" (global-batch
    losses, every micro batch), "step_all_reduce" (router_bias or global_batch, once per step)."""
    W = cluster.world
    ring = 2 * (W - 1) / W
    forwards = 2 if checkpointing != "none" else 1
    forward = step = 0.0
    for layer in facts.moe_layers:
        cfg = layer.config
        values = len(cfg.modalities) * cfg.num_experts
        if cfg.load_balance == "global_batch":
            forward += ring * 8 * values * forwards * grad_accum
        if cfg.load_balance == "global_batch" or cfg.router_bias:
            step += ring * 8 * values
    total = round(forward) + round(step)
    inter = cluster.nodes > 1
    return {"forward_all_reduce": round(forward), "step_all_reduce": round(step),
            "intra_node": 0 if inter else total, "inter_node": total if inter else 0}


def gradient_bytes(groups, cluster: Cluster, ep_size: int, zero_stage: int, precision: str,
                   grad_accum: int = 1) -> Dict[str, int]:
    """Gradient all-reduce (ZeRO 0, once per step; ZeRO 1/2, bucket by bucket after every micro batch)
    and ZeRO 1/2's parameter all-gather (the padded flat group, once per step): bytes per step."""
    b, W = DTYPE_BYTES[precision], cluster.world
    sent = {"all_reduce": 0.0, "bucket_all_reduce": 0.0, "param_all_gather": 0.0, "intra_node": 0.0,
            "inter_node": 0.0}
    for g in groups:
        d, stride = (W // ep_size, ep_size) if g.expert else (W, 1)
        if d == 1:
            continue
        ring = (d - 1) / d * b
        if zero_stage == 0:
            parts = {"all_reduce": 2 * ring * g.numel}
        else:
            # ZeRO 2 reduces after every micro batch; ZeRO 1 at the accumulation boundary only
            # (DeepSpeedEngine.allreduce_gradients -> reduce_gradients)
            parts = {"bucket_all_reduce": 2 * ring * g.numel * (grad_accum if zero_stage == 2 else 1),
                     "param_all_gather": ring * zero_partition(g, d)[0]}
        where = "inter_node" if cluster.spans_nodes(d, stride) else "intra_node"
        for key, value in parts.items():
            sent[key] += value
            sent[where] += value
    return {key: round(value) for key, value in sent.items()}


def contrastive_bytes(facts: ModelFacts, cluster: Cluster, micro_batch: int, grad_accum: int,
                      precision: str) -> Dict[str, int]:
    """The embedding all-gather (forward) and its gradient's reduce-scatter (backward) per step."""
    W = cluster.world
    sent = 2 * 2 * (W - 1) * micro_batch * facts.embed_dim * DTYPE_BYTES[precision] * grad_accum
    where = "inter_node" if cluster.nodes > 1 else "intra_node"
    return {"all_gather": sent, "intra_node": sent if where == "intra_node" else 0,
            "inter_node": sent if where == "inter_node" else 0}
