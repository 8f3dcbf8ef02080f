"""Which routed assignments survive capacity, and moving tokens to their experts and back.

Shape legend: T tokens, D hidden, E experts (global), L local experts per rank, R expert-parallel ranks,
K slots per token, A kept (token, expert) assignments on this rank, N tokens received by this rank's
experts (sorted by local expert).

This is the only module that communicates. Dispatch outline (ep_size R > 1):
    1. sort the A assignments by global expert; experts [r*L, (r+1)*L) live on EP rank r;
    2. all-to-all the per-expert counts, so every rank knows how many rows it will receive (uneven
       loads, empty experts and ranks with zero tokens all work: every rank always joins both
       collectives);
    3. all-to-all the rows (variable split sizes); received rows are grouped (source rank, local
       expert) and get permuted to (local expert, source rank) for the grouped expert compute;
    4. combine reverses 3 and 1, then scatter-adds gate-weighted rows into their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Type

import torch

from .registry import Registry
from .router import Routing, count_per_expert

if TYPE_CHECKING:
    from .config import MoEConfig


# ----------------------------------------------------------------------------- drop priorities
# Each maps a routing decision to the priority order of its T tokens: order_T[i] = the token served i-th.
def _position_order(routing: Routing) -> torch.Tensor:
    """Token index: earlier tokens win."""
    return torch.arange(routing.weights_TK.shape[0], device=routing.weights_TK.device)


def _random_order(routing: Routing) -> torch.Tensor:
    """A fresh uniform permutation from the default generator (DeepSpeed's random token selection)."""
    return torch.randperm(routing.weights_TK.shape[0], device=routing.weights_TK.device)


def _score_order(routing: Routing) -> torch.Tensor:
    """Descending router probability of the token's first choice, ties by token index (V-MoE batch
    priority routing)."""
    first_T = routing.probs_TE.gather(1, routing.experts_TK[:, :1]).squeeze(1)
    return torch.sort(-first_T.detach(), stable=True).indices


DROP_PRIORITIES: Registry[Callable[[Routing], torch.Tensor]] = Registry(
    "drop_priority", {"position": _position_order, "random": _random_order, "score": _score_order})


# ----------------------------------------------------------------------------- capacity policies
class CapacityPolicy:
    """Decides ``kept_TK``: the subset of ``routing.valid_TK`` that is computed."""

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg

    def capacity(self, num_tokens, training: bool):
        """Per-expert, per-rank capacity for ``num_tokens`` real tokens: an int, or a device tensor (then a
        long tensor, computed in float64 in Python's order of operations, so the same value without a
        host sync)."""
        factor = self.cfg.capacity_factor if training else self.cfg.eval_capacity_factor
        k, E = self.cfg.experts_per_token, self.cfg.num_experts
        if torch.is_tensor(num_tokens):
            raw = torch.ceil(factor * num_tokens.to(torch.float64) * k / E)
            return raw.clamp_min(self.cfg.min_capacity).long()
        return max(self.cfg.min_capacity, math.ceil(factor * num_tokens * k / E))

    def keep(self, routing: Routing, training: bool) -> torch.Tensor:
        raise NotImplementedError


class Dropless(CapacityPolicy):
    def keep(self, routing, training):
        return routing.valid_TK


class CapacityDrop(CapacityPolicy):
    """Keep at most ``capacity`` assignments per expert, in priority order.

    Priority: all slot-0 (first choice) assignments come before slot-1 ones, and so on; within a slot
    the token order is the ``drop_priority`` entry of ``DROP_PRIORITIES``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.order = DROP_PRIORITIES.get(cfg.drop_priority)

    def token_rank(self, routing: Routing) -> torch.Tensor:
        """[T] long: the position of each token in the priority order (0 = served first)."""
        order_T = self.order(routing)
        return torch.empty_like(order_T).scatter_(0, order_T, torch.arange(order_T.numel(), device=order_T.device))

    def keep(self, routing, training):
        valid_TK = routing.valid_TK
        T, K = valid_TK.shape
        E = self.cfg.num_experts
        device = valid_TK.device
        capacity = self.capacity(routing.token_mask_T.sum(), training)
        # Every slot sorted by (expert, priority); invalid slots form a last group E. The priority key
        # k * T + token rank is unique, so no stable sort is needed. Nothing here waits for the device.
        group_TK = torch.where(valid_TK, routing.experts_TK, E)
        priority_TK = torch.arange(K, device=device)[None, :] * T + self.token_rank(routing)[:, None]
        order = torch.argsort((group_TK * (T * K) + priority_TK).flatten())
        sorted_group = group_TK.flatten()[order]
        starts = torch.searchsorted(sorted_group, torch.arange(E + 1, device=device))
        position = torch.arange(T * K, device=device) - starts[sorted_group]
        kept_sorted = (sorted_group < E) & (position < capacity)
        return torch.empty(T * K, dtype=torch.bool, device=device).scatter_(0, order, kept_sorted).view(T, K)


POLICIES: Dict[str, Type[CapacityPolicy]] = {"dropless": Dropless, "capacity": CapacityDrop}


def build_capacity_policy(cfg: MoEConfig) -> CapacityPolicy:
    return POLICIES["dropless" if cfg.dropless else "capacity"](cfg)


# ----------------------------------------------------------------------------- communication
@dataclass
class Traffic:
    """Bytes this rank's all-to-alls sent to the other ranks of its EP group. Counted only while a
    dispatcher holds one (``layer.dispatcher.traffic = Traffic()``); None, the default, costs nothing."""

    rows: int = 0    # token rows: dispatch, combine and both of their backward exchanges
    counts: int = 0  # the per-expert count exchange

    def add(self, name: str, x: torch.Tensor, send_splits: List[int], group) -> None:
        import deepspeed.comm as ds_comm

        row_bytes = x.element_size() * math.prod(x.shape[1:])
        remote = sum(send_splits) - send_splits[ds_comm.get_rank(group=group)]
        setattr(self, name, getattr(self, name) + remote * row_bytes)


class _AllToAllV(torch.autograd.Function):
    """Variable-split all-to-all through deepspeed.comm; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x_ND, send_splits: List[int], recv_splits: List[int], group, traffic=None):
        import deepspeed.comm as ds_comm

        ctx.splits, ctx.group, ctx.traffic = (send_splits, recv_splits), group, traffic
        if traffic is not None:
            traffic.add("rows", x_ND, send_splits, group)
        out = x_ND.new_empty((sum(recv_splits),) + tuple(x_ND.shape[1:]))
        ds_comm.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv_splits,
                                  input_split_sizes=send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        send_splits, recv_splits = ctx.splits
        return (_AllToAllV.apply(grad_out.contiguous(), recv_splits, send_splits, ctx.group, ctx.traffic),
                None, None, None, None)


def _exchange_counts(counts_RL: torch.Tensor, group) -> torch.Tensor:
    """counts_RL[r, l] rows this rank sends to rank r's expert l -> rows it receives, [R, L]."""
    import deepspeed.comm as ds_comm

    received = torch.empty_like(counts_RL)
    ds_comm.all_to_all_single(received, counts_RL.contiguous(), group=group)
    return received


@dataclass
class DispatchPlan:
    """What combine needs to undo dispatch."""

    token_A: torch.Tensor        # [A] token index of each expert-sorted assignment
    weight_A: torch.Tensor       # [A] gate weight of each expert-sorted assignment
    send_splits: List[int]       # rows sent to each EP rank
    recv_splits: List[int]       # rows received from each EP rank
    local_perm: Optional[torch.Tensor]  # [N] (source, expert) order -> (expert, source) order


@dataclass
class Dispatched:
    """What ``TokenDispatcher.dispatch`` returns: this rank's expert input and how to undo the move."""

    rows_ND: torch.Tensor  # rows for this rank's experts, sorted by local expert
    counts_L: List[int]    # rows per local expert
    plan: DispatchPlan


class TokenDispatcher:
    """Moves kept assignments to the ranks holding their experts, and the results back.

    Args:
        num_experts: E, global.
        ep_size: R; experts are split in contiguous blocks of L = E / R per rank.
        group: the expert-parallel process group (None when R == 1).
    """

    def __init__(self, num_experts: int, ep_size: int = 1, group=None):
        self.num_experts, self.ep_size, self.group = num_experts, ep_size, group
        self.num_local = num_experts // ep_size
        self.traffic: Optional[Traffic] = None

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, kept_TK: torch.Tensor) -> Dispatched:
        """Gather the rows for this rank's experts (x_TD [T, D], kept_TK [T, K] bool)."""
        K, E = kept_TK.shape[1], self.num_experts
        # Kept assignments by expert (token order within one), dropped ones last (group E); the counts
        # are read once, and their sum cuts the order: the layer's one host sync (the experts need
        # their row counts on the host).
        group_TK = torch.where(kept_TK, routing.experts_TK, E)
        order = torch.argsort(group_TK.flatten(), stable=True)
        counts_E = count_per_expert(routing.experts_TK, kept_TK, E)
        R, L = self.ep_size, self.num_local
        if R == 1:
            counts_L = counts_E.tolist()
            num_kept = sum(counts_L)
        else:
            counts_RL = counts_E.view(R, L)
            recv_RL = _exchange_counts(counts_RL, self.group)
            if self.traffic is not None:
                self.traffic.add("counts", counts_RL, [1] * R, self.group)
            read = torch.cat([counts_RL.sum(1), recv_RL.flatten()]).tolist()  # one host sync for all three
            send_splits, recv_flat = read[:R], read[R:]
            recv_splits = [sum(recv_flat[r * L:(r + 1) * L]) for r in range(R)]
            counts_L = [sum(recv_flat[r * L + l] for r in range(R)) for l in range(L)]
            num_kept = sum(send_splits)
        flat_A = order[:num_kept]
        token_A = torch.div(flat_A, K, rounding_mode="floor")
        weight_A = routing.weights_TK.flatten()[flat_A]
        x_AD = x_TD.index_select(0, token_A)
        if R == 1:
            return Dispatched(x_AD, counts_L, DispatchPlan(token_A, weight_A, [], [], None))
        x_ND = _AllToAllV.apply(x_AD, send_splits, recv_splits, self.group, self.traffic)
        # Received rows come grouped by (source rank, local expert); regroup by local expert.
        segment_N = torch.repeat_interleave(torch.arange(R * L, device=x_ND.device), recv_RL.flatten(),
                                            output_size=x_ND.shape[0])
        local_perm = torch.argsort((segment_N % L) * R + segment_N // L, stable=True)
        plan = DispatchPlan(token_A, weight_A, send_splits, recv_splits, local_perm)
        return Dispatched(x_ND.index_select(0, local_perm), counts_L, plan)

    def combine(self, y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        """Send expert outputs home and sum them per token, weighted by the gates: [T, D]."""
        if self.ep_size > 1:
            y_back = torch.empty_like(y_ND).index_copy(0, plan.local_perm, y_ND)
            y_ND = _AllToAllV.apply(y_back, plan.recv_splits, plan.send_splits, self.group, self.traffic)
        weighted_AD = y_ND * plan.weight_A.to(y_ND.dtype)[:, None]
        out_TD = y_ND.new_zeros((num_tokens,) + tuple(y_ND.shape[1:]))
        return out_TD.index_add_(0, plan.token_A, weighted_AD)  # in place: no copy of the zeros

