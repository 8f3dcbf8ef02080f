"""``moe-dist reshard``: a checkpoint for another expert-parallel layout (ep_size, world size).

    moe-dist reshard --checkpoint DIR --ep-size N [--world-size W] [--with-optimizer] --out DIR2

``moe-dist train --resume DIR`` already resumes a checkpoint of any layout with its optimizer state
(``engine/optim_state.py``); reshard writes one for a given layout ahead of time, e.g. to hand on or to
keep the optimizer state in one layout-free file.

What a layout binds, and what it does not:
  - the model weights: DeepSpeed writes one file per MoE layer and *global* expert plus one non-expert
    file, whatever the world size and ep_size, and every ep_size reads them (each rank picks its
    experts). They are copied bit for bit.
  - DeepSpeed's optimizer files (ZeRO shards by data-parallel rank; at ZeRO 0 one per expert-parallel
    rank) are bound to the layout that wrote them and are not copied; ``--with-optimizer`` writes their
    content per global parameter instead (``optim_state.OptimizerStates``).
  - the per-rank client files (counters, data-loader position, RNG) merge at any layout (the RNG is not
    used elsewhere); ``--with-optimizer`` copies them.

DIR2/step######## is a complete checkpoint of the same step: the model files, a COMPLETE marker with
world_size W, run_config.json with the new ep_size and _world_size, deepspeed_config.json with the global
batch for W, model_config.json and the tokenizer. Without ``--with-optimizer`` it holds no optimizer
state (the marker says ``"weights_only": true``): resume it with ``--weights-only`` (fresh Adam moments,
the step counter kept), or load it with ``load_pretrained``. With ``--with-optimizer`` it also holds
``optim_states.pt`` (Adam's fp32 master weights, moments and step per global parameter, whatever layout
wrote them) and the ranks' client files (counters and data-loader positions): ``moe-dist train --resume
DIR2/step########`` at any layout continues with the moments and the data stream.

Outline:
    1. read the source and check it: every tensor of the model config with its shape, the tokenizer fits;
       with --with-optimizer every file against the marker's list, and the optimizer state indexed;
    2. check the layout: N divides every layer's expert count and W (W defaults to N);
    3. write DIR2/step########.saving (copies, run files, then the marker), flush it, rename it into
       place, point DIR2/latest at it: a crash leaves no half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import time
from typing import Dict, Union

from .export import add_checkpoint_args

CLIENT_RE = re.compile(r"client_rank\d+\.pt")  # counters and data-loader positions (layout-free since merge_states)


def reshard(checkpoint: str, out: str, ep_size: int, world_size: int = 0, model_config=None,
            tokenizer=None, with_optimizer: bool = False) -> str:
    """Write the checkpoint described above; returns its step directory."""
    from ..checkpoint_files import MODEL_FILE_RE, STAGING, TAG_RE, commit, read_marker, verify_files
    from ..engine.optim_state import LAYOUT_FREE_FILE, OptimizerStates
    from ..files import atomic_path, atomic_write, fsync_file
    from ..models.pretrained import consolidated_state_dict, experts_per_layer, model_files

    state = consolidated_state_dict(checkpoint, model_config, tokenizer)  # 1.
    src = state.source
    if not os.path.isdir(src) or not TAG_RE.match(os.path.basename(src)):
        raise ValueError(f"--checkpoint {checkpoint}: reshard takes a checkpoint directory, not an export; "
                         "an export already loads under any ep_size")
    world_size = world_size or ep_size  # 2.
    counts = sorted(set(experts_per_layer(state.state_dict).values()))
    if ep_size < 1 or any(n % ep_size for n in counts):
        valid = [d for d in range(1, min(counts, default=1) + 1) if all(n % d == 0 for n in counts)]
        raise ValueError(f"--ep-size {ep_size} must divide the number of experts per layer ({counts}); "
                         f"pick one of {valid}")
    if world_size < 1 or world_size % ep_size:
        raise ValueError(f"--world-size {world_size} must be a multiple of --ep-size {ep_size}")
    out = os.path.abspath(out)
    if out == os.path.dirname(src):
        raise ValueError(f"--out {out} is the source's checkpoint root; write the resharded checkpoint elsewhere")
    tag = os.path.basename(src)
    target, staging = os.path.join(out, tag), os.path.join(out, tag + STAGING)
    if os.path.exists(target):
        raise ValueError(f"{target} already exists; pick another --out or remove it")

    states = None
    if with_optimizer:  # read (and checked against the marker's file list) before anything is written
        if read_marker(src).get("weights_only"):
            raise ValueError(f"--checkpoint {src} holds model weights only (a reshard output without "
                             "--with-optimizer): there is no optimizer state to carry; reshard the checkpoint it "
                             "came from, or leave out --with-optimizer")
        verify_files(src)
        states = OptimizerStates.from_checkpoint(src, state.config)
    files: Dict[str, Union[str, bytes]] = dict(model_files(state.config, state.tokenizer))  # 3.
    files.update(_layout_files(src, ep_size, world_size))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    copied = [n for n in sorted(os.listdir(src)) if MODEL_FILE_RE.match(n) or (states and CLIENT_RE.fullmatch(n))]
    for name in copied:
        shutil.copyfile(os.path.join(src, name), os.path.join(staging, name))
        fsync_file(os.path.join(staging, name))
    for name, data in files.items():
        atomic_write(os.path.join(staging, name), data)
    marker = {"step": state.step, "world_size": world_size, "time": time.time(),
              "run_id": read_marker(src).get("run_id", ""), "ep_size": ep_size, "resharded_from": src}
    if states is not None:
        with atomic_path(os.path.join(staging, LAYOUT_FREE_FILE)) as tmp:
            states.save_layout_free(tmp)
        marker["optimizer"] = "layout-free"
    else:
        marker["weights_only"] = True
    return commit(out, tag, marker)


def _layout_files(src: str, ep_size: int, world_size: int) -> Dict[str, str]:
    """run_config.json and deepspeed_config.json of ``src`` rewritten for the new layout (absent ones stay absent)."""
    files = {}
    from ..checkpoint_files import read_json

    run = read_json(os.path.join(src, "run_config.json"))
    if run:
        run.update(ep_size=ep_size, _world_size=world_size)
        files["run_config.json"] = json.dumps(run, indent=2)
    ds = read_json(os.path.join(src, "deepspeed_config.json"))
    if ds:
        per_rank = ds.get("train_micro_batch_size_per_gpu", 1) * ds.get("gradient_accumulation_steps", 1)
        ds["train_batch_size"] = per_rank * world_size
        files["deepspeed_config.json"] = json.dumps(ds, indent=2)
    return files


def _run(args: argparse.Namespace) -> int:
    target = reshard(args.checkpoint, args.out, args.ep_size, args.world_size, args.model_config, args.tokenizer,
                     args.with_optimizer)
    world = args.world_size or args.ep_size
    what, flag = ("weights and optimizer state", "") if args.with_optimizer else \
        ("weights only (no optimizer state)", " --weights-only")
    print(f"wrote {target}: {what}, for ep_size={args.ep_size}, world size {world}; resume with: moe-dist train "
          f"--config RUN.yaml --set ep_size={args.ep_size} --set output_dir=NEW_DIR --resume {target}{flag} (a run "
          "directory of its own: the old one holds the checkpoints of the layout it leaves)")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reshard", help="a checkpoint for another ep_size / world size (weights, optionally optimizer)",
                       description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--ep-size", type=int, required=True, help="the expert-parallel size to resume with")
    p.add_argument("--world-size", type=int, default=0, help="the number of ranks to resume with (default: --ep-size)")
    p.add_argument("--with-optimizer", action="store_true",
                   help="also carry Adam's master weights, moments and step (one layout-free file) and the ranks' "
                        "data-loader positions, so that the resume continues them")
    p.add_argument("--out", required=True, help="checkpoint root to write (DIR2/step########)")
    p.set_defaults(func=_run)
