"""Training loss: open_clip's ClipLoss or SigLipLoss (correct across data-parallel ranks) + MoE aux loss."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from .clip import ModelOutput


class ContrastiveLoss(nn.Module):
    """loss = contrastive + sum_layers sum_l coef_l * aux_l.

    The CLIP loss gathers features from every rank with gradient (``gather_with_grad``) and scores
    only the local rows against all columns (``local_loss``): the mean of the ranks' losses is the
    loss of the whole global batch, and gradients averaged over ranks match it too. SigLIP exchanges
    text features between neighbouring ranks (open_clip's "bidir").
    """

    def __init__(self, kind: str = "clip", rank: int = 0, world_size: int = 1):
        super().__init__()
        self.kind = kind
        if kind == "clip":
            self.contrastive = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank,
                                        world_size=world_size)
        elif kind == "siglip":
            self.contrastive = SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
        else:
            raise ValueError(f"model.loss={kind!r} is unknown; use 'clip' or 'siglip'")

    def forward(self, out: ModelOutput) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns (total loss, unweighted parts: contrastive and each MoE loss summed over layers)."""
        if self.kind == "clip":
            contrastive = self.contrastive(out.image_features, out.text_features, out.logit_scale)
        else:
            if out.logit_bias is None:
                raise ValueError("model.loss='siglip' needs a logit bias: set model.init_logit_bias (e.g. -10)")
            contrastive = self.contrastive(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        parts = {"contrastive": contrastive, **out.moe.losses}
        return contrastive + out.moe.aux_loss, parts
