"""Load that spans micro batches and ranks: the step's expert loads, the global-batch balance loss's
frequencies, and the auxiliary-loss-free selection bias (DeepSeek-V3).

Shape legend: M modality rows (``MoEConfig.modalities``; row 0 for calls without a modality), E experts.

Per optimizer step, for every layer that needs it (``router_bias``, or ``load_balance="global_batch"``):
    1. each micro batch's forward: a global-batch loss reads the step's load so far plus its own, summed
       over every rank (``LoadTracker.global_load``: one all-reduce of M x E numbers);
    2. after its backward the trainer adds the micro batch's selections to the step's load
       (``record_loads``), so an activation-checkpointing recompute sees what the forward saw;
    3. after the optimizer step (``end_optimizer_step``): one all-reduce of every layer's step load
       together, then bias[m, e] += rate * sign(mean_e' load[m, e'] - load[m, e]) over the experts open to
       modality m, and the step's load starts again from zero.
The bias is a buffer of the router (in the state dict: a resume continues from it); the step's load is not
saved (checkpoints are written between steps, when it is zero).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import torch
from torch import nn

from .config import MoEConfig


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over every rank in place (nothing in a single process)."""
    import deepspeed.comm as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def world_size() -> int:
    import deepspeed.comm as dist

    return dist.get_world_size() if dist.is_initialized() else 1


class LoadTracker(nn.Module):
    """The step's selected assignments per modality row and expert on this rank ([M, E] int64 counts:
    a model cast to fp16/bf16 casts floating buffers, never integer ones)."""

    def __init__(self, cfg: MoEConfig, allowed_ME: Optional[torch.Tensor]):
        super().__init__()
        M, E = len(cfg.modalities), cfg.num_experts
        self.register_buffer("step_load_ME", torch.zeros(M, E, dtype=torch.long), persistent=False)
        # experts open to each modality row: the balance target is their mean load
        open_ME = torch.ones(M, E, dtype=torch.bool) if allowed_ME is None else allowed_ME[:M].clone()
        self.register_buffer("open_ME", open_ME, persistent=False)

    def _rows(self, load_ME: torch.Tensor) -> torch.Tensor:
        return self.step_load_ME[:load_ME.shape[0]]

    def global_load(self, load_ME: torch.Tensor) -> torch.Tensor:
        """The step's load so far plus ``load_ME`` (this call's), summed over every rank."""
        total = self._rows(load_ME).to(load_ME.dtype) + load_ME
        return _all_reduce_sum(total)

    @torch.no_grad()
    def record(self, load_ME: torch.Tensor) -> None:
        self._rows(load_ME).add_(load_ME.round().to(self.step_load_ME.dtype))  # exact counts held in floats

    @torch.no_grad()
    def reset(self) -> None:
        self.step_load_ME.zero_()


def bias_update(bias_ME: torch.Tensor, load_ME: torch.Tensor, open_ME: torch.Tensor, rate: float) -> torch.Tensor:
    """rate * sign(mean load - load) per open expert of each row (0 elsewhere, and 0 for a row with no
    load): the step of DeepSeek-V3's selection bias."""
    load = load_ME.to(torch.float64)
    open_f = open_ME.to(torch.float64)
    mean_M1 = (load * open_f).sum(-1, keepdim=True) / open_f.sum(-1, keepdim=True).clamp_min(1)
    return (rate * torch.sign(mean_M1 - load) * open_f).to(bias_ME.dtype)


def record_loads(layers: Dict[str, nn.Module], loads: Dict[str, torch.Tensor]) -> None:
    """Add each layer's micro-batch load (``MoEOutput.load_ME``, by layer name) to its step's load."""
    for name, load_ME in loads.items():
        tracker = getattr(layers.get(name), "load_tracker", None)
        if tracker is not None and load_ME is not None:
            tracker.record(load_ME)


@torch.no_grad()
def end_optimizer_step(layers: Iterable[nn.Module], update: bool = True) -> None:
    """After an optimizer step: move every selection bias by its step's global load (one all-reduce for
    all layers), then clear the step's loads. Every rank must call it (it communicates when any layer
    tracks a load). ``update`` False (a step the optimizer skipped: every rank agrees) only clears."""
    tracked = [layer for layer in layers if getattr(layer, "load_tracker", None) is not None]
    if not tracked:
        return
    if not update:
        for layer in tracked:
            layer.load_tracker.reset()
        return
    loads = torch.cat([layer.load_tracker.step_load_ME.flatten() for layer in tracked])
    _all_reduce_sum(loads)
    offset = 0
    for layer in tracked:
        tracker = layer.load_tracker
        n = tracker.step_load_ME.numel()
        bias_ME = layer.router.selection_bias_ME
        if bias_ME is not None:
            load_ME = loads[offset:offset + n].view_as(tracker.step_load_ME)
            bias_ME.add_(bias_update(bias_ME, load_ME, tracker.open_ME, layer.config.router_bias_rate))
        offset += n
        tracker.reset()
