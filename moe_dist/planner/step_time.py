"""Predicted step time from hardware figures: compute from FLOPs, communication from bytes.

    compute        = training FLOPs of the rank's samples / sustained FLOP/s
                     (training = 3 x forward; + 1 forward with "blocks" checkpointing; + the MoE MLPs'
                     forward with "moe" checkpointing), the forward of a whole micro batch
                     (``models.params.forward_flops``: Expert-Choice's C depends on the call's tokens),
                     each MoE layer with its tower's config (moe/cost.py)
    communication  = all-to-all + gradient + contrastive + load-balance bytes / the bandwidth of the links they use
                     (intra-node for groups inside a node, inter-node otherwise)
    step           = compute + communication (no overlap assumed: an upper bound; DeepSpeed overlaps
                     little of the MoE all-to-all, which sits on the critical path of every MoE layer)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

from .params import ModelFacts


@dataclass(frozen=True)
class Hardware:
    """Per-GPU figures. Defaults: an H100-80GB SXM node (NVLink 4, one 400 Gb/s NIC per GPU) at a
    sustained 400 TFLOP/s in bf16 (about 40% of its dense peak)."""

    gpu_memory_gb: float = 80.0      # GiB
    gpu_tflops: float = 400.0        # sustained (not peak) TFLOP/s
    intra_node_gbps: float = 3600.0  # Gbit/s per GPU inside a node (NVLink 4: 450 GB/s)
    inter_node_gbps: float = 400.0   # Gbit/s per GPU between nodes
    headroom: float = 0.9            # the share of GPU memory the plan may fill (CUDA context, fragmentation)

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0 (got {value})")
        if self.headroom > 1:
            raise ValueError(f"headroom={self.headroom} must be at most 1")

    @property
    def usable_bytes(self) -> int:
        return int(self.gpu_memory_gb * 2 ** 30 * self.headroom)


def moe_mlp_flops(facts: ModelFacts, micro_batch: int) -> float:
    """Forward FLOPs of the MoE MLPs (routers, Soft MoE's mixing, experts, shared FFNs) for one micro batch."""
    return float(sum(sum(layer.flops(micro_batch).values()) for layer in facts.moe_layers))


def training_flops(facts: ModelFacts, micro_batch: int, checkpointing: str = "none") -> float:
    """FLOPs one rank spends on one micro batch, forward and backward (and any recompute)."""
    forward = float(facts.forward_flops(micro_batch))
    extra = {"none": 0.0, "blocks": forward, "moe": moe_mlp_flops(facts, micro_batch)}[checkpointing]
    return 3 * forward + extra


def step_time(facts: ModelFacts, hw: Hardware, micro_batch: int, grad_accum: int, world: int,
              checkpointing: str, comm: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    """Seconds per optimizer step, split into compute and each kind of communication.

    Args:
        comm: {"all_to_all": ..., "gradients": ..., "contrastive": ..., "balance": ...}, each with
            "intra_node" and "inter_node" bytes per step (see comm.py).
    """
    intra, inter = hw.intra_node_gbps * 1e9 / 8, hw.inter_node_gbps * 1e9 / 8
    out = {"compute_s": training_flops(facts, micro_batch, checkpointing) * grad_accum / (hw.gpu_tflops * 1e12)}
    for name, sent in comm.items():
        out[f"{name}_s"] = sent["intra_node"] / intra + sent["inter_node"] / inter
    out["communication_s"] = sum(out[f"{name}_s"] for name in comm)
    out["total_s"] = out["compute_s"] + out["communication_s"]
    out["samples_per_s"] = micro_batch * grad_accum * world / out["total_s"]
    return out
