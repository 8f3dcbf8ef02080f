"""``moe-dist hostfile``: a DeepSpeed hostfile ("host slots=N" per line) from SLURM_JOB_NODELIST or a host list.

    moe-dist hostfile --slots 8 [--nodelist 'gpu[01-03,07]' | --hosts a b c] [--out hostfile]
Without --nodelist/--hosts, $SLURM_JOB_NODELIST is used. Prints to stdout without --out.
"""

from __future__ import annotations

import argparse
import os
import sys


def _run(args: argparse.Namespace) -> int:
    from ..distributed import expand_nodelist
    from ..files import atomic_write

    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    hosts = args.hosts or expand_nodelist(args.nodelist or os.environ.get("SLURM_JOB_NODELIST", ""))
    if not hosts:
        raise ValueError("no hosts: pass --nodelist or --hosts, or run inside a SLURM job (SLURM_JOB_NODELIST)")
    text = "".join(f"{host} slots={args.slots}\n" for host in hosts)
    if args.out:
        atomic_write(args.out, text, durable=False)
    else:
        sys.stdout.write(text)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from a SLURM node list or host names",
                       description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, required=True, help="processes (GPUs) per host")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--nodelist", help="SLURM compressed host list, e.g. gpu[01-03,07]")
    group.add_argument("--hosts", nargs="+", help="host names")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=_run, needs_stack=False)
