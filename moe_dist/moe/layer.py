"""The MoE layer: router -> capacity policy -> dispatch -> grouped experts -> combine.

Shape legend: T tokens (all leading dims of x flattened), D hidden, E experts, L local experts,
K slots per token, N rows at this rank's experts.

y(x) = sum_{i in S(x)} g_i(x) * f_i(x) (+ shared FFN(x)), where S(x) are the kept experts of token x.

DeepSpeed integration: ``MoELayer`` is a ``deepspeed.moe.layer.MoE`` so that ``deepspeed.initialize``
recognises it (expert-data-parallel gradient reduction, MoE ZeRO param groups, per-expert checkpoint
files). It does not use the parent's gate or experts. Its state dict stores the stacked expert
tensors under DeepSpeed's per-expert key layout (``deepspeed_moe.experts.deepspeed_experts.<i>.w1``,
one [D, H] slice per expert), so ``engine.save_checkpoint`` writes one file per *global* expert and a
load under a different ``ep_size`` picks the right experts on every rank.
"""

from __future__ import annotations

import functools
import operator
import re
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from torch import nn

from .balance import LoadTracker, world_size
from .config import LOSSES, MoEConfig
from .dispatch import build_capacity_policy, build_dispatcher
from .experts import ACTIVATIONS, GroupedExperts
from .losses import BalanceInputs, summarize
from .registry import Registry
from .router import build_router
from .tensors import cast

_DS_EXPERT_KEY = "deepspeed_moe.experts.deepspeed_experts.{}.{}"
_DS_EXPERT_RE = re.compile(r"deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)$")


# router name -> the layer class that runs it, for routers that replace the sparse path (soft.py)
LAYERS: Registry = Registry("router")


@dataclass
class MoEOutput:
    """Result of one MoE layer call.

    Attributes:
        output: same shape and dtype as the input.
        aux_loss: scalar, sum of coefficient * loss over the enabled auxiliary losses.
        losses: name -> unweighted scalar loss ("load_balance", "z_loss", "entropy_local", "entropy_global").
        stats: name -> detached tensor (tokens per expert, dropped fraction, router entropy; "/image"
            and "/text" variants when a modality tensor is given).
        load_ME: [M, E] selected assignments per modality row, detached (moe/balance.py); None when
            the layer tracks no load across micro batches.
    """

    output: torch.Tensor
    aux_loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    load_ME: Optional[torch.Tensor] = None


class _Activation(nn.Module):
    """An ``ACTIVATIONS`` entry as a module (the shared experts' FFN)."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.fn = name, ACTIVATIONS.get(name).fn

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fn(h)

    def extra_repr(self) -> str:
        return self.name


def shared_ffn(cfg: MoEConfig) -> Optional[nn.Sequential]:
    """The always-on experts as one FFN ``num_shared_experts`` times as wide (None without any):
    Linear, the experts' activation, Linear (the keys ``0.*`` and ``2.*`` of earlier checkpoints)."""
    width = cfg.shared_hidden_size
    if not width:
        return None
    act = ACTIVATIONS.get(cfg.shared_activation)
    return nn.Sequential(nn.Linear(cfg.hidden_size, act.width * width), _Activation(cfg.shared_activation),
                         nn.Linear(width, cfg.hidden_size))


def expert_parallel_group(ep_size: int):
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups for ``ep_size`` and
    return the expert-parallel group (None for ep_size 1, which needs no all-to-all)."""
    import deepspeed.comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        if ep_size == 1:
            return None  # single process; deepspeed.initialize creates the groups later
        raise ValueError(f"ep_size={ep_size} needs torch.distributed: call deepspeed.init_distributed() "
                         "(or launch with deepspeed/torchrun) before building the model, or use ep_size=1")
    world = ds_comm.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"ep_size={ep_size} does not divide the world size {world}; pick an ep_size that "
                         f"divides it (e.g. {world} or 1)")
    name = f"ep_size_{ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    return groups._get_expert_parallel_group(name) if ep_size > 1 else None


class MoELayer(_DeepSpeedMoE):
    """Sparse mixture-of-experts FFN whose experts are sharded over ``ep_size`` ranks.

    Args:
        config: the layer's ``MoEConfig``.
        ep_size: expert-parallel group size; must divide ``config.num_experts`` and the world size.
    """

    def __init__(self, config: MoEConfig, ep_size: int = 1):
        nn.Module.__init__(self)  # the parent's gate and experts are not used
        if config.router in LAYERS and not isinstance(self, LAYERS.get(config.router)):
            raise ValueError(f"MoEConfig.router={config.router!r} runs in {LAYERS.get(config.router).__name__}, not "
                             f"{type(self).__name__}; build layers with moe_dist.moe.build_moe_layer(config, ep_size)")
        if ep_size < 1 or config.num_experts % ep_size != 0:
            raise ValueError(f"num_experts={config.num_experts} is not divisible by ep_size={ep_size}; "
                             "choose an ep_size that divides num_experts")
        self.config = config
        # Attributes DeepSpeed's engine and checkpointing read from a native MoE layer.
        self.ep_size = ep_size
        self.num_experts = config.num_experts
        self.num_local_experts = config.num_experts // ep_size
        self.expert_group_name = f"ep_size_{ep_size}"
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False

        self.router = build_router(config)
        self.policy = build_capacity_policy(config)
        self.experts = GroupedExperts(self.num_local_experts, config.hidden_size, config.expert_hidden_size,
                                      config.activation, config.expert_bias, config.expert_backend,
                                      self.expert_group_name, config.recompute_activation)
        self.shared_mlp = shared_ffn(config)
        # experts open to each modality row: the per-modality balance losses' E_m
        open_M = (torch.full((len(config.modalities),), config.num_experts) if self.router.allowed_ME is None
                  else self.router.allowed_ME[:-1].sum(-1))  # integers: a cast model leaves them exact
        self.register_buffer("open_experts_M", open_M, persistent=False)
        # (Soft MoE has no routing loss and no bias: nothing to track)
        tracks_load = config.router_bias or config.load_balance == "global_batch"
        tracks_load = tracks_load and config.router_class.has_routing_loss
        self.load_tracker = LoadTracker(config, self.router.allowed_ME) if tracks_load else None
        self.dispatcher = build_dispatcher(config.num_experts, ep_size, expert_parallel_group(ep_size))
        self.register_state_dict_post_hook(_experts_to_deepspeed_keys)
        self.register_load_state_dict_pre_hook(_experts_from_deepspeed_keys)

    @property
    def communicates(self) -> bool:
        """The forward calls collectives (expert-parallel all-to-alls, or the global-batch loss's
        all-reduce): it runs eager, outside a compiled graph (models/moe_blocks.py)."""
        global_loss = self.load_tracker is not None and self.config.load_balance == "global_batch"
        return self.ep_size > 1 or (global_loss and world_size() > 1)

    def set_dropless(self, dropless: bool) -> None:
        """Switch between dropless and capacity dispatch after construction (evaluation runs dropless by
        default: capacity clipping at eval inflates the loss). A router that fixes its own capacity
        (Expert-Choice) keeps it."""
        if self.config.router_class.capacity_policy is not None:
            return
        self.policy = build_capacity_policy(self.config.replace(dropless=dropless))

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Called by ``deepspeed.initialize``; our group already exists (see ``expert_parallel_group``)."""
        self.dispatcher.group = expert_parallel_group(self.ep_size)

    def forward(self, x: torch.Tensor, modality: Optional[torch.Tensor] = None,
                padding_mask: Optional[torch.Tensor] = None) -> MoEOutput:
        """Route, compute and combine.

        Args:
            x: [..., D] tokens.
            modality: optional [...] ints (0 image, 1 text), same leading shape as x.
            padding_mask: optional [...] bool, True marks padding. Padding is never routed, never
                counted in losses or stats, and its output is zero.
        """
        D = self.config.hidden_size
        if x.shape[-1] != D:
            raise ValueError(f"MoELayer expects inputs [..., {D}], got {tuple(x.shape)}")
        x_TD = x.reshape(-1, D)
        T = x_TD.shape[0]
        modality_T = None if modality is None else modality.expand(x.shape[:-1]).reshape(T)
        token_mask_T = None if padding_mask is None else ~padding_mask.expand(x.shape[:-1]).reshape(T)

        routing = self.router(x_TD, modality_T, token_mask_T)
        kept_TK = self.policy.keep(routing, self.training)
        # a fixed-size exchange at ep_size > 1 in training (eval batches may be ragged); ep_size 1 needs none
        capacity = self.policy.buffer_capacity(T) if self.training and self.ep_size > 1 else None
        sent = self.dispatcher.dispatch(x_TD, routing, kept_TK, capacity)
        y_ND = self.experts(sent.rows_ND, sent.offs_L)
        y_TD = self.dispatcher.combine(y_ND, sent.plan, T)
        if self.shared_mlp is not None:
            y_TD = y_TD + self.shared_mlp(x_TD) * cast(routing.token_mask_T[:, None], x_TD.dtype)

        coefs = {name: getattr(self.config, f"{name}_coef") for name in LOSSES}
        weighted = [name for name, coef in coefs.items() if coef > 0]
        # the others are reported, not differentiated
        summary = summarize(routing, kept_TK, weighted, self.config.load_balance, self._balance_inputs(x))
        terms = [coefs[name] * summary.losses[name] for name in weighted]
        aux_loss = routing.probs_TE.sum() * 0.0 if not terms else functools.reduce(operator.add, terms)
        load_ME = summary.load_ME if self.load_tracker is not None else None
        return MoEOutput(cast(y_TD.reshape(x.shape), x.dtype), aux_loss, summary.losses, summary.stats, load_ME)

    def _balance_inputs(self, x: torch.Tensor) -> Optional[BalanceInputs]:
        """What the configured balance loss needs beyond the routing (None for the micro batch's)."""
        kind = self.config.load_balance
        if kind == "micro_batch":
            return None
        experts_M = self.open_experts_M
        if kind == "global_batch":
            tracker = self.load_tracker
            return BalanceInputs(experts_M, global_load=tracker.global_load if self.training else None)
        # sequence: [..., L, D] holds prod(...) sequences of L tokens ([T, D]: one sequence)
        L = max(1, x.shape[-2] if x.dim() >= 3 else x.shape[0])  # (an empty call has no sequence)
        T = x.numel() // x.shape[-1]
        return BalanceInputs(experts_M, sample_T=torch.arange(T, device=x.device) // L, num_samples=T // L)

    def extra_repr(self) -> str:
        c = self.config
        return (f"router={c.router}, experts={c.num_experts} ({self.num_local_experts} local), "
                f"k={c.experts_per_token}, dropless={c.dropless}, ep_size={self.ep_size}")


def build_moe_layer(config: MoEConfig, ep_size: int = 1) -> MoELayer:
    """The MoE layer for ``config``: ``MoELayer``, or the class its router registered in ``LAYERS``."""
    cls = LAYERS.get(config.router) if config.router in LAYERS else MoELayer
    return cls(config, ep_size)


def _experts_to_deepspeed_keys(module: MoELayer, state_dict, prefix: str, local_metadata) -> None:
    """Stacked ``experts.w1 [L, ...]`` -> ``deepspeed_moe.experts.deepspeed_experts.<l>.w1`` per local expert."""
    for name in ("w1", "b1", "w2", "b2"):
        stacked = state_dict.pop(f"{prefix}experts.{name}", None)
        if stacked is None:
            continue
        for local_id, tensor in enumerate(stacked.unbind(0)):
            state_dict[prefix + _DS_EXPERT_KEY.format(local_id, name)] = tensor


def _experts_from_deepspeed_keys(module: MoELayer, state_dict, prefix: str, *args) -> None:
    """Inverse of ``_experts_to_deepspeed_keys``: restack per-expert entries before loading."""
    pieces: Dict[str, Dict[int, torch.Tensor]] = {}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        match = _DS_EXPERT_RE.fullmatch(key[len(prefix):])
        if match:
            pieces.setdefault(match.group(2), {})[int(match.group(1))] = state_dict.pop(key)
    for name, by_id in pieces.items():
        if sorted(by_id) != list(range(module.num_local_experts)):
            raise ValueError(f"checkpoint for {prefix or 'MoE layer'} has experts {sorted(by_id)} for '{name}', "
                             f"but this rank holds {module.num_local_experts} local experts "
                             f"(num_experts={module.num_experts}, ep_size={module.ep_size})")
        state_dict[f"{prefix}experts.{name}"] = torch.stack([by_id[i] for i in range(len(by_id))])
