"""The planner's recommended layouts for the small and L/14 MoE-CLIP on 16, 64 and 256 GPUs (docs/scaling.md).

    python -m bench.plan_layouts [--models moe-clip-small,moe-clip-l14] [--clusters 2x8,8x8,32x8]
                                 [--global-batch 32768] [--precision bf16]

For each (model, cluster) it ranks every (ep_size, ZeRO stage, micro batch) layout at one global batch
(``moe_dist.planner.rank_layouts``, the table ``moe-dist plan`` prints), and breaks the best one's predicted
step into compute, MoE all-to-all, gradient traffic and the contrastive all-gather. Nothing here runs a
model: the figures are the planner's (H100-80GB defaults: 400 TFLOP/s sustained, NVLink 3,600 Gbit/s,
400 Gbit/s per GPU between nodes; no overlap). Which of them are validated is said in docs/scaling.md.
Results: bench/results/plan_layouts.json.
"""

from __future__ import annotations

import argparse
import json
import os

from bench.memory import ROOT, TINY

RESULTS = os.path.join(ROOT, "bench", "results", "plan_layouts.json")
GIB = 2 ** 30


def recommend(model: str, nodes: int, gpus_per_node: int, global_batch: int, precision: str) -> dict:
    """The planner's rank-1 layout for ``model`` on ``nodes`` x ``gpus_per_node`` and its step breakdown."""
    from moe_dist.engine.config import load_run_config
    from moe_dist.planner import Cluster, Hardware, Layout, estimate, model_facts, rank_layouts

    cfg = load_run_config(TINY, [f"model.name={model}", f"precision={precision}"])
    facts, cluster, hw = model_facts(cfg), Cluster(nodes, gpus_per_node), Hardware()
    ranked = rank_layouts(facts, cfg, cluster, hw, global_batch)
    if not ranked["feasible"]:
        return {"model": model, "nodes": nodes, "gpus_per_node": gpus_per_node, "fits": False}
    best = ranked["feasible"][0]
    layout = Layout(best["ep_size"], best["zero_stage"], best["micro_batch"], best["grad_accum"])
    est = estimate(facts, cfg, cluster, hw, layout)
    t = est["step_time"]
    return {"model": model, "nodes": nodes, "gpus_per_node": gpus_per_node, "fits": True,
            "params": facts.params["total"], "layout": est["layout"],
            "peak_bytes": est["per_gpu_bytes"]["total"],
            "all_to_all_bytes": est["all_to_all_bytes"]["total"],
            "all_to_all_inter_node_bytes": est["all_to_all_bytes"]["inter_node"],
            "gradient_bytes": est["gradient_bytes"]["intra_node"] + est["gradient_bytes"]["inter_node"],
            "step_ms": {k: 1e3 * t[k] for k in ("compute_s", "all_to_all_s", "gradients_s", "contrastive_s",
                                                 "total_s")},
            "samples_per_s": t["samples_per_s"]}


def _row(r: dict) -> str:
    if not r["fits"]:
        return f"| {r['model']} | {r['nodes']}x{r['gpus_per_node']} | no layout fits | | | | | | |"
    lay, ms = r["layout"], r["step_ms"]
    return (f"| {r['model']} | {r['nodes']}x{r['gpus_per_node']} | ep_size {lay['ep_size']}, ZeRO {lay['zero_stage']}, "
            f"micro {lay['micro_batch']} x accum {lay['grad_accum']} | {r['peak_bytes'] / GIB:.1f} GiB | "
            f"{ms['compute_s']:.0f} | {ms['all_to_all_s']:.1f} | {ms['gradients_s']:.1f} | {ms['contrastive_s']:.1f} "
            f"| {ms['total_s']:.0f} | {r['samples_per_s'] / 1e3:.0f} k |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="moe-clip-small,moe-clip-l14")
    p.add_argument("--clusters", default="2x8,8x8,32x8", help="NODESxGPUS_PER_NODE, comma-separated")
    p.add_argument("--global-batch", type=int, default=32768)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for cluster in args.clusters.split(","):
            nodes, gpus = (int(x) for x in cluster.lower().split("x"))
            rows.append(recommend(model, nodes, gpus, args.global_batch, args.precision))
    print(f"global batch {args.global_batch}, {args.precision}; step in ms (no overlap assumed)")
    print("| model | cluster | best layout | peak per GPU | compute | all-to-all | gradients | contrastive | step | "
          "samples/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(_row(r))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"global_batch": args.global_batch, "precision": args.precision, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
