"""Routers: token features -> which experts, with what gate weight. No communication here.

Shape legend: T tokens, D hidden size, E experts, K experts-per-token slots (top_k or max_k).

Every router computes its gate network, softmax and selection in fp32 (fp64 when the input is fp64),
whatever the parameter or input dtype. Variants differ only in ``select``; register new ones in
``ROUTERS``. Training-time noise is a ``ROUTER_NOISE`` entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry
from .tensors import cast

# ``MoEConfig`` (moe/config.py) is named in annotations, not imported: config.py validates its fields
# against this file's registries, so an import here would make the two files import each other.

# modality ids of routed tokens: models tag image tokens IMAGE, text tokens TEXT, and the tokens of a
# multimodal decoder (text that cross-attends to image tokens, models/coca.py) CROSS
IMAGE, TEXT, CROSS = 0, 1, 2
MODALITY_NAMES = {IMAGE: "image", TEXT: "text", CROSS: "cross"}
# the logit of an expert a token may not use: its probability underflows to exactly 0 (fp32 and fp64),
# while p * logit (the entropy, moe/losses.py) and its gradient -logit * upstream stay finite at any loss
# scale (-inf would give 0 * inf; the dtype's lowest value overflows once the upstream gradient passes 1)
MASKED_LOGIT = -1e4


class RouterNoise:
    """Exploration noise in training: ``on_input`` perturbs the router input, ``on_logits`` its logits.
    The base class adds none."""

    def on_input(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        return h

    def on_logits(self, h: torch.Tensor, eps: float) -> torch.Tensor:
        return h


class JitterNoise(RouterNoise):
    """Multiply the router input by U(1 - eps, 1 + eps) (Switch Transformer)."""

    def on_input(self, h, eps):
        return h * torch.empty_like(h).uniform_(1.0 - eps, 1.0 + eps)


class GumbelNoise(RouterNoise):
    """Add eps * Gumbel(0, 1) to the logits."""

    def on_logits(self, h, eps):
        u = torch.rand_like(h).clamp_(1e-20, 1.0)
        return h - eps * torch.log(-torch.log(u))


ROUTER_NOISE: Registry[RouterNoise] = Registry("router_noise", {"none": RouterNoise(), "jitter": JitterNoise(),
                                                                "gumbel": GumbelNoise()})


@dataclass
class Routing:
    """The router's decision for T tokens.

    Attributes:
        logits_TE: gate logits after modality masking (``MASKED_LOGIT`` for forbidden experts), fp32.
        lse_T: logsumexp of ``logits_TE`` (the z-loss's, and the softmax's normaliser).
        probs_TE: softmax of ``logits_TE``, as exp(logits - lse).
        experts_TK: chosen expert per slot (long); slots with ``valid_TK`` False are unused.
        weights_TK: gate weight per slot (fp32), 0 where not valid.
        valid_TK: slot is used; always False for padding tokens.
        token_mask_T: token is real (not padding).
        modality_T: modality id per token, or None.
        modalities: the modality ids whose stats and entropy losses are reported (``MoEConfig.modalities``).
    """

    logits_TE: torch.Tensor
    lse_T: torch.Tensor
    probs_TE: torch.Tensor
    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    valid_TK: torch.Tensor
    token_mask_T: torch.Tensor
    modality_T: Optional[torch.Tensor]
    modalities: Tuple[int, ...] = (IMAGE, TEXT)


def allowed_experts_table(cfg: MoEConfig) -> torch.Tensor:
    """[M + 1, E] bool: row m, the experts a token of modality m may use under ``cfg.modality_experts``;
    the last row, a token of any other modality (the shared experts only).

    ``modality_experts`` = (n_image, n_text[, n_cross]) lays the experts out as consecutive groups:
    image-only, text-only, cross-only, then shared. A token of modality m may use its own group and the
    shared experts."""
    M = len(cfg.modality_experts)
    group_E = [m for m, n in enumerate(cfg.modality_experts) for _ in range(n)]
    group_E += [M] * (cfg.num_experts - len(group_E))  # shared
    # from Python lists: no operator, so it also builds under torch.device("meta") (parameter counting)
    return torch.tensor([[g in (m, M) for g in group_E] for m in range(M + 1)], dtype=torch.bool)


class Router(nn.Module):
    """Gate network plus noise, modality masking and forced balancing; subclasses pick experts."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.router_hidden_size:
            self.proj = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.router_hidden_size), nn.GELU(),
                                      nn.Linear(cfg.router_hidden_size, cfg.num_experts))
        else:
            self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.noise = ROUTER_NOISE.get(cfg.router_noise)
        # built once and moved with the module: a per-call table would be a host-to-device copy
        self.register_buffer("allowed_ME", allowed_experts_table(cfg) if cfg.uses_modality else None, persistent=False)

    def gate_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """fp32 (or fp64) logits [T, E], computed outside autocast with upcast weights."""
        dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        h = cast(x_TD, dtype)
        if self.training:
            h = self.noise.on_input(h, self.cfg.router_noise_eps)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            for layer in (self.proj if isinstance(self.proj, nn.Sequential) else [self.proj]):
                if isinstance(layer, nn.Linear):
                    bias = None if layer.bias is None else cast(layer.bias, dtype)
                    h = F.linear(h, cast(layer.weight, dtype), bias)
                else:
                    h = layer(h)
        if self.training:
            h = self.noise.on_logits(h, self.cfg.router_noise_eps)
        return h

    def forward(self, x_TD: torch.Tensor, modality_T: Optional[torch.Tensor] = None,
                token_mask_T: Optional[torch.Tensor] = None) -> Routing:
        T = x_TD.shape[0]
        padded = token_mask_T is not None
        if not padded:
            token_mask_T = torch.ones(T, dtype=torch.bool, device=x_TD.device)
        logits_TE = self.gate_logits(x_TD)
        allowed_TE = None
        if self.allowed_ME is not None:
            if modality_T is None:
                raise ValueError(f"MoEConfig.modality_experts={self.cfg.modality_experts} reserves experts per "
                                 "modality, so forward() needs modality= (0 image, 1 text, 2 cross) for every token")
            last = self.allowed_ME.shape[0] - 1
            allowed_TE = self.allowed_ME.index_select(0, modality_T.clamp(0, last))
        if allowed_TE is not None:
            logits_TE = logits_TE.masked_fill(~allowed_TE, MASKED_LOGIT)
        # exp(logits - lse), not torch.softmax: the z-loss needs lse anyway, and CPU softmax over a last dim
        # of E is slow (hand-timed, 4,160 x 8: 253 us against 117 us for logsumexp and exp together)
        lse_T = torch.logsumexp(logits_TE, dim=-1)
        probs_TE = torch.exp(logits_TE - lse_T[:, None])
        if self.cfg.force_balanced:
            experts_TK, valid_TK = self._balanced(T, allowed_TE, x_TD.device)
        else:
            experts_TK, valid_TK = self.select(probs_TE)
        weights_TK = probs_TE.gather(1, experts_TK)
        if padded:
            valid_TK = valid_TK & token_mask_T[:, None]
        if padded or self.may_skip_slots:
            weights_TK = weights_TK * valid_TK
        if self.cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
        return Routing(logits_TE, lse_T, probs_TE, experts_TK, weights_TK, valid_TK, token_mask_T, modality_T,
                       self.cfg.modalities)

    may_skip_slots = True  # select can leave slots unused (valid_TK False); top-k never does

    def select(self, probs_TE: torch.Tensor):
        """Return (experts_TK long, valid_TK bool), slots sorted by decreasing probability."""
        raise NotImplementedError

    def _balanced(self, T: int, allowed_TE: Optional[torch.Tensor], device):
        """Debug routing: slot j of token t takes allowed expert number (t*K + j) mod |allowed|."""
        K, E = self.cfg.experts_per_token, self.cfg.num_experts
        turn_TK = torch.arange(T * K, device=device).view(T, K)
        if allowed_TE is None:
            allowed_TE = torch.ones(T, E, dtype=torch.bool, device=device)
        n_allowed_T = allowed_TE.sum(-1, keepdim=True)
        # The allowed experts of each token in increasing order, padded with E at the end.
        ordered_TE = torch.where(allowed_TE, torch.arange(E, device=device), E).sort(-1).values
        experts_TK = ordered_TE.gather(1, turn_TK % n_allowed_T)
        return experts_TK, torch.ones(T, K, dtype=torch.bool, device=device)


class TopKRouter(Router):
    may_skip_slots = False

    def select(self, probs_TE):
        if self.cfg.top_k == 1:  # argmax: 3-5x faster than topk(1) on CPU (hand-timed)
            experts_TK = probs_TE.argmax(dim=-1, keepdim=True)
        else:
            experts_TK = probs_TE.topk(self.cfg.top_k, dim=-1).indices
        return experts_TK, torch.ones_like(experts_TK, dtype=torch.bool)


class ThresholdRouter(Router):
    """Keep experts with probability >= threshold; the best one always, at most max_k."""

    def select(self, probs_TE):
        top_TK, experts_TK = probs_TE.topk(self.cfg.max_k, dim=-1)
        valid_TK = top_TK >= self.cfg.threshold
        valid_TK[:, 0] = True
        return experts_TK, valid_TK


class TopPRouter(Router):
    """Keep the smallest prefix of the sorted experts whose probability mass reaches top_p (<= max_k)."""

    def select(self, probs_TE):
        top_TK, experts_TK = probs_TE.topk(self.cfg.max_k, dim=-1)
        mass_before_TK = top_TK.cumsum(-1) - top_TK
        valid_TK = mass_before_TK < self.cfg.top_p
        valid_TK[:, 0] = True
        return experts_TK, valid_TK


ROUTERS: Registry[Type[Router]] = Registry("router", {"topk": TopKRouter, "threshold": ThresholdRouter,
                                                     "top_p": TopPRouter})


def build_router(cfg: MoEConfig) -> Router:
    return ROUTERS.get(cfg.router)(cfg)
