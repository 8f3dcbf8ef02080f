"""An MoE model made dense by an explicit rule (``moe-dist export --format open_clip --collapse RULE``).

Each MoE MLP of the model becomes the dense open_clip MLP of its block (``c_fc``, ``c_proj``), built from the
layer's experts; routers (and their selection biases) are dropped; every other tensor is kept as is. The
rules:

    expert:I   keep expert I of every MoE layer (``c_fc.weight = w1[I].T``, ``c_fc.bias = b1[I]``,
               ``c_proj.weight = w2[I].T``, ``c_proj.bias = b2[I]``).
    mean       the uniform mean of the experts' weights, tensor by tensor (w1, b1, w2, b2 each averaged).

Either rule *changes the function*: the MoE layer computes ``sum_k g_k(x) E_k(x)`` over the experts a token
was routed to, the dense MLP computes one fixed MLP for every token. The result equals the MoE model only
when every expert is the same MLP (e.g. right after upcycling, without noise), the gates of a token sum to
1 (top-1 with ``renormalize``, or top-k renormalised) and no token is dropped; then both rules give that
MLP. ``mean`` averages weights, not outputs: with distinct experts the GELU makes it a different MLP from
the mean of the experts' outputs. Evaluate the collapsed model before you rely on it.

Refused in one line: a dense model (nothing to collapse), shared experts (a second MLP beside the routed
ones), fine-grained experts (granularity > 1: an expert is narrower than the dense MLP), and an expert
activation other than GELU (open_clip's MLP uses exact GELU).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Dict, List

import torch

from .config import MoEPlacement, ModelConfig
from .pretrained import PretrainedState, experts_per_layer

COLLAPSE_RULES = ("expert:I", "mean")
_EXPERT_KEY = re.compile(r"^(.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w1|b1|w2|b2)$")
# (MoE MLP module path, global expert id, tensor name)


@dataclass(frozen=True)
class CollapseRule:
    """A parsed ``--collapse`` value: ``mode`` "expert" (keep ``expert``) or "mean"."""

    mode: str
    expert: int = 0

    @property
    def text(self) -> str:
        return f"expert:{self.expert}" if self.mode == "expert" else self.mode

    @classmethod
    def parse(cls, text: str) -> "CollapseRule":
        if text == "mean":
            return cls("mean")
        match = re.fullmatch(r"expert:(\d+)", text or "")
        if not match:
            raise ValueError(f"--collapse {text!r} is not a rule; use one of {', '.join(COLLAPSE_RULES)} "
                             "(expert:0 keeps expert 0 of every MoE layer; mean averages the experts' weights)")
        return cls("expert", int(match.group(1)))


def dense_config(config: ModelConfig) -> ModelConfig:
    """``config`` with no MoE layer in any tower (the same blocks, each with its dense MLP)."""
    none = MoEPlacement()
    return dataclasses.replace(
        config, name=f"{config.name}-dense",
        vision=dataclasses.replace(config.vision, moe=none), text=dataclasses.replace(config.text, moe=none),
        decoder=dataclasses.replace(config.decoder, moe=none, cross_moe=none))


def collapse(state: PretrainedState, rule: CollapseRule) -> PretrainedState:
    """The dense model ``rule`` makes of ``state``'s MoE model (module docstring).

    Args:
        state: an ep_size=1 state (``consolidated_state_dict``) with at least one MoE layer.
        rule: which expert to keep, or "mean".

    Returns:
        A PretrainedState of ``dense_config(state.config)`` with the same tokenizer, source and step; its
        tensors are new only where an MoE MLP was (the others are shared with ``state``).
    """
    _check_collapsible(state, rule)
    layers: Dict[str, Dict[str, List[torch.Tensor]]] = {}
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state.state_dict.items():
        match = _EXPERT_KEY.match(name)
        if match:
            path, expert, part = match.group(1), int(match.group(2)), match.group(3)
            layers.setdefault(path, {}).setdefault(part, []).append((expert, tensor))
        elif ".mlp.moe." not in name:  # routers and selection biases go with their MoE MLP
            out[name] = tensor
    for path, parts in layers.items():
        chosen = {part: _combine([t for _, t in sorted(pairs, key=lambda p: p[0])], rule)
                  for part, pairs in parts.items()}
        w1, w2 = chosen["w1"], chosen["w2"]  # [D, H], [H, D]
        out[f"{path}.c_fc.weight"] = w1.t().contiguous()
        out[f"{path}.c_fc.bias"] = chosen.get("b1", torch.zeros(w1.shape[1], dtype=w1.dtype))
        out[f"{path}.c_proj.weight"] = w2.t().contiguous()
        out[f"{path}.c_proj.bias"] = chosen.get("b2", torch.zeros(w2.shape[1], dtype=w2.dtype))
    return PretrainedState(dense_config(state.config), out, state.tokenizer, state.source, state.step)


def _combine(experts: List[torch.Tensor], rule: CollapseRule) -> torch.Tensor:
    if rule.mode == "expert":
        return experts[rule.expert]
    return torch.stack([e.double() for e in experts]).mean(dim=0).to(experts[0].dtype)  # fp64 sum: no order effects


def _check_collapsible(state: PretrainedState, rule: CollapseRule) -> None:
    counts = experts_per_layer(state.state_dict)
    if not counts:
        raise ValueError(f"{state.source} is a dense model ({state.config.name}); --collapse applies to MoE models "
                         "only: drop it")
    for tower, moe in state.config.tower_moe().items():
        key = state.config.moe_key
        if moe.shared_expert or moe.num_shared_experts:
            raise ValueError(f"the {tower} MoE layers have shared experts ({key(tower, 'shared_expert')}, "
                             f"{key(tower, 'num_shared_experts')}): a dense MLP cannot hold both, so it cannot be "
                             "collapsed; use --format hub, which keeps every expert")
        if moe.granularity != 1:
            raise ValueError(f"the {tower} MoE layers have fine-grained experts ({key(tower, 'granularity')}="
                             f"{moe.granularity}): an expert is narrower than the dense MLP, so it cannot be "
                             "collapsed; use --format hub, which keeps every expert")
        if moe.activation != "gelu":
            raise ValueError(f"the {tower} experts use {key(tower, 'activation')}={moe.activation!r}, but open_clip's "
                             "MLP uses exact GELU; use --format hub, which keeps every expert")
    fewest = min(counts.values())
    if rule.mode == "expert" and not rule.expert < fewest:
        raise ValueError(f"--collapse {rule.text}: the MoE layers have {fewest} experts (ids 0..{fewest - 1}); "
                         "pick one of those")
