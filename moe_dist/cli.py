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
from .models.params import add_params_command  # noqa: E402


def _version(args: argparse.Namespace) -> int:
    import deepspeed
    import torch

    print(f"moe-dist {__version__} (torch {torch.__version__}, deepspeed {deepspeed.__version__})")
    return 0


def _add_version(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the versions of moe-dist, torch and deepspeed")
    p.set_defaults(func=_version)


# name -> function that adds the subcommand's parser (and sets ``func``)
COMMANDS: Dict[str, Callable[[argparse._SubParsersAction], None]] = {
    "version": _add_version,
    "params": add_params_command,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist",
        description="Train sparse Mixture-of-Experts vision-language models (MoE-CLIP, LIMoE) with DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"moe-dist {__version__}")
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


if __name__ == "__main__":
    sys.exit(main())
