"""Checkpoints that count only when complete, and resuming from the newest complete one.

Layout: CKPT/step00000100/ holds DeepSpeed's files (model states, one file per global expert, ZeRO
optimizer shards), ``client_rank<r>.pt`` per rank (step, data-loader state, RNG states), and the
``COMPLETE`` marker; CKPT/latest names the newest complete tag.

Save outline:
    1. engine.save_checkpoint (collective; DeepSpeed's own ``latest`` is not written);
    2. every rank writes its client file atomically (temp file + rename);
    3. barrier: every rank has finished writing;
    4. rank 0 writes COMPLETE atomically, then points ``latest`` at the tag atomically, then prunes
       all but the newest ``keep`` complete checkpoints (the newest complete one is never deleted);
    5. barrier.
A kill anywhere before 4 leaves a directory without COMPLETE, which resume ignores.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..files import atomic_path, atomic_write

MARKER = "COMPLETE"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def is_complete(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(tag_dir, MARKER))


def complete_tags(root: str) -> List[str]:
    """Complete checkpoint tags under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    tags = [t for t in os.listdir(root) if _TAG.match(t) and is_complete(os.path.join(root, t))]
    return sorted(tags, key=lambda t: int(_TAG.match(t).group(1)))


def rng_state() -> Dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


def save(engine, root: str, step: int, client: Dict[str, Any], keep: int, run_files: Dict[str, str],
         pause_s: float = 0.0) -> str:
    """Write a complete checkpoint of ``engine`` at ``step`` (plus ``run_files``, name -> text, from
    rank 0); returns its directory."""
    import deepspeed.comm as dist

    tag = tag_for(step)
    tag_dir = os.path.join(root, tag)
    engine.save_checkpoint(root, tag=tag, client_state={"step": step}, save_latest=False)
    os.makedirs(tag_dir, exist_ok=True)
    rank = dist.get_rank()
    client_path = os.path.join(tag_dir, f"client_rank{rank}.pt")
    with atomic_path(client_path) as tmp:
        torch.save(client, tmp)
    if rank == 0:
        for name, text in run_files.items():
            atomic_write(os.path.join(tag_dir, name), text)
    if pause_s:
        atomic_write(os.path.join(root, f"saving.rank{rank}"), tag)
        time.sleep(pause_s)
    dist.barrier()
    if rank == 0:
        info = {"step": step, "world_size": dist.get_world_size(), "time": time.time()}
        atomic_write(os.path.join(tag_dir, MARKER), json.dumps(info))
        atomic_write(os.path.join(root, LATEST), tag)
        _prune(root, keep)
    for stale in glob.glob(os.path.join(root, f"saving.rank{rank}")):
        os.remove(stale)
    dist.barrier()
    return tag_dir


def _prune(root: str, keep: int) -> None:
    tags = complete_tags(root)
    newest = int(_TAG.match(tags[-1]).group(1))
    for tag in tags[:-max(keep, 1)]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    for name in os.listdir(root):  # incomplete leftovers older than the newest complete checkpoint
        match = _TAG.match(name)
        if match and int(match.group(1)) < newest and not is_complete(os.path.join(root, name)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def find_resume(root: str, resume: str) -> Optional[Tuple[str, str]]:
    """(checkpoint root, tag) to resume from, or None for a fresh start.

    resume: "auto" (newest complete checkpoint, or fresh if none; a dangling or truncated ``latest``
    falls back to it), "latest" (exactly what ``latest`` names; must be complete), or a path to a
    checkpoint directory (must be complete) or to a checkpoint root.
    """
    if resume in ("", "none"):
        return None
    if resume == "auto":
        tags = complete_tags(root)
        return (root, tags[-1]) if tags else None
    if resume == "latest":
        try:
            tag = open(os.path.join(root, LATEST)).read().strip()
        except OSError:
            raise ValueError(f"--resume latest: {os.path.join(root, LATEST)} does not exist") from None
        if not _TAG.match(tag) or not is_complete(os.path.join(root, tag)):
            raise ValueError(f"--resume latest: {root}/latest names {tag!r}, which is not a complete checkpoint; "
                             "use --resume auto to take the newest complete one")
        return root, tag
    path = os.path.abspath(resume.rstrip("/"))
    if os.path.isdir(path) and _TAG.match(os.path.basename(path)):
        if not is_complete(path):
            raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: the save was "
                             "interrupted); pick a complete one or use --resume auto")
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if not tags:
        raise ValueError(f"--resume {resume}: no complete checkpoint there (expected step########/{MARKER})")
    return path, tags[-1]


# Types DeepSpeed's checkpoint files contain besides tensors and containers.
def _allowed_globals() -> List[Any]:
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


def verify_safe(tag_dir: str) -> None:
    """Refuse checkpoint files holding arbitrary pickled objects: each must load with
    ``weights_only=True`` and the allow-list above, before DeepSpeed loads it (unrestricted)."""
    with torch.serialization.safe_globals(_allowed_globals()):
        for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise ValueError(f"refusing to load {path}: it holds objects outside the weights-only allow-list "
                                 f"({str(err).splitlines()[0][:200]})") from None


def check_compatible(tag_dir: str, world_size: int, ep_size: int) -> None:
    """Refuse to resume ``tag_dir`` under another world size or ep_size (its run_config.json says which)."""
    saved_path = os.path.join(tag_dir, "run_config.json")
    if not os.path.isfile(saved_path):
        return
    with open(saved_path) as f:
        saved = json.load(f)
    now = {"world_size": world_size, "ep_size": ep_size}
    was = {"world_size": saved.get("_world_size"), "ep_size": saved.get("ep_size")}
    if was != now:
        raise ValueError(f"checkpoint {tag_dir} was written with {was}, this run has {now}. Resuming with a "
                         "different world size or ep_size would re-partition ZeRO optimizer state and the data "
                         "stream; resume with the same layout")


def load(engine, root: str, tag: str, rank: int) -> Dict[str, Any]:
    """Load DeepSpeed state and this rank's client state; raise if anything is missing."""
    tag_dir = os.path.join(root, tag)
    verify_safe(tag_dir)
    path, _ = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    client_path = os.path.join(tag_dir, f"client_rank{rank}.pt")
    if not os.path.isfile(client_path):
        raise ValueError(f"checkpoint {tag_dir} has no {os.path.basename(client_path)}: it was written by fewer ranks "
                         "than this run has; resume with the same world size")
    return torch.load(client_path, map_location="cpu", weights_only=True)
