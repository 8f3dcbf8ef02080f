"""``moe-dist params``: total / expert / active-per-modality parameter counts and forward FLOPs of a model.

Active parameters are what one token touches (see ``moe_dist.models.params``).
"""

from __future__ import annotations

import argparse
import json


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}E"


def _run(args: argparse.Namespace) -> int:
    from ..config import parse_overrides
    from ..models.params import params_report

    report = params_report(args.model, parse_overrides(args.set, prefix="model."))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {report['model']} ({report['kind']})")
    rows = [(f"params {k}", v) for k, v in report["params"].items()]
    rows += [(f"forward FLOPs {k}", v) for k, v in report["flops"].items()]
    for label, value in rows:
        print(f"  {label:26s} {value:>16,d}  ({_human(value)})")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("params", help="parameter counts (total, expert, active per modality) and FLOPs of a model",
                       description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="registry name (see configs/models/), path to a model JSON, or open_clip:ARCH")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model field, e.g. --set moe.top_k=2 (repeatable)")
    p.set_defaults(func=_run)
