"""Bytes one GPU holds: model states as DeepSpeed lays them out, and an activation estimate.

Model states (exact; tests/distributed/test_plan_states.py holds them against the tensors after
``deepspeed.initialize`` on 2 ranks). Per optimizer group g of n_g elements on this rank, with d_g the
size of the group it is partitioned over (the data-parallel group of all W ranks; for expert groups the
expert-data-parallel group of W / ep_size ranks, which strides by ep_size, so rank r is member r // ep_size):

    ZeRO 0, fp32:       params 4 n, grads 4 n, AdamW moments 8 n + a 4-byte step per tensor
    ZeRO 0, bf16/fp16:  DeepSpeed's FP16_Optimizer: params 2 n, grads 2 n, fp32 master 4 n, moments 8 n,
                        a step per group
    ZeRO 1/2:           the group is flattened and padded to a multiple of 2 d_g (params are views of that
                        buffer); partition P = padded / d_g; fp32 master copy 4 P (even in fp32), moments
                        8 P, one step per group; gradients are copied, whole, for every tensor that
                        overlaps this rank's partition (DeepSpeed's contiguous ``grads_in_partition``)
    transient buffers:  ZeRO 1/2's reduce bucket (the run's reduce_bucket_size, in the model dtype) and the
                        fp32 gradient partition built for the optimizer step; ZeRO 0's flattened
                        all-reduce bucket (and FP16_Optimizer's fp32 gradient copy).
    the peak:           ZeRO 1/2 free the gradient partition after each step and allocate it whole at the
                        first bucket's reduction; with a bucket smaller than the rank's parameters that is
                        early in the backward, so the activations, the gradients and the bucket are held
                        together (bench/memory.py's phase peaks: the backward peak at W = 4 rose by the
                        gradients over the forward's end, whatever the micro batch).

Activations are an estimate, per micro batch, of what autograd saves (measured per block on CPU with
``torch.autograd.graph.saved_tensors_hooks``): a transformer block saves about 16 N D values for N
tokens of width D (attention through SDPA keeps no S x S scores); an MoE MLP, with its tower's config,
replaces the dense MLP's 9 N D by (``moe_mlp_values``; fitted at D = 32, 64, 128, E = 4 to 16, K = 1 to 3,
granularity 1 and 4, GELU and SwiGLU, within 2%)
    token choice, Expert-Choice:  N (D + 2 E + 7) + X (3 D + (a + k) He + 7)
    Soft MoE:                     N (2 D + 2 S + 2) + X (3 D + (a + k) He + 7)  (2 S: the [B, L, S]
                                  dispatch and combine weights; S = E slots_per_expert)
    shared experts:               + N (a + 1) Hs
for X the rows the experts' tensors hold (``cost.buffer_rows``: at ep_size 1 every one of the T K slots,
so T E for Expert-Choice; Soft MoE's E P per sequence; at ep_size > 1 the exchange's E C rows with a
capacity, or the received T K), He the expert width (ffn / granularity), a the activation's width factor
(2 for SwiGLU), k = 1 when act(h) is kept too (``recompute_activation`` off, or the grouped_mm backend),
else 0 ("auto" is counted as the loop backend, which it is on CPU). Checkpointing "blocks"
keeps each block's input and recomputes one block at a time; "moe" does that for the MoE MLPs only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, Iterable

from ..engine.zero_bucket import REDUCE_BUCKET_ELEMENTS
from .params import ModelFacts, ParamGroup

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model states on one rank (what ``deepspeed.initialize`` and the first step allocate)."""

    parameters: int
    gradients: int
    optimizer: int          # fp32 master copy + Adam moments + step counters
    backward_buffers: int   # live with the activations: ZeRO 1/2's reduce bucket
    step_buffers: int       # live with the full gradients: the step's fp32 gradient partition (ZeRO 1/2),
    #                         the flattened all-reduce bucket (ZeRO 0) and FP16_Optimizer's fp32 gradients
    gradients_early: bool = False  # ZeRO 1/2 with a bucket smaller than the rank's parameters: the first
    #                         full bucket is reduced early in the backward, and DeepSpeed then allocates the
    #                         whole gradient partition while (nearly) every activation is still held

    @property
    def buffers(self) -> int:
        return self.backward_buffers + self.step_buffers

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.buffers

    def peak(self, activations: int) -> int:
        """Peak bytes of a step: the activations are all held when the backward starts (with the reduce
        bucket, and with the gradient partition when it comes early); the gradients are all held when it
        ends (the bucket is freed after the gradient partition is filled, then the step's buffers come)."""
        held = activations + self.gradients if self.gradients_early else max(activations, self.gradients)
        return self.parameters + self.optimizer + max(held + self.backward_buffers,
                                                      self.gradients + self.step_buffers)

    def as_dict(self) -> Dict[str, int]:
        out = {**asdict(self), "buffers": self.buffers}
        del out["gradients_early"]
        return out


def zero_partition(group: ParamGroup, dp: int):
    """(padded numel, partition size) of a ZeRO-1/2 flat group over ``dp`` ranks."""
    align = 2 * dp  # DeepSpeed's nccl_start_alignment_factor x the group size
    padded = math.ceil(group.numel / align) * align
    return padded, padded // dp


def _grads_in_partition(group: ParamGroup, size: int, member: int) -> int:
    """Elements of the tensors that overlap partition ``member`` (each counted whole), plus the zero
    padding DeepSpeed appends to the partition that holds the group's end."""
    lo, hi, start, total = member * size, (member + 1) * size, 0, 0
    for n in group.numels:
        if n and start < hi and start + n > lo:
            total += n
        start += n
    return total + max(0, hi - max(lo, start))


def state_bytes(groups: Iterable[ParamGroup], world: int, ep_size: int, zero_stage: int, precision: str,
                rank: int = 0, bucket_elements: int = REDUCE_BUCKET_ELEMENTS) -> StateBytes:
    """Model-state bytes of ``rank`` for one layout (see the module docstring for the rules).

    Args:
        groups: this rank's optimizer groups (``ModelFacts.groups(ep_size)``).
        world: data-parallel world size W; ep_size: R (divides W).
        zero_stage: 0, 1 or 2; precision: "fp32", "bf16" or "fp16".
        rank: which rank (partitions, and so the gradient copy, differ slightly by rank).
        bucket_elements: ZeRO 1/2's reduce_bucket_size (the run's DeepSpeed config).
    """
    groups = list(groups)
    b = DTYPE_BYTES[precision]
    if zero_stage == 0:
        n = sum(g.numel for g in groups)
        largest = min(REDUCE_BUCKET_ELEMENTS, max(sum(g.numel for g in groups if g.expert == e) for e in (0, 1)))
        if precision == "fp32":
            steps = 4 * sum(len(g.numels) for g in groups)
            return StateBytes(4 * n, 4 * n, 8 * n + steps, 0, 4 * largest)
        return StateBytes(b * n, b * n, 12 * n + 4 * len(groups), 0, 4 * n + b * largest)
    params = grads = optimizer = step_grads = 0
    for g in groups:
        dp = world // ep_size if g.expert else world
        member = rank // ep_size if g.expert else rank
        padded, size = zero_partition(g, dp)
        params += b * padded
        grads += b * _grads_in_partition(g, size, member)
        optimizer += 12 * size + 4
        step_grads += 4 * size
    local = sum(g.numel for g in groups)
    return StateBytes(params, grads, optimizer, b * bucket_elements, step_grads, bucket_elements < local)


# ----------------------------------------------------------------------------- activations
def moe_mlp_values(layer, micro_batch: int, ep_size: int = 1) -> float:
    """Saved values of one MoE MLP call of ``micro_batch`` samples (module docstring)."""
    from ..moe import cost
    from ..moe.registry import ACTIVATIONS

    m = layer.config
    N, D, X = layer.call_tokens(micro_batch), m.hidden_size, layer.buffer_rows(micro_batch, ep_size)
    a = cost.activation_width(m)
    k = 1 if not m.recompute_activation or m.expert_backend == "grouped_mm" else 0
    routing = 2 * D + 2 * m.num_experts * m.slots_per_expert + 2 if m.router == "soft" else D + 2 * m.num_experts + 7
    a_shared = ACTIVATIONS.get(m.shared_activation).width
    return N * routing + X * (3 * D + (a + k) * m.expert_hidden_size + 7) + N * (a_shared + 1) * m.shared_hidden_size


def _tower_values(tokens: int, width: int, layers: int, moe_blocks: Dict[int, object], hidden: int,
                  micro_batch: int, checkpointing: str, ep_size: int = 1) -> Dict[str, float]:
    """Saved values (elements) of one tower for ``tokens`` tokens: the held total and the largest
    recompute (what one checkpointed block or MoE MLP brings back during backward). ``moe_blocks``:
    block index -> its MoE layer (``MoELayerShape``)."""
    N, D = tokens, width
    dense_mlp = 9 * N * D
    held, recompute = 0.0, 0.0
    for i in range(layers):
        mlp = moe_mlp_values(moe_blocks[i], micro_batch, ep_size) if i in moe_blocks else dense_mlp
        block = 7 * N * D + 4 * N + mlp
        if checkpointing == "blocks":
            held, recompute = held + N * D, max(recompute, block)
        elif checkpointing == "moe" and i in moe_blocks:
            held, recompute = held + block - mlp + N * D, max(recompute, mlp)
        else:
            held += block
    return {"held": held + 3 * N * D, "recompute": recompute}  # + stem / final norm and projection


def activation_bytes(facts: ModelFacts, micro_batch: int, world: int, precision: str,
                     checkpointing: str = "none", ep_size: int = 1) -> int:
    """Estimated activation bytes of one micro batch on one rank (forward saved tensors + one recompute);
    with a capacity at ``ep_size`` > 1 the experts compute the whole [E, C] exchange buffer. CoCa's decoder
    is not counted."""
    cfg, B = facts.config, micro_batch
    v, t = cfg.vision, cfg.text
    image_tokens = (v.image_size // v.patch_size) ** 2 + 1
    ratio_v, ratio_t = int(v.width * v.mlp_ratio), int(t.width * t.mlp_ratio)

    def blocks(prefix: str) -> Dict[int, object]:
        return {int(x.name.rsplit(".", 1)[1]): x for x in facts.moe_layers if x.name.startswith(prefix + ".")}

    if cfg.kind == "limoe":  # one transformer over both sequences, padded to one length
        length = max(image_tokens, t.context_length)
        towers = [_tower_values(2 * B * length, v.width, v.layers, blocks("shared"), ratio_v, B, checkpointing,
                                ep_size)]
    else:
        towers = [_tower_values(B * image_tokens, v.width, v.layers, blocks("vision"), ratio_v, B, checkpointing,
                                ep_size),
                  _tower_values(B * t.context_length, t.width, t.layers, blocks("text"), ratio_t, B, checkpointing,
                                ep_size)]
    values = sum(x["held"] for x in towers) + max(x["recompute"] for x in towers)
    images = B * 3 * v.image_size ** 2
    loss = 2 * B * world * B + 2 * world * B * cfg.embed_dim  # logits and gathered features, fp32
    return int(DTYPE_BYTES[precision] * (values + images) + 4 * loss)
