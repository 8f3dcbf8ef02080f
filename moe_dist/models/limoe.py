"""LIMoE: one shared open_clip Transformer for image patches and text tokens.

Outline of ``encode_pair``:
    1. image stem: patchify conv + CLS + positions; text stem: token embedding + positions;
       each adds its learned modality embedding;
    2. both sequences are padded to one length L and stacked into one batch [2B, L, W], so every MoE
       layer routes image and text tokens together (per-modality entropy losses and stats apply);
    3. attention masks padded keys (text is bidirectional, as in LIMoE); the MoE layers get the same
       padding mask and a per-token modality;
    4. image: CLS token, text: EOS token, each through its own LayerNorm + projection head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, Transformer
from torch import nn

from ..moe import IMAGE, TEXT
from .clip import ContrastiveModel, act_layer, text_eos_position, text_padding_mask
from .config import ModelConfig
from .moe_blocks import place_moe, routing_context


class LIMoE(ContrastiveModel):
    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        v, t = cfg.vision, cfg.text
        width = v.width
        scale = width ** -0.5
        grid = v.image_size // v.patch_size
        self.patchify = nn.Conv2d(3, width, kernel_size=v.patch_size, stride=v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.image_positions = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.token_embedding = nn.Embedding(t.vocab_size, width)
        self.text_positions = nn.Parameter(0.01 * torch.randn(t.context_length, width))
        self.modality_embedding = nn.Parameter(0.02 * torch.randn(2, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, v.layers, v.heads, v.mlp_ratio, act_layer=act_layer(cfg))
        place_moe(self.transformer, cfg.vision_moe_blocks(), cfg.moe_config(width, v.mlp_ratio, "vision"), ep_size, "shared")
        self.image_head = nn.Sequential(LayerNorm(width), nn.Linear(width, cfg.embed_dim, bias=False))
        self.text_head = nn.Sequential(LayerNorm(width), nn.Linear(width, cfg.embed_dim, bias=False))
        self.heads = v.heads
        self._init_logits(cfg)

    def _image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patchify(images).flatten(2).transpose(1, 2)  # [B, P, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.image_positions.to(x.dtype) + self.modality_embedding[IMAGE]

    def _text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(text) + self.text_positions + self.modality_embedding[TEXT]

    def _run(self, tokens, padding, modality):
        """Shared transformer over [N, L, W] with key padding [N, L] and per-sequence modality [N]."""
        N, L, _ = tokens.shape
        attn = torch.zeros(N, 1, L, L, dtype=tokens.dtype, device=tokens.device)
        attn = attn.masked_fill(padding[:, None, None, :], float("-inf"))
        attn = attn.expand(N, self.heads, L, L).reshape(N * self.heads, L, L)
        with routing_context(self.transformer, modality=modality[:, None].expand(N, L), padding_mask=padding):
            return self.transformer(self.ln_pre(tokens), attn_mask=attn)

    def encode_pair(self, images, text):
        img = self._image_tokens(images)
        txt = self._text_tokens(text)
        B, Li, Lt = img.shape[0], img.shape[1], txt.shape[1]
        L = max(Li, Lt)
        device = img.device
        img_pad = torch.arange(L, device=device)[None, :].expand(B, L) >= Li
        txt_pad = F.pad(text_padding_mask(text, self.cfg), (0, L - Lt), value=True)
        tokens = torch.cat([F.pad(img, (0, 0, 0, L - Li)), F.pad(txt, (0, 0, 0, L - Lt))])
        modality = torch.cat([torch.full((B,), IMAGE, device=device), torch.full((txt.shape[0],), TEXT, device=device)])
        x = self._run(tokens, torch.cat([img_pad, txt_pad]), modality)
        return self._image_features(x[:B]), self._text_features(x[B:], text)

    def _image_features(self, x):
        return F.normalize(self.image_head(x[:, 0]), dim=-1)

    def _text_features(self, x, text):
        pooled = x[torch.arange(x.shape[0], device=x.device), text_eos_position(text, self.cfg)]
        return F.normalize(self.text_head(pooled), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self._image_tokens(images)
        padding = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        modality = torch.full(tokens.shape[:1], IMAGE, device=tokens.device)
        return self._image_features(self._run(tokens, padding, modality))

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        modality = torch.full(text.shape[:1], TEXT, device=text.device)
        x = self._run(self._text_tokens(text), text_padding_mask(text, self.cfg), modality)
        return self._text_features(x, text)
