"""One layout's full estimate, and the ranked table of layouts that fit.

A layout is (ep_size, ZeRO stage, micro batch) on a given cluster; everything else (precision,
activation checkpointing, the model) comes from the run config. Layouts are compared at one global
batch (the run's ``batch.global_batch``, else its micro_batch x grad_accum x the world size): a smaller
micro batch takes more gradient-accumulation steps. Outline of ``plan``:
    1. check the requested layout (ep_size must divide the world size and num_experts);
    2. estimate it: per-GPU bytes (memory.py), bytes sent (comm.py), step time (step_time.py);
    3. estimate every candidate layout, rank those that fit by predicted samples/s and give the
       reason each other one does not fit;
    4. if none fits, raise a ValueError that says what would be needed (memory per GPU, or nodes).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional

from . import comm, memory
from .params import ModelFacts
from .step_time import Hardware, step_time, training_flops

MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GIB = 2 ** 30


@dataclass(frozen=True)
class Layout:
    ep_size: int
    zero_stage: int
    micro_batch: int
    grad_accum: int = 1


def grad_accum_for(global_batch: int, micro_batch: int, world: int) -> int:
    """Accumulation steps that make ``global_batch`` from ``micro_batch`` on ``world`` GPUs; ValueError if none."""
    if micro_batch < 1 or global_batch % (micro_batch * world):
        raise ValueError(f"the global batch {global_batch} is not a multiple of micro_batch {micro_batch} x {world} "
                         f"GPUs; set batch.global_batch (--set batch.global_batch=N) to a multiple of "
                         f"{max(micro_batch, 1) * world}, or pick another --micro-batch")
    return global_batch // (micro_batch * world)


def check_layout(facts: ModelFacts, cluster: comm.Cluster, layout: Layout) -> None:
    """ValueError naming what is wrong with ``layout`` on ``cluster`` and the values that would work."""
    W, E = cluster.world, facts.num_experts
    if layout.ep_size < 1 or W % layout.ep_size or E % layout.ep_size:
        valid = [d for d in range(1, math.gcd(W, E) + 1) if W % d == 0 and E % d == 0]
        counts = sorted({x.config.num_experts for x in facts.moe_layers}) or [E]
        experts = f"num_experts={counts[0]}" if len(counts) == 1 else f"every tower's num_experts {counts}"
        raise ValueError(f"ep_size={layout.ep_size} must divide both the world size {W} "
                         f"({cluster.nodes} nodes x {cluster.gpus_per_node} GPUs) and {experts}; "
                         f"use one of {valid}")
    if layout.zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage={layout.zero_stage} must be 0, 1 or 2 (stage 3 does not shard experts)")
    if layout.micro_batch < 1:
        raise ValueError(f"micro_batch={layout.micro_batch} must be >= 1")


def estimate(facts: ModelFacts, run_cfg, cluster: comm.Cluster, hw: Hardware, layout: Layout) -> Dict[str, object]:
    """Memory, communication and time of one layout (the JSON the planner prints, less the table)."""
    W, R, B, accum = cluster.world, layout.ep_size, layout.micro_batch, layout.grad_accum
    precision, ckpt = run_cfg.precision, run_cfg.activation_checkpointing
    groups = facts.groups(R)
    acts = {mode: memory.activation_bytes(facts, B, W, precision, mode, R) for mode in ("none", "blocks", "moe")}
    states = max((memory.state_bytes(groups, W, R, layout.zero_stage, precision, rank, facts.bucket(R))
                  for rank in {0, W - 1}), key=lambda s: s.peak(acts[ckpt]))
    per_gpu = {**states.as_dict(), "activations": acts[ckpt], "activations_by_checkpointing": acts,
               "peak_by_checkpointing": {mode: states.peak(a) for mode, a in acts.items()}}
    per_gpu["total"] = states.peak(acts[ckpt])  # the peak of a step: what has to fit
    per_gpu["usable"] = hw.usable_bytes
    a2a = comm.moe_all_to_all(facts, cluster, R, B, accum, precision, ckpt)
    grads = comm.gradient_bytes(groups, cluster, R, layout.zero_stage, precision, accum)
    gather = comm.contrastive_bytes(facts, cluster, B, accum, precision)
    balance = comm.balance_bytes(facts, cluster, accum, ckpt)
    times = step_time(facts, hw, B, accum, W, ckpt, {"all_to_all": a2a, "gradients": grads, "contrastive": gather,
                                                     "balance": balance})
    return {"layout": {**asdict(layout), "global_batch": B * accum * W,
                       "precision": precision, "activation_checkpointing": ckpt},
            "per_gpu_bytes": per_gpu, "fits": per_gpu["total"] <= hw.usable_bytes,
            "all_to_all_bytes": a2a, "gradient_bytes": grads, "contrastive_bytes": gather, "balance_bytes": balance,
            "flops": {"forward_per_sample": facts.flops["per_sample"],
                      "train_per_sample": training_flops(facts, 1, ckpt)},
            "step_time": times}


def _reason(est: Dict[str, object]) -> str:
    mem = est["per_gpu_bytes"]
    parts = {k: mem[k] for k in ("parameters", "gradients", "optimizer", "buffers", "activations")}
    biggest = max(parts, key=parts.get)
    return (f"needs {mem['total'] / GIB:.1f} GiB > {mem['usable'] / GIB:.1f} GiB usable "
            f"(largest part: {biggest} {parts[biggest] / GIB:.1f} GiB)")


def candidates(facts: ModelFacts, cluster: comm.Cluster, global_batch: int,
               micro_batch: Optional[int] = None) -> List[Layout]:
    """Every (ep_size, ZeRO stage, micro batch) that divides the world size, the experts and the global batch."""
    W, E = cluster.world, facts.num_experts
    eps = [d for d in range(1, math.gcd(W, E) + 1) if W % d == 0 and E % d == 0]
    batches = [b for b in ((micro_batch,) if micro_batch else MICRO_BATCHES) if global_batch % (b * W) == 0]
    return [Layout(ep, z, b, global_batch // (b * W)) for ep in eps for z in (0, 1, 2) for b in batches]


def rank_layouts(facts: ModelFacts, run_cfg, cluster: comm.Cluster, hw: Hardware, global_batch: int,
                 micro_batch: Optional[int] = None) -> Dict[str, List[Dict[str, object]]]:
    """Every candidate layout: those that fit, fastest first, and the others with their reason."""
    feasible, infeasible = [], []
    for layout in candidates(facts, cluster, global_batch, micro_batch):
        est = estimate(facts, run_cfg, cluster, hw, layout)
        row = {**asdict(layout), "total_bytes": est["per_gpu_bytes"]["total"],
               "step_s": est["step_time"]["total_s"], "samples_per_s": est["step_time"]["samples_per_s"],
               "all_to_all_bytes": est["all_to_all_bytes"]["total"],
               "global_batch": est["layout"]["global_batch"]}
        if est["fits"]:
            feasible.append(row)
        else:
            infeasible.append({**row, "reason": _reason(est)})
    # equal speed (to 3 digits): the larger micro batch, since sustained FLOP/s assumes one big enough to reach it
    feasible.sort(key=lambda r: (-float(f"{r['samples_per_s']:.3g}"), -r["micro_batch"], r["total_bytes"]))
    return {"feasible": feasible, "infeasible": infeasible}


def _what_would_fit(facts: ModelFacts, run_cfg, cluster: comm.Cluster, hw: Hardware) -> str:
    layouts = candidates(facts, cluster, cluster.world, 1)  # micro batch 1: the least activation memory
    smallest = min((estimate(facts, run_cfg, cluster, hw, lay) for lay in layouts), key=lambda e: e["per_gpu_bytes"]["total"])
    need = smallest["per_gpu_bytes"]["total"] / hw.headroom / GIB
    lay = smallest["layout"]
    text = (f"the smallest layout (ep_size={lay['ep_size']}, zero_stage={lay['zero_stage']}, micro_batch 1) needs "
            f"{smallest['per_gpu_bytes']['total'] / GIB:.1f} GiB, i.e. GPUs of at least {need:.0f} GB")
    for factor in (2, 4, 8, 16, 32, 64):
        bigger = comm.Cluster(cluster.nodes * factor, cluster.gpus_per_node)
        if any(estimate(facts, run_cfg, bigger, hw, lay)["fits"] for lay in candidates(facts, bigger, bigger.world)):
            return text + f", or {bigger.nodes} nodes of {cluster.gpus_per_node} GPUs"
    return text


def plan(facts: ModelFacts, run_cfg, cluster: comm.Cluster, hw: Hardware, layout: Layout,
         fixed_micro_batch: bool = False) -> Dict[str, object]:
    """The full report for ``layout`` plus the ranked table at its global batch (see the module outline)."""
    check_layout(facts, cluster, layout)
    report = estimate(facts, run_cfg, cluster, hw, layout)
    global_batch = layout.micro_batch * layout.grad_accum * cluster.world
    table = rank_layouts(facts, run_cfg, cluster, hw, global_batch, layout.micro_batch if fixed_micro_batch else None)
    if not table["feasible"]:
        raise ValueError(f"no layout of {facts.name} fits {cluster.nodes} x {cluster.gpus_per_node} GPUs of "
                         f"{hw.gpu_memory_gb:g} GiB ({run_cfg.precision}, activation_checkpointing="
                         f"{run_cfg.activation_checkpointing}): {_what_would_fit(facts, run_cfg, cluster, hw)}")
    params = dict(facts.params)
    params["non_expert"] = params["total"] - params["expert"]
    return {"model": facts.name, "kind": facts.kind,
            "cluster": {"nodes": cluster.nodes, "gpus_per_node": cluster.gpus_per_node, "world": cluster.world},
            "hardware": asdict(hw), "params": params, **report,
            "layouts": table["feasible"], "infeasible_layouts": table["infeasible"]}
