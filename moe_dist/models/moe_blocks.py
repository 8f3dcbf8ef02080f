"""Putting MoELayer into open_clip transformer blocks and collecting what the layers computed.

open_clip's ResidualAttentionBlock calls ``self.mlp(x)`` with the tokens only, so ``MoEMLP`` takes the
per-call routing context (modality, padding mask) from ``routing_context`` and keeps its
``MoEOutput`` until ``collect_moe_outputs`` pops it right after the tower's forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from ..moe import MoEConfig, MoELayer, MoEOutput


class MoEMLP(nn.Module):
    """Drop-in replacement for an open_clip block's ``mlp``: tokens [B, L, D] -> [B, L, D]."""

    def __init__(self, config: MoEConfig, ep_size: int = 1):
        super().__init__()
        self.moe = MoELayer(config, ep_size=ep_size)
        self.modality: Optional[torch.Tensor] = None
        self.padding_mask: Optional[torch.Tensor] = None
        self.last: Optional[MoEOutput] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.moe(x, modality=self.modality, padding_mask=self.padding_mask)
        return self.last.output


def place_moe(transformer: nn.Module, blocks: List[int], config: MoEConfig, ep_size: int, prefix: str) -> None:
    """Replace ``transformer.resblocks[i].mlp`` by an MoEMLP for every i in ``blocks``."""
    for i in blocks:
        block = transformer.resblocks[i]
        mlp = MoEMLP(config, ep_size)
        mlp.layer_name = f"{prefix}.{i}"
        block.mlp = mlp


def moe_mlps(module: nn.Module) -> Iterator[MoEMLP]:
    return (m for m in module.modules() if isinstance(m, MoEMLP))


def set_dropless(module: nn.Module, dropless: bool = True) -> None:
    """Dropless (or the configured capacity) dispatch in every MoE layer under ``module``."""
    for m in moe_mlps(module):
        m.moe.set_dropless(dropless)


@contextlib.contextmanager
def routing_context(module: nn.Module, modality=None, padding_mask=None):
    """Give every MoEMLP under ``module`` the modality/padding of the tokens about to pass."""
    mlps = list(moe_mlps(module))
    for m in mlps:
        m.modality, m.padding_mask = modality, padding_mask
    try:
        yield
    finally:
        for m in mlps:
            m.modality = m.padding_mask = None


@dataclass
class MoEAux:
    """MoE results of one model forward: weighted aux loss, unweighted losses summed over layers,
    and per-layer stats ("vision.3" -> stats dict)."""

    aux_loss: torch.Tensor
    losses: Dict[str, torch.Tensor] = field(default_factory=dict)
    layer_stats: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)


def collect_moe_outputs(module: nn.Module, like: torch.Tensor) -> MoEAux:
    """Pop the outputs the MoE layers under ``module`` kept during the last forward."""
    aux = like.new_zeros((), dtype=torch.float32)
    losses: Dict[str, torch.Tensor] = {}
    stats: Dict[str, Dict[str, torch.Tensor]] = {}
    for m in moe_mlps(module):
        out, m.last = m.last, None
        if out is None:
            continue
        aux = aux + out.aux_loss
        for name, value in out.losses.items():
            losses[name] = losses.get(name, 0) + value
        stats[m.layer_name] = out.stats
    return MoEAux(aux, losses, stats)
