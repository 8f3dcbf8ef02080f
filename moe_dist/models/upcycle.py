"""Sparse upcycling: start an MoE model (MoE-CLIP or LIMoE) from a dense model of the same architecture.

Every expert of an MoE block starts as a copy of that block's dense MLP (``c_fc``, ``c_proj``), plus
optional Gaussian noise; everything else loads as is; routers keep their fresh init. With k=1,
renormalised gates and no dropped tokens the upcycled model computes exactly the dense model's function
(the one selected gate weight is p / p = 1).

Dense sources (``read_dense``; the run-config option ``model.init: PATH`` takes the same):
    open_clip   a CLIP state dict file (torch ``.pt``/``.bin``, or a ``.safetensors`` without our metadata):
                its top-level text tower is renamed into our ``text.`` layout; always kind "clip";
    published   ``open_clip:ARCH/TAG`` (or ``open_clip:ARCH/PATH``): the model ``open_clip.create_model``
                builds from that tag's weights in open_clip's cache (openclip_arch.py); its architecture
                must be the run model's;
    ours        a ``moe-dist export`` .safetensors file or a checkpoint directory (``load_pretrained``'s
                forms) of a dense model: ``clip-tiny-dense``, or for LIMoE a LIMoE config with no MoE blocks.
A source of another kind than the model, or one that has MoE layers itself, is refused in one line.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch
from torch import nn

from .build import build_model
from .config import ModelConfig
from .moe_blocks import MoEMLP
from .openclip_arch import check_same_arch, is_openclip, load_openclip, parse_init
from .pretrained import EXPORT_FORMAT, consolidated_state_dict

KIND_NAMES = {"clip": "a two-tower CLIP", "limoe": "a one-tower LIMoE"}

# open_clip's CLIP keeps the text tower at the top level; our layout (CustomTextCLIP) nests it in "text."
_CLIP_TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                   "attn_mask")


def _to_custom_text_layout(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """open_clip CLIP keys -> ours; a state already in our layout (MoE-CLIP's ``text.``, or LIMoE's top-level
    ``token_embedding`` beside ``patchify``, no ``visual.``) is returned as is."""
    if "token_embedding.weight" not in state or not any(k.startswith("visual.") for k in state):
        return state
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
    """Copy dense weights into ``model`` (MoE-CLIP or LIMoE); returns which keys filled which experts.

    Args:
        source: a dense state dict, module, or open_clip checkpoint file (``load_dense_state``); for our
            own exports and checkpoint directories use ``init_from_dense``.

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


# ---------------------------------------------------------------------------------------------- model.init
@dataclass
class DenseSource:
    """A dense model read for upcycling.

    Attributes:
        kind: "clip" or "limoe".
        state: name -> tensor in our module layout.
        what: how messages name it ("an open_clip CLIP checkpoint", "model 'clip-tiny-dense'").
        moe_layers: how many MoE layers it has itself (a dense source has none).
        config: its ModelConfig when it carries one (our exports and checkpoints), else None.
    """

    kind: str
    state: Dict[str, torch.Tensor]
    what: str
    moe_layers: int = 0
    config: Optional[ModelConfig] = None


def _is_our_export(path: str) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"model.init: {path} is not a readable safetensors file ({type(err).__name__})") from None


def _torch_load(path: str):
    """Weights only; memory-mapped where the file format allows it (the zip format of torch >= 1.6)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def read_dense(path: str) -> DenseSource:
    """The dense model at ``path`` (forms in the module docstring).

    Raises:
        ValueError (one line): the path does not exist or holds no model.
    """
    if is_openclip(path):
        init = parse_init(path)
        return DenseSource("clip", load_dense_state(load_openclip(init)), f"open_clip's {init.arch}")
    if not os.path.exists(path):
        raise ValueError(f"model.init: {path} does not exist; give a dense open_clip checkpoint file, a moe-dist "
                         "export (.safetensors), a checkpoint directory of a dense model, or open_clip:ARCH/TAG")
    if os.path.isdir(path) or (path.endswith(".safetensors") and _is_our_export(path)):
        try:
            pretrained = consolidated_state_dict(path)
        except ValueError as err:
            raise ValueError(f"model.init: {err}") from None
        cfg = pretrained.config
        layers = len(cfg.vision_moe_blocks()) + (len(cfg.text_moe_blocks()) if cfg.kind == "clip" else 0)
        return DenseSource(cfg.kind, pretrained.state_dict, f"model {cfg.name!r}", layers, cfg)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = _torch_load(path)
    except Exception as err:  # noqa: BLE001 - torch and safetensors raise many types for a bad file
        raise ValueError(f"model.init: {path} is not a state dict file torch or safetensors can read "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    keys = [str(k)[len("module."):] if str(k).startswith("module.") else str(k) for k in state] \
        if isinstance(state, dict) else []
    if not any(k.startswith("visual.") for k in keys):
        raise ValueError(f"model.init: {path} is not an open_clip CLIP state dict (no visual.* weights); give an "
                         "open_clip checkpoint, a moe-dist export or a checkpoint directory")
    experts = {k.split(".experts.")[0] for k in state if ".experts." in k or "deepspeed_experts" in k}
    return DenseSource("clip", load_dense_state(state), "an open_clip CLIP checkpoint", len(experts))


def check_source(source: DenseSource, cfg: ModelConfig, path: str) -> None:
    """Refuse (one line) a source of another kind than ``cfg``, or one with MoE layers of its own."""
    if source.kind != cfg.kind:
        raise ValueError(f"model.init: {path} holds {source.what}, {KIND_NAMES[source.kind]} model, but the run's "
                         f"model {cfg.name!r} is {KIND_NAMES[cfg.kind]}; upcycle from a dense model of the same kind "
                         "(for LIMoE: a LIMoE config with no MoE blocks)")
    if source.moe_layers:
        raise ValueError(f"model.init: {path} holds {source.what} with {source.moe_layers} MoE layers; sparse "
                         "upcycling starts from a dense model (e.g. clip-tiny-dense); to continue an MoE run, "
                         "resume it (--resume PATH, --weights-only for another layout)")
    if source.config is not None:  # what the tensors cannot show: the function computed with them
        theirs = source.config
        for key, mine, its in (("model.quick_gelu", cfg.quick_gelu, theirs.quick_gelu),
                               ("model.text.pool_type", cfg.text.pool_type, theirs.text.pool_type),
                               ("model.text.eos_id", cfg.text.eos_id, theirs.text.eos_id)):
            if mine != its:
                raise ValueError(f"model.init: {path} holds {source.what}, trained with {key}={_yaml(its)}, but the "
                                 f"run's model has {key}={_yaml(mine)}, so the upcycled model would compute another "
                                 f"function; set {key}={_yaml(its)}")


def _yaml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def init_from_dense(model: nn.Module, path: str, noise_std: float = 0.0,
                    generator: torch.Generator = None) -> Dict[str, list]:
    """``model.init``: check the dense model at ``path`` against ``model.cfg``, then ``upcycle`` from it.

    Returns:
        upcycle's report. Raises ValueError (one line, starting "model.init:") for a source that does
        not fit: another kind, MoE layers of its own, missing or differently shaped tensors.
    """
    if is_openclip(path):  # kind and architecture first: a mismatch costs no download
        init = parse_init(path)
        check_source(DenseSource("clip", {}, f"open_clip's {init.arch}"), model.cfg, path)
        check_same_arch(init, dataclasses.asdict(model.cfg), model.cfg.name)
    _check_expert_activation(model, path)
    source = read_dense(path)
    check_source(source, model.cfg, path)
    try:
        return upcycle(model, source.state, noise_std, generator)
    except ValueError as err:
        raise ValueError(f"model.init: {path} does not fit model {model.cfg.name!r}: {err}") from None


def _check_expert_activation(model: nn.Module, path: str) -> None:
    """Experts start as copies of the dense MLPs: refuse an expert activation other than theirs."""
    dense = "quick_gelu" if model.cfg.quick_gelu else "gelu"
    for name, mlp in model.named_modules():
        if isinstance(mlp, MoEMLP) and mlp.moe.config.activation != dense:
            tower = mlp.layer_name.rsplit(".", 1)[0].replace("shared", "vision")  # place_moe's "<tower>.<block>"
            key = model.cfg.moe_key(tower, "activation")
            raise ValueError(f"model.init: {path}: the dense MLPs compute {dense} (model.quick_gelu="
                             f"{str(model.cfg.quick_gelu).lower()}) but {name} experts compute "
                             f"{mlp.moe.config.activation}, so the upcycled copies would not compute the dense MLP; "
                             f"set {key}={dense}")


def check_init(path: str, cfg: ModelConfig) -> None:
    """Everything ``init_from_dense`` would refuse, found before a process group starts: the source is
    read and upcycled into a model on the meta device (no memory for the model itself)."""
    with torch.device("meta"):
        model = build_model(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying from a non-meta parameter ... is a no-op": intended here
        init_from_dense(model, path)
