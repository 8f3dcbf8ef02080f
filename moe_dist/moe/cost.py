"""What one MoE layer call computes, from its MoEConfig alone: the arithmetic behind ``moe-dist params``
and ``moe-dist plan`` (nothing is built, nothing runs).

Shape legend: T tokens of the call (padding included), Q its sequences of L tokens (T = Q L), D hidden,
E experts, K slots per token (``MoEConfig.experts_per_token``), f the capacity factor, He one routed
expert's width (``expert_hidden_size`` = ffn_hidden_size / granularity), Hs the shared FFN's width
(``shared_hidden_size``), a the activation's width factor (2 for SwiGLU, whose first projection is
a H wide), Hr the router MLP's width (0: linear), P ``slots_per_expert``, S = E P Soft MoE's slots per
sequence, R ep_size.

Rows the routed experts compute (``expert_rows``):
    top-k, threshold, top-p   T K (threshold / top-p: K = max_k, an upper bound); with a capacity in
                              training at R > 1, the fixed exchange's E C rows (zero rows included),
                              C = max(min_capacity, ceil(f T K / E))
    expert_choice             E C exactly, C = clamp(ceil(f T / E), 1, T) (``expert_choice_capacity``), at
                              any R (the exchange carries exactly C rows per expert)
    soft                      E P Q exactly (every expert P slot rows per sequence), at any R
The experts' tensors hold more rows than they compute at ep_size 1 (``buffer_rows``): the dispatcher
gathers all T K slots (dropped, unchosen and padding ones last, not computed), so Expert-Choice holds T E.
Forward FLOPs (``layer_flops``; a multiply-add is 2 FLOPs; softmax, sigmoid, group selection, norms and
other elementwise work are not counted, so score_func="sigmoid" costs what "softmax" does):
    router    token choice and Expert-Choice: 2 T D E (linear), 2 T (D Hr + Hr E) (MLP router)
              soft: the logits x @ phi (phi [D, S]) 2 T D S, the slots dispatch^T x ([S, L] x [L, D] per
              sequence) 2 T S D, the outputs combine @ slot outputs ([L, S] x [S, D] per sequence)
              2 T S D: 6 T D S in all
    experts   rows x 2 D He (a + 1)  (first projection D -> a He, second He -> D)
    shared    T x 2 D Hs (a + 1)     (every real token)
Active experts per token (``active_experts``), what one token's output draws on:
    top-k: K; threshold / top-p: max_k (an upper bound); Expert-Choice: min(f, E), the mean E C / T of a
    call without the ceiling (C E / T tends to f as T grows); Soft MoE: min(E, E P / L), the E P slot rows
    of a sequence shared by its L tokens. The shared experts are always active.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

from .config import MoEConfig
from .experts import ACTIVATIONS
from .router import expert_choice_capacity

__all__ = ["active_experts", "activation_width", "buffer_rows", "call_flops", "expert_choice_capacity",
           "expert_row_flops", "expert_rows", "fixed_exchange", "layer_flops", "router_flops", "shared_flops",
           "token_capacity"]


def activation_width(cfg: MoEConfig) -> int:
    """a: how many times He the experts' first projection is (2 for SwiGLU's fused gate and up)."""
    return ACTIVATIONS.get(cfg.activation).width


def token_capacity(cfg: MoEConfig, tokens: int) -> int:
    """C of a token-choice router with a capacity: max(min_capacity, ceil(f T K / E)) in training."""
    return max(cfg.min_capacity, math.ceil(cfg.capacity_factor * tokens * cfg.experts_per_token / cfg.num_experts))


def expert_rows(cfg: MoEConfig, tokens: int, sequences: int = 1, ep_size: int = 1,
                routed: Optional[int] = None) -> int:
    """Rows one rank's experts compute when every rank's call has ``tokens`` tokens (padding included)
    in ``sequences`` sequences, ``routed`` of them real (default: all; padding is never routed, so token
    choice computes routed x K rows). See the module docstring; balanced routing: a rank receives what
    it sends."""
    if cfg.router == "soft":
        return cfg.num_experts * cfg.slots_per_expert * sequences
    if cfg.router == "expert_choice":
        return cfg.num_experts * expert_choice_capacity(cfg, tokens)
    if cfg.dropless or ep_size == 1:
        return (tokens if routed is None else routed) * cfg.experts_per_token
    return cfg.num_experts * token_capacity(cfg, tokens)


def buffer_rows(cfg: MoEConfig, tokens: int, sequences: int = 1, ep_size: int = 1,
                routed: Optional[int] = None) -> int:
    """Rows the experts' input and hidden tensors hold on one rank (what activation memory counts): at
    ep_size 1 the dispatcher gathers every one of the T K slots, dropped, unchosen and padding ones
    included (only the kept ones are computed): T K, so T E for Expert-Choice; Soft MoE's E P Q; at
    ep_size > 1 the fixed exchange's E C rows, or the routed x K rows a dropless exchange receives."""
    if ep_size == 1 and cfg.router != "soft":
        return tokens * cfg.experts_per_token
    return expert_rows(cfg, tokens, sequences, ep_size, routed)


def fixed_exchange(cfg: MoEConfig) -> bool:
    """Training at ep_size > 1 exchanges fixed [E, C] blocks (no per-expert counts): with a capacity,
    Expert-Choice and Soft MoE; the dropless token-choice exchange sends its counts first."""
    return cfg.router in ("soft", "expert_choice") or not cfg.dropless


def router_flops(cfg: MoEConfig, tokens: int) -> int:
    """Forward FLOPs of the router for ``tokens`` tokens: Soft MoE's logits, dispatch and combine
    (6 T D S), or the gate network (2 T D E, or 2 T (D Hr + Hr E))."""
    D, E = cfg.hidden_size, cfg.num_experts
    if cfg.router == "soft":
        return 3 * 2 * tokens * D * E * cfg.slots_per_expert
    if cfg.router_hidden_size:
        return 2 * tokens * (D * cfg.router_hidden_size + cfg.router_hidden_size * E)
    return 2 * tokens * D * E


def expert_row_flops(cfg: MoEConfig) -> int:
    """Forward FLOPs of one routed expert row: 2 D He (a + 1)."""
    return 2 * cfg.hidden_size * cfg.expert_hidden_size * (activation_width(cfg) + 1)


def shared_flops(cfg: MoEConfig, tokens: int) -> int:
    """Forward FLOPs of the always-on FFN for ``tokens`` tokens: 2 T D Hs (a + 1) (0 without one)."""
    a = ACTIVATIONS.get(cfg.shared_activation).width  # the older shared_expert is GELU whatever the experts use
    return 2 * tokens * cfg.hidden_size * cfg.shared_hidden_size * (a + 1)


def layer_flops(cfg: MoEConfig, tokens: int, sequences: int = 1) -> int:
    """Forward FLOPs of one call of ``tokens`` real tokens in ``sequences`` sequences of equal length:
    router + expert rows (``expert_rows`` at ep_size 1) + shared FFN."""
    return sum(call_flops(cfg, {"all": (sequences, tokens // sequences)}, tokens // sequences).values())


def call_flops(cfg: MoEConfig, parts: Dict[str, Tuple[int, int]], length: int) -> Dict[str, int]:
    """Forward FLOPs of one call that stacks several kinds of sequence padded to one ``length`` (LIMoE's
    image and text), split by kind. ``parts``: kind -> (sequences, real tokens per sequence).

    Each kind's own tokens pay the router (token choice, Expert-Choice) and the shared FFN; Soft MoE's
    mixing runs over the padded length and each sequence has its own S slots; Expert-Choice's C comes
    from the padded call (T = Q length) and its E C rows are split by real-token share, as are the
    T K rows of token choice (padding is never routed)."""
    Q = sum(q for q, _ in parts.values())
    routed = sum(q * n for q, n in parts.values())
    rows = expert_rows(cfg, Q * length, Q, routed=routed)
    row = expert_row_flops(cfg)
    out, left = {}, rows
    for i, (kind, (q, n)) in enumerate(parts.items()):
        if cfg.router == "soft":
            out[kind] = router_flops(cfg, q * length) + expert_rows(cfg, q * length, q) * row
        else:  # the last kind takes what the floor left over
            share = left if i == len(parts) - 1 else rows * q * n // max(routed, 1)
            left -= share
            out[kind] = router_flops(cfg, q * n) + share * row
        out[kind] += shared_flops(cfg, q * n)
    return out


def active_experts(cfg: MoEConfig, length: int) -> float:
    """Routed experts' worth of parameters one token draws on (module docstring); ``length`` is L, the
    tokens of its sequence (Soft MoE only)."""
    E = cfg.num_experts
    if cfg.router == "soft":
        return min(float(E), E * cfg.slots_per_expert / length)
    if cfg.router == "expert_choice":
        return min(float(E), cfg.capacity_factor)
    return float(cfg.experts_per_token)
