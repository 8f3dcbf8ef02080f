"""``moe-dist train``: train a model (single process, deepspeed launcher, torchrun or srun)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..engine import load_run_config
    from ..engine.trainer import run

    return run(load_run_config(args.config, args.set), resume=args.resume, weights_only=args.weights_only)


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (single process, deepspeed, torchrun or srun)",
                       description="Train an MoE vision-language model with DeepSpeed ZeRO and expert parallelism. "
                                   "Works as a single process or under the deepspeed launcher, torchrun or srun.")
    p.add_argument("--config", help="run config YAML (see configs/runs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, e.g. --set batch.micro_batch=16 --set model.moe.top_k=2")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint, else fresh), latest, none, or a checkpoint path. A "
                        "checkpoint of another world size, ep_size, ZeRO stage or precision resumes with its Adam "
                        "state and data position too")
    p.add_argument("--weights-only", action="store_true",
                   help="with --resume PATH: load only the model weights (fresh Adam moments; the step counter, LR "
                        "schedule and an exact-mode data stream continue)")
    p.set_defaults(func=_run)
