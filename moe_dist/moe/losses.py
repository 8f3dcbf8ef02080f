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
    1. per-token columns: p_t, H(p_t), logsumexp(logits_t)^2, and the one-hot selected and kept
       experts of token t;
    2. their means (and the counts' sums) per group: [G, T] x [T, C] products in float64 (counts stay
       exact, and TF32 never applies; float32 on a device without float64);
    3. losses and statistics from those sums.
A layer call therefore runs a fixed few dozen operators, whatever the number of modalities: where the
host launches every kernel (a GPU step waits on the host, docs/performance.md) the operator count is the
cost. A column that only undifferentiated losses (coefficient 0) use is detached, so backward never runs
through its computation. The overall statistics cover every real token, the per-modality ones the
tokens of each modality in ``MoEConfig.modalities``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable

import torch

from .router import MODALITY_NAMES, Routing

LOSSES = ("load_balance", "z_loss", "entropy_local", "entropy_global")


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy along the last dim; 0*log(0) = 0 with finite gradients."""
    logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    return -(p * torch.where(p > 0, logp, 0.0)).sum(-1)


@dataclass
class RoutingSummary:
    """What ``summarize`` returns.

    Attributes:
        losses: name in ``LOSSES`` -> unweighted scalar loss (in the router's dtype).
        stats: detached statistics, overall and per modality ("name/image", "name/text", and
            "name/cross" when the layer's config has three modalities): tokens_per_expert [E] assignments
            kept per expert; routed_per_expert [E] before drops; dropped_fraction: dropped / selected
            assignments; router_entropy: mean H(p_t) over tokens; num_tokens.
    """

    losses: Dict[str, torch.Tensor]
    stats: Dict[str, torch.Tensor]


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
    # 1. per-token columns
    ent_T = entropy(_column(probs_TE, "entropy_local" in wanted))
    lse2_T = _column(routing.lse_T, "z_loss" in wanted).square()
    probs_col = _column(probs_TE, bool(wanted & {"load_balance", "entropy_global"}))
    values_TC = torch.cat([probs_col, ent_T[:, None], lse2_T[:, None]], 1).to(f64)
    onehot_TE = torch.zeros(T, E, dtype=f64, device=probs_TE.device)
    selected_TE = onehot_TE.scatter_add(1, routing.experts_TK, routing.valid_TK.to(f64))
    counted = [selected_TE]
    if kept_TK is not routing.valid_TK:  # capacity drops: kept is a subset of selected
        # the out-of-place scatter above left onehot_TE zero: it becomes the kept one-hot
        counted.append(onehot_TE.scatter_add_(1, routing.experts_TK, kept_TK.to(f64)))
    # 2. sums per group; the last group is every real token (also those of a modality not reported)
    if mod_T is None:
        member_TG = mask_T[:, None]
        names = [None]
    else:
        G = len(routing.modalities)
        assert tuple(routing.modalities) == tuple(range(G)), routing.modalities  # MoEConfig.modalities
        member_TG = torch.cat([mod_T[:, None] == torch.arange(G, device=mod_T.device), mask_T[:, None]], 1)
        member_TG = member_TG & mask_T[:, None]
        names = [MODALITY_NAMES[m] for m in routing.modalities] + [None]
    member_GT = member_TG.t().to(f64)
    with torch.no_grad():
        counts_GC = member_GT @ torch.cat([torch.ones_like(lse2_T, dtype=f64)[:, None], *counted], 1)
        n_G = counts_GC[:, 0]
        selected_GE = counts_GC[:, 1:E + 1]
        kept_GE = counts_GC[:, E + 1:] if len(counted) > 1 else selected_GE
    means_GC = ((member_GT / n_G.clamp_min(1)[:, None]) @ values_TC).to(dtype)
    mean_p_GE, mean_ent_G1, mean_lse2_G1 = means_GC.split([E, 1, 1], dim=1)
    # 3. losses and statistics from the sums
    f_E = (selected_GE[-1] / selected_GE[-1].sum().clamp_min(1)).to(dtype)
    per_modality = slice(None) if mod_T is None else slice(0, -1)  # the entropy losses' groups
    losses = {
        "load_balance": E * (f_E * mean_p_GE[-1]).sum(),
        "z_loss": mean_lse2_G1[-1, 0],
        "entropy_local": mean_ent_G1[per_modality].sum(),
        "entropy_global": -entropy(mean_p_GE[per_modality]).sum(),
    }
    with torch.no_grad():
        dropped_G = (1.0 - kept_GE.sum(1) / selected_GE.sum(1).clamp_min(1)).to(dtype)
        columns = {"routed_per_expert": selected_GE.long(), "tokens_per_expert": kept_GE.long(),
                   "dropped_fraction": dropped_G, "router_entropy": mean_ent_G1.detach()[:, 0],
                   "num_tokens": n_G.long()}
    stats: Dict[str, torch.Tensor] = {}
    for key, column in columns.items():
        for name, row in zip(names, column.unbind(0)):
            stats[key + ("" if name is None else f"/{name}")] = row
    return RoutingSummary(losses, stats)
