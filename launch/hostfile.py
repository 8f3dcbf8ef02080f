#!/usr/bin/env python3
"""Write a DeepSpeed hostfile ("host slots=N" per line) from SLURM_JOB_NODELIST or a list of hosts.

    python launch/hostfile.py --slots 8 [--nodelist 'gpu[01-03,07]' | --hosts a b c] [--out hostfile]
Without --nodelist/--hosts, $SLURM_JOB_NODELIST is used. Prints to stdout without --out.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from moe_dist.dist.env import expand_nodelist  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slots", type=int, required=True, help="processes (GPUs) per host")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--nodelist", help="SLURM compressed host list, e.g. gpu[01-03,07]")
    group.add_argument("--hosts", nargs="+", help="host names")
    parser.add_argument("--out", help="file to write (default: stdout)")
    args = parser.parse_args(argv)
    if args.slots < 1:
        parser.error(f"--slots must be >= 1, got {args.slots}")
    hosts = args.hosts or expand_nodelist(args.nodelist or os.environ.get("SLURM_JOB_NODELIST", ""))
    if not hosts:
        parser.error("no hosts: pass --nodelist or --hosts, or run inside a SLURM job (SLURM_JOB_NODELIST)")
    text = "".join(f"{host} slots={args.slots}\n" for host in hosts)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.out + ".tmp", args.out)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
