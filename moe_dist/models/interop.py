"""Our models in other tools' formats: an open_clip folder, and a torch.distributed.checkpoint (DCP) directory.

open_clip (``moe-dist export --format open_clip --out DIR``), what ``open_clip.create_model_and_transforms(
"local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")`` read:
    open_clip_config.json        ``model_cfg`` (open_clip's CustomTextCLIP: our two towers are its
                                 VisionTransformer and TextTransformer, with the same module names) and
                                 ``preprocess_cfg`` (our eval transform: resize the shortest side with bicubic
                                 interpolation, centre crop to the image size, CLIP mean/std)
    open_clip_model.safetensors  the state dict in open_clip's layout: ours, with a scalar ``logit_scale``
                                 (and ``logit_bias``) as open_clip's published checkpoints hold them
Only a dense two-tower CLIP (kind "clip") with open_clip's CLIP BPE tokenizer ("openclip-bpe") is written:
open_clip's folders load its BPE (no ``hf_tokenizer_name``) or a Hugging Face tokenizer (through transformers),
never a sentencepiece model, so a sentencepiece model is refused with the reason. An MoE model is written
only through an explicit ``--collapse`` rule (``collapse.py``), which changes its function. Before writing,
open_clip's model is built from the config on the meta device and its tensor names and shapes are checked
against ours.

DCP (``--format torch_dcp --out DIR``): ``torch.distributed.checkpoint.save`` of the ep_size=1 state dict
(the names ``model.state_dict()`` gives; experts under DeepSpeed's per-expert keys with global ids), flat at
the top level as torchtitan's model-only checkpoints are, plus ``model_config.json`` and ``tokenizer.model``
(sentencepiece) as in a checkpoint directory. It is written by one process without a process group; any
number of ranks can then ``dcp.load`` all of it or a subset (each rank its own experts) and reshard.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Dict

import torch

from ..files import atomic_dir, atomic_json, atomic_write
from .pretrained import OPENCLIP_BPE, PretrainedState, experts_per_layer, file_tensors, model_files

OPEN_CLIP_CONFIG_FILE = "open_clip_config.json"
OPEN_CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
_SCALARS = ("logit_scale", "logit_bias")  # [1] in our models (DeepSpeed's broadcast), [] in open_clip's files


def check_open_clip_kind(state: PretrainedState) -> None:
    """Refuse (one line, with the reason) a model open_clip cannot load even when made dense: another kind
    than "clip", or a tokenizer other than openclip-bpe. ``moe-dist export`` calls it before collapsing."""
    cfg = state.config
    if cfg.kind != "clip":
        what = {"limoe": "LIMoE shares one transformer between images and text, and open_clip has no such model",
                "coca": "a CoCa model is not written in open_clip's format yet"}.get(cfg.kind, f"kind {cfg.kind!r}")
        raise ValueError(f"{state.source}: {what}; export it with --format hub (or safetensors), which "
                         "load_pretrained reads")
    if state.tokenizer != OPENCLIP_BPE:
        raise ValueError(f"{state.source}: model {cfg.name!r} uses a sentencepiece tokenizer, which open_clip cannot "
                         "load (a local-dir: folder gives its CLIP BPE, or a Hugging Face tokenizer through "
                         "transformers); export it with --format hub, which carries the tokenizer, or train with "
                         "data.tokenizer=openclip-bpe")


def open_clip_config(state: PretrainedState) -> dict:
    """The ``open_clip_config.json`` of a dense CLIP: {"model_cfg", "preprocess_cfg"} (module docstring).
    Raises ValueError (one line, with the reason) for a model open_clip cannot load."""
    from open_clip.transform import PreprocessCfg

    check_open_clip_kind(state)
    cfg = state.config
    if experts_per_layer(state.state_dict):
        raise ValueError(f"{state.source}: model {cfg.name!r} has MoE layers and open_clip's CLIP is dense; choose "
                         "how to make it dense with --collapse expert:I or --collapse mean (see docs/interop.md: "
                         "it changes the model), or export every expert with --format hub")
    v, t = cfg.vision, cfg.text
    model_cfg = {
        "embed_dim": cfg.embed_dim, "custom_text": True, "quick_gelu": cfg.quick_gelu,
        "init_logit_scale": cfg.init_logit_scale,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                       "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                     "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio, "pad_id": t.pad_id,
                     "eos_id": t.eos_id, "pool_type": t.pool_type},
    }
    if cfg.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = cfg.init_logit_bias
    preprocess = dataclasses.asdict(PreprocessCfg(size=v.image_size))
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def open_clip_tensors(state: PretrainedState, config: dict, dtype: str) -> Dict[str, torch.Tensor]:
    """Our tensors in open_clip's layout, checked against the model open_clip builds from ``config``."""
    from open_clip.model import CustomTextCLIP

    tensors = file_tensors(state.state_dict, dtype)
    for name in _SCALARS:
        if name in tensors:
            tensors[name] = tensors[name].reshape(())
    model_cfg = {k: v for k, v in config["model_cfg"].items() if k != "custom_text"}
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in CustomTextCLIP(**model_cfg).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
    if missing or extra or wrong:
        first = (f"{missing[0]} missing" if missing else f"{extra[0]} unexpected" if extra else
                 f"{wrong[0]} has shape {list(tensors[wrong[0]].shape)}, open_clip's {list(expected[wrong[0]])}")
        raise ValueError(f"{state.source}: open_clip's CLIP built from the exported config does not match model "
                         f"{state.config.name!r} ({first}; {len(missing)} missing, {len(extra)} unexpected, "
                         f"{len(wrong)} of another shape); export it with --format hub instead")
    return tensors


def write_open_clip(state: PretrainedState, out_dir: str, dtype: str = "fp32") -> None:
    """An open_clip folder (module docstring) at ``out_dir`` (a new or empty directory), written atomically.
    ``state`` must be dense (``collapse.collapse`` an MoE one first)."""
    from safetensors.torch import save_file

    config = open_clip_config(state)
    tensors = open_clip_tensors(state, config, dtype)
    with atomic_dir(out_dir) as tmp:
        atomic_json(os.path.join(tmp, OPEN_CLIP_CONFIG_FILE), config, durable=False)
        save_file(tensors, os.path.join(tmp, OPEN_CLIP_WEIGHTS_FILE), metadata={"format": "pt"})


def write_dcp(state: PretrainedState, out_dir: str, dtype: str = "fp32") -> None:
    """A torch.distributed.checkpoint directory of ``state`` (module docstring) at ``out_dir``, written by
    this process alone (no process group is used, even when one exists)."""
    import torch.distributed.checkpoint as dcp

    tensors = file_tensors(state.state_dict, dtype)
    with atomic_dir(out_dir) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save(tensors, checkpoint_id=tmp, no_dist=True)
        for name, data in model_files(state.config, state.tokenizer).items():
            atomic_write(os.path.join(tmp, name), data, durable=False)
