"""Parameter and FLOP accounting (what ``moe-dist params`` prints), each tower's MoE layers with their own
MoEConfig (``model.moe`` with the tower's ``overrides``). The per-layer rules are moe/cost.py's.

Active parameters are what one token draws on: every MoE layer counts its router, its shared FFN and
``cost.active_experts`` of its E experts (top-k: top_k; threshold / top-p: max_k; Expert-Choice:
min(capacity_factor, E), the mean E C / T of a call; Soft MoE: min(E, E slots_per_expert / L) for a
sequence of L tokens), the total rounded to an integer. L is the tower's sequence: patches + 1 for the
image, context_length for text; LIMoE's shared layers use each modality's own length for
``active/<modality>`` and the pair call's padded length, the longer of the two, for ``active``. Per
modality, the parameters only the other modality uses (its tower, stem or head) are left out as well.

FLOPs are forward multiply-adds x 2 for one image and one caption (training is about 3x that), per key:
    block of N tokens, width D:  2 N 4 D^2 (q, k, v, out projections) + 2 x 2 N^2 D (scores, weighted sum)
    dense MLP of hidden H:       2 x 2 N D H
    MoE MLP:                     ``cost.call_flops`` with its tower's config: router (Soft MoE: the phi
                                 logits and the dispatch and combine matmuls, 6 N D S), the routed experts'
                                 rows x 2 D He (a + 1), the shared FFN N x 2 D Hs (a + 1)
    image stem 2 P 3 p^2 D (P patches of p x p pixels), each tower's projection 2 D embed_dim.
    "decoder" (CoCa, width D): Ld = context_length - 1 positions; per layer a causal block as above and a
    cross-attention block, 2 Ld D^2 x 2 (q, out) + 2 M D^2 x 2 (k, v over the M image tokens) + 2 x 2 Ld M D,
    each with its MLP; plus the image tokens' map to the decoder width: patches (M = P) 2 P Dv D, or the
    attentional pooler (M queries) 2 M D^2 x 2 (q, out) + 2 P Dv D x 2 (k, v) + 2 x 2 M P D; the text
    states' map 2 Ld Dt D when the widths differ; and the logits 2 Ld D V.
LIMoE runs image and text through one transformer: each sequence is counted at its own length, except
where the padded pair call decides the work (Expert-Choice's C, Soft MoE's mixing: ``cost.call_flops``).
Text is counted at context_length (the longest caption). ``forward_flops(cfg, B)`` gives the FLOPs of a
micro batch of B (Expert-Choice's C = ceil(f T / E) is exact only for the call's T).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

from ..moe import cost
from ..moe.config import MoEConfig
from .build import build_model
from .config import ModelConfig, load_model_config
from .moe_blocks import MoEMLP

# parameter-name prefixes used by one modality only, per model kind
EXCLUSIVE = {
    "clip": {"image": ("visual.",), "text": ("text.",)},
    "limoe": {"image": ("patchify.", "class_embedding", "image_positions", "image_head."),
              "text": ("token_embedding.", "text_positions", "text_head.")},
    "coca": {"image": ("visual.", "image_to_decoder."), "text": ("text.",)},  # the decoder serves both
}


@dataclass(frozen=True)
class MoELayerShape:
    """One MoE layer as one sample meets it.

    Attributes:
        name: the layer's name (``MoEMLP.layer_name``: "vision.1", "text.3", "shared.1" (LIMoE),
            "decoder.0", "decoder_cross.1").
        hidden: D.
        config: its tower's MoEConfig.
        parts: (kind, tokens) per sequence one sample sends through it: ("image", patches + 1), ("text",
            context_length), ("decoder", context_length - 1); LIMoE's shared layers get both of its
            sequences, stacked in one call padded to the longer.
    """

    name: str
    hidden: int
    config: MoEConfig
    parts: Tuple[Tuple[str, int], ...]

    @property
    def tokens_per_sample(self) -> int:
        """Real tokens one sample routes (an upper bound for text: padding after EOS is not routed)."""
        return sum(n for _, n in self.parts)

    @property
    def length(self) -> int:
        """Tokens per sequence of a call, padding included."""
        return max(n for _, n in self.parts)

    def call_tokens(self, micro_batch: int) -> int:
        """T of one call: micro_batch x sequences per sample x length (padding included)."""
        return micro_batch * len(self.parts) * self.length

    def rows(self, micro_batch: int, ep_size: int = 1) -> int:
        """Rows one rank's experts compute per call (``cost.expert_rows``)."""
        return cost.expert_rows(self.config, self.call_tokens(micro_batch), micro_batch * len(self.parts), ep_size,
                                routed=micro_batch * self.tokens_per_sample)

    def buffer_rows(self, micro_batch: int, ep_size: int = 1) -> int:
        """Rows one rank's expert tensors hold per call (``cost.buffer_rows``: activation memory)."""
        return cost.buffer_rows(self.config, self.call_tokens(micro_batch), micro_batch * len(self.parts), ep_size,
                                routed=micro_batch * self.tokens_per_sample)

    def flops(self, micro_batch: int) -> Dict[str, int]:
        """Forward FLOPs of one call of ``micro_batch`` samples, per kind (``cost.call_flops``)."""
        return cost.call_flops(self.config, {kind: (micro_batch, n) for kind, n in self.parts}, self.length)


def image_tokens(cfg: ModelConfig) -> int:
    return (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1


def moe_layers(cfg: ModelConfig) -> Tuple[MoELayerShape, ...]:
    """Every MoE layer of the model, in the order the towers run, each with its tower's MoEConfig."""
    v, t = cfg.vision, cfg.text
    image, text = ("image", image_tokens(cfg)), ("text", t.context_length)
    towers = cfg.tower_moe()
    if cfg.kind == "limoe":  # every MoE layer routes both modalities in one call
        return tuple(MoELayerShape(f"shared.{i}", v.width, towers["vision"], (image, text))
                     for i in cfg.vision_moe_blocks())
    out = [MoELayerShape(f"vision.{i}", v.width, towers["vision"], (image,)) for i in cfg.vision_moe_blocks()]
    out += [MoELayerShape(f"text.{i}", t.width, towers["text"], (text,)) for i in cfg.text_moe_blocks()]
    if cfg.kind == "coca":
        for tower, blocks in cfg.decoder_moe_blocks().items():
            out += [MoELayerShape(f"{tower}.{i}", cfg.decoder_width, towers[tower],
                                  (("decoder", t.context_length - 1),))
                    for i in blocks]
    return tuple(out)


def _active_length(shape: MoELayerShape, kind: str) -> int:
    """L of ``active_experts``: the modality's own sequence, else the call's padded length."""
    return dict(shape.parts).get(kind, shape.length)


def count_params(model: nn.Module, cfg: ModelConfig) -> Dict[str, int]:
    """total, expert, active and active/<modality> parameter counts (of an ep_size=1 model)."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    expert = sum(p.numel() for p in named.values() if getattr(p, "allreduce", True) is False)
    shapes = {s.name: s for s in moe_layers(cfg)}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}

    def unselected(mlp: MoEMLP, kind: str) -> float:
        layer, shape = mlp.moe, shapes[mlp.layer_name]
        per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_local_experts
        return (layer.num_experts - cost.active_experts(layer.config, _active_length(shape, kind))) * per_expert

    counts = {"total": total, "expert": expert,
              "active": round(total - sum(unselected(m, "") for m in layers.values()))}
    for modality, other in (("image", "text"), ("text", "image")):
        foreign = EXCLUSIVE[cfg.kind][other]
        own = sum(p.numel() for n, p in named.items() if not n.startswith(foreign))
        counts[f"active/{modality}"] = round(own - sum(unselected(m, modality) for n, m in layers.items()
                                                       if not n.startswith(foreign)))
    return counts


def _block(tokens: int, width: int) -> int:
    """One transformer block's attention part for a sequence of ``tokens``: projections + attention."""
    return 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width


def _mlp(tokens: int, width: int, hidden: int) -> int:
    return 2 * 2 * tokens * width * hidden


def forward_flops(cfg: ModelConfig, micro_batch: int = 1) -> Dict[str, int]:
    """Forward FLOPs of ``micro_batch`` samples: {"image", "text"} (and "decoder" for CoCa)."""
    B, v, t, d = micro_batch, cfg.vision, cfg.text, cfg.decoder
    Li, Lt, P = image_tokens(cfg), t.context_length, image_tokens(cfg) - 1
    out = {"image": B * (2 * P * 3 * v.patch_size ** 2 * v.width + 2 * v.width * cfg.embed_dim),
           "text": B * 2 * t.width * cfg.embed_dim}
    moe = {s.name for s in moe_layers(cfg)}
    if cfg.kind == "limoe":
        towers = [("image", Li, v.width, v.layers, v.mlp_ratio, "shared"),
                  ("text", Lt, v.width, v.layers, v.mlp_ratio, "shared")]
    else:
        towers = [("image", Li, v.width, v.layers, v.mlp_ratio, "vision"),
                  ("text", Lt, t.width, t.layers, t.mlp_ratio, "text")]
    for kind, L, D, layers, ratio, prefix in towers:
        for i in range(layers):
            out[kind] += B * _block(L, D) + (0 if f"{prefix}.{i}" in moe else B * _mlp(L, D, int(D * ratio)))
    if cfg.kind == "coca":
        Ld, D = Lt - 1, cfg.decoder_width
        H = int(D * d.mlp_ratio)
        if d.image_tokens == "pooler":  # Q queries over the P patches, k and v from the vision width
            M = d.pooler_queries
            memory = 2 * 2 * M * D * D + 2 * 2 * P * v.width * D + 2 * 2 * M * P * D
        else:
            M, memory = P, 2 * P * v.width * D
        text_map = 2 * Ld * t.width * D if D != t.width else 0
        out["decoder"] = B * (memory + text_map + 2 * Ld * D * t.vocab_size)
        for i in range(d.layers):
            cross = 2 * 2 * Ld * D * D + 2 * 2 * M * D * D + 2 * 2 * Ld * M * D
            out["decoder"] += B * (_block(Ld, D) + cross)
            out["decoder"] += sum(0 if f"{name}.{i}" in moe else B * _mlp(Ld, D, H)
                                  for name in ("decoder", "decoder_cross"))
    for shape in moe_layers(cfg):
        for kind, flops in shape.flops(B).items():
            out[kind] += flops
    return out


def count_flops(cfg: ModelConfig) -> Dict[str, int]:
    """Forward FLOPs of one sample: image, text (decoder for CoCa) and per_sample, their sum."""
    out = forward_flops(cfg, 1)
    return {**out, "per_sample": sum(out.values())}


def params_report(name_or_path: str, overrides=None) -> Dict[str, object]:
    import torch

    cfg = load_model_config(name_or_path, overrides)
    with torch.device("meta"):  # shapes only: an L/14 MoE would need 18 GB otherwise
        model = build_model(cfg)
    return {"model": cfg.name, "kind": cfg.kind, "params": count_params(model, cfg), "flops": count_flops(cfg)}
