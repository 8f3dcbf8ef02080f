"""The ``moe-dist`` command: one module per subcommand, each exposing ``add(subparsers)``.

Commands sit on top of the libraries (``moe``, ``models``, ``data``, ``engine``, ``distributed``,
``text``); no library imports a command. A new subcommand is a new module here plus one line in
``COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import List, Optional

from .. import __version__, exit_process


def _name_the_cpu_accelerator() -> None:
    """On a machine with none of the accelerators DeepSpeed probes for, say "cpu" up front: DeepSpeed
    then skips its probe and the "Setting accelerator to CPU" warning every command would print first.
    Any accelerator (or an explicit DS_ACCELERATOR) leaves DeepSpeed's own detection in charge."""
    import importlib.util

    import torch

    if os.environ.get("DS_ACCELERATOR") or torch.cuda.is_available() or torch.backends.mps.is_available():
        return
    probes = ("intel_extension_for_pytorch", "torch_npu", "torch_sdaa", "habana_frameworks", "torch_mlu")
    if not any(importlib.util.find_spec(name) for name in probes):
        os.environ["DS_ACCELERATOR"] = "cpu"


def load_stack() -> None:
    """Import DeepSpeed, once, before a command that uses torch: after naming the CPU accelerator, and
    with DeepSpeed's logger bound to stderr (it binds to the stdout of its import time), so that stdout
    carries only command output (moe-dist params --json | jq ...). ``main`` calls it unless a command
    says it needs no torch (``set_defaults(needs_stack=False)``), so that --help, a usage error and
    ``hostfile`` answer in a fraction of a second instead of the ~3 s the import takes."""
    if "deepspeed" in sys.modules:
        return
    _name_the_cpu_accelerator()
    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed  # noqa: F401


# subcommand name -> module under moe_dist.cli (imported when the parser is built)
COMMANDS = {
    "version": "version",
    "quickstart": "quickstart",
    "train": "train",
    "eval": "eval",
    "export": "export",
    "reshard": "reshard",
    "analyze-routing": "analyze_routing",
    "params": "params",
    "plan": "plan",
    "slurm": "slurm",
    "hostfile": "hostfile",
    "caption": "caption",
    "vqa": "vqa",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist",
        description="Train sparse Mixture-of-Experts vision-language models (MoE-CLIP, LIMoE) with DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"moe-dist {__version__}")
    # the deepspeed launcher passes --local_rank; the rank comes from the environment (LOCAL_RANK)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS.values():
        importlib.import_module(f"{__name__}.{module}").add(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..distributed.launch_argv import decode_argv

    parser = build_parser()
    try:  # a multi-node launch over pdsh hands the arguments over as one word (launch/deepspeed.sh)
        argv = decode_argv(sys.argv[1:] if argv is None else argv)
    except ValueError as err:
        parser.error(str(err))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    if getattr(args, "needs_stack", True):
        load_stack()
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # configuration errors: one clear line, no traceback
        print(f"moe-dist {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from ..data import DataError
        from ..engine.trainer import NonFiniteError

        if not isinstance(err, (DataError, NonFiniteError)):
            raise
        print(f"moe-dist {args.command}: stopped: {err}", file=sys.stderr)
        return 1


def command() -> None:
    """The ``moe-dist`` console command and ``python -m moe_dist``."""
    exit_process(main())
