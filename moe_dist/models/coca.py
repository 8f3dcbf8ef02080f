"""CoCa-MoE: MoE-CLIP's two towers plus open_clip's multimodal text decoder, for captioning and VQA.

Shape legend: B batch, C context length, L decoder positions (C - 1 in training), P image tokens the decoder
reads (patches, or the pooler's queries), W decoder width (``decoder.width``, by default the text width),
Wv vision width, V vocabulary.

Outline of ``forward(images, text)``:
    1. image tower (open_clip VisionTransformer, ``output_tokens``): the pooled CLS embedding for the
       contrastive loss and the patch tokens, mapped to the decoder's memory [B, P, W] by a linear layer
       (``decoder.image_tokens: patches``) or open_clip's AttentionalPooler (``pooler``: P learnt queries);
    2. unimodal text tower (open_clip TextTransformer, causal, ``output_tokens``): the EOS embedding for
       the contrastive loss and the token states [B, C, Wt], mapped to W when the widths differ;
    3. multimodal decoder (open_clip MultimodalTransformer): token states of positions 0..C-2 attend
       causally to each other and fully to the image tokens; logits [B, C-1, V] predict text[:, 1:].
MoE routing: image tokens are modality IMAGE, the text tower's TEXT, the decoder's CROSS; positions
after the first EOS are padding everywhere (never routed). ``CocaLoss`` = contrastive x weight +
captioning cross-entropy x weight + MoE aux losses.

Where this departs from open_clip's ``CoCa`` (coca_model.py), and why:
    - by default the decoder cross-attends to the ViT's patch tokens through one linear map instead of an
      attentional pooler to 256 queries (tiny images have a few dozen patches, fewer than the queries);
      ``decoder.image_tokens: pooler`` is open_clip's pooler with ``decoder.pooler_queries`` queries;
    - the contrastive text embedding is the EOS token's (as in MoE-CLIP), not an appended CLS token, so
      the text tower and its MoE layers are MoE-CLIP's;
    - generation is ``moe_dist.generation`` (no HF ``transformers`` dependency) and recomputes the
      prefix every step: prefixes hold no EOS, so padding is "after the first EOS", never
      ``pool_type`` based.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import SimpleNamespace
from typing import List, Tuple

import torch
import torch.nn.functional as F
from open_clip.transformer import AttentionalPooler, MultimodalTransformer, TextTransformer, VisionTransformer
from torch import nn

from ..moe.router import CROSS, IMAGE, TEXT
from .clip import ContrastiveModel, act_layer
from .config import ModelConfig
from .loss import ContrastiveLoss, LossOutput, ModelOutput
from .moe_blocks import collect_moe_outputs, place_moe, routing_context

log = logging.getLogger(__name__)


@dataclass
class CocaOutput(ModelOutput):
    """ModelOutput plus the decoder's next-token logits [B, C-1, V] and their labels text[:, 1:] [B, C-1]."""

    logits: torch.Tensor = None
    labels: torch.Tensor = None


def padding_after_eos(text_BC: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, C] bool, True after each row's first EOS; a row without EOS (a prefix being decoded) has none."""
    is_eos_BC = text_BC == eos_id
    C = text_BC.shape[1]
    first_B = torch.where(is_eos_BC.any(1), is_eos_BC.int().argmax(1), torch.full_like(text_BC[:, 0], C))
    return torch.arange(C, device=text_BC.device)[None, :] > first_B[:, None]


class CoCa(ContrastiveModel):
    """Image encoder, unimodal text encoder and multimodal decoder, each with MoE MLPs where configured."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        v, t, d = cfg.vision, cfg.text, cfg.decoder
        self.visual = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width,
                                        layers=v.layers, heads=v.heads, mlp_ratio=v.mlp_ratio,
                                        output_dim=cfg.embed_dim, output_tokens=True, act_layer=act_layer(cfg))
        self.text = TextTransformer(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width,
                                    heads=t.heads, layers=t.layers, mlp_ratio=t.mlp_ratio,
                                    output_dim=cfg.embed_dim, pad_id=t.pad_id, eos_id=t.eos_id,
                                    pool_type=t.pool_type, output_tokens=True, act_layer=act_layer(cfg))
        D = cfg.decoder_width
        if d.image_tokens == "pooler":
            self.image_to_decoder = AttentionalPooler(D, v.width, n_head=d.heads or t.heads, n_queries=d.pooler_queries)
        else:
            self.image_to_decoder = nn.Linear(v.width, D)
        self.text_to_decoder = nn.Linear(t.width, D) if D != t.width else nn.Identity()
        self.decoder = MultimodalTransformer(width=D, layers=d.layers, heads=d.heads or t.heads,
                                             context_length=t.context_length, mlp_ratio=d.mlp_ratio,
                                             output_dim=t.vocab_size, act_layer=act_layer(cfg))
        # open_clip leaves the projection to init_parameters, which reads attributes this class lacks
        nn.init.normal_(self.decoder.text_projection, std=D ** -0.5)
        place_moe(self.visual.transformer, cfg.vision_moe_blocks(), cfg.moe_config(v.width, v.mlp_ratio, "vision"),
                  ep_size, "vision")
        place_moe(self.text.transformer, cfg.text_moe_blocks(), cfg.moe_config(t.width, t.mlp_ratio, "text"),
                  ep_size, "text")
        blocks = cfg.decoder_moe_blocks()
        place_moe(self.decoder, blocks["decoder"], cfg.moe_config(D, d.mlp_ratio, "decoder"), ep_size, "decoder")
        place_moe(SimpleNamespace(resblocks=self.decoder.cross_attn), blocks["decoder_cross"],
                  cfg.moe_config(D, d.mlp_ratio, "decoder_cross"), ep_size, "decoder_cross")
        self._init_logits(cfg)

    # ------------------------------------------------------------------ towers
    def encode_image_tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """images [B, 3, S, S] -> (normalised embedding [B, embed_dim], decoder memory [B, P, W])."""
        with routing_context(self.visual, modality=torch.full((), IMAGE, device=images.device)):
            pooled, tokens_BPV = self.visual(images)
        return F.normalize(pooled, dim=-1), self.image_to_decoder(tokens_BPV)

    def _text_tower(self, text_BC: torch.Tensor, padding_BC: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        with routing_context(self.text, modality=torch.full((), TEXT, device=text_BC.device), padding_mask=padding_BC):
            return self.text(text_BC)

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        with routing_context(self.visual, modality=torch.full((), IMAGE, device=images.device)):
            pooled, _ = self.visual(images)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, text: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        pooled, _ = self._text_tower(text, padding_after_eos(text, self.cfg.text.eos_id))
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def decode(self, memory_BPW: torch.Tensor, text_BL: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, L, V] for every prefix of ``text_BL`` (BOS first), given the image tokens.

        The text tower's causal mask has the full context length (open_clip does not slice it), so the
        prefix is padded to C; causality keeps the padded positions out of the L that are returned, and
        they are not routed."""
        t = self.cfg.text
        L = text_BL.shape[1]
        text_BC = F.pad(text_BL, (0, t.context_length - L), value=t.pad_id)
        position_C = torch.arange(t.context_length, device=text_BL.device)
        padding_BC = padding_after_eos(text_BC, t.eos_id) | (position_C >= L)[None, :]
        _, states_BCW = self._text_tower(text_BC, padding_BC)
        return self._decoder(memory_BPW, states_BCW[:, :L], padding_BC[:, :L])

    def _decoder(self, memory_BPW, states_BLW, padding_BL) -> torch.Tensor:
        with routing_context(self.decoder, modality=torch.full((), CROSS, device=states_BLW.device),
                             padding_mask=padding_BL):
            return self.decoder(memory_BPW, self.text_to_decoder(states_BLW))

    # ------------------------------------------------------------------ training forward
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> CocaOutput:
        """images [B, 3, S, S], text [B, C] (BOS ... EOS pad...) -> CocaOutput (logits predict text[:, 1:])."""
        image_features, memory_BPW = self.encode_image_tokens(images)
        padding_BC = padding_after_eos(text, self.cfg.text.eos_id)
        pooled, states_BCW = self._text_tower(text, padding_BC)
        # the text tower is causal, so its states at 0..C-2 equal those of text[:, :-1] alone
        logits_BLV = self._decoder(memory_BPW, states_BCW[:, :-1], padding_BC[:, :-1])
        return CocaOutput(image_features, F.normalize(pooled, dim=-1), self.logit_scale.exp(), self.logit_bias,
                          collect_moe_outputs(self, image_features), logits_BLV, text[:, 1:])


class CocaLoss(nn.Module):
    """loss = contrastive_loss_weight x contrastive + caption_loss_weight x caption + MoE aux loss.

    ``caption`` is the mean next-token cross-entropy (fp32; ``decoder.label_smoothing`` spreads that share of
    each target's mass uniformly over the vocabulary) over the label positions that are not padding
    (the EOS is predicted, nothing after it) and, with ``decoder.loss_after``, that follow the marker's last
    occurrence in their sample (VQA: the answer, not the question). Parts are logged unweighted."""

    def __init__(self, cfg: ModelConfig, rank: int = 0, world_size: int = 1, tokenizer=None):
        super().__init__()
        self.contrastive = ContrastiveLoss(cfg.loss, rank, world_size)
        self.pad_id = cfg.text.pad_id
        self.label_smoothing = cfg.decoder.label_smoothing
        self.caption_weight = cfg.decoder.caption_loss_weight
        self.contrastive_weight = cfg.decoder.contrastive_loss_weight
        self.marker: List[int] = []
        self.loss_after, self._warned = cfg.decoder.loss_after, False
        if cfg.decoder.loss_after:
            if tokenizer is None:
                raise ValueError("model.decoder.loss_after needs the run's tokenizer to find its tokens")
            self.marker = list(tokenizer.pieces([cfg.decoder.loss_after])[0])
            if not self.marker:
                raise ValueError(f"model.decoder.loss_after={cfg.decoder.loss_after!r} encodes to no token")

    def forward(self, out: CocaOutput) -> LossOutput:
        parts = dict(self.contrastive(out).parts)
        labels = out.labels
        if self.marker:
            labels = answer_labels(out.labels, self.marker, self.pad_id)
            if not self._warned and not bool((labels != out.labels).any()):
                self._warned = True  # once: a marker the tokenizer splits differently would score every token
                log.warning("model.decoder.loss_after=%r occurs in no sample of this batch (token ids %s): "
                            "every token of those samples is scored", self.loss_after, self.marker)
        caption = F.cross_entropy(out.logits.float().flatten(0, 1), labels.flatten(), ignore_index=self.pad_id,
                                  label_smoothing=self.label_smoothing)
        parts["caption"] = caption
        total = self.contrastive_weight * parts["contrastive"] + self.caption_weight * caption + out.moe.aux_loss
        return LossOutput(total, parts)


def answer_labels(labels_BL: torch.Tensor, marker: List[int], pad_id: int) -> torch.Tensor:
    """``labels_BL`` with every position up to the end of ``marker``'s last occurrence in its row set to
    ``pad_id`` (not scored); rows without the marker are returned whole."""
    m, L = len(marker), labels_BL.shape[1]
    if L < m:
        return labels_BL
    windows_BSM = labels_BL.unfold(1, m, 1)
    found_BS = (windows_BSM == torch.tensor(marker, device=labels_BL.device)).all(-1)
    start_S = torch.arange(found_BS.shape[1], device=labels_BL.device)
    last_B = torch.where(found_BS, start_S, torch.full_like(start_S, -m)).amax(1)  # -m: no marker, keep all
    keep_BL = torch.arange(L, device=labels_BL.device)[None, :] >= (last_B + m)[:, None]
    return labels_BL.masked_fill(~keep_BL, pad_id)
