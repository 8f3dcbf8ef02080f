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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

from ..engine.zero_bucket import planned_bucket_elements

if TYPE_CHECKING:  # the planner's arithmetic (and moe-dist --help) imports no torch
    from ..models.params import MoELayerShape


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
class ModelFacts:
    """Everything the planner needs from a model config; built once by ``model_facts``."""

    name: str
    kind: str
    params: Dict[str, int]      # total, expert, active, active/image, active/text (moe-dist params)
    flops: Dict[str, int]       # forward FLOPs: image, text, per_sample
    embed_dim: int
    num_experts: int            # the gcd of every tower's num_experts: an ep_size must divide it
    moe_layers: Tuple["MoELayerShape", ...]  # every MoE layer with its tower's MoEConfig (models/params.py)
    bucket_elements: int        # the run's zero_bucket_elements (0: the planner's choice per ep_size)
    groups_ep1: Tuple[Tuple[str, bool, float, Tuple[int, ...]], ...]  # (name, expert, decay, numels), ep_size 1
    config: object              # the ModelConfig
    _forward: Dict[int, int] = field(default_factory=dict, compare=False, repr=False)  # forward_flops' cache

    def forward_flops(self, micro_batch: int) -> int:
        """Forward FLOPs of a whole micro batch (``models.params.forward_flops``; cached)."""
        if micro_batch not in self._forward:
            from ..models.params import forward_flops

            self._forward[micro_batch] = sum(forward_flops(self.config, micro_batch).values())
        return self._forward[micro_batch]

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

    def layer(self, name: str) -> "MoELayerShape":
        """The MoE layer called ``name`` ("vision.1", "text.3", "shared.1", ...)."""
        for layer in self.moe_layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{self.name} has no MoE layer {name!r}; it has {[x.name for x in self.moe_layers]}")

    def bucket(self, ep_size: int) -> int:
        """ZeRO's reduce / all-gather bucket of a run at ``ep_size``: the run's ``zero_bucket_elements``, or
        ``planned_bucket_elements`` of one rank's tensors (what ``RunConfig.deepspeed_config`` writes)."""
        if self.bucket_elements:
            return self.bucket_elements
        return planned_bucket_elements([n for g in self.groups(ep_size) for n in g.numels])


def capacity(layer: "MoELayerShape", micro_batch: int) -> Optional[int]:
    """Per-expert, per-rank capacity of one training call of ``micro_batch`` samples (None: dropless):
    max(min_capacity, ceil(f T K / E)) with a capacity (moe/dispatch.py CapacityPolicy), Expert-Choice's
    clamp(ceil(f T / E), 1, T), Soft MoE's slots_per_expert per sequence; T counts padding."""
    from ..moe import cost

    cfg, T = layer.config, layer.call_tokens(micro_batch)
    if cfg.router == "soft":
        return cfg.slots_per_expert * micro_batch * len(layer.parts)
    if cfg.router == "expert_choice":
        return cost.expert_choice_capacity(cfg, T)
    return None if cfg.dropless else cost.token_capacity(cfg, T)


def expert_rows(layer: "MoELayerShape", micro_batch: int, ep_size: int) -> int:
    """Rows one rank's experts compute per call (``cost.expert_rows``): the T K assignments, or with a
    capacity at ep_size > 1 the fixed exchange's whole [E, C] buffer (zero rows included); Expert-Choice's
    E C and Soft MoE's E P Q exactly."""
    return layer.rows(micro_batch, ep_size)


def _tagged_meta(numel: int, group_name: str):
    """A meta stand-in for a rank's slice of an expert tensor, tagged as experts.py tags experts."""
    import torch  # here, not at the top: the planner's arithmetic (and moe-dist --help) needs no torch

    p = torch.nn.Parameter(torch.empty(numel, device="meta"))
    p.allreduce, p.group_name = False, group_name
    return p


def model_facts(run_cfg) -> ModelFacts:
    """``ModelFacts`` of a run config's model (built on the meta device: an L/14 MoE costs no memory)."""
    import torch

    from ..engine.optim import build_optimizer
    from ..models import build_model
    from ..models.params import count_flops, count_params, moe_layers

    cfg = run_cfg.model_config()
    with torch.device("meta"):
        model = build_model(cfg)
    # a non-zero decay tells the decay group's expert chunks from the no-decay group's (see groups())
    marked = dataclasses.replace(run_cfg, optimizer=dataclasses.replace(run_cfg.optimizer, weight_decay=1.0))
    optimizer = build_optimizer(model, marked)
    groups = tuple((g["name"], bool(g.get("moe")), float(g["weight_decay"]), tuple(p.numel() for p in g["params"]))
                   for g in optimizer.param_groups if g["params"])
    return ModelFacts(name=cfg.name, kind=cfg.kind, params=count_params(model, cfg), flops=count_flops(cfg),
                      embed_dim=cfg.embed_dim, num_experts=math.gcd(*cfg.expert_counts()), moe_layers=moe_layers(cfg),
                      groups_ep1=groups, config=cfg, bucket_elements=run_cfg.zero_bucket_elements)
