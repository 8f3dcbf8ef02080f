"""What a checkpoint directory is, for code that reads one without the training engine.

A run's checkpoint root holds ``step########/`` directories; one is a checkpoint once its ``COMPLETE``
marker exists (``moe_dist.engine.checkpoint`` writes the marker last and renames the directory into
place). Inside, DeepSpeed's model files are:

    mp_rank_00_model_states.pt                        "module": the non-expert state dict (+ bookkeeping)
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt   one per MoE layer L and *global* expert E, keyed
                                                      ``...deepspeed_experts.<E>.w1`` etc.

so the model weights do not depend on the world size or ep_size that wrote them. ZeRO optimizer shards
(``*optim_states.pt``) and ``client_rank<r>.pt`` are partitioned by rank and are not model files.

Every file is read with ``torch.load(weights_only=True)`` and the allow-list below: nothing outside it
is unpickled. This module sits below ``engine`` and ``models`` so that both can use it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from typing import Any, Dict, List

import torch

from .files import atomic_write, fsync_dir, remove_stale_temporaries

MARKER = "COMPLETE"
LATEST = "latest"
STAGING = ".saving"  # step########.saving: a save in progress (or committed but not yet renamed)
REPLACED = ".replaced"  # step########.replaced.<pid>: a step saved twice, its older copy moved aside
TAG_RE = re.compile(r"^step(\d{8})$")
MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_STATES_RE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")
# the model files (non-expert and per-expert, any model-parallel rank): independent of the layout that wrote them
MODEL_FILE_RE = re.compile(r"^(layer_\d+_expert_\d+_)?mp_rank_\d+_model_states\.pt$")


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, MARKER))


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if TAG_RE.match(t) and is_complete(os.path.join(root, t))]
    return sorted(tags, key=lambda t: int(TAG_RE.match(t).group(1)))


def read_marker(tag_dir: str) -> Dict[str, Any]:
    """The COMPLETE marker's contents ({} when it is missing or unreadable)."""
    try:
        with open(os.path.join(tag_dir, MARKER)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def commit(root: str, tag: str, marker: Dict[str, Any]) -> str:
    """Make ``root/<tag>.saving`` (fully written and flushed) the checkpoint ``root/<tag>``; returns its path.

    Outline: 1. COMPLETE goes into the staging directory (durably); 2. an existing ``<tag>`` (a step saved
    twice) is moved aside to ``<tag>.replaced.<pid>``; 3. one rename publishes the staging directory; 4.
    the root is flushed, ``latest`` points at the tag, the moved-aside copy is deleted. A crash between 2
    and 3 leaves two complete copies under other names: ``recover`` puts one back.
    """
    tag_dir, staging = os.path.join(root, tag), os.path.join(root, tag + STAGING)
    atomic_write(os.path.join(staging, MARKER), json.dumps(marker))
    replaced = None
    if os.path.exists(tag_dir):
        replaced = f"{tag_dir}{REPLACED}.{os.getpid()}"
        os.replace(tag_dir, replaced)
    os.replace(staging, tag_dir)
    fsync_dir(root)
    atomic_write(os.path.join(root, LATEST), tag)
    if replaced:
        shutil.rmtree(replaced, ignore_errors=True)
    return tag_dir


def recover(root: str) -> List[str]:
    """Clean up after interrupted saves under ``root``; returns the tags it put back.

    A tag whose directory is missing gets back its committed staging directory (it has COMPLETE), else
    its complete moved-aside copy; every other staging or moved-aside directory and every temporary
    file is deleted."""
    if not os.path.isdir(root):
        return []
    restored = []
    leftovers = sorted(n for n in os.listdir(root) if n.endswith(STAGING) or REPLACED in n)
    for name in sorted(leftovers, key=lambda n: not n.endswith(STAGING)):  # a newer committed save first
        tag = name.split(".")[0]
        path = os.path.join(root, name)
        if TAG_RE.match(tag) and not os.path.exists(os.path.join(root, tag)) and is_complete(path):
            os.replace(path, os.path.join(root, tag))
            restored.append(tag)
        else:
            shutil.rmtree(path, ignore_errors=True)
    remove_stale_temporaries(root)
    if restored:
        fsync_dir(root)
    return restored


def find_checkpoint(path: str) -> str:
    """The complete checkpoint ``path`` names: a step directory itself, or the newest complete one in a
    run's checkpoint root. Raises ValueError for anything else, saying what was found."""
    path = os.path.abspath(path.rstrip("/") or "/")
    if not os.path.isdir(path):
        raise ValueError(f"{path} does not exist or is not a directory; pass a run's checkpoint root, one of its "
                         "step######## directories, or an exported .safetensors file")
    if TAG_RE.match(os.path.basename(path)) and is_complete(path):
        return path
    if TAG_RE.match(os.path.basename(path).split(".")[0]):
        raise ValueError(f"checkpoint {path} is incomplete (no {MARKER} marker: the save was interrupted); pick a "
                         "complete one, or pass the checkpoint root for the newest complete one")
    tags = complete_tags(path)
    if not tags:
        hint = " (a run keeps them in <output_dir>/checkpoints)" if os.path.isdir(os.path.join(path, "checkpoints")) \
            else ""
        raise ValueError(f"{path} holds no complete checkpoint (expected step########/{MARKER}){hint}")
    return os.path.join(path, tags[-1])


def allowed_globals() -> List[Any]:
    """Types DeepSpeed's checkpoint files contain besides tensors and containers."""
    import argparse
    import collections

    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [collections.OrderedDict, argparse.Namespace, LossScaler, fragment_address]
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed.append(ZeroStageEnum)
    except ImportError:
        pass
    return allowed


def load_weights_only(path: str, mmap: bool = True) -> Any:
    """``torch.load`` of one checkpoint file on the CPU, refusing pickled objects outside the allow-list.

    Raises:
        ValueError: the file holds other objects, or is truncated or corrupt (one line, naming the file).
    """
    with torch.serialization.safe_globals(allowed_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            raise ValueError(f"refusing to load {path}: it holds objects outside the weights-only allow-list "
                             f"({str(err).splitlines()[0][:200]})") from None
        except Exception as err:
            raise ValueError(f"cannot read {path}: the file is truncated or corrupt "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
