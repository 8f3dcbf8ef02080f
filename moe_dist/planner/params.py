"""What the planner knows about a model: parameter counts, FLOPs, MoE layers and the optimizer's groups.

Counts and FLOPs are ``moe_dist.models.params`` (what ``moe-dist params`` prints). The parameter
groups are the ones DeepSpeed partitions: the run's optimizer (``engine/optim.py``: decay / no-decay,
then DeepSpeed's ``split_params_into_different_moe_groups_for_optimizer``) built over a meta-device
model, so nothing is allocated and the groups match a real run's tensor for tensor. Expert tensors are
stacked ``[E, ...]``, so a rank of an ``ep_size`` R group holds 1/R of each; DeepSpeed's split of expert
groups at its maximum group size is redone on those local sizes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

from ..engine.zero_bucket import planned_bucket_elements


@dataclass(frozen=True)
class ParamGroup:
    """One optimizer parameter group as DeepSpeed sees it on one rank.

    Attributes:
        name: the group's name ("decay", "no_decay", or the expert group name).
        expert: True for expert groups (partitioned over the expert-data-parallel group).
        numels: element count of each tensor, in the optimizer's order, as held by one rank.
    """

    name: str
    expert: bool
    numels: Tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.numels)


@dataclass(frozen=True)
class MoELayerShape:
    """One MoE layer: its name, hidden size D and the tokens one sample routes through it (an upper
    bound for text: padding after EOS is not routed)."""

    name: str
    hidden: int
    tokens_per_sample: int


@dataclass(frozen=True)
class ModelFacts:
    """Everything the planner needs from a model config; built once by ``model_facts``."""

    name: str
    kind: str
    params: Dict[str, int]      # total, expert, active, active/image, active/text (moe-dist params)
    flops: Dict[str, int]       # forward FLOPs: image, text, per_sample
    embed_dim: int
    num_experts: int
    top_k: int                  # K: slots per token (top_k, or max_k)
    dropless: bool
    capacity_factor: float
    min_capacity: int
    moe_layers: Tuple[MoELayerShape, ...]
    bucket_elements: int        # the run's zero_bucket_elements (0: the planner's choice per ep_size)
    groups_ep1: Tuple[Tuple[str, bool, float, Tuple[int, ...]], ...]  # (name, expert, decay, numels), ep_size 1
    config: object              # the ModelConfig

    def groups(self, ep_size: int) -> List[ParamGroup]:
        """The optimizer groups of one rank at ``ep_size`` (expert groups re-split on local sizes)."""
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        out = [ParamGroup(name, False, numels) for name, expert, _, numels in self.groups_ep1 if not expert]
        merged: Dict[float, List[int]] = {}  # expert tensors of one origin group (same weight decay), in order
        for _, expert, decay, numels in self.groups_ep1:
            if expert:
                merged.setdefault(decay, []).extend(n // ep_size for n in numels)
        for decay, numels in merged.items():
            stand_ins = [_tagged_meta(n, f"ep_size_{ep_size}") for n in numels]
            for g in split_params_into_different_moe_groups_for_optimizer({"name": "origin", "params": stand_ins}):
                if g.get("moe") and g["params"]:
                    out.append(ParamGroup(g["name"], True, tuple(p.numel() for p in g["params"])))
        return out

    def bucket(self, ep_size: int) -> int:
        """ZeRO's reduce / all-gather bucket of a run at ``ep_size``: the run's ``zero_bucket_elements``, or
        ``planned_bucket_elements`` of one rank's tensors (what ``RunConfig.deepspeed_config`` writes)."""
        if self.bucket_elements:
            return self.bucket_elements
        return planned_bucket_elements([n for g in self.groups(ep_size) for n in g.numels])


def capacity(facts: ModelFacts, tokens: int) -> int:
    """Per-expert, per-rank capacity for ``tokens`` tokens (moe/dispatch.py CapacityPolicy)."""
    raw = math.ceil(facts.capacity_factor * tokens * facts.top_k / facts.num_experts)
    return max(facts.min_capacity, raw)


def expert_rows(facts: ModelFacts, tokens: int, ep_size: int) -> int:
    """Rows one rank's experts compute for ``tokens`` tokens: the T K assignments, or with a capacity at
    ep_size > 1 the fixed exchange's whole [E, C] buffer (zero rows included: moe/dispatch.py)."""
    if facts.dropless or ep_size == 1:
        return tokens * facts.top_k
    return facts.num_experts * capacity(facts, tokens)


def _tagged_meta(numel: int, group_name: str):
    """A meta stand-in for a rank's slice of an expert tensor, tagged as experts.py tags experts."""
    import torch  # here, not at the top: the planner's arithmetic (and moe-dist --help) needs no torch

    p = torch.nn.Parameter(torch.empty(numel, device="meta"))
    p.allreduce, p.group_name = False, group_name
    return p


def _moe_layers(cfg) -> Tuple[MoELayerShape, ...]:
    v, t = cfg.vision, cfg.text
    image_tokens = (v.image_size // v.patch_size) ** 2 + 1
    if cfg.kind == "limoe":  # every MoE layer routes both modalities
        return tuple(MoELayerShape(f"shared.{i}", v.width, image_tokens + t.context_length)
                     for i in cfg.vision_moe_blocks())
    return (tuple(MoELayerShape(f"vision.{i}", v.width, image_tokens) for i in cfg.vision_moe_blocks())
            + tuple(MoELayerShape(f"text.{i}", t.width, t.context_length) for i in cfg.text_moe_blocks()))


def model_facts(run_cfg) -> ModelFacts:
    """``ModelFacts`` of a run config's model (built on the meta device: an L/14 MoE costs no memory)."""
    import torch

    from ..engine.optim import build_optimizer
    from ..models import build_model
    from ..models.params import count_flops, count_params

    cfg = run_cfg.model_config()
    with torch.device("meta"):
        model = build_model(cfg)
    # a non-zero decay tells the decay group's expert chunks from the no-decay group's (see groups())
    marked = dataclasses.replace(run_cfg, optimizer=dataclasses.replace(run_cfg.optimizer, weight_decay=1.0))
    optimizer = build_optimizer(model, marked)
    groups = tuple((g["name"], bool(g.get("moe")), float(g["weight_decay"]), tuple(p.numel() for p in g["params"]))
                   for g in optimizer.param_groups if g["params"])
    moe = cfg.moe_config(cfg.vision.width, cfg.vision.mlp_ratio)
    return ModelFacts(name=cfg.name, kind=cfg.kind, params=count_params(model, cfg), flops=count_flops(cfg),
                      embed_dim=cfg.embed_dim, num_experts=moe.num_experts, top_k=moe.experts_per_token,
                      dropless=moe.dropless, capacity_factor=moe.capacity_factor, min_capacity=moe.min_capacity,
                      moe_layers=_moe_layers(cfg), groups_ep1=groups, config=cfg,
                      bucket_elements=run_cfg.zero_bucket_elements)
