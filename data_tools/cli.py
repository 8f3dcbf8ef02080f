"""The ``moe-dist-data`` command: shard, validate, stats, tokenizer and synth arrive with the data issue."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-dist-data",
        description="Build, validate and inspect webdataset image-text shards for moe-dist. "
                    "No subcommands are available yet.")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
