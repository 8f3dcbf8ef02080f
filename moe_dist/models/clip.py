"""Two-tower MoE-CLIP: open_clip's VisionTransformer and TextTransformer with MoE MLPs in chosen blocks.

The module layout is open_clip's CustomTextCLIP (``visual.*``, ``text.*``, ``logit_scale``), so dense
open_clip weights map onto it directly (see upcycle.py). Image tokens are routed as modality 0,
text tokens as modality 1, and text positions after EOS as padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU, TextTransformer, VisionTransformer, text_global_pool
from torch import nn

from ..moe import IMAGE, TEXT
from .config import ModelConfig
from .loss import ModelOutput
from .moe_blocks import collect_moe_outputs, place_moe, routing_context


def act_layer(cfg: ModelConfig) -> type:
    """The dense MLPs' activation module: open_clip's QuickGELU (``model.quick_gelu``) or GELU."""
    return QuickGELU if cfg.quick_gelu else nn.GELU


def text_padding_mask(text: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[B, C] bool, True after each sequence's EOS (the position the text tower pools)."""
    eos_pos = text_eos_position(text, cfg)
    return torch.arange(text.shape[1], device=text.device)[None, :] > eos_pos[:, None]


def text_eos_position(text: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    if cfg.text.pool_type == "argmax":
        return text.argmax(dim=-1)
    if cfg.text.pool_type == "eos":
        return (text == cfg.text.eos_id).int().argmax(dim=-1)
    return torch.full(text.shape[:1], text.shape[1] - 1, device=text.device)


def text_to_device(model: nn.Module, tokens: torch.Tensor, device) -> torch.Tensor:
    """A host batch's token ids [B, C] on ``device``, cut after the batch's last EOS where the model
    allows it (its ``trim_text_batch``): the length comes from the host copy and the cut is a device
    view, so nothing is read back from the device (models that do not trim get the batch as it is)."""
    out = tokens.to(device, non_blocking=True)
    trim = getattr(model, "trim_text_batch", None)
    return out if trim is None else out[:, :trim(tokens).shape[1]]


def _causal_eos_pooled(tower: TextTransformer, cfg: ModelConfig) -> bool:
    return (cfg.text.pool_type in ("argmax", "eos") and tower.attn_mask is not None and tower.cls_emb is None
            and not tower.use_pad_mask)


def trim_after_eos(text: torch.Tensor, tower: TextTransformer, cfg: ModelConfig) -> torch.Tensor:
    """``text`` without the columns after the batch's last EOS, where that is exact: a causal tower
    (no CLS token, no padding mask) that pools at EOS ("argmax" or "eos"). No position up to a sequence's
    EOS attends to a later one, and the later ones are padding that is never routed, so the pooled
    features and every MoE statistic are unchanged (with deterministic routing: router noise and a random
    drop priority draw per token, so fewer tokens draw other numbers). The text tower's time falls with
    the caption length. Costs one host sync per call for the length."""
    if not _causal_eos_pooled(tower, cfg):
        return text
    keep = int(text_eos_position(text, cfg).max()) + 1
    return text if keep >= text.shape[1] else text[:, :keep]


def run_text_tower(tower: TextTransformer, text: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """open_clip's ``TextTransformer.forward`` for a causal, EOS-pooled tower at any length up to its
    context: the same modules, with the causal mask and positions cut to the length (open_clip would
    apply its full-context mask, and reads its input dtype from block 0's dense MLP, which an MoE block 0
    does not have). Other towers run open_clip's own forward."""
    if not _causal_eos_pooled(tower, cfg):
        return tower(text)
    L = text.shape[1]
    x = tower.token_embedding(text)
    x = x + tower.positional_embedding[:L].to(x.dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:L, :L])
    pooled = text_global_pool(tower.ln_final(x), text, pool_type=tower.pool_type, eos_token_id=tower.eos_id)
    if tower.text_projection is None:
        return pooled
    if isinstance(tower.text_projection, nn.Linear):
        return tower.text_projection(pooled)
    return pooled @ tower.text_projection


class ContrastiveModel(nn.Module):
    """What both model kinds share: logit scale/bias, the forward contract and MoE collection."""

    def _init_logits(self, cfg: ModelConfig) -> None:
        # shape [1], not []: DeepSpeed's parameter broadcast cannot view 0-d tensors as bytes
        # (open_clip's nonscalar_logit_scale option exists for the same reason)
        self.logit_scale = nn.Parameter(torch.ones([1]) * cfg.init_logit_scale)
        self.logit_bias = None if cfg.init_logit_bias is None else nn.Parameter(torch.ones([1]) * cfg.init_logit_bias)

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> ModelOutput:
        """images [B, 3, S, S], text [B, C] token ids -> ModelOutput."""
        image_features, text_features = self.encode_pair(images, text)
        return ModelOutput(image_features, text_features, self.logit_scale.exp(), self.logit_bias,
                           collect_moe_outputs(self, image_features))

    def encode_pair(self, images, text):
        return self.encode_image(images), self.encode_text(text)


class MoECLIP(ContrastiveModel):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        self.visual = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                                        layers=v.layers, heads=v.heads, mlp_ratio=v.mlp_ratio,
                                        output_dim=cfg.embed_dim, act_layer=act_layer(cfg))
        self.text = TextTransformer(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                                    heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_ratio,
                                    output_dim=cfg.embed_dim, pad_id=t.pad_id, eos_id=t.eos_id,
                                    pool_type=t.pool_type, act_layer=act_layer(cfg))
        place_moe(self.visual.transformer, cfg.vision_moe_blocks(), cfg.moe_config(v.width, v.mlp_ratio, "vision"),
                  ep_size, "vision")
        text_moe = cfg.moe_config(t.width, t.mlp_ratio, "text")
        place_moe(self.text.transformer, cfg.text_moe_blocks(), text_moe, ep_size, "text")
        # cut the text after the batch's last EOS (trim_after_eos), except where every rank must route the
        # same token count (capacity at ep_size > 1 exchanges fixed-size buffers, moe/dispatch.py). Callers
        # with a host batch cut it there (text_to_device: the trainer and evaluation); the forward cuts
        # text on the CPU, where reading its length waits on nothing, unless a whole-model compile runs it
        self.trim_text = ep_size == 1 or text_moe.dropless or not cfg.text_moe_blocks()
        self.trim_in_forward = True
        self._init_logits(cfg)

    def trim_text_batch(self, text: torch.Tensor) -> torch.Tensor:
        """``text`` [B, C] without the columns after the batch's last EOS where that is exact and allowed
        (``trim_after_eos``), for token ids still on the host: the trainer cuts each batch before its copy
        to the device, so a compiled model gets the short batch without reading anything back."""
        return trim_after_eos(text, self.text, self.cfg) if self.trim_text else text

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        modality = torch.full((), IMAGE, device=images.device)
        with routing_context(self.visual, modality=modality):
            features = self.visual(images)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        if self.trim_text and self.trim_in_forward and text.device.type == "cpu":
            text = trim_after_eos(text, self.text, self.cfg)
        modality = torch.full((), TEXT, device=text.device)
        with routing_context(self.text, modality=modality, padding_mask=text_padding_mask(text, self.cfg)):
            features = run_text_tower(self.text, text, self.cfg)
        return F.normalize(features, dim=-1) if normalize else features
