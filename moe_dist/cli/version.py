"""``moe-dist version``: the versions of moe-dist, torch and deepspeed."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    import deepspeed
    import torch

    from .. import __version__

    print(f"moe-dist {__version__} (torch {torch.__version__}, deepspeed {deepspeed.__version__})")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("version", help="print the versions of moe-dist, torch and deepspeed")
    p.set_defaults(func=_run)
