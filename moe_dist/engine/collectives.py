"""The few collectives the trainer and the resume logic use outside the model: agreeing on a text (an
error path, or rank 0's choice) and reducing one number with one host read."""

from __future__ import annotations

from typing import List, Optional

import torch


def all_gather_text(text: str, world: int) -> List[str]:
    """Every rank's ``text`` (an error path only: it pickles); one rank needs no collective."""
    if world == 1:
        return [text]
    out: List[Optional[str]] = [None] * world
    torch.distributed.all_gather_object(out, text)
    return [t or "" for t in out]


def rank0_value(value: str, world: int) -> str:
    """Rank 0's ``value`` on every rank."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce(value, op: str) -> float:
    """``value`` (a float, or a one-element tensor on any device) reduced over all ranks and read back
    with one host sync; a single rank needs no collective (and a float no sync at all)."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    if dist.get_world_size() == 1:
        return float(value)
    device = get_accelerator().device_name()
    if torch.is_tensor(value):
        t = value.detach().reshape(1).to(device=device, dtype=torch.float32, copy=True)  # reduced in place
    else:
        t = torch.tensor([value], dtype=torch.float32, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())
