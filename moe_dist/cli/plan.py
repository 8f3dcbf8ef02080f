"""``moe-dist plan``: memory, communication and step time of a run on a cluster, before it is launched.

For the run config's model, precision, batch and activation checkpointing on NODES x GPUS: the
parameters (total, expert, non-expert, active per token and modality); per-GPU bytes of parameters,
gradients and optimizer states as DeepSpeed's ZeRO partitions them (exact), transient buffers and
activations (an estimate, with and without checkpointing); MoE all-to-all bytes per layer (intra /
inter node), gradient reduction, contrastive all-gather and load-balance all-reduce bytes (each MoE
layer with its tower's MoEConfig); FLOPs per sample; a predicted step time and samples/s; and the
ranked table of (ep_size, ZeRO stage, micro batch) layouts that fit, all at one global batch
(batch.global_batch, else micro_batch x grad_accum x the GPUs; a smaller micro batch accumulates more
steps). The layout printed in full is the run config's unless --ep-size /
--zero-stage / --micro-batch say otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Dict

from ..config import finite_float

GIB = 2 ** 30


def _human(n: float, unit: str = "") -> str:
    for prefix in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g} {prefix}{unit}".rstrip()
        n /= 1000
    return f"{n:.3g} E{unit}"


def _gib(n: float) -> str:
    return f"{n / GIB:.3f} GiB" if n < GIB else f"{n / GIB:.2f} GiB"


def _print(report: Dict[str, object], top: int) -> None:
    lay, c = report["layout"], report["cluster"]
    print(f"model {report['model']} ({report['kind']}) on {c['nodes']} x {c['gpus_per_node']} GPUs: ep_size "
          f"{lay['ep_size']}, ZeRO {lay['zero_stage']}, micro batch {lay['micro_batch']} x grad_accum "
          f"{lay['grad_accum']} (global {lay['global_batch']}), {lay['precision']}, checkpointing "
          f"{lay['activation_checkpointing']}")
    print("parameters")
    for key, value in report["params"].items():
        print(f"  {key:22s} {value:>16,d}  ({_human(value)})")
    mem = report["per_gpu_bytes"]
    print("per-GPU bytes")
    for key in ("parameters", "gradients", "optimizer", "backward_buffers", "step_buffers", "activations"):
        print(f"  {key:22s} {_gib(mem[key]):>12s}")
    print(f"  {'peak of a step':22s} {_gib(mem['total']):>12s}  (parameters + optimizer + the largest of "
          "activations (with ZeRO 1/2's gradient partition) or gradients + backward buffers, gradients + step "
          "buffers)")
    for mode, acts in mem["activations_by_checkpointing"].items():
        print(f"  checkpointing {mode:8s} activations {_gib(acts)}, peak {_gib(mem['peak_by_checkpointing'][mode])}")
    print(f"  {'fits' if report['fits'] else 'DOES NOT FIT'} in {_gib(mem['usable'])} usable")
    a2a = report["all_to_all_bytes"]
    print("communication per step, sent per GPU")
    print(f"  MoE all-to-all         {_human(a2a['total'], 'B'):>12s}  (intra-node {_human(a2a['intra_node'], 'B')}, "
          f"inter-node {_human(a2a['inter_node'], 'B')})")
    for layer in a2a["per_layer"]:
        print(f"    {layer['layer']:16s} {layer['router']:13s} {_human(layer['bytes'], 'B'):>12s}")
    g = report["gradient_bytes"]
    for key in ("all_reduce", "bucket_all_reduce", "param_all_gather"):
        if g[key]:
            print(f"  gradient {key:17s} {_human(g[key], 'B'):>8s}")
    print(f"  contrastive all-gather {_human(report['contrastive_bytes']['all_gather'], 'B'):>12s}")
    bal = report["balance_bytes"]
    if bal["forward_all_reduce"] or bal["step_all_reduce"]:
        print(f"  load-balance all-reduce {_human(bal['forward_all_reduce'] + bal['step_all_reduce'], 'B'):>11s}  "
              f"(global-batch loads every forward {_human(bal['forward_all_reduce'], 'B')}, step loads "
              f"{_human(bal['step_all_reduce'], 'B')})")
    f, t = report["flops"], report["step_time"]
    print(f"FLOPs per sample: forward {_human(f['forward_per_sample'])}, training {_human(f['train_per_sample'])}")
    ms = {k: f"{v * 1e3:.3g}" for k, v in t.items() if k.endswith("_s")}
    print(f"step time {ms['total_s']} ms = compute {ms['compute_s']} ms + communication {ms['communication_s']} ms "
          f"(all-to-all {ms['all_to_all_s']}, gradients {ms['gradients_s']}, contrastive {ms['contrastive_s']}"
          + (f", load balance {ms['balance_s']}" if t["balance_s"] else "") + "); "
          f"{t['samples_per_s']:,.0f} samples/s")
    rows = report["layouts"]
    print(f"layouts that fit ({len(rows)}; fastest first, top {min(top, len(rows))}):")
    print(f"  {'ep':>4s} {'zero':>4s} {'micro':>5s} {'global':>7s} {'GiB/GPU':>8s} {'a2a/step':>10s} "
          f"{'step ms':>8s} {'samples/s':>10s}")
    for r in rows[:top]:
        print(f"  {r['ep_size']:>4d} {r['zero_stage']:>4d} {r['micro_batch']:>5d} {r['global_batch']:>7d} "
              f"{r['total_bytes'] / GIB:>8.2f} {_human(r['all_to_all_bytes'], 'B'):>10s} {r['step_s'] * 1e3:>8.3g} "
              f"{r['samples_per_s']:>10,.0f}")
    bad = report["infeasible_layouts"]
    if bad:
        print(f"layouts that do not fit ({len(bad)}); per ep_size and ZeRO stage, the smallest micro batch:")
        smallest: Dict[tuple, dict] = {}
        for r in sorted(bad, key=lambda r: r["micro_batch"]):
            smallest.setdefault((r["ep_size"], r["zero_stage"]), r)
        for (ep, zero), r in sorted(smallest.items()):
            print(f"  ep {ep} zero {zero} micro {r['micro_batch']} and up: {r['reason']}")


def _run(args: argparse.Namespace) -> int:
    from ..engine.config import load_run_config
    from ..planner import Cluster, Hardware, Layout, model_facts, plan
    from ..planner.layouts import grad_accum_for

    cfg = load_run_config(args.config, args.set)
    if cfg.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={cfg.precision!r} is unknown; use fp32, bf16 or fp16")
    hw = Hardware(args.gpu_memory_gb, args.gpu_tflops, args.intra_node_gbps, args.inter_node_gbps)
    cluster = Cluster(args.nodes, args.gpus_per_node)
    micro = cfg.batch.micro_batch if args.micro_batch is None else args.micro_batch
    global_batch = cfg.batch.global_batch or micro * cfg.batch.grad_accum * cluster.world
    layout = Layout(cfg.ep_size if args.ep_size is None else args.ep_size,
                    cfg.zero_stage if args.zero_stage is None else args.zero_stage,
                    micro, grad_accum_for(global_batch, micro, cluster.world))
    report = plan(model_facts(cfg), cfg, cluster, hw, layout, fixed_micro_batch=args.micro_batch is not None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report, args.top)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    from ..planner.step_time import Hardware

    d = Hardware()
    p = sub.add_parser("plan", help="per-GPU memory, communication and step time of a run on a cluster; "
                                    "ranked layouts that fit", description=__doc__.split("\n\n")[0] + "\n\n"
                       + __doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run config YAML (model, precision, batch, checkpointing)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a run-config field, e.g. --set precision=bf16 (repeatable)")
    p.add_argument("--nodes", type=int, required=True, help="number of nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-memory-gb", type=finite_float, default=d.gpu_memory_gb,
                   help=f"memory per GPU in GiB (default {d.gpu_memory_gb:g}); the plan fills at most "
                        f"{d.headroom * 100:.0f}%% of it")
    p.add_argument("--ep-size", type=int, default=None, help="expert-parallel size (default: the run config's)")
    p.add_argument("--zero-stage", type=int, default=None, help="ZeRO stage 0/1/2 (default: the run config's)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="micro batch per GPU (default: the run config's; given, the table keeps it fixed)")
    p.add_argument("--gpu-tflops", type=finite_float, default=d.gpu_tflops,
                   help=f"sustained TFLOP/s per GPU (default {d.gpu_tflops:g}: H100 bf16 at ~40%% of peak)")
    p.add_argument("--intra-node-gbps", type=finite_float, default=d.intra_node_gbps,
                   help=f"Gbit/s per GPU inside a node (default {d.intra_node_gbps:g}: NVLink 4)")
    p.add_argument("--inter-node-gbps", type=finite_float, default=d.inter_node_gbps,
                   help=f"Gbit/s per GPU between nodes (default {d.inter_node_gbps:g}: one 400G NIC per GPU)")
    p.add_argument("--top", type=int, default=10, help="rows of the layout table to print (default 10)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (params, per_gpu_bytes, all_to_all_bytes, gradient_bytes, "
                        "contrastive_bytes, balance_bytes, flops, step_time, layouts, infeasible_layouts)")
    p.set_defaults(func=_run)
