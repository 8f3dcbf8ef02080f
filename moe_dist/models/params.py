"""Parameter and FLOP accounting (what ``moe-dist params`` prints).

Active parameters are what one token touches: every MoE layer counts its router, shared expert and
k (top_k, or max_k for threshold/top-p routing) of its E experts. Per modality, the parameters that
only the other modality uses (its tower, stem or head) are left out as well.
FLOPs are forward multiply-adds x 2 for one image and one caption (training is about 3x that).
"""

from __future__ import annotations

from typing import Dict, List

from torch import nn

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


def _unselected_expert_params(mlp: MoEMLP) -> int:
    layer = mlp.moe
    per_expert = sum(p.numel() for p in layer.experts.parameters()) // layer.num_local_experts
    return (layer.num_experts - layer.config.experts_per_token) * per_expert


def count_params(model: nn.Module, cfg: ModelConfig) -> Dict[str, int]:
    """total, expert, active and active/<modality> parameter counts (of an ep_size=1 model)."""
    named = dict(model.named_parameters())
    total = sum(p.numel() for p in named.values())
    expert = sum(p.numel() for p in named.values() if getattr(p, "allreduce", True) is False)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}
    counts = {"total": total, "expert": expert,
              "active": total - sum(_unselected_expert_params(m) for m in layers.values())}
    for modality, other in (("image", "text"), ("text", "image")):
        foreign = EXCLUSIVE[cfg.kind][other]
        own = sum(p.numel() for n, p in named.items() if not n.startswith(foreign))
        unselected = sum(_unselected_expert_params(m) for n, m in layers.items() if not n.startswith(foreign))
        counts[f"active/{modality}"] = own - unselected
    return counts


def _tower_flops(tokens: int, width: int, layers: int, mlp_ratio: float, moe_blocks: List[int], k: int,
                 num_experts: int) -> int:
    hidden = int(width * mlp_ratio)
    flops = 0
    for i in range(layers):
        flops += 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width  # projections + attention
        if i in moe_blocks:
            flops += 2 * 2 * tokens * width * hidden * k + 2 * tokens * width * num_experts
        else:
            flops += 2 * 2 * tokens * width * hidden
    return flops


def count_flops(cfg: ModelConfig) -> Dict[str, int]:
    v, t = cfg.vision, cfg.text
    moe = cfg.moe_config(v.width, v.mlp_ratio)
    patches = (v.image_size // v.patch_size) ** 2
    stem = 2 * patches * 3 * v.patch_size ** 2 * v.width
    text_blocks = cfg.vision_moe_blocks() if cfg.kind == "limoe" else cfg.text_moe_blocks()
    text_layers = v.layers if cfg.kind == "limoe" else t.layers
    image = stem + _tower_flops(patches + 1, v.width, v.layers, v.mlp_ratio, cfg.vision_moe_blocks(),
                                moe.experts_per_token, moe.num_experts) + 2 * v.width * cfg.embed_dim
    text = _tower_flops(t.context_length, t.width, text_layers, t.mlp_ratio, text_blocks, moe.experts_per_token,
                        moe.num_experts) + 2 * t.width * cfg.embed_dim
    return {"image": image, "text": text, "per_sample": image + text}


def params_report(name_or_path: str, overrides=None) -> Dict[str, object]:
    import torch

    cfg = load_model_config(name_or_path, overrides)
    with torch.device("meta"):  # shapes only: an L/14 MoE would need 18 GB otherwise
        model = build_model(cfg)
    return {"model": cfg.name, "kind": cfg.kind, "params": count_params(model, cfg), "flops": count_flops(cfg)}
