"""Where the time of an MoE layer call and of a training step goes, on whatever accelerator DeepSpeed
detects (CPU here; the GPU when ``bench/gpu_check.sh`` runs it).

    python -m bench.profile_step [--tokens 16384 --hidden 1024 --ffn 4096] [--dtype bf16] [--steps 12]
                                 [--workers 6] [--compile] [--skip-training] [--out bench/results/profile_step.json]

Three torch.profiler captures, each printed as its top operators by self device time (self CPU time
on CPU) with the operators that wait for the device (``aten::_local_scalar_dense``: ``.item()``,
``int(tensor)``; ``aten::nonzero``; a ``.tolist()`` is a copy and does not show here: on a GPU
``cudaStreamSynchronize`` in the runtime calls counts every wait), kernels and copies launched, and wall
time per call:
    1. the MoE layer (E=8, k=2), forward + backward, loop and grouped_mm backends: dropless without a
       modality tensor, and at capacity 1.25 with one (as the models call it); each also counts its host
       reads per call (``host_reads_per_call``, moe_dist/host_reads.py) and, with ``--compile``, runs
       compiled (``graph_breaks``, generated kernels, ``kernels_per_call``; grouped_mm in bf16 only);
    2. one training step of ``moe-dist train`` on bench.train_throughput's dense model;
    3. the same on its MoE model (E=8 top-1 in every other block).
The training captures wrap DeepSpeed's ``engine.step``: steps ``--steps - 3`` to ``--steps - 1`` are
recorded, after a warm-up; the optimizer step and the forward are also timed alone (the device drained
around each), ``optimizer_vs_forward``. Writes the per-capture summary (and top operators) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from moe_dist.host_reads import HostReads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "profile_step.json")
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::item")
# operators that only make a view (no kernel, no copy): left out of ``non_view_ops_per_call``
VIEW_OPS = {f"aten::{name}" for name in (
    "select", "slice", "unsqueeze", "squeeze", "t", "view", "reshape", "expand", "expand_as", "narrow", "unbind",
    "split", "split_with_sizes", "chunk", "detach", "as_strided", "alias", "transpose", "permute", "_reshape_alias",
    "lift_fresh", "flatten", "unflatten", "view_as")}


def _summary(prof, calls: int, wall_s: float, top: int = 12) -> dict:
    events = prof.key_averages()
    on_device = any(getattr(e, "self_device_time_total", 0) for e in events)
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)
    kernel_events = [e for e in events if str(getattr(e, "device_type", "")).endswith(("CUDA", "XPU"))
                     and not e.key.startswith("ProfilerStep")]  # the step marker spans the whole step
    if on_device:  # the kernels alone: an operator's self device time repeats its kernels'
        total = sum(e.self_device_time_total for e in kernel_events)
    else:
        total = sum(e.self_cpu_time_total for e in events if not e.key.startswith("ProfilerStep"))
    kernels = sum(e.count for e in kernel_events)
    runtime = {e.key: e.count for e in events if e.key.startswith(("cuda", "cudaStream", "cudaMemcpy"))}
    top_level = [e.name for e in prof.events() if e.name.startswith("aten::")
                 and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    out = {
        "wall_ms_per_call": 1e3 * wall_s / calls,
        "time_kind": "device" if on_device else "cpu",
        "self_ms_per_call": total / 1e3 / calls,
        "ops_per_call": sum(e.count for e in events if e.key.startswith("aten::")) / calls,
        "top_level_ops_per_call": len(top_level) / calls,  # aten operators not called from inside another one
        "non_view_ops_per_call": sum(1 for name in top_level if name not in VIEW_OPS) / calls,
        "kernels_per_call": kernels / calls,
        "host_syncs_per_call": {k: e.count / calls for e in events for k in SYNC_OPS if e.key == k},
        "runtime_calls_per_call": {k: v / calls for k, v in runtime.items()},
        "top": [{"op": e.key, "ms_per_call": getattr(e, key) / 1e3 / calls, "calls_per_call": e.count / calls}
                for e in rows[:top]],
    }
    return out


def _print(name: str, s: dict) -> None:
    print(f"\n== {name}: wall {s['wall_ms_per_call']:.2f} ms/call, self {s['time_kind']} time "
          f"{s['self_ms_per_call']:.2f} ms, {s['ops_per_call']:.0f} aten ops ({s['top_level_ops_per_call']:.0f} top-level, "
          f"{s['non_view_ops_per_call']:.0f} of them not views), "
          f"{s['kernels_per_call']:.0f} kernels")
    print("   host syncs per call:", {k: round(v, 1) for k, v in s["host_syncs_per_call"].items()},
          " runtime:", {k: round(v, 1) for k, v in s["runtime_calls_per_call"].items()
                        if "Synchronize" in k or "Memcpy" in k})
    for row in s["top"]:
        print(f"   {row['ms_per_call']:8.3f} ms {row['calls_per_call']:6.1f}x  {row['op'][:90]}")


def profile_layer(args, device, dtype, acc) -> dict:
    from moe_dist.moe import MoEConfig, MoELayer
    from moe_dist.moe.experts import grouped_mm_supported

    results = {}
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    # dropless without modality; and as the models call it: capacity 1.25 and a modality tensor
    setups = {"": (dict(dropless=True), None),
              "_capacity_modality": (dict(capacity_factor=1.25), torch.zeros((), dtype=torch.long, device=device))}
    for (backend, (suffix, (kw, modality))) in [(b, s) for b in ("loop", "grouped_mm") for s in setups.items()]:
        if backend == "grouped_mm" and not grouped_mm_supported(x, (args.hidden, args.ffn, args.hidden)):
            continue
        torch.manual_seed(0)
        layer = MoELayer(MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=8, top_k=2,
                                   expert_backend=backend, **kw)).to(device, dtype)

        def call():
            out = layer(x, modality=modality)
            (out.output.float().square().mean() + out.aux_loss).backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None

        for _ in range(3):
            call()
        acc.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(args.calls):
                call()
            acc.synchronize()
            wall = time.perf_counter() - start
        name = f"moe_layer_{backend}{suffix}"
        results[name] = _summary(prof, args.calls, wall)
        with HostReads() as reads:
            call()
        results[name]["host_reads_per_call"] = reads.count
        _print(f"MoE layer E=8 k=2 {'capacity 1.25, with modality' if suffix else 'dropless'}, {backend}, "
               f"{args.tokens}x{args.hidden}x{args.ffn} {dtype}", results[name])
        print(f"   host reads per call: {reads.count} {sorted(set(reads.reads))}")
        if args.compile and (backend == "loop" or dtype == torch.bfloat16):  # grouped_mm traces in bf16 only
            results[name + "_compiled"] = profile_compiled_layer(args, layer, x, modality, acc)
    return results


def profile_compiled_layer(args, layer, x, modality, acc) -> dict:
    """The same call under torch.compile (inductor): graph breaks (dynamo's explain), kernels generated for
    the forward and backward graphs (each runs once per call: straight-line graphs), and the operators
    still dispatched per call outside them (extern kernels: GEMMs, sorts, our custom operators)."""
    from torch._inductor import metrics

    def loss_of(x):
        out = layer(x, modality=modality)
        return out.output.float().square().mean() + out.aux_loss

    torch._dynamo.reset()
    graph_breaks = torch._dynamo.explain(loss_of)(x).graph_break_count
    compiled = torch.compile(loss_of)
    metrics.reset()
    for _ in range(3):
        compiled(x).backward()
    generated = metrics.generated_kernel_count
    acc.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.device.type == "cuda" else [])) as prof:
        start = time.perf_counter()
        for _ in range(args.calls):
            compiled(x).backward()
        acc.synchronize()
        wall = time.perf_counter() - start
    s = _summary(prof, args.calls, wall)
    out = {"graph_breaks": graph_breaks, "generated_kernels": generated,
           "extern_ops_per_call": s["non_view_ops_per_call"], "wall_ms_per_call": s["wall_ms_per_call"],
           "kernels_per_call": s["kernels_per_call"] if x.device.type == "cuda" else generated + s["non_view_ops_per_call"]}
    print(f"   compiled: {graph_breaks} graph breaks, {generated} generated kernels + {out['extern_ops_per_call']:.0f} "
          f"extern operators per call; {out['kernels_per_call']:.0f} kernels per call, wall {out['wall_ms_per_call']:.2f} ms")
    return out


def profile_training(args, moe: bool, root: str, device) -> dict:
    """Steps of ``moe-dist train`` in this process, the last three recorded."""
    from bench.train_throughput import model_json
    from moe_dist.distributed import detect_env
    from moe_dist.engine import load_run_config
    from moe_dist.engine.trainer import Trainer

    name = "moe" if moe else "dense"
    sets = [f"model.name={model_json(root, moe)}", f"data.train={os.path.join(root, 'train')}",
            "data.tokenizer=openclip-bpe", f"data.workers={args.workers}", f"output_dir={root}/run-{name}",
            f"steps={args.steps}", f"batch.micro_batch={args.batch}", "ep_size=1", "zero_stage=0", "compile=none",
            "logging.progress=false", "logging.tensorboard=false", "schedule.warmup_steps=2",
            "eval.every=0"]
    cfg = load_run_config(None, sets)
    trainer = Trainer(cfg, detect_env(), resume="none")
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    forward, optimizer_s, forward_s = trainer._forward, [], []

    def timed_forward(batch):  # forward + loss, the device drained before and after (the optimizer too)
        acc.synchronize()
        start = time.perf_counter()
        out = forward(batch)
        acc.synchronize()
        forward_s.append(time.perf_counter() - start)
        return out

    trainer._forward = timed_forward
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    recorded = 3
    prof = profile(activities=activities, schedule=torch.profiler.schedule(
        wait=args.steps - recorded - 1, warmup=1, active=recorded, repeat=1))
    step = trainer.engine.step
    marks = []

    def step_and_mark(*a, **kw):
        acc.synchronize()
        start = time.perf_counter()
        result = step(*a, **kw)  # the optimizer step (fused AdamW), gradient clipping and zeroing
        acc.synchronize()
        optimizer_s.append(time.perf_counter() - start)
        marks.append(time.perf_counter())  # before prof.step(): the last one stops the trace
        prof.step()
        return result

    trainer.engine.step = step_and_mark
    try:
        with prof:
            trainer.train("none")
    finally:
        trainer.close()
    wall = marks[-1] - marks[-1 - recorded] if len(marks) > recorded else float("nan")
    with open(os.path.join(root, f"run-{name}", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "perf/data_wait_fraction" in line]
    summary = _summary(prof, recorded, wall)
    summary["data_wait_fraction_median"] = sorted(r["perf/data_wait_fraction"] for r in rows[3:])[len(rows[3:]) // 2]
    summary["samples_per_s_median"] = sorted(r["perf/samples_per_s"] for r in rows[3:])[len(rows[3:]) // 2]
    # what the optimizer step (4x the parameters of a dense model for an E=8 MoE) costs against the forward
    summary["optimizer_step_ms_median"] = 1e3 * sorted(optimizer_s[3:])[len(optimizer_s[3:]) // 2]
    summary["forward_ms_median"] = 1e3 * sorted(forward_s[3:])[len(forward_s[3:]) // 2]
    summary["optimizer_vs_forward"] = summary["optimizer_step_ms_median"] / summary["forward_ms_median"]
    print(f"   optimizer step {summary['optimizer_step_ms_median']:.1f} ms, forward + loss "
          f"{summary['forward_ms_median']:.1f} ms: {summary['optimizer_vs_forward']:.2f}x")
    _print(f"training step, {name} model, batch {args.batch}, {args.workers} workers "
           f"(data wait {summary['data_wait_fraction_median']:.2f}, {summary['samples_per_s_median']:.0f} samples/s)",
           summary)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--calls", type=int, default=3, help="layer calls recorded")
    p.add_argument("--steps", type=int, default=12, help="training steps per model (the last 3 recorded)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--compile", action="store_true", help="also capture each layer call under torch.compile")
    p.add_argument("--out", default=RESULTS)
    args = p.parse_args(argv)
    if args.steps < 5:
        p.error("--steps must be at least 5 (the last 3 are recorded after a warm-up)")
    from deepspeed.accelerator import get_accelerator

    from bench._results import save
    from bench.train_throughput import make_data
    from moe_dist.distributed import detect_env, init_distributed

    acc = get_accelerator()
    device = torch.device(acc.device_name())
    init_distributed(detect_env())
    results = {"setup": {**vars(args), "device": str(device), "torch": torch.__version__}}
    results.update(profile_layer(args, device, {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype], acc))
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as root:
            make_data(root, args.steps * args.batch + args.batch, shards=max(4, 2 * args.workers))
            for moe in (False, True):
                results[f"train_step_{'moe' if moe else 'dense'}"] = profile_training(args, moe, root, device)
    save(args.out, results)


if __name__ == "__main__":
    sys.exit(main())
