"""The ``moe-dist`` command. Subcommands register themselves in ``COMMANDS``."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Callable, Dict, List, Optional

# DeepSpeed's logger binds to the stdout of its import time; bind it to stderr so that stdout carries
# only command output (moe-dist params --json | jq ...).
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

from . import __version__  # noqa: E402
from .dist.slurm import add_slurm_command  # noqa: E402
from .models.params import add_params_command  # noqa: E402


def _version(args: argparse.Namespace) -> int:
    import torch

    print(f"moe-dist {__version__} (torch {torch.__version__}, deepspeed {deepspeed.__version__})")
    return 0


def _add_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the versions of moe-dist, torch and deepspeed")
    p.set_defaults(func=_version)


def _train(args: argparse.Namespace) -> int:
    from .engine import load_run_config
    from .engine.trainer import run

    return run(load_run_config(args.config, args.set), resume=args.resume)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (single process, deepspeed, torchrun or srun)",
                       description="Train an MoE vision-language model with DeepSpeed ZeRO and expert parallelism. "
                                   "Works as a single process or under the deepspeed launcher, torchrun or srun.")
    p.add_argument("--config", help="run config YAML (see configs/runs/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, e.g. --set batch.micro_batch=16 --set model.moe.top_k=2")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint, else fresh), latest, none, or a checkpoint path")
    p.set_defaults(func=_train)


# name -> function that adds the subcommand's parser (and sets ``func``)
COMMANDS: Dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "version": _add_version,
    "train": _add_train,
    "params": add_params_command,
    "slurm": add_slurm_command,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist",
        description="Train sparse Mixture-of-Experts vision-language models (MoE-CLIP, LIMoE) with DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"moe-dist {__version__}")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment (LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"moe-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from .data import DataError
        from .engine.trainer import NonFiniteError

        if not isinstance(err, (DataError, NonFiniteError)):
            raise
        print(f"moe-dist {args.command}: stopped: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
