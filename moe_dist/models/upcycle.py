"""Sparse upcycling: start an MoE model from a dense open_clip checkpoint.

Every expert of an MoE block starts as a copy of that block's dense MLP (``c_fc``, ``c_proj``), plus
optional Gaussian noise; everything else loads as is; routers keep their fresh init. With k=1 and
renormalised gates the upcycled model computes exactly the dense model's function.
"""

from __future__ import annotations

from typing import Dict, Union

import torch
from torch import nn

from .moe_blocks import MoEMLP

# open_clip's CLIP keeps the text tower at the top level; our layout (CustomTextCLIP) nests it in "text."
_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                   "attn_mask")


def _to_custom_text_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        out[f"text.{key}" if key.startswith(_CLIP_TEXT_KEYS) else key] = value
    return out


def load_dense_state(source: Union[str, nn.Module, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A dense state dict from a file path (loaded with weights_only=True), a module, or a dict."""
    if isinstance(source, nn.Module):
        state = source.state_dict()
    elif isinstance(source, dict):
        state = source
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return _to_custom_text_layout(state)


@torch.no_grad()
def upcycle(model: nn.Module, source, noise_std: float = 0.0, generator: torch.Generator = None) -> Dict[str, list]:
    """Copy dense weights into ``model`` (MoECLIP layout); returns which keys filled which experts.

    Raises:
        ValueError: a dense tensor is missing or has the wrong shape for the MoE model.
    """
    dense = load_dense_state(source)
    moe_paths = {name: m for name, m in model.named_modules() if isinstance(m, MoEMLP)}
    used, report = set(), {"experts": [], "loaded": []}
    for path, mlp in moe_paths.items():
        experts = mlp.moe.experts
        pairs = {"w1": (f"{path}.c_fc.weight", True), "b1": (f"{path}.c_fc.bias", False),
                 "w2": (f"{path}.c_proj.weight", True), "b2": (f"{path}.c_proj.bias", False)}
        for name, (key, transpose) in pairs.items():
            target = getattr(experts, name)
            if target is None:
                continue
            if key not in dense:
                raise ValueError(f"dense checkpoint has no {key!r} to upcycle {path}; is it the same architecture?")
            value = dense[key].t() if transpose else dense[key]
            if tuple(value.shape) != tuple(target.shape[1:]):
                raise ValueError(f"dense {key} has shape {tuple(dense[key].shape)}, but {path} experts need "
                                 f"{tuple(target.shape[1:])} per expert")
            target.copy_(value.to(target.dtype).expand_as(target))
            if noise_std > 0:
                target.add_(torch.randn(target.shape, generator=generator).to(target) * noise_std)
            used.add(key)
        report["experts"].append(path)
    own = model.state_dict()
    rest = {k: v for k, v in dense.items() if k not in used and k in own}
    skipped = sorted(k for k in dense if k not in used and k not in own and not k.endswith("attn_mask"))
    if skipped:
        raise ValueError(f"dense checkpoint has weights the MoE model lacks: {skipped[:5]}"
                         f"{' ...' if len(skipped) > 5 else ''}; is it the same architecture?")
    for key, value in rest.items():
        if own[key].shape != value.shape and own[key].numel() == value.numel() == 1:
            rest[key] = value.reshape(own[key].shape)  # open_clip's scalar logit_scale vs our [1]
        elif own[key].shape != value.shape:
            raise ValueError(f"dense {key} has shape {tuple(value.shape)}, the MoE model {tuple(own[key].shape)}")
    moe_owned = ("deepspeed_moe.", "router.", "shared_mlp.")
    missing = sorted(k for k in own if k not in rest and not any(f".{tag}" in k for tag in moe_owned))
    if missing:
        raise ValueError(f"dense checkpoint lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         "is it the same architecture?")
    model.load_state_dict(rest, strict=False)
    report["loaded"] = sorted(rest)
    return report
