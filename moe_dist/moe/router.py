"""Routers: token features -> which experts, with what gate weight. No communication here.

Shape legend: T tokens, D hidden, E experts, K slots per token (top_k, max_k, or E for Expert-Choice),
M modality rows, G expert groups.

Every router computes its gate network, scores and selection in fp32 (fp64 when the input is fp64),
whatever the parameter or input dtype. A router's steps:
    1. logits = gate(x) (+ training noise, ``ROUTER_NOISE``), forbidden experts of the token's modality
       set to ``MASKED_LOGIT``;
    2. scores (``SCORE_FUNCS``): softmax probabilities, or per-expert sigmoids (their normalised copy is
       the distribution the balance loss and the statistics use);
    3. selection on the scores plus, with ``router_bias``, the modality's selection bias (DeepSeek-V3;
       moe/balance.py moves it after each optimizer step), within the best groups when ``n_groups`` > 1;
    4. gate weights: the unbiased scores of the chosen experts (renormalised when asked).
Variants differ only in ``select``; each registers in ``ROUTERS`` and checks its own fields
(``check_config``). Soft MoE's router lives in soft.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import MoEConfig
from .registry import ROUTER_NOISE, ROUTERS, SCORE_FUNCS
from .tensors import cast

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


ROUTER_NOISE.register("none", RouterNoise())
ROUTER_NOISE.register("jitter", JitterNoise())
ROUTER_NOISE.register("gumbel", GumbelNoise())


@dataclass
class Routing:
    """The router's decision for T tokens.

    Attributes:
        logits_TE: gate logits after modality masking (``MASKED_LOGIT`` for forbidden experts), fp32.
        lse_T: logsumexp of ``logits_TE`` (the z-loss's, and the softmax's normaliser).
        probs_TE: the gate distribution over experts (rows sum to 1): the softmax as exp(logits - lse),
            or the normalised sigmoid scores. The balance loss and the statistics use it.
        experts_TK: chosen expert per slot (long); slots with ``valid_TK`` False are unused.
        weights_TK: gate weight per slot (fp32), 0 where not valid.
        valid_TK: slot is used; always False for padding tokens.
        token_mask_T: token is real (not padding).
        modality_T: modality id per token, or None.
        modalities: the modality ids whose stats and entropy losses are reported (``MoEConfig.modalities``).
        softmax: ``probs_TE`` is the softmax of ``logits_TE`` (its entropy is lse - sum p * logit).
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
    softmax: bool = True


# ----------------------------------------------------------------------------- gate scores
# Each maps masked logits [T, E] to (lse_T, probs_TE, scores_TE): the z-loss's logsumexp, the gate
# distribution (rows sum to 1) and the scores that select experts and become gate weights.
def _softmax_scores(logits_TE: torch.Tensor):
    # exp(logits - lse), not torch.softmax: the z-loss needs lse anyway, and CPU softmax over a last dim
    # of E is slow (hand-timed, 4,160 x 8: 253 us against 117 us for logsumexp and exp together)
    lse_T = torch.logsumexp(logits_TE, dim=-1)
    probs_TE = torch.exp(logits_TE - lse_T[:, None])
    return lse_T, probs_TE, probs_TE


def _sigmoid_scores(logits_TE: torch.Tensor):
    scores_TE = torch.sigmoid(logits_TE)  # a masked logit's sigmoid is exactly 0
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(scores_TE.dtype).tiny)
    return torch.logsumexp(logits_TE, dim=-1), probs_TE, scores_TE


SCORE_FUNCS.register("softmax", _softmax_scores)
SCORE_FUNCS.register("sigmoid", _sigmoid_scores)


def allowed_experts_table(cfg: MoEConfig) -> torch.Tensor:
    """[M + 1, E] bool: row m, the experts a token of modality m may use under ``cfg.modality_experts``;
    the last row, a token of any other modality (the shared experts only).

    ``modality_experts`` = (n_image, n_text[, n_cross]) lays the experts out as consecutive groups:
    image-only, text-only, cross-only, then shared. A token of modality m may use its own group and the
    shared experts."""
    # from Python lists: no operator, so it also builds under torch.device("meta") (parameter counting)
    return torch.tensor(allowed_experts_lists(cfg), dtype=torch.bool)


def allowed_experts_lists(cfg: MoEConfig) -> List[List[bool]]:
    """``allowed_experts_table`` as Python lists (config checks need no tensor)."""
    M = len(cfg.modality_experts)
    group_E = [m for m, n in enumerate(cfg.modality_experts) for _ in range(n)]
    group_E += [M] * (cfg.num_experts - len(group_E))  # shared
    return [[g in (m, M) for g in group_E] for m in range(M + 1)]


def modality_rows(modality_T: Optional[torch.Tensor], num_rows: int, num_tokens: int, device) -> torch.Tensor:
    """[T] long, each token's row in a per-modality table of ``num_rows`` rows (row 0 without modalities)."""
    if modality_T is None:
        return torch.zeros(num_tokens, dtype=torch.long, device=device)
    return modality_T.long().clamp(0, num_rows - 1)


class Router(nn.Module):
    """Gate network plus noise, modality masking, scores, selection bias and forced balancing;
    subclasses pick experts (``select``).

    Class attributes a variant sets:
        token_choice: each token picks its experts on its own (False: the router looks at the whole call).
        may_skip_slots: ``select`` can leave slots unused (``valid_TK`` False).
        capacity_policy: the ``dispatch.POLICIES`` entry the router imposes (None: by ``dropless``).
        has_routing_loss: the routing losses (and the loads moe/balance.py tracks) apply.
    """

    token_choice = True
    may_skip_slots = True
    capacity_policy: Optional[str] = None
    has_routing_loss = True

    @classmethod
    def slots_per_token(cls, cfg: MoEConfig) -> int:
        """K, the slots of one token's routing."""
        return cfg.max_k

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        """ValueError for the fields this router cannot honour (``MoEConfig.__post_init__`` calls it)."""
        if cfg.router_bias or cfg.n_groups > 1:
            raise ValueError(f"MoEConfig.router={cfg.router!r} with router_bias={cfg.router_bias}, n_groups="
                             f"{cfg.n_groups}: the selection bias and group-limited routing pick a fixed number of "
                             "experts per token; use router='topk'")

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.router_hidden_size:
            self.proj = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.router_hidden_size), nn.GELU(),
                                      nn.Linear(cfg.router_hidden_size, cfg.num_experts))
        else:
            self.proj = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.noise = ROUTER_NOISE.get(cfg.router_noise)
        self.scores = SCORE_FUNCS.get(cfg.score_func)
        # built once and moved with the module: a per-call table would be a host-to-device copy
        self.register_buffer("allowed_ME", allowed_experts_table(cfg) if cfg.uses_modality else None, persistent=False)
        # the selection bias, one row per modality (row 0 for calls without one); in the state dict, so
        # a resume continues from it. Only when enabled: other layers' checkpoints keep their keys.
        bias_ME = torch.zeros(len(cfg.modalities), cfg.num_experts) if cfg.router_bias else None
        self.register_buffer("selection_bias_ME", bias_ME)

    def _apply(self, fn, recurse=True):
        """Moves and casts as nn.Module does, except that the selection bias stays fp32: DeepSpeed casts
        fp16/bf16 models whole, and a bf16 bias could not take steps of router_bias_rate."""
        bias = self.selection_bias_ME
        out = super()._apply(fn, recurse)
        if bias is not None and self.selection_bias_ME.dtype != bias.dtype:
            self.selection_bias_ME = bias.to(self.selection_bias_ME.device)
        return out

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
        lse_T, probs_TE, scores_TE = self.scores(logits_TE)
        if self.cfg.force_balanced:
            experts_TK, valid_TK = self._balanced(T, allowed_TE, x_TD.device)
        else:
            choose_TE = scores_TE.detach()
            if self.selection_bias_ME is not None:
                rows_T = modality_rows(modality_T, self.selection_bias_ME.shape[0], T, x_TD.device)
                choose_TE = choose_TE + cast(self.selection_bias_ME, choose_TE.dtype).index_select(0, rows_T)
                if allowed_TE is not None:  # a bias must not open a forbidden expert
                    choose_TE = choose_TE.masked_fill(~allowed_TE, float("-inf"))
            experts_TK, valid_TK = self.select(choose_TE, token_mask_T if padded else None)
        weights_TK = scores_TE.gather(1, experts_TK)
        if padded:
            valid_TK = valid_TK & token_mask_T[:, None]
        if padded or self.may_skip_slots:
            weights_TK = weights_TK * valid_TK
        if self.cfg.renormalize:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(weights_TK.dtype).tiny)
        return Routing(logits_TE, lse_T, probs_TE, experts_TK, weights_TK, valid_TK, token_mask_T, modality_T,
                       self.cfg.modalities, self.cfg.score_func == "softmax")

    def select(self, scores_TE: torch.Tensor, token_mask_T: Optional[torch.Tensor]):
        """Return (experts_TK long, valid_TK bool) from the (detached, possibly biased) selection scores,
        slots sorted by decreasing score. ``token_mask_T`` is None when every token is real."""
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


@ROUTERS.register("topk")
class TopKRouter(Router):
    """The ``top_k`` best experts, among the ``topk_groups`` best of ``n_groups`` groups when grouped."""

    may_skip_slots = False

    @classmethod
    def slots_per_token(cls, cfg):
        return cfg.top_k

    @classmethod
    def check_config(cls, cfg):
        G, E = cfg.n_groups, cfg.num_experts
        if E % G:
            raise ValueError(f"MoEConfig.n_groups={G} must divide num_experts={E} (group-limited routing splits "
                             "the experts into equal groups); use a divisor of num_experts, or 1 for no groups")
        if cfg.topk_groups > G:
            raise ValueError(f"MoEConfig.topk_groups={cfg.topk_groups} exceeds n_groups={G}; use 1..{G}")
        if cfg.top_k > cfg.topk_groups * (E // G):
            raise ValueError(f"MoEConfig.top_k={cfg.top_k} exceeds the {cfg.topk_groups * (E // G)} experts that "
                             f"topk_groups={cfg.topk_groups} groups of {E // G} allow; raise topk_groups or lower top_k")
        if G > 1 and cfg.uses_modality:
            # the groups a token may end up in hold at least top_k experts its modality may use
            for m, allowed_E in enumerate(allowed_experts_lists(cfg)[:-1]):
                usable = sorted(n for n in (sum(allowed_E[g * (E // G):(g + 1) * (E // G)]) for g in range(G)) if n)
                if len(usable) < cfg.topk_groups or sum(usable[:cfg.topk_groups]) < cfg.top_k:
                    raise ValueError(
                        f"MoEConfig.modality_experts={cfg.modality_experts} with n_groups={G}, topk_groups="
                        f"{cfg.topk_groups}: a modality-{m} token can pick groups holding only "
                        f"{sum(usable[:cfg.topk_groups])} experts it may use, fewer than top_k={cfg.top_k}; raise "
                        "topk_groups, lower top_k or reserve fewer experts")

    def select(self, scores_TE, token_mask_T):
        cfg = self.cfg
        if cfg.n_groups > 1 and cfg.topk_groups < cfg.n_groups:
            scores_TE = self._within_best_groups(scores_TE)
        if cfg.top_k == 1:  # argmax: 3-5x faster than topk(1) on CPU (hand-timed)
            experts_TK = scores_TE.argmax(dim=-1, keepdim=True)
        else:
            experts_TK = scores_TE.topk(cfg.top_k, dim=-1).indices
        return experts_TK, torch.ones_like(experts_TK, dtype=torch.bool)

    def _within_best_groups(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The scores with every expert outside the token's ``topk_groups`` best groups at -inf; a group
        scores the sum of its two best experts (its best one when groups have one expert)."""
        T, E = scores_TE.shape
        G = self.cfg.n_groups
        scores_TGX = scores_TE.view(T, G, E // G)
        group_TG = scores_TGX.topk(min(2, E // G), dim=-1).values.sum(-1)
        best_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            1, group_TG.topk(self.cfg.topk_groups, dim=-1).indices, True)
        return scores_TGX.masked_fill(~best_TG[:, :, None], float("-inf")).view(T, E)


class _ProbabilityRouter(Router):
    """A router whose rule reads the gate as probabilities (a threshold, a cumulative mass)."""

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.score_func != "softmax":
            raise ValueError(f"MoEConfig.router={cfg.router!r} with score_func={cfg.score_func!r}: its rule reads "
                             "the gate as probabilities that sum to 1; use score_func='softmax' or router='topk'")


@ROUTERS.register("threshold")
class ThresholdRouter(_ProbabilityRouter):
    """Keep experts with probability >= threshold; the best one always, at most max_k."""

    def select(self, scores_TE, token_mask_T):
        top_TK, experts_TK = scores_TE.topk(self.cfg.max_k, dim=-1)
        valid_TK = top_TK >= self.cfg.threshold
        valid_TK[:, 0] = True
        return experts_TK, valid_TK


@ROUTERS.register("top_p")
class TopPRouter(_ProbabilityRouter):
    """Keep the smallest prefix of the sorted experts whose probability mass reaches top_p (<= max_k)."""

    def select(self, scores_TE, token_mask_T):
        top_TK, experts_TK = scores_TE.topk(self.cfg.max_k, dim=-1)
        mass_before_TK = top_TK.cumsum(-1) - top_TK
        valid_TK = mass_before_TK < self.cfg.top_p
        valid_TK[:, 0] = True
        return experts_TK, valid_TK


def expert_choice_capacity(cfg: MoEConfig, num_tokens: int) -> int:
    """Tokens each expert takes under Expert-Choice: ceil(capacity_factor * T / E), in [1, T] (0 for T = 0)."""
    return min(num_tokens, max(1, math.ceil(cfg.capacity_factor * num_tokens / cfg.num_experts)))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert-Choice routing (Zhou et al. 2022): expert e takes the C tokens of the call with the highest
    score for e (C = ``expert_choice_capacity``), so every expert computes exactly C rows and a token may
    get 0 to E experts. Slot e of a token is expert e (K = E); padding is never chosen, and a token may
    never be chosen by an expert its modality forbids."""

    token_choice = False
    capacity_policy = "expert_choice"

    @classmethod
    def slots_per_token(cls, cfg):
        return cfg.num_experts

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg.force_balanced or cfg.renormalize:
            raise ValueError(f"MoEConfig.router='expert_choice' with force_balanced={cfg.force_balanced}, renormalize="
                             f"{cfg.renormalize}: every expert takes its capacity of tokens by construction, and a "
                             "token's gate weights are its own probabilities (Zhou et al.); set both to false")

    def select(self, scores_TE, token_mask_T):
        T, E = scores_TE.shape
        C = expert_choice_capacity(self.cfg, T)
        rank_TE = scores_TE if token_mask_T is None else scores_TE.masked_fill(~token_mask_T[:, None], -1.0)
        if self.allowed_ME is not None:  # forbidden experts score exactly 0 (softmax of MASKED_LOGIT)
            rank_TE = rank_TE.masked_fill(scores_TE <= 0, -2.0)
        chosen_ET = torch.zeros(E, T, dtype=torch.bool, device=scores_TE.device).scatter_(
            1, rank_TE.t().topk(C, dim=-1).indices, True)
        valid_TE = chosen_ET.t()
        if self.allowed_ME is not None:
            valid_TE = valid_TE & (scores_TE > 0)
        experts_TE = torch.arange(E, device=scores_TE.device).expand(T, E)
        return experts_TE, valid_TE


def build_router(cfg: MoEConfig) -> Router:
    return ROUTERS.get(cfg.router)(cfg)
