"""``moe-dist reshard``: a checkpoint for another expert-parallel layout (ep_size, world size), weights only.

    moe-dist reshard --checkpoint DIR --ep-size N [--world-size W] --out DIR2

What a layout binds, and what it does not:
  - the model weights: DeepSpeed writes one file per MoE layer and *global* expert plus one non-expert
    file, whatever the world size and ep_size, and every ep_size reads them (each rank picks its
    experts). They are copied bit for bit.
  - the ZeRO optimizer shards (partitioned by data-parallel rank), the per-rank client files (data-loader
    position, RNG) and, at ZeRO 0, the per-expert-rank optimizer files are bound to the layout that wrote
    them: they are not carried over. (At ZeRO 0 the non-expert file also holds DeepSpeed's non-expert
    optimizer state; a weights-only load ignores it.)

DIR2/step######## is a complete checkpoint of the same step: the model files, a COMPLETE marker with
world_size W and ``"weights_only": true``, run_config.json with the new ep_size and _world_size,
deepspeed_config.json with the global batch for W, model_config.json and the tokenizer. It holds no
optimizer state: resume it with ``moe-dist train --resume DIR2/step######## --weights-only`` (fresh
optimizer and data stream, the step counter kept), or load it with ``load_pretrained``.

Outline:
    1. read the source and check it: every tensor of the model config with its shape, the tokenizer fits;
    2. check the layout: N divides every layer's expert count and W (W defaults to N);
    3. write DIR2/step########.saving (copies, run files, then the marker), flush it, rename it into
       place, point DIR2/latest at it: a crash leaves no half-written checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from typing import Dict, Union

from .export import add_checkpoint_args


def reshard(checkpoint: str, out: str, ep_size: int, world_size: int = 0, model_config=None,
            tokenizer=None) -> str:
    """Write the weights-only checkpoint described above; returns its step directory."""
    from ..checkpoint_files import MODEL_FILE_RE, STAGING, TAG_RE, commit, read_marker
    from ..files import atomic_write, fsync_file
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

    files: Dict[str, Union[str, bytes]] = dict(model_files(state.config, state.tokenizer))  # 3.
    files.update(_layout_files(src, ep_size, world_size))
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    for name in sorted(os.listdir(src)):
        if MODEL_FILE_RE.match(name):
            shutil.copyfile(os.path.join(src, name), os.path.join(staging, name))
            fsync_file(os.path.join(staging, name))
    for name, data in files.items():
        atomic_write(os.path.join(staging, name), data)
    return commit(out, tag, {"step": state.step, "world_size": world_size, "time": time.time(),
                             "run_id": read_marker(src).get("run_id", ""), "weights_only": True,
                             "ep_size": ep_size, "resharded_from": src})


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
    target = reshard(args.checkpoint, args.out, args.ep_size, args.world_size, args.model_config, args.tokenizer)
    world = args.world_size or args.ep_size
    print(f"wrote {target}: weights only (no optimizer state), for ep_size={args.ep_size}, world size {world}; "
          f"resume with: moe-dist train --config RUN.yaml --set ep_size={args.ep_size} --set output_dir=NEW_DIR "
          f"--resume {target} --weights-only (a run directory of its own: the old one holds the checkpoints "
          "of the layout it leaves)")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reshard", help="a weights-only checkpoint for another ep_size / world size",
                       description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--ep-size", type=int, required=True, help="the expert-parallel size to resume with")
    p.add_argument("--world-size", type=int, default=0, help="the number of ranks to resume with (default: --ep-size)")
    p.add_argument("--out", required=True, help="checkpoint root to write (DIR2/step########)")
    p.set_defaults(func=_run)
