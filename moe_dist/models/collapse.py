"""An MoE model made dense by an explicit rule (``moe-dist export --format open_clip --collapse RULE``).

Each MoE MLP of the model becomes the dense open_clip MLP of its block (``c_fc``, ``c_proj``), built from the
layer's experts; routers (and their selection biases) are dropped; every other tensor is kept as is. The
rules:

    expert:I   keep expert I of every MoE layer (``c_fc.weight = w1[I].T``, ``c_fc.bias = b1[I]``,
               ``c_proj.weight = w2[I].T``, ``c_proj.bias = b2[I]``).
    mean       the uniform mean of the experts' weights, tensor by tensor (w1, b1, w2, b2 each averaged).
    routed-mass:FILE
               the mean weighted by each expert's routed mass in FILE, the routing.json of ``moe-dist
               analyze-routing``: per layer, the expert's assignments summed over the modalities, over their sum.

Every rule *changes the function*: the MoE layer computes ``sum_k g_k(x) E_k(x)`` over the experts a token
was routed to, the dense MLP computes one fixed MLP for every token. The result equals the MoE model only
when every expert is the same MLP (e.g. right after upcycling, without noise), the gates of a token sum to
1 (top-1 with ``renormalize``, or top-k renormalised) and no token is dropped; then both rules give that
MLP. ``mean`` and ``routed-mass`` average weights, not outputs: with distinct experts the GELU makes it a different MLP from
the mean of the experts' outputs. Evaluate the collapsed model before you rely on it.

Refused in one line: a dense model (nothing to collapse), shared experts (a second MLP beside the routed
ones), fine-grained experts (granularity > 1: an expert is narrower than the dense MLP), and an expert
activation other than the dense MLPs' (``model.quick_gelu``: QuickGELU, else exact GELU; the open_clip
config written says which).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .config import MoEPlacement, ModelConfig
from .pretrained import PretrainedState, experts_per_layer

COLLAPSE_RULES = ("expert:I", "mean", "routed-mass:FILE")
_EXPERT_KEY = re.compile(r"^(.*)\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(w1|b1|w2|b2)$")
# (MoE MLP module path, global expert id, tensor name)


@dataclass(frozen=True)
class CollapseRule:
    """A parsed ``--collapse`` value: ``mode`` "expert" (keep ``expert``), "mean", or "routed-mass" (the
    routing.json at ``path``)."""

    mode: str
    expert: int = 0
    path: str = ""

    @property
    def text(self) -> str:
        return {"expert": f"expert:{self.expert}", "routed-mass": f"routed-mass:{self.path}"}.get(self.mode, self.mode)

    @classmethod
    def parse(cls, text: str) -> "CollapseRule":
        if text == "mean":
            return cls("mean")
        if (text or "").startswith("routed-mass:") and len(text) > len("routed-mass:"):
            return cls("routed-mass", path=text[len("routed-mass:"):])
        match = re.fullmatch(r"expert:(\d+)", text or "")
        if not match:
            raise ValueError(f"--collapse {text!r} is not a rule; use one of {', '.join(COLLAPSE_RULES)} "
                             "(expert:0 keeps expert 0 of every MoE layer; mean averages the experts' weights; "
                             "routed-mass:routing.json weights them by moe-dist analyze-routing's assignments)")
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
    masses = _routed_mass(state, rule.path) if rule.mode == "routed-mass" else {}
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
        chosen = {part: _combine([t for _, t in sorted(pairs, key=lambda p: p[0])], rule, masses.get(path))
                  for part, pairs in parts.items()}
        w1, w2 = chosen["w1"], chosen["w2"]  # [D, H], [H, D]
        out[f"{path}.c_fc.weight"] = w1.t().contiguous()
        out[f"{path}.c_fc.bias"] = chosen.get("b1", torch.zeros(w1.shape[1], dtype=w1.dtype))
        out[f"{path}.c_proj.weight"] = w2.t().contiguous()
        out[f"{path}.c_proj.bias"] = chosen.get("b2", torch.zeros(w2.shape[1], dtype=w2.dtype))
    return PretrainedState(dense_config(state.config), out, state.tokenizer, state.source, state.step)


def _combine(experts: List[torch.Tensor], rule: CollapseRule, mass_E: Optional[torch.Tensor]) -> torch.Tensor:
    if rule.mode == "expert":
        return experts[rule.expert]
    stacked = torch.stack([e.double() for e in experts])  # [E, ...] in fp64: no order effects
    if mass_E is None:
        return stacked.mean(dim=0).to(experts[0].dtype)
    weight_E = mass_E / mass_E.sum()
    return torch.tensordot(weight_E, stacked, dims=1).to(experts[0].dtype)


def _routed_mass(state: PretrainedState, path: str) -> Dict[str, torch.Tensor]:
    """MoE MLP module path -> [E] fp64 routed mass per expert, from an analyze-routing routing.json."""
    from .build import build_model
    from .moe_blocks import MoEMLP

    try:
        with open(path) as f:
            layers = json.load(f)["layers"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--collapse routed-mass:{path}: cannot read a routing.json of moe-dist analyze-routing "
                         f"({type(err).__name__}: {err})") from None
    with torch.device("meta"):
        paths = {m.layer_name: name for name, m in build_model(state.config).named_modules() if isinstance(m, MoEMLP)}
    counts = experts_per_layer(state.state_dict)
    out = {}
    for layer, module in paths.items():
        report = layers.get(layer) if isinstance(layers, dict) else None
        report = report if isinstance(report, dict) else {}
        rows = [r["assignments"] for r in report.values() if isinstance(r, dict) and "assignments" in r]
        E = counts[f"{module}.moe.deepspeed_moe.experts.deepspeed_experts."]
        if not rows or any(not isinstance(r, list) or len(r) != E or
                           not all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in r) for r in rows):
            raise ValueError(f"--collapse routed-mass:{path} has no assignments of {E} experts for layer {layer!r}; "
                             "run moe-dist analyze-routing on this checkpoint")
        mass_E = torch.tensor(rows, dtype=torch.float64).sum(0)
        if not mass_E.sum() > 0:
            raise ValueError(f"--collapse routed-mass:{path}: layer {layer!r} routed no token; route more data "
                             "with moe-dist analyze-routing, or use --collapse mean")
        out[module] = mass_E
    return out


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
        dense = "quick_gelu" if state.config.quick_gelu else "gelu"
        if moe.activation != dense:
            raise ValueError(f"the {tower} experts use {key(tower, 'activation')}={moe.activation!r} but the dense "
                             f"MLPs (model.quick_gelu={str(state.config.quick_gelu).lower()}) and open_clip's MLP "
                             f"compute {dense}, so no dense MLP computes an expert; use --format hub, which keeps "
                             "every expert")
    fewest = min(counts.values())
    if rule.mode == "expert" and not rule.expert < fewest:
        raise ValueError(f"--collapse {rule.text}: the MoE layers have {fewest} experts (ids 0..{fewest - 1}); "
                         "pick one of those")
