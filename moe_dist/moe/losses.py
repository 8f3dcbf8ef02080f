"""Auxiliary router losses and routing statistics, computed on real (non-padding) tokens only.

Shape legend: T tokens, E experts, K slots per token, G token groups (the layer's modalities, then one
group of all real tokens), C per-token columns.

All losses are unweighted here; ``MoELayer`` multiplies them by the coefficients in ``MoEConfig``.
    load_balance   E * sum_e f_e * P_e  (Switch/GShard). f_e: share of the selected (token, expert)
                   assignments that chose expert e, before capacity drops; P_e: mean gate probability
                   of e. Uniform routing gives exactly 1. ``MoEConfig.load_balance`` picks the tokens
                   f and P count (``BALANCE_LOSSES``):
                   micro_batch   the call's real tokens, as above;
                   global_batch  per modality m: E_m * sum_e F_me * P_me, F from the selections of every
                                 micro batch of the optimizer step so far on every rank (moe/balance.py),
                                 P from this call; the modalities weighted by their share of the call's
                                 tokens (Qwen, arXiv 2501.11873);
                   sequence      per (sequence, modality) s: E_m * sum_e f_se * P_se, averaged over the
                                 non-empty s (DeepSeek-V2).
                   E_m is the number of experts open to modality m (E without modality_experts), so
                   uniform routing gives 1 in every variant.
    z_loss         mean_t logsumexp(logits_t)^2  (ST-MoE).
    entropy_local  sum over modalities m of mean_{t in m} H(p_t)       (LIMoE; low = confident tokens)
    entropy_global sum over modalities m of -H(mean_{t in m} p_t)      (LIMoE; low = experts all used)
Without a modality tensor all tokens form one group.

One pass computes all of it (``summarize``):
    1. per-token columns: p_t, H(p_t) (as lse_t - sum_e p_te logit_te: three operators, no log),
       logsumexp(logits_t)^2, the token mask, and the one-hot selected and kept experts of token t;
    2. their sums per group: one [G, T] x [T, C] product in float64 (counts stay exact, and TF32 never
       applies; float32 on a device without float64), divided by the group sizes;
    3. the losses from those means. The statistics are derived from the same sums when first read
       (``RoutingStats``): a training step that logs nothing never computes them.
A layer call therefore runs a fixed few dozen operators, whatever the number of modalities: where the
host launches every kernel (a GPU step waits on the host, docs/performance.md) the operator count is the
cost. A column that only undifferentiated losses (coefficient 0) use is detached, so backward never runs
through its computation. The overall statistics cover every real token, the per-modality ones the
tokens of each modality in ``MoEConfig.modalities``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch

from .config import LOSSES
from .registry import BALANCE_LOSSES
from .router import MODALITY_NAMES, Routing
from .tensors import cast


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy along the last dim; 0*log(0) = 0 with finite gradients."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def _negative_entropy_sum(p: torch.Tensor) -> torch.Tensor:
    """-sum of the rows' entropies, ``-entropy(p).sum()`` in two operators fewer."""
    return (p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()


class RoutingStats(Mapping):
    """The detached statistics of one routing decision, derived from its per-group sums on first read.

    Keys, overall and per modality ("name/image", "name/text", and "name/cross" when the layer's config
    has three modalities): tokens_per_expert [E] assignments kept per expert; routed_per_expert [E]
    before drops; dropped_fraction: dropped / selected assignments; router_entropy: mean H(p_t) over
    tokens; num_tokens.
    """

    def __init__(self, sums_GC: torch.Tensor, num_experts: int, names, dtype: torch.dtype, has_kept: bool):
        self._sums, self._E, self._names, self._dtype, self._has_kept = sums_GC, num_experts, names, dtype, has_kept
        self._values: Optional[Dict[str, torch.Tensor]] = None

    def _compute(self) -> Dict[str, torch.Tensor]:
        if self._values is None:
            E, sums = self._E, self._sums  # the columns of summarize's values_TC, summed per group
            n_G = sums[:, E + 2]
            selected_GE = sums[:, E + 3:2 * E + 3]
            kept_GE = sums[:, 2 * E + 3:3 * E + 3] if self._has_kept else selected_GE
            dropped_G = (1.0 - kept_GE.sum(1) / selected_GE.sum(1).clamp_min(1)).to(self._dtype)
            columns = {"routed_per_expert": selected_GE.long(), "tokens_per_expert": kept_GE.long(),
                       "dropped_fraction": dropped_G,
                       "router_entropy": (sums[:, E] / n_G.clamp_min(1)).to(self._dtype),
                       "num_tokens": n_G.long()}
            self._values = {key + ("" if name is None else f"/{name}"): row
                            for key, column in columns.items() for name, row in zip(self._names, column.unbind(0))}
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._compute()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._compute())

    def __len__(self) -> int:
        return len(self._compute())

    def __repr__(self) -> str:
        return f"RoutingStats({self._compute()!r})"


@dataclass
class RoutingSummary:
    """What ``summarize`` returns.

    Attributes:
        losses: name in ``LOSSES`` -> unweighted scalar loss (in the router's dtype).
        stats: a ``RoutingStats`` mapping (detached; computed when first read).
        load_ME: [M, E] selected assignments per modality row (one row without modalities), detached
            float64: what moe/balance.py accumulates over the optimizer step.
    """

    losses: Dict[str, torch.Tensor]
    stats: RoutingStats
    load_ME: Optional[torch.Tensor] = None


@dataclass
class BalanceInputs:
    """What the balance losses beyond the micro batch's need from the layer.

    Attributes:
        experts_M: [M] experts open to each modality row (E each without modality_experts); float.
        global_load: global_batch: maps this call's ``load_ME`` to the step's global one (the selections
            of the step's earlier micro batches and this one, summed over every rank).
        sample_T: sequence: the sequence index of each token.
        num_samples: sequence: the number of sequences.
    """

    experts_M: torch.Tensor
    global_load: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    sample_T: Optional[torch.Tensor] = None
    num_samples: int = 1


@dataclass
class _Means:
    """Per-group sums ``summarize`` derived (rows: the modalities, then every real token; or one row)."""

    mean_p_GE: torch.Tensor  # mean gate distribution, router dtype, differentiable when asked
    probs_TE: torch.Tensor  # the gate distribution per token (detached unless the balance loss is differentiated)
    counts_GN: torch.Tensor  # [real tokens | selected (E) | kept (E)], detached float64
    rows: slice  # the per-modality rows (every row but the last with modalities, else the one row)


def _micro_batch_balance(routing: Routing, means: _Means, onehot_TE, inputs: Optional[BalanceInputs]):
    E = routing.probs_TE.shape[1]
    selected_E = means.counts_GN[-1, 1:E + 1]
    dtype = means.mean_p_GE.dtype
    return cast(E / selected_E.sum().clamp_min(1), dtype) * (cast(selected_E, dtype) @ means.mean_p_GE[-1])


def _global_batch_balance(routing: Routing, means: _Means, onehot_TE, inputs: Optional[BalanceInputs]):
    E = routing.probs_TE.shape[1]
    counts_MN = means.counts_GN[means.rows]
    load_ME = counts_MN[:, 1:E + 1]
    if inputs is not None and inputs.global_load is not None and torch.is_grad_enabled():
        load_ME = inputs.global_load(load_ME)  # evaluation and no-grad calls use the call's own load
    dtype = means.mean_p_GE.dtype
    f_ME = cast(load_ME / load_ME.sum(-1, keepdim=True).clamp_min(1), dtype)
    share_M = cast(counts_MN[:, 0] / means.counts_GN[-1, 0].clamp_min(1), dtype)
    experts_M = _experts_per_row(inputs, load_ME.shape[0], E, dtype, load_ME.device)
    return (share_M * experts_M * (f_ME * means.mean_p_GE[means.rows]).sum(-1)).sum()


def _sequence_balance(routing: Routing, means: _Means, onehot_TE, inputs: Optional[BalanceInputs]):
    probs_TE, mask_T = means.probs_TE, routing.token_mask_T
    T, E = probs_TE.shape
    M = 1 if routing.modality_T is None else len(routing.modalities)
    sample_T = inputs.sample_T if inputs is not None and inputs.sample_T is not None else None
    S = (inputs.num_samples if sample_T is not None else 1) * M
    segment_T = torch.zeros(T, dtype=torch.long, device=probs_TE.device) if sample_T is None else sample_T * M
    if M > 1:
        segment_T = segment_T + routing.modality_T.long().clamp(0, M - 1)
    f64 = onehot_TE.dtype
    real_T1 = mask_T[:, None]
    # [S, E + 1 + E]: sums of p (real tokens), the real-token count and the selected one-hot per segment
    sums_SC = torch.zeros(S, 2 * E + 1, dtype=f64, device=probs_TE.device).index_add_(
        0, segment_T, torch.cat([probs_TE.to(f64) * real_T1, real_T1.to(f64), onehot_TE], 1))
    n_S1 = sums_SC[:, E:E + 1]
    p_SE = (sums_SC[:, :E] / n_S1.clamp_min(1)).to(probs_TE.dtype)
    load_SE = sums_SC[:, E + 1:].detach()
    f_SE = cast(load_SE / load_SE.sum(-1, keepdim=True).clamp_min(1), probs_TE.dtype)
    experts_S = _experts_per_row(inputs, M, E, probs_TE.dtype, probs_TE.device).repeat(S // M)
    present_S = cast((n_S1[:, 0] > 0).detach(), probs_TE.dtype)
    per_segment_S = experts_S * (f_SE * p_SE).sum(-1) * present_S
    return per_segment_S.sum() / present_S.sum().clamp_min(1)


def _experts_per_row(inputs: Optional[BalanceInputs], rows: int, E: int, dtype, device) -> torch.Tensor:
    if inputs is None:
        return torch.full((rows,), float(E), dtype=dtype, device=device)
    return cast(inputs.experts_M[:rows], dtype)


BALANCE_LOSSES.register("micro_batch", _micro_batch_balance)
BALANCE_LOSSES.register("global_batch", _global_batch_balance)
BALANCE_LOSSES.register("sequence", _sequence_balance)


def _column(t: torch.Tensor, differentiate: bool) -> torch.Tensor:
    return t if differentiate else t.detach()


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA); float32 elsewhere (MPS and HPU have no float64):
    counts then stay exact up to 2^24 tokens per call."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def summarize(routing: Routing, kept_TK: torch.Tensor, differentiate: Iterable[str] = LOSSES,
              balance: str = "micro_batch", inputs: Optional[BalanceInputs] = None) -> RoutingSummary:
    """The losses and statistics of one routing decision (see the module docstring).

    Args:
        routing: the router's decision.
        kept_TK: [T, K] bool, the assignments the capacity policy kept (``routing.valid_TK`` when dropless).
        differentiate: names in ``LOSSES`` that need a gradient. The columns only the others use
            (the entropy, the probabilities, the logsumexp) are detached, so backward never runs through
            their computation; the values of all four are reported either way.
        balance: the ``BALANCE_LOSSES`` entry of the load-balance loss.
        inputs: what that entry needs beyond the routing (``BalanceInputs``); None for micro_batch.
    """
    unknown = set(differentiate) - set(LOSSES)
    if unknown:
        raise ValueError(f"summarize(differentiate=...) names unknown losses {sorted(unknown)}; use names in {LOSSES}")
    wanted = set(differentiate) if torch.is_grad_enabled() else set()
    probs_TE, mask_T, mod_T = routing.probs_TE, routing.token_mask_T, routing.modality_T
    T, E = probs_TE.shape
    dtype, f64 = probs_TE.dtype, _sum_dtype(probs_TE.device)
    # 1. per-token columns: [p (E) | H | lse^2 | real | selected one-hot (E) | kept one-hot (E, with drops)]
    differentiate_p = bool(wanted & {"load_balance", "entropy_global"})
    local = "entropy_local" in wanted
    if routing.softmax:
        ent_T = _column(routing.lse_T, local) - (_column(probs_TE, local) * _column(routing.logits_TE, local)).sum(-1)
    else:  # sigmoid scores: no entropy loss (MoEConfig refuses it); the statistic from the distribution
        ent_T = entropy(probs_TE.detach())
    lse2_T = _column(routing.lse_T, "z_loss" in wanted).square()
    onehot_TE = torch.zeros(T, E, dtype=f64, device=probs_TE.device)
    selected_TE = onehot_TE.scatter_add(1, routing.experts_TK, routing.valid_TK.to(f64))
    columns = [_column(probs_TE, differentiate_p), ent_T[:, None], lse2_T[:, None], mask_T[:, None], selected_TE]
    has_kept = kept_TK is not routing.valid_TK  # capacity drops: kept is a subset of selected
    if has_kept:  # the out-of-place scatter above left onehot_TE zero: it becomes the kept one-hot
        columns.append(onehot_TE.scatter_add_(1, routing.experts_TK, kept_TK.to(f64)))
    values_TC = torch.cat(columns, 1)  # float64 (cat promotes)
    # 2. sums per group; the last group is every real token (also those of a modality not reported)
    if mod_T is None:
        member_GT = mask_T[None, :].to(f64)
        names = [None]
    else:
        G = len(routing.modalities)
        assert tuple(routing.modalities) == tuple(range(G)), routing.modalities  # MoEConfig.modalities
        groups_G1 = torch.arange(G + 1, device=mod_T.device)[:, None]
        member_GT = ((mod_T[None, :] == groups_G1) | (groups_G1 == G)) & mask_T[None, :]
        member_GT = member_GT.to(f64)
        names = [MODALITY_NAMES[m] for m in routing.modalities] + [None]
    sums_GC = member_GT @ values_TC
    # one split (its backward is one operator; slices would each add a zero-filled gradient)
    sums_GV, counts_GN = sums_GC.split([E + 2, sums_GC.shape[1] - E - 2], dim=1)
    counts_GN = counts_GN.detach()  # [real tokens | selected (E) | kept (E, with drops)]
    mean_p_GE, mean_ent_G1, mean_lse2_G1 = cast(sums_GV / counts_GN[:, :1].clamp_min(1), dtype).split([E, 1, 1], 1)
    # 3. losses from the means and counts
    per_modality = slice(None) if mod_T is None else slice(0, -1)  # the per-modality losses' groups
    means = _Means(mean_p_GE, _column(probs_TE, "load_balance" in wanted), counts_GN, per_modality)
    losses = {
        "load_balance": BALANCE_LOSSES.get(balance)(routing, means, selected_TE, inputs),
        "z_loss": mean_lse2_G1[-1, 0],
        "entropy_local": mean_ent_G1[per_modality].sum(),
        "entropy_global": _negative_entropy_sum(mean_p_GE[per_modality]),
    }
    stats = RoutingStats(sums_GC.detach(), E, names, dtype, has_kept)
    return RoutingSummary(losses, stats, counts_GN[per_modality, 1:E + 1])
