"""``moe-dist hostfile``: a DeepSpeed hostfile ("host slots=N" per line) from SLURM_JOB_NODELIST or a host list.

    moe-dist hostfile --slots 8 [--nodelist 'gpu[01-03,07]' | --hosts a b c] [--out hostfile]
Without --nodelist/--hosts, $SLURM_JOB_NODELIST is used. Prints to stdout without --out. A host name is
letters, digits, '.', '-' and '_' (moe_dist.distributed.check_host_name); anything else, and a malformed
node list, is refused with exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys


def _run(args: argparse.Namespace) -> int:
    from ..distributed import check_host_name, expand_nodelist
    from ..files import atomic_write

    if args.slots < 1:
        raise ValueError(f"--slots must be >= 1, got {args.slots}")
    # one host per line: a name with a newline, a space, '#' or '=' would add lines or fields
    hosts = [check_host_name(host, "--hosts") for host in args.hosts or []]
    hosts = hosts or expand_nodelist(args.nodelist or os.environ.get("SLURM_JOB_NODELIST", ""))
    if not hosts:
        raise ValueError("no hosts: pass --nodelist or --hosts, or run inside a SLURM job (SLURM_JOB_NODELIST)")
    text = "".join(f"{host} slots={args.slots}\n" for host in hosts)
    if args.out:
        try:
            atomic_write(args.out, text, durable=False)
        except OSError as err:
            raise ValueError(f"--out {args.out!r}: cannot write the hostfile there ({err.strerror}); name a file "
                             "in an existing directory") from None
    else:
        sys.stdout.write(text)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hostfile", help="write a DeepSpeed hostfile from a SLURM node list or host names",
                       description=__doc__.splitlines()[0])
    p.add_argument("--slots", type=int, required=True, help="processes (GPUs) per host")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--nodelist", help="SLURM compressed host list, e.g. gpu[01-03,07]")
    group.add_argument("--hosts", nargs="+", help="host names (letters, digits, '.', '-', '_')")
    p.add_argument("--out", help="file to write (default: stdout)")
    p.set_defaults(func=_run, needs_stack=False)
