"""Building models and their losses: the model-kind registry (``MODEL_KINDS``), ``build_model``,
``build_loss``, ``create_model`` and ``expert_parallel_share``.

Above every model module (clip.py, limoe.py, coca.py) and below the ones that build a model from a
config (pretrained.py, upcycle.py, params.py), which import this file rather than the package.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from .clip import MoECLIP
from .coca import CoCa, CocaLoss
from .config import ModelConfig, load_model_config
from .limoe import LIMoE
from .loss import ContrastiveLoss

MODEL_KINDS = {"clip": MoECLIP, "limoe": LIMoE, "coca": CoCa}


def build_model(cfg: ModelConfig, ep_size: int = 1):
    return MODEL_KINDS[cfg.kind](cfg, ep_size=ep_size)


def expert_parallel_share(model, ep_size: int, ep_rank: int) -> Dict[str, Any]:
    """The tensors rank ``ep_rank`` of an ``ep_size`` expert-parallel group holds of ``model`` (built at
    ep_size 1), by parameter name: every non-expert tensor, and experts [r L, (r + 1) L) of each stacked
    [E, ...] expert tensor (L = E / ep_size; the layer's placement). Copies, detached: load them into a
    model built at ``ep_size`` to start it from the same weights as the one-process model."""
    share = {}
    for name, p in model.named_parameters():
        if getattr(p, "allreduce", True) is False:  # experts.py tags expert tensors
            local = p.shape[0] // ep_size
            share[name] = p.detach()[ep_rank * local:(ep_rank + 1) * local].clone()
        else:
            share[name] = p.detach().clone()
    return share


def build_loss(cfg: ModelConfig, rank: int = 0, world_size: int = 1, tokenizer=None):
    """The training loss of ``cfg.kind``: contrastive (+ captioning for coca) + MoE aux losses. A coca
    model with ``decoder.loss_after`` needs the ``tokenizer`` that encodes its text."""
    if cfg.kind == "coca":
        return CocaLoss(cfg, rank, world_size, tokenizer)
    return ContrastiveLoss(cfg.loss, rank, world_size)


def create_model(name_or_path: str, ep_size: int = 1, overrides: Optional[Dict[str, Any]] = None, **kwargs):
    """Build a model by registry name or JSON path.

    Args:
        name_or_path: a name from ``list_models()`` or a path to a model JSON.
        ep_size: expert-parallel size for every MoE layer.
        overrides: nested dict merged into the JSON, e.g. ``{"moe": {"top_k": 2}}``.
        **kwargs: top-level shortcuts merged the same way (``embed_dim=256``, ``moe={...}``).
    """
    merged = dict(overrides or {})
    merged.update(kwargs)
    return build_model(load_model_config(name_or_path, merged), ep_size=ep_size)
