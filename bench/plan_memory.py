"""The planner's predicted peak memory per rank against ``bench.memory``'s measurement of real steps.

    python -m bench.plan_memory [--models tiny,small] [--checkpointing none,blocks,moe] [--zero 2]
                                [--micro-batch 8] [--from bench/results/memory.json|plan_memory.json]

For each (model, activation checkpointing, ZeRO stage) it runs ``bench.memory.measure`` (2 ranks, the
accelerator's backend; or reads the runs of an earlier ``bench.memory`` (or ``bench.plan_memory``) results file with --from) and
``moe_dist.planner.estimate`` for the same run config on one node of 2 GPUs, and prints predicted /
measured peak bytes per rank. Target (issue 16): within 15%. Results: bench/results/plan_memory.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

from bench.memory import ROOT, TINY, measure

RESULTS = os.path.join(ROOT, "bench", "results", "plan_memory.json")
MODELS = {"tiny": "moe-clip-tiny", "small": "moe-clip-small"}


def predicted_peak(overrides) -> dict:
    from moe_dist.engine.config import load_run_config
    from moe_dist.planner import Cluster, Hardware, Layout, estimate, model_facts

    cfg = load_run_config(TINY, list(overrides))
    layout = Layout(cfg.ep_size, cfg.zero_stage, cfg.batch.micro_batch)
    return estimate(model_facts(cfg), cfg, Cluster(1, 2), Hardware(), layout)["per_gpu_bytes"]


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
    p.add_argument("--zero", default="2", help="comma list of ZeRO stages")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--from", dest="source", default="",
                   help="reuse the runs of a bench.memory results JSON instead of measuring")
    p.add_argument("--out", default=RESULTS, help="results JSON")
    args = p.parse_args(argv)
    from bench._results import save

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
    save(args.out, {"micro_batch": args.micro_batch, "world_size": 2, "largest_deviation": worst, "rows": rows})


if __name__ == "__main__":
    main()
