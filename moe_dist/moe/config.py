"""Typed configuration of one MoE layer, validated when it is built.

Fields that name a variant are checked against that family's registry (registry.py, filled by router.py,
soft.py, dispatch.py, experts.py and losses.py, the one place each variant is defined); a router entry
also checks the fields it depends on (``Router.check_config``). This file imports only registry.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

from .registry import ROUTERS, VARIANT_FIELDS

# the auxiliary losses, each with a ``<name>_coef`` field below (moe/losses.py computes them)
LOSSES = ("load_balance", "z_loss", "entropy_local", "entropy_global")


@dataclass
class MoEConfig:
    """Everything that defines one MoE layer.

    Routing:
        router: token choice: "topk" (exactly ``top_k`` experts per token), "threshold" (every expert
            whose gate probability is >= ``threshold``; at least 1, at most ``max_k``) or "top_p" (the
            smallest set whose cumulative probability reaches ``top_p``; at most ``max_k``). Whole
            sequence (encoder towers only, refused in a causal tower): "expert_choice" (Zhou et al.
            2022: each expert takes its ``capacity`` highest-scoring tokens of the call, so every expert
            computes exactly that many rows) or "soft" (Soft MoE, Puigcerver et al. 2023: each expert has
            ``slots_per_expert`` slots per sequence, each slot a softmax-weighted mix of the sequence's
            tokens, each token a softmax-weighted mix of the slot outputs; no drops and no routing loss,
            so the loss coefficients are unused).
        score_func: "softmax" over the experts, or "sigmoid" per expert (DeepSeek-V3; the gate weights
            are the chosen sigmoid scores, renormalised when ``renormalize``; the balance loss uses the
            scores normalised to sum 1; refused with the entropy losses, which assume a softmax).
        n_groups, topk_groups: group-limited routing (DeepSeek-V3, top-k only): the experts form
            n_groups consecutive groups, a group's score is the sum of its two best scores (its best
            when a group has one expert), and a token picks its top_k among the topk_groups best groups.
        router_bias: auxiliary-loss-free balancing (DeepSeek-V3, top-k only): a per-expert bias, one row
            per modality, added to the scores for the selection only (not the gate weights). After each
            optimizer step it moves by ``router_bias_rate * sign(mean load - load_e)``, the loads summed
            over every micro batch of the step and every rank (moe/balance.py). Set
            ``load_balance_coef`` 0 to balance with the bias alone.
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
        Expert-Choice's capacity is ceil(capacity_factor * T / E) of the call's T tokens (padding
        included: a shape, known without reading the device; at most T; ``top_k``, ``min_capacity`` and
        ``dropless`` do not apply) in training and evaluation alike.
    Losses (reported unweighted, added to ``aux_loss`` with these coefficients):
        load_balance_coef (Switch/GShard), z_loss_coef (ST-MoE), entropy_local_coef and
        entropy_global_coef (LIMoE, per modality).
        load_balance: which tokens the balance loss's expert frequencies count (moe/losses.py):
            "micro_batch" (the call's tokens, Switch), "global_batch" (Qwen, arXiv 2501.11873: every
            micro batch of the optimizer step so far and every rank, per modality) or "sequence"
            (DeepSeek-V2: per sequence and modality, then averaged).
    Modality:
        modality_experts: (n_image, n_text) experts reserved for image (modality 0) or text (modality 1)
            tokens: experts [0, n_image) are image-only, the next n_text are text-only, the rest shared.
            A third entry n_cross reserves the next n_cross experts for cross-modal tokens (modality 2, a
            multimodal decoder's), e.g. (4, 4, 4) of 16: 0-3 image, 4-7 text, 8-11 cross, 12-15 shared.
    Experts:
        granularity: fine-grained experts (DeepSeekMoE): each expert's hidden width is
            ffn_hidden_size / granularity (with granularity x the experts and top_k, the total and active
            parameters stay those of the coarse layer).
        num_shared_experts: always-on experts (DeepSeekMoE) of width ``shared_ffn_hidden_size`` (0: the
            routed experts' width) and the routed experts' activation, added to the routed output; run
            as one dense FFN num_shared_experts times as wide. ``shared_expert`` is the older form: one
            GELU FFN of ``shared_ffn_hidden_size`` (0: ffn_hidden_size), whatever the activation.
        activation, expert_bias, expert_backend ("auto" picks per device and dtype),
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
    score_func: str = "softmax"
    n_groups: int = 1
    topk_groups: int = 1
    router_bias: bool = False
    router_bias_rate: float = 1e-3
    slots_per_expert: int = 1
    force_balanced: bool = False
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    dropless: bool = False
    drop_priority: str = "position"
    load_balance: str = "micro_batch"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 1e-3
    entropy_local_coef: float = 0.0
    entropy_global_coef: float = 0.0
    modality_experts: Tuple[int, int] = (0, 0)
    activation: str = "gelu"
    expert_bias: bool = True
    shared_expert: bool = False
    shared_ffn_hidden_size: int = 0
    num_shared_experts: int = 0
    granularity: int = 1
    expert_backend: str = "auto"
    recompute_activation: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "max_k", "n_groups", "topk_groups",
                     "granularity"):
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
        if not min(self.min_capacity, self.router_hidden_size, self.router_noise_eps, self.num_shared_experts,
                   self.shared_ffn_hidden_size) >= 0:
            raise ValueError("MoEConfig.min_capacity, router_hidden_size, router_noise_eps, num_shared_experts and "
                             "shared_ffn_hidden_size must be >= 0")
        if self.shared_expert and self.num_shared_experts:
            raise ValueError(f"MoEConfig.shared_expert=True and num_shared_experts={self.num_shared_experts}: "
                             "shared_expert is the older form (one GELU FFN); use num_shared_experts alone")
        if self.ffn_hidden_size % self.granularity:
            divisors = [d for d in range(1, min(self.ffn_hidden_size, 64) + 1) if self.ffn_hidden_size % d == 0]
            raise ValueError(f"MoEConfig.granularity={self.granularity} must divide the FFN width "
                             f"ffn_hidden_size={self.ffn_hidden_size} (each expert is ffn_hidden_size / granularity "
                             f"wide); use one of {divisors}")
        if not self.router_bias_rate > 0:
            raise ValueError(f"MoEConfig.router_bias_rate={self.router_bias_rate} must be > 0 (the step of the "
                             "selection bias per optimizer step, e.g. 1e-3); set router_bias=false to turn it off")
        if self.slots_per_expert < 1:
            raise ValueError(f"MoEConfig.slots_per_expert={self.slots_per_expert} must be >= 1 (Soft MoE's slots "
                             "per expert and sequence)")
        if self.score_func != "softmax" and (self.entropy_local_coef or self.entropy_global_coef):
            raise ValueError(f"MoEConfig.score_func={self.score_func!r} with entropy_local_coef="
                             f"{self.entropy_local_coef} / entropy_global_coef={self.entropy_global_coef}: the "
                             "entropy losses assume softmax gate probabilities; use score_func='softmax' or set "
                             "both coefficients to 0")
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
        ROUTERS.get(self.router).check_config(self)
        if self.router_class.token_choice and self.experts_per_token > allowed:
            raise ValueError(f"MoEConfig: a token may pick {self.experts_per_token} experts but only {allowed} are "
                             f"open to one modality with modality_experts={self.modality_experts}; "
                             "lower top_k/max_k or reserve fewer experts")

    @property
    def router_class(self):
        """The ``ROUTERS`` entry this config names."""
        return ROUTERS.get(self.router)

    @property
    def experts_per_token(self) -> int:
        """K, the slots of a token's routing: the most experts one token can be sent to."""
        return self.router_class.slots_per_token(self)

    @property
    def mixes_tokens(self) -> bool:
        """The router looks at every token of the call or sequence at once (Expert-Choice, Soft MoE): a
        token's routing depends on the others, so a causal tower cannot use it."""
        return not self.router_class.token_choice

    @property
    def expert_hidden_size(self) -> int:
        """One routed expert's hidden width: ffn_hidden_size / granularity."""
        return self.ffn_hidden_size // self.granularity

    @property
    def shared_hidden_size(self) -> int:
        """The width of the always-on FFN: num_shared_experts x one shared expert's width; with the older
        ``shared_expert``, shared_ffn_hidden_size or ffn_hidden_size (0: none)."""
        if self.shared_expert:
            return self.shared_ffn_hidden_size or self.ffn_hidden_size
        return self.num_shared_experts * (self.shared_ffn_hidden_size or self.expert_hidden_size)

    @property
    def shared_activation(self) -> str:
        """The always-on FFN's activation: the experts' (num_shared_experts), GELU for ``shared_expert``
        (as checkpoints of that form were trained)."""
        return "gelu" if self.shared_expert else self.activation

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
