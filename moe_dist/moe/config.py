"""Typed configuration of one MoE layer, validated when it is built.

Fields that name a variant are checked against that family's registry (router.py, dispatch.py,
experts.py), the one place each variant is defined.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

from .dispatch import DROP_PRIORITIES
from .experts import ACTIVATIONS, EXPERT_BACKENDS
from .losses import LOSSES
from .router import ROUTER_NOISE, ROUTERS

# MoEConfig field -> the registry its value must name
VARIANT_FIELDS = {"router": ROUTERS, "router_noise": ROUTER_NOISE, "drop_priority": DROP_PRIORITIES,
                  "activation": ACTIVATIONS, "expert_backend": EXPERT_BACKENDS}


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer.

    Routing:
        router: "topk" (exactly ``top_k`` experts per token), "threshold" (every expert whose gate
            probability is >= ``threshold``; at least 1, at most ``max_k``) or "top_p" (the smallest
            set whose cumulative probability reaches ``top_p``; at most ``max_k``).
        renormalize: divide the selected gate weights by their sum.
        router_hidden_size: 0 for a linear router, else the hidden width of a 2-layer GELU MLP router.
        router_noise: "jitter" multiplies the router input by U(1-eps, 1+eps); "gumbel" adds
            eps * Gumbel(0, 1) noise to the logits. Training only.
        force_balanced: debug mode, token t takes experts (t*K + j) mod E (within its allowed set).
    Capacity:
        capacity = max(min_capacity, ceil(factor * tokens * K / E)) per expert and rank, with K the
        top_k (or max_k). dropless=True drops nothing and pads nothing. drop_priority decides which
        assignments survive when capacity binds: all first choices before second choices, and within a
        choice by "position" (token order), "random" (a fresh uniform permutation, DeepSpeed's RTS) or
        "score" (highest top-1 gate weight first, V-MoE's batch priority routing).
    Losses (reported unweighted, added to ``aux_loss`` with these coefficients):
        load_balance_coef (Switch/GShard), z_loss_coef (ST-MoE), entropy_local_coef and
        entropy_global_coef (LIMoE, per modality).
    Modality:
        modality_experts: (n_image, n_text) experts reserved for image (modality 0) or text (modality 1)
            tokens: experts [0, n_image) are image-only, the next n_text are text-only, the rest shared.
            A third entry n_cross reserves the next n_cross experts for cross-modal tokens (modality 2, a
            multimodal decoder's), e.g. (4, 4, 4) of 16: 0-3 image, 4-7 text, 8-11 cross, 12-15 shared.
    Experts:
        activation, expert_bias, shared_expert (an always-on dense FFN of ``shared_ffn_hidden_size``
        added to the routed output), expert_backend ("auto" picks per device and dtype),
        recompute_activation (the loop backend, CPU's "auto", keeps only the experts' pre-activations for backward and
        recomputes the activation: 0.84x the activation memory of k dense FFNs; False keeps both as a dense
        FFN does, 1.29x, and skips one elementwise pass: the layer 2-3% faster on CPU).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    router: str = "topk"
    renormalize: bool = False
    threshold: float = 0.5
    top_p: float = 0.9
    max_k: int = 2
    router_hidden_size: int = 0
    router_noise: str = "none"
    router_noise_eps: float = 1e-2
    force_balanced: bool = False
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = False
    drop_priority: str = "position"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 1e-3
    entropy_local_coef: float = 0.0
    entropy_global_coef: float = 0.0
    modality_experts: Tuple[int, int] = (0, 0)
    activation: str = "gelu"
    expert_bias: bool = True
    shared_expert: bool = False
    shared_ffn_hidden_size: int = 0
    expert_backend: str = "auto"
    recompute_activation: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "max_k"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} must be a positive integer")
        for name, registry in VARIANT_FIELDS.items():
            registry.get(getattr(self, name))
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                             f"set top_k <= num_experts or add experts")
        if self.max_k > self.num_experts:
            raise ValueError(f"MoEConfig.max_k={self.max_k} exceeds num_experts={self.num_experts}; "
                             f"set max_k <= num_experts")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"MoEConfig.threshold={self.threshold} must lie in (0, 1]; "
                             f"it is the gate probability an expert needs to be kept")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"MoEConfig.top_p={self.top_p} must lie in (0, 1]")
        if not (self.capacity_factor > 0 and self.eval_capacity_factor > 0):  # (NaN fails too)
            raise ValueError("MoEConfig.capacity_factor and eval_capacity_factor must be > 0 "
                             f"(got {self.capacity_factor}, {self.eval_capacity_factor}); use dropless=True "
                             "to never drop tokens")
        if not min(self.min_capacity, self.router_hidden_size, self.router_noise_eps) >= 0:
            raise ValueError("MoEConfig.min_capacity, router_hidden_size and router_noise_eps must be >= 0")
        for name in (f"{loss}_coef" for loss in LOSSES):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MoEConfig.{name}={getattr(self, name)} must be >= 0")
        self.modality_experts = tuple(int(n) for n in self.modality_experts)
        if len(self.modality_experts) not in (2, 3) or min(self.modality_experts) < 0:
            raise ValueError(f"MoEConfig.modality_experts={self.modality_experts} must be a pair (n_image_only, "
                             "n_text_only) or a triple (n_image_only, n_text_only, n_cross_only) of non-negative "
                             "integers")
        if sum(self.modality_experts) > self.num_experts:
            raise ValueError(f"MoEConfig.modality_experts={self.modality_experts} reserves more than "
                             f"num_experts={self.num_experts} experts")
        shared = self.num_experts - sum(self.modality_experts)
        allowed = shared + min(self.modality_experts)  # the experts open to the most restricted modality
        if self.experts_per_token > allowed:
            raise ValueError(f"MoEConfig: a token may pick {self.experts_per_token} experts but only {allowed} are "
                             f"open to one modality with modality_experts={self.modality_experts}; "
                             "lower top_k/max_k or reserve fewer experts")

    @property
    def experts_per_token(self) -> int:
        """K, the most experts one token can be sent to."""
        return self.top_k if self.router == "topk" else self.max_k

    @property
    def modalities(self) -> Tuple[int, ...]:
        """Modality ids reported in stats and entropy losses: image and text, plus cross-modal (decoder)
        tokens when ``modality_experts`` has three entries (models/coca.py always gives three)."""
        return tuple(range(len(self.modality_experts)))

    @property
    def uses_modality(self) -> bool:
        return any(self.modality_experts)

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)
