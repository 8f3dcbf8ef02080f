"""The planner's predictions against ``bench.memory``'s measurements of real steps.

    python -m bench.plan_memory [--models tiny,small] [--checkpointing none,blocks,moe] [--zero 2]
                                [--micro-batch 8] [--from bench/results/memory.json|plan_memory.json]
    python -m bench.plan_memory --grid [--world-size 8] [--ep 1,2,4,8] [--zero 0,1,2] [--precision fp32,bf16]

Peak memory (the default): for each (model, activation checkpointing, ZeRO stage) it runs
``bench.memory.measure`` (2 ranks, the accelerator's backend; or reads the runs of an earlier
``bench.memory`` (or ``bench.plan_memory``) results file with --from) and ``moe_dist.planner.estimate`` for
the same run config on one node of 2 GPUs, and prints predicted / measured peak bytes per rank. Target
(issue 16): within 15%. Results: the ``rows`` of bench/results/plan_memory.json.

The layout grid (``--grid``, issue 26): moe-clip-tiny with 8 experts (so that ep_size 8 divides them) on
``--world-size`` ranks, for every ep_size x ZeRO stage x precision, ``--steps`` steps of micro batch
``--micro-batch`` from one initial model and one batch per rank (``measure(same_init=True)``). Per
layout: the largest loss difference to the ep_size-1 run of the same ZeRO stage and precision (every
rank, every step); the all-to-all bytes each rank sent in the last step (the dispatchers' ``Traffic``)
against ``planner.comm.moe_all_to_all``; the gradient bytes DeepSpeed's collectives sent (all-reduce in
backward, parameter all-gather in the step: ``moe_dist/distributed/comm_count.py``) against
``planner.comm.gradient_bytes``; every rank's peak against the planner's. Results: the ``grid`` of
bench/results/plan_memory.json (each mode keeps the other's part of the file).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

from bench.grid import replan, run_grid
from bench.memory import ROOT, TINY, measure, planned

RESULTS = os.path.join(ROOT, "bench", "results", "plan_memory.json")
MODELS = {"tiny": "moe-clip-tiny", "small": "moe-clip-small"}


def predicted_peak(overrides) -> dict:
    return planned(overrides, 2)["per_gpu_bytes"]


def _measured_runs(path: str) -> dict:
    """Measurements of a bench.memory results file, or of an earlier bench.plan_memory one."""
    with open(path) as f:
        results = json.load(f)
    if "runs" in results:
        return {(r["model"], r["activation_checkpointing"], r["zero_stage"], results["micro_batch"]): r
                for r in results["runs"]}
    runs: dict = {}
    for r in results["rows"]:
        key = (r["model"], r["activation_checkpointing"], r["zero_stage"], results["micro_batch"])
        runs.setdefault(key, {"per_rank": []})["per_rank"].append(r["measured"])
    return runs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,small", help="comma list of tiny (moe-clip-tiny), small (moe-clip-small)")
    p.add_argument("--checkpointing", default="none,blocks,moe", help="comma list of activation_checkpointing modes")
    p.add_argument("--zero", default="", help="comma list of ZeRO stages (default 2; with --grid 0,1,2)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--from", dest="source", default="",
                   help="reuse the runs of a bench.memory results JSON instead of measuring")
    p.add_argument("--grid", action="store_true", help="the layout grid instead (see above)")
    p.add_argument("--replan", action="store_true", help="--grid: the stored grid against the planner as it is "
                                                          "now, without measuring")
    p.add_argument("--world-size", type=int, default=8, help="--grid: ranks")
    p.add_argument("--ep", default="1,2,4,8", help="--grid: comma list of ep_size (1 first: the loss reference)")
    p.add_argument("--precision", default="fp32,bf16", help="--grid: comma list of precisions")
    p.add_argument("--steps", type=int, default=3, help="--grid: training steps per layout")
    p.add_argument("--out", default=RESULTS, help="results JSON")
    args = p.parse_args(argv)
    from bench._results import save

    args.zero = args.zero or ("0,1,2" if args.grid else "2")
    kept = _load(args.out)
    if args.grid and args.replan:
        save(args.out, {**kept, "grid": replan(kept["grid"], planned)})
        return
    if args.grid:
        grid = run_grid(args.world_size, [int(e) for e in args.ep.split(",")], [int(z) for z in args.zero.split(",")],
                        args.precision.split(","), args.micro_batch, args.steps, planned)
        key = ("world_size", "ep_size", "zero_stage", "precision")  # rows of other layouts are kept
        done = {tuple(r[k] for k in key) for r in grid["rows"]}
        grid["rows"] = [r for r in kept.get("grid", {}).get("rows", []) if tuple(r[k] for k in key) not in done] + \
            grid["rows"]
        save(args.out, {**kept, "grid": grid})
        return
    earlier = _measured_runs(args.source) if args.source else {}
    rows = []
    print(f"{'model':6} {'ckpt':6} {'zero':4} {'rank':4} {'predicted MiB':>13} {'measured MiB':>12} {'ratio':>6}")
    for model, ckpt, zero in itertools.product(args.models.split(","), args.checkpointing.split(","),
                                               [int(z) for z in args.zero.split(",")]):
        sets = [f"model.name={MODELS[model]}", f"zero_stage={zero}", f"activation_checkpointing={ckpt}",
                f"batch.micro_batch={args.micro_batch}"]
        run = earlier.get((model, ckpt, zero, args.micro_batch)) or measure(TINY, sets, world_size=2)
        plan = predicted_peak(sets)
        for r in run["per_rank"]:
            ratio = plan["total"] / r["peak_bytes"]
            rows.append({"model": model, "activation_checkpointing": ckpt, "zero_stage": zero, "rank": r["rank"],
                         "predicted_peak_bytes": plan["total"], "measured_peak_bytes": r["peak_bytes"],
                         "ratio": ratio, "predicted": {k: v for k, v in plan.items() if isinstance(v, int)},
                         "measured": r})
            print(f"{model:6} {ckpt:6} {zero:4} {r['rank']:4} {plan['total'] / 2 ** 20:13.1f} "
                  f"{r['peak_bytes'] / 2 ** 20:12.1f} {ratio:6.3f}", flush=True)
    worst = max((abs(r["ratio"] - 1) for r in rows), default=0.0)
    print(f"largest deviation: {worst:.1%} (target: within 15%)")
    save(args.out, {**kept, "micro_batch": args.micro_batch, "world_size": 2, "largest_deviation": worst,
                    "rows": rows})


def _load(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
