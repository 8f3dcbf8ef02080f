"""Which routed assignments survive capacity, and moving tokens to their experts and back.

Shape legend: T tokens, D hidden, E experts (global), L local experts per rank, R expert-parallel ranks,
K slots per token, S rows of this rank's send layout, A kept (token, expert) assignments on this rank,
C capacity, N rows at this rank's experts (sorted by local expert).

This is the only module that communicates. Nothing here reads the host at ep_size 1, nor with a
capacity in training at R > 1: shapes follow from T, the group ends stay on the device
(``Dispatched.offs_L``), and rows that are not computed carry a zero gate weight.

Dispatch outline:
    1. sort all T*K assignments by expert (kept ones by token within an expert, the rest last);
    ep_size 1: 2. gather those rows; combine scatter-adds the gate-weighted outputs into their tokens.
    ep_size R > 1, fixed exchange (a capacity C):
       2. place each kept assignment in an [E, C] send buffer (zero rows where an expert has fewer);
       3. all-to-all [L, C] blocks (equal splits), regroup [R, L, C] -> [L, R, C] for the experts;
       4. combine reverses 3 and gathers each assignment's row from the returned buffer.
    ep_size R > 1, counted exchange (dropless, evaluation):
       2. all-to-all the per-expert counts and read them once (the split sizes; uneven loads, empty
          experts and ranks with zero tokens all work: every rank always joins both collectives);
       3. all-to-all the kept rows; received rows are grouped (source rank, local expert) and get
          permuted to (local expert, source rank) for the experts;
       4. combine reverses 3, then scatter-adds gate-weighted rows into their tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Type

import torch

from .config import MoEConfig
from .registry import DROP_PRIORITIES
from .router import Routing, expert_choice_capacity
from .tensors import cast


# ----------------------------------------------------------------------------- drop priorities
# Each maps a routing decision to the priority order of its T tokens (order_T[i] = the token served
# i-th), or None for token order itself (no operator at all).
def _position_order(routing: Routing) -> Optional[torch.Tensor]:
    """Token index: earlier tokens win."""
    return None


def _random_order(routing: Routing) -> torch.Tensor:
    """A fresh uniform permutation from the default generator (DeepSpeed's random token selection)."""
    return torch.randperm(routing.weights_TK.shape[0], device=routing.weights_TK.device)


def _score_order(routing: Routing) -> torch.Tensor:
    """Descending router probability of the token's first choice, ties by token index (V-MoE batch
    priority routing)."""
    first_T = routing.probs_TE.gather(1, routing.experts_TK[:, :1]).squeeze(1)
    return torch.sort(-first_T.detach(), stable=True).indices


DROP_PRIORITIES.register("position", _position_order)
DROP_PRIORITIES.register("random", _random_order)
DROP_PRIORITIES.register("score", _score_order)


# ----------------------------------------------------------------------------- capacity policies
class CapacityPolicy:
    """Decides ``kept_TK``: the subset of ``routing.valid_TK`` that is computed."""

    def __init__(self, cfg: MoEConfig):
        self.cfg = cfg

    def capacity(self, num_tokens, training: bool):
        """Per-expert, per-rank capacity for ``num_tokens`` real tokens, max(min_capacity, ceil(factor *
        tokens * K / E)): an int; or, for a device tensor, the float64 bound before the ceiling, computed
        in Python's order of operations (an integer position p is below the capacity exactly when it is
        below this bound), with no host read."""
        factor = self.cfg.capacity_factor if training else self.cfg.eval_capacity_factor
        k, E = self.cfg.experts_per_token, self.cfg.num_experts
        if torch.is_tensor(num_tokens):
            return (factor * num_tokens.to(torch.float64) * k / E).clamp_min(self.cfg.min_capacity)
        return max(self.cfg.min_capacity, math.ceil(factor * num_tokens * k / E))

    def keep(self, routing: Routing, training: bool) -> torch.Tensor:
        raise NotImplementedError

    def buffer_capacity(self, num_tokens: int) -> Optional[int]:
        """A bound on any expert's kept assignments in training with ``num_tokens`` tokens (padding
        included), known before routing; None when there is none (dropless)."""
        return self.capacity(num_tokens, training=True)


class Dropless(CapacityPolicy):
    def keep(self, routing, training):
        return routing.valid_TK

    def buffer_capacity(self, num_tokens):
        return None


class CapacityDrop(CapacityPolicy):
    """Keep at most ``capacity`` assignments per expert, in priority order.

    Priority: all slot-0 (first choice) assignments come before slot-1 ones, and so on; within a slot
    the token order is the ``drop_priority`` entry of ``DROP_PRIORITIES``. An assignment's place in its
    expert's queue is a running count over the [K*T, E] one-hot of the assignments in that order
    (GShard's cumsum): no sort, a dozen operators, nothing read on the host.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.order = DROP_PRIORITIES.get(cfg.drop_priority)

    def keep(self, routing, training):
        T, K = routing.valid_TK.shape
        E = self.cfg.num_experts
        capacity = self.capacity(routing.token_mask_T.sum(), training)
        order_T = self.order(routing)
        experts_KT, valid_KT = routing.experts_TK.t(), routing.valid_TK.t()  # slot-major: first choices first
        if order_T is not None:
            experts_KT, valid_KT = experts_KT[:, order_T], valid_KT[:, order_T]
        experts_S1 = experts_KT.reshape(-1, 1)
        onehot_SE = (experts_S1 == torch.arange(E, device=experts_S1.device)) & valid_KT.reshape(-1, 1)
        # place in the expert's queue (0 = served first); int32 holds any T*K
        place_S = onehot_SE.cumsum(0, dtype=torch.int32).gather(1, experts_S1)[:, 0] - 1
        kept_KT = ((place_S < capacity) & valid_KT.reshape(-1)).view(K, T)
        if order_T is not None:  # back to token order
            kept_KT = torch.empty_like(kept_KT).scatter_(1, order_T.expand(K, T), kept_KT)
        return kept_KT.t()


class ExpertChoiceCapacity(CapacityPolicy):
    """Expert-Choice: the router already chose exactly C tokens per expert, so everything is kept, and
    C bounds the exchange buffer in training and evaluation alike (dropless does not apply)."""

    def keep(self, routing, training):
        return routing.valid_TK

    def buffer_capacity(self, num_tokens):
        return expert_choice_capacity(self.cfg, num_tokens)


POLICIES: Dict[str, Type[CapacityPolicy]] = {"dropless": Dropless, "capacity": CapacityDrop,
                                             "expert_choice": ExpertChoiceCapacity}


def build_capacity_policy(cfg: MoEConfig) -> CapacityPolicy:
    """The router's own policy when it fixes one (Expert-Choice), else dropless or capacity drops."""
    return POLICIES[cfg.router_class.capacity_policy or ("dropless" if cfg.dropless else "capacity")](cfg)


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
    """What combine needs to undo dispatch. Rows are this rank's send layout: at ep_size 1 (and in the
    variable exchange) the assignments sorted by expert; in the fixed exchange all T*K assignments."""

    token_S: torch.Tensor                   # [S] token of each row
    weight_S: torch.Tensor                  # [S] gate weight, 0 for a row that is not computed
    send_splits: Optional[List[int]] = None  # variable exchange: rows sent to each EP rank ...
    recv_splits: Optional[List[int]] = None  # ... and received from each
    local_perm: Optional[torch.Tensor] = None  # variable exchange: [N] (source, expert) -> (expert, source) order
    slot_S: Optional[torch.Tensor] = None   # fixed exchange: [S] slot e*C + c of each row in the [E*C] buffer
    capacity: int = 0                       # fixed exchange: C


@dataclass
class Dispatched:
    """What ``TokenDispatcher.dispatch`` returns: this rank's expert input and how to undo the move."""

    rows_ND: torch.Tensor  # rows for this rank's experts, sorted by local expert
    offs_L: torch.Tensor   # [L] int32 cumulative row counts per local expert, on the rows' device
    plan: DispatchPlan


@dataclass
class _Sorted:
    """Every (token, slot) assignment sorted by expert, token order within one, the ones not kept last;
    all on the device."""

    order_S: torch.Tensor  # [T*K] flat assignment index, in that order
    group_S: torch.Tensor  # [T*K] its expert (E when not kept)
    ends_E: torch.Tensor   # [E] int32, where each expert's rows end (searchsorted: no counting buffer)

    def starts(self) -> torch.Tensor:
        """[E] int32, where each expert's rows begin."""
        experts_E = torch.arange(self.ends_E.shape[0], device=self.group_S.device, dtype=self.group_S.dtype)
        return torch.searchsorted(self.group_S, experts_E, out_int32=True)


def _sort_by_expert(routing: Routing, kept_TK: torch.Tensor, num_experts: int) -> _Sorted:
    group_TK = torch.where(kept_TK, routing.experts_TK, num_experts)
    order_S = torch.argsort(group_TK.flatten(), stable=True)
    group_S = group_TK.flatten()[order_S]
    experts_E = torch.arange(num_experts, device=group_S.device, dtype=group_S.dtype)
    return _Sorted(order_S, group_S, torch.searchsorted(group_S, experts_E, right=True, out_int32=True))


class TokenDispatcher:
    """Moves kept assignments to the ranks holding their experts, and the results back; ep_size 1.

    Every assignment gets a row, T*K of them sorted by expert with the ones not kept last: the shapes
    are fixed by T, and the experts take the group ends as a device tensor, so dispatch and combine read
    nothing on the host (a capacity drop or an invalid threshold slot only costs its row).

    Args:
        num_experts: E, global.
        ep_size: R; experts are split in contiguous blocks of L = E / R per rank.
        group: the expert-parallel process group (None when R == 1).
    """

    def __init__(self, num_experts: int, ep_size: int = 1, group=None):
        self.num_experts, self.ep_size, self.group = num_experts, ep_size, group
        self.num_local = num_experts // ep_size
        self.traffic: Optional[Traffic] = None

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, kept_TK: torch.Tensor,
                 capacity: Optional[int] = None) -> Dispatched:
        """Gather the rows for this rank's experts (x_TD [T, D], kept_TK [T, K] bool). ``capacity``, an
        int bound on every expert's kept assignments, lets an expert-parallel dispatcher exchange
        fixed-size buffers; None (dropless) needs the counts."""
        K = kept_TK.shape[1]
        s = _sort_by_expert(routing, kept_TK, self.num_experts)
        token_S = torch.div(s.order_S, K, rounding_mode="floor")
        weights_TK = routing.weights_TK if kept_TK is routing.valid_TK else routing.weights_TK * kept_TK
        plan = DispatchPlan(token_S, weights_TK.flatten()[s.order_S])  # 0 where not kept (not valid: router)
        return Dispatched(x_TD.index_select(0, token_S), s.ends_E, plan)

    def combine(self, y_ND: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        """Sum the expert outputs per token, weighted by the gates: [T, D]."""
        return _weighted_sum(y_ND, plan, num_tokens)


def _weighted_sum(y_SD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    weighted_SD = y_SD * cast(plan.weight_S, y_SD.dtype)[:, None]
    out_TD = y_SD.new_zeros((num_tokens,) + tuple(y_SD.shape[1:]))
    return out_TD.index_add_(0, plan.token_S, weighted_SD)  # in place: no copy of the zeros


class ExpertParallelDispatcher(TokenDispatcher):
    """ep_size R > 1: the only place that exchanges tokens (module docstring).

    With a capacity (training with capacity drops) every rank sends every other one a fixed [L, C]
    block of rows per exchange, padded with zero rows: shapes are known before the routing, so nothing
    is read on the host. This needs every rank of the group to route the same number of tokens T per
    call (C derives from T), as the trainer's fixed micro batch and context length give. Without one
    (dropless, and evaluation) the rows go as they are: their counts are exchanged and read once.
    """

    def dispatch(self, x_TD, routing, kept_TK, capacity=None):
        if capacity is None:
            return self._dispatch_counted(x_TD, routing, kept_TK)
        return self._dispatch_fixed(x_TD, routing, kept_TK, capacity)

    def _dispatch_fixed(self, x_TD, routing, kept_TK, capacity: int) -> Dispatched:
        T, K = kept_TK.shape
        # C >= 1: with T = 0 and min_capacity = 0 every rank still exchanges (empty) [L, 1] blocks
        E, R, L, C, D = self.num_experts, self.ep_size, self.num_local, max(1, capacity), x_TD.shape[1]
        s = _sort_by_expert(routing, kept_TK, E)
        # slot of each sorted assignment in the [E*C] send buffer: its expert's block, at its rank among
        # the expert's kept assignments (< C by the policy); the ones not kept go to a spare slot E*C
        rank_S = torch.arange(T * K, device=x_TD.device) - s.starts().index_select(0, s.group_S.clamp_max(E - 1))
        slot_S = torch.where(s.group_S < E, s.group_S * C + rank_S, E * C)
        token_S = torch.div(s.order_S, K, rounding_mode="floor")
        weight_S = (routing.weights_TK * kept_TK).flatten()[s.order_S]
        buffer_D = x_TD.new_zeros((E * C + 1,) + tuple(x_TD.shape[1:]))
        send_XD = buffer_D.index_copy(0, slot_S, x_TD.index_select(0, token_S))[:E * C]
        splits = [L * C] * R
        recv_XD = _AllToAllV.apply(send_XD, splits, splits, self.group, self.traffic)
        # received [R source, L expert, C]; the experts want [L, R, C]
        rows_ND = recv_XD.view(R, L, C, D).transpose(0, 1).reshape(L * R * C, D)
        offs_L = torch.arange(1, L + 1, device=x_TD.device, dtype=torch.int32) * (R * C)
        plan = DispatchPlan(token_S, weight_S, slot_S=slot_S.clamp_max(E * C - 1), capacity=C)
        return Dispatched(rows_ND, offs_L, plan)

    def _dispatch_counted(self, x_TD, routing, kept_TK) -> Dispatched:
        K = kept_TK.shape[1]
        R, L = self.ep_size, self.num_local
        s = _sort_by_expert(routing, kept_TK, self.num_experts)
        counts_RL = (s.ends_E - s.starts()).long().view(R, L)
        recv_RL = _exchange_counts(counts_RL, self.group)
        if self.traffic is not None:
            self.traffic.add("counts", counts_RL, [1] * R, self.group)
        # the layer's one host read: the split sizes all_to_all needs, all three lists in one copy
        read = torch.cat([counts_RL.sum(1), recv_RL.flatten()]).tolist()
        send_splits, recv_flat = read[:R], read[R:]
        recv_splits = [sum(recv_flat[r * L:(r + 1) * L]) for r in range(R)]
        flat_A = s.order_S[:sum(send_splits)]
        token_A = torch.div(flat_A, K, rounding_mode="floor")
        weight_A = routing.weights_TK.flatten()[flat_A]
        x_ND = _AllToAllV.apply(x_TD.index_select(0, token_A), send_splits, recv_splits, self.group, self.traffic)
        # Received rows come grouped by (source rank, local expert); regroup by local expert.
        segment_N = torch.repeat_interleave(torch.arange(R * L, device=x_ND.device), recv_RL.flatten(),
                                            output_size=x_ND.shape[0])
        local_perm = torch.argsort((segment_N % L) * R + segment_N // L, stable=True)
        plan = DispatchPlan(token_A, weight_A, send_splits, recv_splits, local_perm)
        return Dispatched(x_ND.index_select(0, local_perm), recv_RL.sum(0).cumsum(0).to(torch.int32), plan)

    def combine(self, y_ND, plan, num_tokens):
        """Send expert outputs home and sum them per token, weighted by the gates: [T, D]."""
        if plan.slot_S is not None:  # fixed exchange
            R, L, C, D = self.ep_size, self.num_local, plan.capacity, y_ND.shape[1]
            y_back = y_ND.view(L, R, C, D).transpose(0, 1).reshape(R * L * C, D)
            y_XD = _AllToAllV.apply(y_back, [L * C] * R, [L * C] * R, self.group, self.traffic)
            return _weighted_sum(y_XD.index_select(0, plan.slot_S), plan, num_tokens)
        y_back = torch.empty_like(y_ND).index_copy(0, plan.local_perm, y_ND)
        y_AD = _AllToAllV.apply(y_back, plan.recv_splits, plan.send_splits, self.group, self.traffic)
        return _weighted_sum(y_AD, plan, num_tokens)


def build_dispatcher(num_experts: int, ep_size: int, group) -> TokenDispatcher:
    return (ExpertParallelDispatcher if ep_size > 1 else TokenDispatcher)(num_experts, ep_size, group)
