"""Training loss: open_clip's ClipLoss or SigLipLoss (correct across data-parallel ranks) + MoE aux loss.

``ModelOutput``, what every model's forward returns and the losses read, is defined here, below both:
the model config imports this file's loss registry and the models import the model config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

from .moe_blocks import MoEAux


@dataclass
class ModelOutput:
    """Normalised embeddings [B, embed_dim], exp'd logit scale, optional logit bias, MoE results."""

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: Optional[torch.Tensor]
    moe: MoEAux


def _clip(rank: int, world_size: int) -> nn.Module:
    return ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=rank, world_size=world_size)


def _siglip(rank: int, world_size: int) -> nn.Module:
    return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)


# model.loss -> builder of the open_clip loss (ModelConfig validates against these names)
CONTRASTIVE_LOSSES = {"clip": _clip, "siglip": _siglip}


@dataclass
class LossOutput:
    """total: the loss to backpropagate; parts: unweighted contrastive and each MoE loss summed over layers."""

    total: torch.Tensor
    parts: Dict[str, torch.Tensor]


class ContrastiveLoss(nn.Module):
    """loss = contrastive + sum_layers sum_l coef_l * aux_l.

    The CLIP loss gathers features from every rank with gradient (``gather_with_grad``) and scores
    only the local rows against all columns (``local_loss``): the mean of the ranks' losses is the
    loss of the whole global batch, and gradients averaged over ranks match it too. SigLIP exchanges
    text features between neighbouring ranks (open_clip's "bidir").
    """

    def __init__(self, kind: str = "clip", rank: int = 0, world_size: int = 1):
        super().__init__()
        if kind not in CONTRASTIVE_LOSSES:
            raise ValueError(f"model.loss={kind!r} is unknown; use one of {sorted(CONTRASTIVE_LOSSES)}")
        self.kind = kind
        self.contrastive = CONTRASTIVE_LOSSES[kind](rank, world_size)

    def forward(self, out: ModelOutput) -> LossOutput:
        # fp32 under bf16/fp16: logits up to exp(logit_scale) = 100 and a softmax over the global batch
        image, text, scale = out.image_features.float(), out.text_features.float(), out.logit_scale.float()
        if self.kind == "clip":
            contrastive = self.contrastive(image, text, scale)
        else:
            if out.logit_bias is None:
                raise ValueError("model.loss='siglip' needs a logit bias: set model.init_logit_bias (e.g. -10)")
            contrastive = self.contrastive(image, text, scale, out.logit_bias.float())
        return LossOutput(contrastive + out.moe.aux_loss, {"contrastive": contrastive, **out.moe.losses})
