"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts"): every expert slot is a
softmax-weighted mix of all tokens of a sequence, every token a softmax-weighted mix of all slot outputs.
No token is dropped, no routing loss is needed, and the experts compute exactly E x S rows per sequence.

Shape legend: B sequences, L tokens per sequence, D hidden, E experts, P slots per expert
(``slots_per_expert``), S = E * P slots (slot s belongs to expert s // P), N slot rows (B * S).

    logits[b, l, s] = scale * <x[b, l] / |x[b, l]|, phi[:, s] / |phi[:, s]|>   (fp32; normalised as the
                       paper does for stability at width, with a learned scalar scale)
    dispatch[b, :, s] = softmax over the sequence's real tokens l of logits[b, l, s]
    combine[b, l, :]  = softmax over the slots s of logits[b, l, s]
    slots[b, s]       = sum_l dispatch[b, l, s] x[b, l]
    y[b, l]           = sum_s combine[b, l, s] expert_{s // P}(slots[b, s])
The slot rows go to their experts through the same dispatcher as routed tokens (each slot row one
assignment of gate weight 1, every expert exactly B * P rows: at ep_size > 1 an exchange with no padding).
Statistics: ``slot_weight_per_expert`` [E], the combine weight each expert's slots receive summed over
real tokens (it sums to the token count; it replaces token counts), and the mean entropy of a token's
combine weights.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .layer import LAYERS, MoELayer, MoEOutput
from .registry import ROUTERS
from .router import MASKED_LOGIT, Routing
from .tensors import cast


@ROUTERS.register("soft")
class SoftRouter(nn.Module):
    """The slot parameters phi [D, S] and the scale; ``forward`` returns the dispatch and combine weights."""

    token_choice = False
    capacity_policy: Optional[str] = None
    has_routing_loss = False
    allowed_ME = None  # Soft MoE reserves no experts per modality (check_config)

    @classmethod
    def slots_per_token(cls, cfg: MoEConfig) -> int:
        return 1  # each slot row goes to one expert

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        unsupported = {"router_bias": cfg.router_bias, "n_groups > 1": cfg.n_groups > 1,
                       "modality_experts": cfg.uses_modality, "score_func='sigmoid'": cfg.score_func != "softmax",
                       "router_hidden_size": cfg.router_hidden_size > 0, "force_balanced": cfg.force_balanced,
                       "router_noise": cfg.router_noise != "none"}
        bad = [name for name, on in unsupported.items() if on]
        if bad:
            raise ValueError(f"MoEConfig.router='soft' cannot use {', '.join(bad)}: Soft MoE mixes every token of a "
                             "sequence into every slot (no per-token choice to bias, group, restrict or "
                             "perturb); remove them or use router='topk'")

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        S = cfg.num_experts * cfg.slots_per_expert
        self.phi = nn.Parameter(torch.randn(cfg.hidden_size, S) / math.sqrt(cfg.hidden_size))
        self.scale = nn.Parameter(torch.ones(1))  # 1-d: DeepSpeed broadcasts parameters as byte views

    def forward(self, x_BLD: torch.Tensor, mask_BL: Optional[torch.Tensor]):
        """(dispatch_BLS, combine_BLS), fp32 (fp64 for fp64 input); padding gets no dispatch weight."""
        dtype = torch.float64 if x_BLD.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x_BLD.device.type, enabled=False):
            x = F.normalize(cast(x_BLD, dtype), dim=-1)
            phi = F.normalize(cast(self.phi, dtype), dim=0) * cast(self.scale, dtype)[0]
            logits_BLS = x @ phi
        combine_BLS = torch.softmax(logits_BLS, dim=-1)
        if mask_BL is not None:  # a finite mask: an all-padding sequence gets a uniform, unused mix
            logits_BLS = logits_BLS.masked_fill(~mask_BL[:, :, None], MASKED_LOGIT)
        dispatch_BLS = torch.softmax(logits_BLS, dim=1)
        return dispatch_BLS, combine_BLS


class SoftMoELayer(MoELayer):
    """``MoELayer`` with Soft MoE's slots in place of routing (same experts, dispatcher and checkpoint keys)."""

    def forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None) -> MoEOutput:
        """Args as ``MoELayer.forward``; x is [..., L, D] (sequences of L tokens) or [L, D] (one sequence)."""
        cfg = self.config
        D, E, P = cfg.hidden_size, cfg.num_experts, cfg.slots_per_expert
        if x.shape[-1] != D or x.dim() < 2:
            raise ValueError(f"Soft MoE expects inputs [..., L, {D}] (sequences of tokens), got {tuple(x.shape)}")
        L = x.shape[-2]
        B = math.prod(x.shape[:-2])  # (1 for [L, D]; an explicit count, as L may be 0)
        x_BLD = x.reshape(B, L, D)
        mask_BL = None if padding_mask is None else ~padding_mask.expand(x.shape[:-1]).reshape(B, L)
        dispatch_BLS, combine_BLS = self.router(x_BLD, mask_BL)
        # 1. slots, expert-major rows: row (e, b, p) is slot e * P + p of sequence b
        slots_BSD = torch.einsum("bls,bld->bsd", cast(dispatch_BLS, x.dtype), x_BLD)
        rows_ND = slots_BSD.view(B, E, P, D).transpose(0, 1).reshape(E * B * P, D)
        # 2. the experts, through the dispatcher (each row one assignment, gate weight 1)
        N = rows_ND.shape[0]
        expert_N1 = torch.arange(E, device=x.device).repeat_interleave(B * P)[:, None]
        ones_N1 = torch.ones(N, 1, dtype=torch.bool, device=x.device)
        routing = Routing(None, None, None, expert_N1, ones_N1.to(torch.float32), ones_N1, ones_N1[:, 0], None)
        capacity = B * P if self.training and self.ep_size > 1 else None
        sent = self.dispatcher.dispatch(rows_ND, routing, ones_N1, capacity)
        y_ND = self.dispatcher.combine(self.experts(sent.rows_ND, sent.offs_L), sent.plan, N)
        # 3. every token a mix of the slot outputs
        y_BSD = cast(y_ND, x.dtype).view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)
        y_BLD = torch.einsum("bls,bsd->bld", cast(combine_BLS, x.dtype), y_BSD)
        if mask_BL is not None:
            y_BLD = y_BLD * cast(mask_BL[:, :, None], y_BLD.dtype)
        if self.shared_mlp is not None:
            shared = self.shared_mlp(x_BLD)
            y_BLD = y_BLD + (shared if mask_BL is None else shared * cast(mask_BL[:, :, None], shared.dtype))
        stats = _soft_stats(combine_BLS.detach(), mask_BL, E, P)
        aux_loss = self.router.scale[0] * 0.0  # no routing loss; a zero tied to the graph
        return MoEOutput(cast(y_BLD.reshape(x.shape), x.dtype), aux_loss, {}, stats)


def _soft_stats(combine_BLS: torch.Tensor, mask_BL: Optional[torch.Tensor], E: int, P: int):
    """slot_weight_per_expert [E] (float64), router_entropy (mean over real tokens), num_tokens,
    dropped_fraction (0: Soft MoE drops nothing)."""
    B, L, S = combine_BLS.shape
    real_BL = torch.ones(B, L, dtype=torch.bool, device=combine_BLS.device) if mask_BL is None else mask_BL
    c = combine_BLS.to(torch.float64) * real_BL[:, :, None]
    n = real_BL.sum()
    entropy_BL = -(c * torch.log(c.clamp_min(torch.finfo(c.dtype).tiny))).sum(-1)
    return {"slot_weight_per_expert": c.sum((0, 1)).view(E, P).sum(-1),
            "router_entropy": (entropy_BL.sum() / n.clamp_min(1)).to(combine_BLS.dtype),
            "num_tokens": n, "dropped_fraction": combine_BLS.new_zeros(())}


LAYERS.register("soft", SoftMoELayer)
