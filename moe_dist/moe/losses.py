"""Auxiliary router losses and routing statistics, computed on real (non-padding) tokens only.

Shape legend: T tokens, E experts, K slots per token, G token groups (the layer's modalities, then one
group of all real tokens), C per-token columns.

All losses are unweighted here; ``MoELayer`` multiplies them by the coefficients in ``MoEConfig``.
    load_balance   E * sum_e f_e * P_e  (Switch/GShard). f_e: share of the selected (token, expert)
                   assignments that chose expert e, before capacity drops; P_e: mean gate probability
                   of e. Uniform routing gives exactly 1.
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
from typing import Dict, Iterable, Iterator, Optional

import torch

from .router import MODALITY_NAMES, Routing
from .tensors import cast

LOSSES = ("load_balance", "z_loss", "entropy_local", "entropy_global")


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
    """

    losses: Dict[str, torch.Tensor]
    stats: RoutingStats


def _column(t: torch.Tensor, differentiate: bool) -> torch.Tensor:
    return t if differentiate else t.detach()


def _sum_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (CPU, CUDA); float32 elsewhere (MPS and HPU have no float64):
    counts then stay exact up to 2^24 tokens per call."""
    return torch.float64 if device.type in ("cpu", "cuda") else torch.float32


def summarize(routing: Routing, kept_TK: torch.Tensor, differentiate: Iterable[str] = LOSSES) -> RoutingSummary:
    """The losses and statistics of one routing decision (see the module docstring).

    Args:
        routing: the router's decision.
        kept_TK: [T, K] bool, the assignments the capacity policy kept (``routing.valid_TK`` when dropless).
        differentiate: names in ``LOSSES`` that need a gradient. The columns only the others use
            (the entropy, the probabilities, the logsumexp) are detached, so backward never runs through
            their computation; the values of all four are reported either way.
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
    ent_T = _column(routing.lse_T, local) - (_column(probs_TE, local) * _column(routing.logits_TE, local)).sum(-1)
    lse2_T = _column(routing.lse_T, "z_loss" in wanted).square()
    onehot_TE = torch.zeros(T, E, dtype=f64, device=probs_TE.device)
    columns = [_column(probs_TE, differentiate_p), ent_T[:, None], lse2_T[:, None], mask_T[:, None],
               onehot_TE.scatter_add(1, routing.experts_TK, routing.valid_TK.to(f64))]
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
    selected_E = counts_GN[-1, 1:E + 1]
    per_modality = slice(None) if mod_T is None else slice(0, -1)  # the entropy losses' groups
    losses = {
        "load_balance": cast(E / selected_E.sum().clamp_min(1), dtype) * (cast(selected_E, dtype) @ mean_p_GE[-1]),
        "z_loss": mean_lse2_G1[-1, 0],
        "entropy_local": mean_ent_G1[per_modality].sum(),
        "entropy_global": _negative_entropy_sum(mean_p_GE[per_modality]),
    }
    stats = RoutingStats(sums_GC.detach(), E, names, dtype, has_kept)
    return RoutingSummary(losses, stats)
