"""What a checkpoint directory is, for code that reads one without the training engine.

A run's checkpoint root holds ``step########/`` directories; one is a checkpoint once its ``COMPLETE``
marker exists (``moe_dist.engine.checkpoint`` writes the marker last and renames the directory into
place). Inside, DeepSpeed's model files are:

    mp_rank_00_model_states.pt                        "module": the non-expert state dict (+ bookkeeping)
    layer_<L>_expert_<E>_mp_rank_00_model_states.pt   one per MoE layer L and *global* expert E, keyed
                                                      ``...deepspeed_experts.<E>.w1`` etc.

so the model weights do not depend on the world size or ep_size that wrote them. ZeRO optimizer shards
(``*optim_states.pt``) and ``client_rank<r>.pt`` are partitioned by rank and are not model files.

The marker lists every file of the checkpoint with its size and SHA-256 (``files``), so a reader can tell
that each file belongs to this checkpoint: a file missing, added, truncated or copied in from another run
or step is refused like a corrupt one (``verify_files``). Checkpoints written before the list load as before.

Every file is read with ``torch.load(weights_only=True)`` and the allow-list below: nothing outside it
is unpickled. This module sits below ``engine`` and ``models`` so that both can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import stat
from typing import Any, Dict, Iterable, List, Optional

import torch

from .files import TMP_MARK, atomic_write, fsync_dir, read_small

MARKER = "COMPLETE"
LATEST = "latest"
OWNER = "OWNER"  # inside a staging directory: {"run_id": ...} of the run writing it
STAGING = ".saving"  # step########.saving: a save in progress (or committed but not yet renamed)
REPLACED = ".replaced"  # step########.replaced.<pid>: a step saved twice, its older copy moved aside
TAG_RE = re.compile(r"^step(\d{8})$")
LEFTOVER_RE = re.compile(r"^(step\d{8})(\.saving|\.replaced\.\d+)$")  # what an interrupted save leaves
LATEST_TMP_RE = re.compile(r"^latest" + re.escape(TMP_MARK) + r"\d+$")
MAX_METADATA_BYTES = 16 << 20  # COMPLETE, latest, OWNER, *.json of a checkpoint: a few KB each
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


def read_json(path: str) -> Dict[str, Any]:
    """A small JSON object file of a checkpoint ({} when it is missing, not a regular file, too large or
    not a JSON object)."""
    try:
        info = json.loads(read_small(path, MAX_METADATA_BYTES))
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def read_marker(tag_dir: str) -> Dict[str, Any]:
    """The COMPLETE marker's contents ({} when it is missing or unreadable)."""
    return read_json(os.path.join(tag_dir, MARKER))


def owner(directory: str) -> Optional[str]:
    """The run id a checkpoint or an interrupted save belongs to: its marker's, else the OWNER file a save
    writes first; None when neither says (a save from before OWNER files, or not ours to judge)."""
    for name in (MARKER, OWNER):
        info = read_json(os.path.join(directory, name))
        if "run_id" in info:
            return str(info["run_id"])
    return None


# ---------------------------------------------------------------------------------------------- file lists
def file_names(tag_dir: str) -> List[str]:
    """The files of a checkpoint directory (all but its marker), sorted. ValueError for an entry that is
    not a regular file (a symlink, FIFO, device or directory): a checkpoint holds nothing else."""
    names = []
    with os.scandir(tag_dir) as entries:
        for entry in entries:
            if entry.name == MARKER:
                continue
            if not entry.is_file(follow_symlinks=False):
                raise ValueError(f"checkpoint {tag_dir}: {entry.name} is not a regular file (a symlink, FIFO, "
                                 "device or directory); a checkpoint holds only the files its save wrote")
            names.append(entry.name)
    return sorted(names)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def describe_files(tag_dir: str, names: Iterable[str]) -> Dict[str, List[Any]]:
    """name -> [size in bytes, SHA-256 hex] for the marker's file list."""
    return {name: [os.path.getsize(os.path.join(tag_dir, name)), sha256(os.path.join(tag_dir, name))]
            for name in names}


def listed_files(tag_dir: str) -> Optional[Dict[str, List[Any]]]:
    """The marker's file list (name -> [size, SHA-256]); None for a checkpoint written before the list.

    Raises:
        ValueError: a marker that is not a regular file of JSON, or a list of the wrong shape.
    """
    path = os.path.join(tag_dir, MARKER)
    try:
        info = json.loads(read_small(path, MAX_METADATA_BYTES, "marker"))
    except (OSError, ValueError) as err:
        raise ValueError(f"checkpoint {tag_dir}: its {MARKER} marker cannot be read ({str(err)[:200]})") from None
    if not isinstance(info, dict):
        raise ValueError(f"checkpoint {tag_dir}: its {MARKER} marker is not a JSON object")
    if "files" not in info:
        return None
    listed = info["files"]
    if not isinstance(listed, dict) or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and isinstance(v[1], str)
            for v in listed.values()):
        raise ValueError(f"checkpoint {tag_dir}: the file list in its {MARKER} marker is not "
                         '{"name": [size, "sha256"], ...}; the marker is damaged')
    return listed


def verify_files(tag_dir: str, names: Optional[Iterable[str]] = None, rank: int = 0, world_size: int = 1) -> None:
    """Refuse a checkpoint whose files are not the ones its save wrote: one missing, one added (a file
    copied in from another run or step), or one whose size or SHA-256 differs from the marker's list.

    Args:
        names: check only these files (a reader that opens a few); default all.
        rank, world_size: this process hashes every ``world_size``-th listed file from ``rank`` (each rank
            of a resume its share); sizes and the names are checked by every caller.
    Raises:
        ValueError: one line naming the checkpoint and the file, also for a file that cannot be read (a
            disk error, a file removed meanwhile). Checkpoints without a list pass.
    """
    listed = listed_files(tag_dir)
    if listed is None:
        return  # written before checkpoints listed their files
    try:
        present = set(file_names(tag_dir))
        extra = sorted(present - set(listed))
        if extra and names is None:
            raise ValueError(f"checkpoint {tag_dir} holds files its save did not write ({', '.join(extra[:3])}"
                             f"{', ...' if len(extra) > 3 else ''}): copied in from another run or step? Remove "
                             "them, or resume another checkpoint")
        wanted = sorted(listed) if names is None else sorted(names)
        for i, name in enumerate(wanted):
            if name not in listed:
                raise ValueError(f"checkpoint {tag_dir}: {name} is not one of the files its save wrote")
            if name not in present:
                hint = (" (optimizer state only: --weights-only resumes the weights with fresh Adam moments)"
                        if "optim_states" in name else "")
                raise ValueError(f"checkpoint {tag_dir} is missing {name}, which its save wrote; resume an earlier "
                                 f"checkpoint{hint}")
            size, digest = listed[name]
            path = os.path.join(tag_dir, name)
            if os.path.getsize(path) != size:
                raise ValueError(f"checkpoint {tag_dir}: {name} has {os.path.getsize(path)} bytes, its save wrote "
                                 f"{size}: the file is truncated or corrupt")
            if i % world_size == rank and sha256(path) != digest:
                raise ValueError(f"checkpoint {tag_dir}: {name} is not the file its save wrote (its SHA-256 "
                                 "differs): copied in from another run or step, or damaged")
    except OSError as err:
        raise ValueError(f"checkpoint {tag_dir}: cannot read its files ({type(err).__name__}: {err})") from None


def commit(root: str, tag: str, marker: Dict[str, Any]) -> str:
    """Make ``root/<tag>.saving`` (fully written and flushed) the checkpoint ``root/<tag>``; returns its path.

    Outline: 1. COMPLETE, with the list of files (``marker["files"]``, computed here when the caller has
    not), goes into the staging directory (durably); 2. an existing ``<tag>`` (a step saved twice) is
    moved aside to ``<tag>.replaced.<pid>``; 3. one rename publishes the staging directory; 4. the root is
    flushed, ``latest`` points at the tag, the moved-aside copy is deleted. A crash between 2 and 3 leaves
    two complete copies under other names: ``recover`` puts one back.
    """
    tag_dir, staging = os.path.join(root, tag), os.path.join(root, tag + STAGING)
    if "files" not in marker:
        marker = {**marker, "files": describe_files(staging, file_names(staging))}
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


def leftovers(root: str) -> Dict[str, Optional[str]]:
    """What interrupted saves left under ``root``: ``step########.saving`` and
    ``step########.replaced.<pid>`` directories (exact names, not symlinks) -> the run each belongs to."""
    if not os.path.isdir(root):
        return {}
    out = {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if LEFTOVER_RE.match(name) and stat.S_ISDIR(os.lstat(path).st_mode):
            out[name] = owner(path)
    return out


def recover(root: str, run_id: str) -> List[str]:
    """Clean up after run ``run_id``'s interrupted saves under ``root``; returns the tags it put back.

    Call it only after checking that the directory is this run's (no other run's checkpoints) and while
    holding its lock, so that no live save is touched. Only leftovers with exact names that belong to
    ``run_id`` are touched: a tag whose directory is missing gets back its committed staging directory
    (it has COMPLETE), else its complete moved-aside copy; the run's other leftovers are deleted, and so
    are ``latest.tmp.<pid>`` files. Everything else stays, whatever its name."""
    restored = []
    ours = [n for n, run in leftovers(root).items() if run == run_id]
    for name in sorted(ours, key=lambda n: (not n.endswith(STAGING), n)):  # a newer committed save first
        tag = LEFTOVER_RE.match(name).group(1)
        path = os.path.join(root, name)
        if not os.path.exists(os.path.join(root, tag)) and is_complete(path):
            os.replace(path, os.path.join(root, tag))
            restored.append(tag)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(root) if os.path.isdir(root) else []:
        if LATEST_TMP_RE.match(name) and os.path.isfile(os.path.join(root, name)):
            os.remove(os.path.join(root, name))
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
