"""Checkpoints that count only when complete, belong to one run, and resume from the newest one that loads.

Layout: CKPT/step00000100/ holds DeepSpeed's files (model states, one file per global expert, ZeRO
optimizer shards), ``client_rank<r>.pt`` per rank (step, data-loader state, RNG states), the run files
and the ``COMPLETE`` marker (step, world size, run id); CKPT/latest names the newest complete tag.

Save outline (no directory is ever written while it is marked complete):
    1. rank 0 replaces a leftover staging directory of this step with a fresh one holding OWNER (this
       run's id); barrier;
    2. every rank writes into the staging directory CKPT/step00000100.saving (DeepSpeed's files, its
       client file; rank 0 the run files), then fsyncs the files there: data reaches the disk before
       any marker;
    3. barrier: every rank has finished writing;
    4. every rank hashes its share of the files (SHA-256); rank 0 gathers the list;
    5. rank 0 commits the staging directory (``checkpoint_files.commit``: COMPLETE with the file list
       inside, an existing step00000100 moved aside, one rename, ``latest``), then prunes this run's
       checkpoints beyond ``keep``;
    6. barrier.
A kill before the commit leaves only a ``.saving`` directory, which resume ignores and this run's next
start deletes; a kill inside the commit leaves complete copies that ``recover`` renames back.

A run holds ``CKPT/.lock`` (``lock_root``) from its start to its exit, so two runs never write, recover
or prune in one checkpoint directory at once.

Resume (``resume_candidates``): ``auto`` tries the complete checkpoints newest first; one whose files do
not load (truncated, corrupt, holding objects outside the allow-list, or not the files its save wrote)
is skipped with a warning.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import socket
import time
import uuid
from typing import IO, Any, Dict, List, Optional, Tuple

import torch

from ..checkpoint_files import (LATEST, MARKER, OWNER, STAGING, TAG_RE, commit, complete_tags, describe_files,
                                file_names, is_complete, leftovers, load_weights_only, read_json, read_marker,
                                verify_files)
from ..files import atomic_path, atomic_write, fsync_dir, fsync_file, read_small

LOCK = ".lock"



def tag_for(step: int) -> str:
    return f"step{step:08d}"


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


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def run_ids(root: str, committed_leftovers: bool = False) -> Dict[str, List[str]]:
    """Run id -> its complete tags under ``root`` (checkpoints from before run ids count as run "");
    ``committed_leftovers`` adds the complete copies an interrupted commit left under other names."""
    out: Dict[str, List[str]] = {}
    for tag in complete_tags(root):
        out.setdefault(str(read_marker(os.path.join(root, tag)).get("run_id", "")), []).append(tag)
    if committed_leftovers:
        for name, run in sorted(leftovers(root).items()):
            if run is not None and is_complete(os.path.join(root, name)):
                out.setdefault(run, []).append(name)
    return out


def lock_root(root: str) -> IO:
    """Hold ``root/.lock`` exclusively until the returned file is closed or the process ends: a second
    run started on the same checkpoint directory, even at the same moment, is refused instead of both
    passing the ownership check. A POSIX record lock (``fcntl.lockf``): forked data workers do not
    inherit it, so it ends with the process that took it, and it works on NFS. Where the filesystem
    has no locks, a warning and no lock.

    Raises:
        ValueError: another live process holds the lock (its host and pid are named), or ``.lock`` is
            not a regular file or cannot be opened (one line).
    """
    import errno
    import fcntl
    import stat
    import warnings

    path = os.path.join(root, LOCK)
    try:
        os.makedirs(root, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as err:  # ELOOP: a symlink, which would have been followed and overwritten
        raise ValueError(f"cannot open the lock file {path} ({err}); it must be a regular file this user may "
                         "write") from None
    f = os.fdopen(fd, "r+")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise ValueError(f"the lock file {path} is not a regular file; remove it")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            warnings.warn(f"cannot lock checkpoint directory {root} ({err}); make sure no other run uses it")
            return f
        holder = f.read(300).strip() or "unknown"
        f.close()
        raise ValueError(f"checkpoint directory {root} is in use by another live run ({holder}); wait for it to "
                         "end, or give this run its own output_dir (or checkpoint.dir)") from None
    f.truncate(0)
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}) + "\n")
    f.flush()
    return f


def _fsync_tree(directory: str) -> None:
    for path in glob.glob(os.path.join(glob.escape(directory), "*")):
        try:
            fsync_file(path)
        except (FileNotFoundError, IsADirectoryError):  # another rank's temporary file renamed meanwhile
            pass
    fsync_dir(directory)


def save(engine, root: str, step: int, client: Dict[str, Any], keep: int, run_files: Dict[str, str],
         run_id: str, pause_s: float = 0.0) -> str:
    """Write a complete checkpoint of ``engine`` at ``step`` for run ``run_id`` (plus ``run_files``, name
    -> text, from rank 0); returns its directory. Collective: every rank calls it."""
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    tag = tag_for(step)
    tag_dir, staging = os.path.join(root, tag), os.path.join(root, tag + STAGING)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        atomic_write(os.path.join(staging, OWNER), json.dumps({"run_id": run_id}))
    dist.barrier()
    # 2. write everything into the staging directory and flush it to disk
    engine.save_checkpoint(root, tag=tag + STAGING, client_state={"step": step}, save_latest=False)
    with atomic_path(os.path.join(staging, f"client_rank{rank}.pt")) as tmp:
        torch.save(client, tmp)
    if rank == 0:
        for name, text in run_files.items():
            atomic_write(os.path.join(staging, name), text)
    if pause_s:
        atomic_write(os.path.join(root, f"saving.rank{rank}"), tag)
        time.sleep(pause_s)
    _fsync_tree(staging)
    dist.barrier()
    # 4. rank 0 lists the files once (a node's view of a shared directory may lag), every rank hashes
    #    its share; 5. commit: marker with the list, one rename
    names = [file_names(staging) if rank == 0 else None]
    if world > 1:
        torch.distributed.broadcast_object_list(names, src=0)
    files = describe_files(staging, names[0][rank::world])
    if world > 1:
        shares: List[Optional[Dict[str, Any]]] = [None] * world
        torch.distributed.all_gather_object(shares, files)
        files = {name: entry for share in shares for name, entry in (share or {}).items()}
    if rank == 0:
        if sorted(files) != file_names(staging):
            raise RuntimeError(f"checkpoint {staging}: the files hashed ({len(files)}) are not the files there now "
                               f"({len(file_names(staging))}); something else writes into the checkpoint directory")
        commit(root, tag, {"step": step, "world_size": world, "run_id": run_id, "time": time.time(), "files": files})
        _prune(root, keep, run_id)
    for stale in glob.glob(os.path.join(root, f"saving.rank{rank}")):
        os.remove(stale)
    dist.barrier()
    return tag_dir


def _prune(root: str, keep: int, run_id: str) -> None:
    """Keep the newest ``keep`` complete checkpoints of run ``run_id``; never touch another run's."""
    tags = run_ids(root).get(run_id, [])
    for tag in tags[:-max(keep, 1)]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)
    if not tags:
        return
    newest = int(TAG_RE.match(tags[-1]).group(1))
    for name in os.listdir(root):  # incomplete step directories older than the newest complete checkpoint
        match = TAG_RE.match(name)
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
            tag = read_small(os.path.join(root, LATEST), 256, "latest").decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            raise ValueError(f"--resume latest: {os.path.join(root, LATEST)} does not exist") from None
        if not TAG_RE.match(tag) or not is_complete(os.path.join(root, tag)):
            raise ValueError(f"--resume latest: {root}/latest names {tag!r}, which is not a complete checkpoint; "
                             "use --resume auto to take the newest complete one")
        return root, tag
    path = os.path.abspath(resume.rstrip("/"))
    if path.endswith(STAGING):
        raise ValueError(f"--resume {resume}: checkpoint is incomplete (an unfinished save); pick a complete one "
                         "or use --resume auto")
    if os.path.isdir(path) and TAG_RE.match(os.path.basename(path)):
        if not is_complete(path):
            raise ValueError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: the save was "
                             "interrupted); pick a complete one or use --resume auto")
        return os.path.dirname(path), os.path.basename(path)
    tags = complete_tags(path)
    if not tags:
        raise ValueError(f"--resume {resume}: no complete checkpoint there (expected step########/{MARKER})")
    return path, tags[-1]


def continued_run(root: str, resume: str) -> Optional[str]:
    """The run id a start with ``resume`` continues in checkpoint directory ``root`` (None: a new run),
    once ``root`` is known to hold no other run's checkpoints; reads only, so a refused start has touched
    nothing. Complete copies an interrupted commit left count as their run's checkpoints.

    Raises:
        ValueError: a fresh start into a directory holding a run's checkpoints, or a resume into one
            holding other runs' checkpoints (one line with what to do).
    """
    runs = run_ids(root, committed_leftovers=True)
    if resume in ("", "none") or (resume == "auto" and not runs):
        if runs:
            newest = max(tag for tags in runs.values() for tag in tags)
            raise ValueError(f"checkpoint directory {root} already holds another run's checkpoints (newest "
                             f"{newest}); a fresh start there would prune or later resume them. Continue that run "
                             "with --resume auto, or give this run its own output_dir (or checkpoint.dir)")
        return None
    if resume in ("auto", "latest"):
        if len(runs) > 1:
            raise ValueError(f"checkpoint directory {root} holds checkpoints of several runs {sorted(runs)}; "
                             "resume one with --resume PATH into a directory of its own (set checkpoint.dir)")
        return next(iter(runs), None)
    src_root, tag = find_resume(root, resume)
    run = str(read_marker(os.path.join(src_root, tag)).get("run_id", ""))
    if set(runs) - {run}:
        raise ValueError(f"checkpoint directory {root} holds checkpoints of runs {sorted(set(runs) - {run})}, not "
                         f"of the run in {os.path.join(src_root, tag)}; resume into its own directory (set "
                         "checkpoint.dir)")
    return run


def resume_candidates(root: str, resume: str) -> List[Tuple[str, str]]:
    """What to try, in order: for ``auto`` every complete checkpoint newest first (a broken newest one
    falls back to the one before), otherwise ``find_resume``'s single answer; [] for a fresh start."""
    if resume == "auto":
        return [(root, tag) for tag in reversed(complete_tags(root))]
    found = find_resume(root, resume)
    return [found] if found else []


def verify_safe(tag_dir: str, rank: Optional[int] = None, hash_share: Tuple[int, int] = (0, 1)) -> None:
    """Refuse checkpoint files that are not the ones its save wrote (``verify_files``; this process hashes
    the listed files of ``hash_share`` = (index, of how many), a rank its share), are unreadable
    (truncated, corrupt) or hold arbitrary pickled objects: each must load with ``weights_only=True`` and
    the allow-list above, before DeepSpeed loads it (unrestricted). With ``rank``, this rank's client
    file must exist too."""
    if rank is not None and not os.path.isfile(os.path.join(tag_dir, f"client_rank{rank}.pt")):
        raise ValueError(f"checkpoint {tag_dir} has no client_rank{rank}.pt (this rank's counters, data position "
                         "and RNG); resume an earlier checkpoint, or this one with --weights-only")
    verify_files(tag_dir, rank=hash_share[0], world_size=hash_share[1])
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        load_weights_only(path)


def check_same_model(tag_dir: str, model_cfg) -> None:
    """Refuse to resume ``tag_dir`` into another model: its ``model_config.json`` must build the same
    parameters (names and shapes) as ``model_cfg``. Options that change no parameter (a capacity factor,
    loss weights, the router's noise) may differ. Checkpoints without the file pass."""
    from ..config import from_dict
    from ..models import build_model
    from ..models.config import MODEL_CONFIG_FILE, ModelConfig

    path = os.path.join(tag_dir, MODEL_CONFIG_FILE)
    saved = read_json(path)
    if not saved:
        return
    try:
        saved_cfg = from_dict(ModelConfig, saved, path)
    except ValueError as err:
        raise ValueError(f"checkpoint {tag_dir}: {MODEL_CONFIG_FILE} is not a model config this version reads "
                         f"({err})") from None
    # the optimizer groups follow the decoder's learning-rate scale (its own groups unless 1): the saved
    # optimizer state only fits the same groups; a file from before the option existed means 1
    saved_scale = float((saved.get("decoder") or {}).get("lr_scale", 1.0))
    if model_cfg.kind == "coca" and saved_scale != model_cfg.decoder.lr_scale:
        raise ValueError(f"checkpoint {tag_dir} was trained with model.decoder.lr_scale={saved_scale:g}, this run's "
                         f"config gives {model_cfg.decoder.lr_scale:g}: its optimizer state holds other groups; resume "
                         f"with --set model.overrides.decoder.lr_scale={saved_scale:g}, or start a new run (model.init "
                         "takes the weights)")
    with torch.device("meta"):
        was, now = ({k: tuple(v.shape) for k, v in build_model(c).state_dict().items()} for c in (saved_cfg, model_cfg))
    if was == now:
        return
    differ = [f"{k} {was.get(k, 'absent')} -> {now.get(k, 'absent')}" for k in sorted(set(was) | set(now))
              if was.get(k) != now.get(k)]
    raise ValueError(f"checkpoint {tag_dir} holds another model than this run's config ({len(differ)} parameters "
                     f"differ: {'; '.join(differ[:3])}{'; ...' if len(differ) > 3 else ''}); resume with the model "
                     "it was trained with (model.name and model.overrides of its run_config.json), or start a new "
                     "run in its own output_dir (model.init upcycles from a checkpoint)")


def load(engine, root: str, tag: str, rank: int) -> Dict[str, Any]:
    """Load DeepSpeed state and this rank's client state (after ``verify_safe`` passed on every rank);
    raise if anything is missing."""
    tag_dir = os.path.join(root, tag)
    path, _ = engine.load_checkpoint(root, tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    return torch.load(os.path.join(tag_dir, f"client_rank{rank}.pt"), map_location="cpu", weights_only=True)


def load_weights(engine, root: str, tag: str) -> int:
    """Load only the model weights of a checkpoint written under any world size or ep_size (DeepSpeed
    keeps one file per global expert, and refreshes ZeRO's fp32 copies from them); returns its step.
    Optimizer state, the LR schedule's state and the data stream are not read. Call it after
    ``verify_safe`` passed on every rank."""
    tag_dir = os.path.join(root, tag)
    path, _ = engine.load_checkpoint(root, tag=tag, load_module_only=True, load_optimizer_states=False,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the weights of checkpoint {tag_dir}")
    step = read_marker(tag_dir).get("step")
    return int(step) if step is not None else int(TAG_RE.match(tag).group(1))


def loader_states(tag_dir: str) -> List[Dict[str, Any]]:
    """Every rank's data-loader state of a checkpoint (empty for a weights-only one), for
    ``moe_dist.data.merge_states``: the global position of its epoch, which a run of another world size
    continues."""
    names = sorted(n for n in os.listdir(tag_dir) if re.fullmatch(r"client_rank\d+\.pt", n))
    return [torch.load(os.path.join(tag_dir, n), map_location="cpu", weights_only=True)["loader"] for n in names]
