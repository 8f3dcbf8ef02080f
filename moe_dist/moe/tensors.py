"""Small tensor helpers of the MoE path, where every operator call counts (docs/performance.md)."""

from __future__ import annotations

import torch


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without an operator call when it already is: a no-op ``Tensor.to`` still goes
    through the dispatcher, and the layer's host cost is its operator count."""
    return t if t.dtype == dtype else t.to(dtype)
