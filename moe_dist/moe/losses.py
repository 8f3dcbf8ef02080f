"""Auxiliary router losses and routing statistics, computed on real (non-padding) tokens only.

Shape legend: T tokens, E experts, K slots per token.

All losses are unweighted here; ``MoELayer`` multiplies them by the coefficients in ``MoEConfig``.
    load_balance   E * sum_e f_e * P_e  (Switch/GShard). f_e: share of the selected (token, expert)
                   assignments that chose expert e, before capacity drops; P_e: mean gate probability
                   of e. Uniform routing gives exactly 1.
    z_loss         mean_t logsumexp(logits_t)^2  (ST-MoE).
    entropy_local  sum over modalities m of mean_{t in m} H(p_t)       (LIMoE; low = confident tokens)
    entropy_global sum over modalities m of -H(mean_{t in m} p_t)      (LIMoE; low = experts all used)
Without a modality tensor all tokens form one group.
"""

from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from .router import MODALITY_NAMES, Routing, count_per_expert


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy along the last dim; 0*log(0) = 0 with finite gradients."""
    logp = torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def _groups(routing: Routing) -> Iterator[Tuple[Optional[str], torch.Tensor]]:
    """(modality name or None, [T] bool mask of real tokens) for each modality group."""
    if routing.modality_T is None:
        yield None, routing.token_mask_T
        return
    for mod_id in routing.modalities:
        yield MODALITY_NAMES[mod_id], routing.token_mask_T & (routing.modality_T == mod_id)


def _masked_mean(v_T: torch.Tensor, mask_T: torch.Tensor) -> torch.Tensor:
    return (v_T * mask_T).sum() / mask_T.sum().clamp_min(1)


def router_losses(routing: Routing) -> Dict[str, torch.Tensor]:
    """The unweighted auxiliary losses (scalars) of one routing decision."""
    mask_T = routing.token_mask_T
    E = routing.probs_TE.shape[-1]
    probs_TE = routing.probs_TE * mask_T[:, None]
    counts_E = torch.zeros(E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_E.index_add_(0, routing.experts_TK.flatten(), routing.valid_TK.flatten().to(probs_TE.dtype))
    f_E = counts_E / counts_E.sum().clamp_min(1)
    P_E = probs_TE.sum(0) / mask_T.sum().clamp_min(1)
    lse_T = torch.logsumexp(routing.logits_TE, dim=-1)
    losses = {
        "load_balance": E * (f_E * P_E).sum(),
        "z_loss": _masked_mean(lse_T.square(), mask_T),
    }
    ent_T = entropy(routing.probs_TE)
    local, global_ = [], []
    # An empty modality group adds exactly 0 (with a zero gradient), so no emptiness check waits for the device.
    for _, group_T in _groups(routing):
        local.append(_masked_mean(ent_T, group_T))
        mean_p_E = (routing.probs_TE * group_T[:, None]).sum(0) / group_T.sum().clamp_min(1)
        global_.append(-entropy(mean_p_E))
    zero = probs_TE.sum() * 0
    losses["entropy_local"] = torch.stack(local).sum() if local else zero
    losses["entropy_global"] = torch.stack(global_).sum() if global_ else zero
    return losses


@torch.no_grad()
def routing_stats(routing: Routing, kept_TK: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Detached statistics, overall and per modality ("name/image", "name/text", and "name/cross" when the
    layer's config has three modalities).

    tokens_per_expert: [E] assignments kept per expert; routed_per_expert: [E] before drops;
    dropped_fraction: dropped / selected assignments; router_entropy: mean H(p_t) over tokens.
    """
    E = routing.probs_TE.shape[-1]
    ent_T = entropy(routing.probs_TE)
    stats: Dict[str, torch.Tensor] = {}
    for name, group_T in _groups(routing):
        suffix = "" if name is None else f"/{name}"
        sel_TK = routing.valid_TK & group_T[:, None]
        kept = kept_TK & group_T[:, None]
        routed_E = count_per_expert(routing.experts_TK, sel_TK, E)
        kept_E = count_per_expert(routing.experts_TK, kept, E)
        stats["routed_per_expert" + suffix] = routed_E
        stats["tokens_per_expert" + suffix] = kept_E
        stats["dropped_fraction" + suffix] = 1.0 - kept_E.sum() / routed_E.sum().clamp_min(1)
        stats["router_entropy" + suffix] = _masked_mean(ent_T, group_T)
        stats["num_tokens" + suffix] = group_T.sum()
    if routing.modality_T is not None:
        for key in ("routed_per_expert", "tokens_per_expert", "num_tokens"):
            stats[key] = sum(stats[f"{key}/{MODALITY_NAMES[m]}"] for m in routing.modalities)
        routed = stats["routed_per_expert"].sum().clamp_min(1)
        stats["dropped_fraction"] = 1.0 - stats["tokens_per_expert"].sum() / routed
        stats["router_entropy"] = _masked_mean(ent_T, routing.token_mask_T)
    return stats
