"""MoE layer speed and memory against a dense FFN and DeepSpeed's stock MoE (one process, CPU, fp32).

    python -m bench.moe_layer [--tokens 4096] [--hidden 256] [--ffn 1024] [--k 2] [--reps 12]
                              [--device cuda] [--dtype bf16]

Every variant runs one forward+backward per round; rounds interleave the variants so machine noise
hits them alike; the table reports medians, and each ratio is the median of the per-round ratios.
    R1 = T(ours, dropless, E=8) / (k * T(dense FFN))          target <= 1.05
    R1_saved_activation: the loop backend with ``recompute_activation=False`` (act(h) kept for backward,
        as the dense FFN keeps it, instead of recomputed: more memory, one elementwise pass less);
        saved_activation_vs_recompute = T(that) / T(ours, loop), per round
    R2 = T(ours, dropless, E=8) / T(deepspeed MoE, cf 1.25)   target <= 0.75
    R4 = T(ours, E=64) / T(ours, E=8)                         target <= 1.10
    R1_floor = T(experts alone, E=8) / (k * T(dense FFN)): our expert loop (GEMMs, activation and its
        recompute, bias gradients) on rows already sorted by expert, k * tokens / E rows each: what any
        layer built on these experts pays before routing, dispatch and combine; R1_vs_floor = R1 /
        R1_floor per round; R2_floor = T(experts alone, E=8) / T(deepspeed MoE, cf 1.25)
    R4_floor = T(GEMMs alone, E=64) / T(GEMMs alone, E=8): the per-expert forward and backward matmuls
        into preallocated outputs (no routing, no autograd, no allocation), the same rows per expert;
        R4_vs_floor = R4 / R4_floor (per round), target <= 1.05
    time_vs_experts: T(ours, dropless, E) for E = 8 ... 128 at fixed tokens and k (fixed active FLOPs),
        relative to E=8, with the least-squares slope per doubling of E
    --compile adds the dense FFN and our E=8 layer (capacity 1.25, the expert backend ``auto`` picks)
        under torch.compile: R1_compiled = T(ours compiled) / (k * T(dense compiled)), target <= 1.25 on a
        GPU in bf16; moe_layer_compiled_vs_eager = T(ours compiled) / T(ours eager, same config)
Each ratio's ``<key>_spread`` is its [min, max] over the rounds. ``page_faults_per_step``: the median
minor page faults of each variant's round (memory the allocator handed back fresh from the kernel).
The bench runs under the allocator CPU training uses (tcmalloc when installed; re-executes itself with
it; ``MOE_DIST_ALLOCATOR=system`` measures glibc). Memory is the bytes autograd saves for backward (unique storages), the layer's training-time
activation footprint, relative to k dense FFNs. Results go to bench/results/moe_layer.json.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import torch
from torch import nn

from bench._results import save
from moe_dist.distributed import detect_env, init_distributed
from moe_dist.distributed.allocator import allocator_env
from moe_dist.moe import MoEConfig, MoELayer
from moe_dist.moe.experts import grouped_mm_supported

RESULTS = os.path.join(os.path.dirname(__file__), "results", "moe_layer.json")
EXPERT_COUNTS = (8, 16, 32, 64, 128)


def _ours_name(num_experts: int) -> str:
    return "ours_dropless_E8_loop" if num_experts == 8 else f"ours_dropless_E{num_experts}"


def _spread(values) -> list:
    """[min, max] over rounds."""
    return [min(values), max(values)]


def _slope_per_doubling(counts, times) -> float:
    """Least-squares slope of T(E) / T(8) (per-round medians) against log2(E): the time added per doubling."""
    import math

    xs = [math.log2(e) for e in counts]
    base = statistics.median(times["ours_dropless_E8_loop"])
    ys = [statistics.median(times[_ours_name(e)]) / base for e in counts]
    mx, my = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def deepspeed_moe(args, num_experts: int) -> nn.Module:
    from deepspeed.moe.layer import MoE

    expert = nn.Sequential(nn.Linear(args.hidden, args.ffn), nn.GELU(), nn.Linear(args.ffn, args.hidden))
    layer = MoE(args.hidden, expert, num_experts=num_experts, k=args.k, capacity_factor=1.25,
                eval_capacity_factor=1.25, min_capacity=4)
    layer.set_deepspeed_parallelism()
    return layer


def ours(args, num_experts: int, **kw) -> nn.Module:
    return MoELayer(MoEConfig(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_experts=num_experts,
                              top_k=args.k, **kw))


class ExpertsAlone:
    """Our loop-backend experts, forward and backward, on ``rows`` rows already sorted by expert (an
    equal share each): the layer without router, dispatch and combine."""

    def __init__(self, rows: int, hidden: int, ffn: int, num_experts: int, **like):
        from moe_dist.moe.experts import GroupedExperts

        self.experts = GroupedExperts(num_experts, hidden, ffn, backend="loop").to(**like)
        self.x = torch.randn(rows, hidden, requires_grad=True, **like)
        self.offs = torch.arange(1, num_experts + 1, dtype=torch.int32) * (rows // num_experts)

    def __call__(self) -> None:
        self.experts(self.x, self.offs).square().mean().backward()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.experts.zero_grad(set_to_none=set_to_none)
        self.x.grad = None


class RawGemms:
    """The expert GEMMs of one forward+backward alone: h = x_e w1_e, y = h w2_e, then dW2, dH, dW1, dX,
    each ``torch.matmul(..., out=)`` into preallocated buffers, rows split evenly over E experts."""

    def __init__(self, rows: int, hidden: int, ffn: int, num_experts: int, **like):
        n = rows // num_experts
        E, D, H = num_experts, hidden, ffn
        self.x, self.dy = torch.randn(E, n, D, **like), torch.randn(E, n, D, **like)
        self.w1, self.w2 = torch.randn(E, D, H, **like), torch.randn(E, H, D, **like)
        self.h, self.dh = torch.empty(E, n, H, **like), torch.empty(E, n, H, **like)
        self.y, self.dx = torch.empty(E, n, D, **like), torch.empty(E, n, D, **like)
        self.dw1, self.dw2 = torch.empty(E, D, H, **like), torch.empty(E, H, D, **like)

    def __call__(self) -> None:
        for e in range(self.x.shape[0]):
            torch.matmul(self.x[e], self.w1[e], out=self.h[e])
            torch.matmul(self.h[e], self.w2[e], out=self.y[e])
            torch.matmul(self.h[e].T, self.dy[e], out=self.dw2[e])
            torch.matmul(self.dy[e], self.w2[e].T, out=self.dh[e])
            torch.matmul(self.x[e].T, self.dh[e], out=self.dw1[e])
            torch.matmul(self.dh[e], self.w1[e].T, out=self.dx[e])

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass


def _loss(module, x):
    out = module(x)
    if isinstance(out, tuple):  # deepspeed: (output, l_aux, exp_counts)
        return out[0].square().mean() + out[1]
    if hasattr(out, "output"):
        return out.output.square().mean() + out.aux_loss
    return out.square().mean()


def saved_bytes(module, x) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward during one forward."""
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:  # weights are not activation memory
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = _loss(module, x)
    loss.backward()
    module.zero_grad(set_to_none=True)
    return sum(seen.values()) - x.numel() * x.element_size()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="timed rounds (after 2 warm-up rounds)")
    parser.add_argument("--device", default="", help="default: the accelerator DeepSpeed detects")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="also time the dense FFN and our layer compiled")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    changes = allocator_env(os.environ)  # the allocator CPU ranks train with (MOE_DIST_ALLOCATOR=system: glibc)
    if changes:
        os.execve(sys.executable, [sys.executable, "-m", "bench.moe_layer", *(sys.argv[1:] if argv is None else argv)],
                  {**os.environ, **changes})
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    device = torch.device(args.device or accelerator.device_name())
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    init_distributed(detect_env())  # DeepSpeed's MoE needs a process group even for one rank
    torch.manual_seed(0)

    variants = {
        "dense_ffn": nn.Sequential(nn.Linear(args.hidden, args.ffn), nn.GELU(), nn.Linear(args.ffn, args.hidden)),
        "ours_dropless_E8_loop": ours(args, 8, dropless=True, expert_backend="loop"),
        "ours_dropless_E8_grouped_mm": ours(args, 8, dropless=True, expert_backend="grouped_mm"),
        "ours_dropless_E8_saved_act": ours(args, 8, dropless=True, expert_backend="loop", recompute_activation=False),
        "ours_capacity1.25_E8": ours(args, 8, capacity_factor=1.25),
        "ours_dropless_E64": ours(args, 64, dropless=True),
        "deepspeed_cf1.25_E8": deepspeed_moe(args, 8),
        "deepspeed_cf1.25_E64": deepspeed_moe(args, 64),
        **{f"ours_dropless_E{e}": ours(args, e, dropless=True) for e in EXPERT_COUNTS if e not in (8, 64)},
    }
    if args.compile:
        variants["ours_capacity1.25_E8_auto"] = ours(args, 8, capacity_factor=1.25)
        variants["dense_ffn_compiled"] = variants["dense_ffn"]
        variants["ours_capacity1.25_E8_compiled"] = variants["ours_capacity1.25_E8_auto"]
    variants = {name: module.to(device, dtype) for name, module in variants.items()}
    if args.compile:  # the same modules (and weights), compiled
        for name in ("dense_ffn_compiled", "ours_capacity1.25_E8_compiled"):
            variants[name] = torch.compile(variants[name])
    gemms = {f"gemms_E{e}": RawGemms(args.tokens * args.k, args.hidden, args.ffn, e, device=device, dtype=dtype)
             for e in (8, 64)}
    gemms["experts_alone_E8"] = ExpertsAlone(args.tokens * args.k, args.hidden, args.ffn, 8, device=device, dtype=dtype)
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    if not grouped_mm_supported(x, (args.hidden, args.ffn, args.hidden)):  # e.g. fp32 on CUDA: bf16-only kernel
        print(f"grouped_mm does not run {dtype} on {device}: left out")
        del variants["ours_dropless_E8_grouped_mm"]
    times = {name: [] for name in [*variants, *gemms]}
    faults = {name: [] for name in times}  # minor page faults (fresh memory touched) per round
    for rnd in range(args.reps + 2):
        for name, module in [*variants.items(), *gemms.items()]:
            accelerator.synchronize()
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            if name in gemms:
                module()
            else:
                _loss(module, x).backward()
            accelerator.synchronize()
            elapsed = time.perf_counter() - start
            module.zero_grad(set_to_none=True)
            x.grad = None
            if rnd >= 2:
                times[name].append(elapsed)
                faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    med = {name: statistics.median(t) for name, t in times.items()}
    mem = {name: 0 if name.endswith("_compiled") else saved_bytes(module, x)  # (saved-tensor hooks do not trace)
           for name, module in variants.items()}
    variants.update(gemms)
    mem.update({name: 0 for name in gemms})
    dense = med["dense_ffn"]
    best = min((n for n in ("ours_dropless_E8_loop", "ours_dropless_E8_grouped_mm") if n in med), key=med.get)

    def per_round(a: str, b: str, scale: float = 1.0) -> list:
        """T(a) / (scale x T(b)) in each round: both sides share the round's machine state."""
        return [x / (scale * y) for x, y in zip(times[a], times[b])]

    def ratio(a: str, b: str, scale: float = 1.0) -> float:
        return statistics.median(per_round(a, b, scale))

    vs_floor = [r / f for r, f in zip(per_round("ours_dropless_E64", best), per_round("gemms_E64", "gemms_E8"))]
    r1_vs_floor = [r / f for r, f in zip(per_round("ours_dropless_E8_loop", "dense_ffn", args.k),
                                         per_round("experts_alone_E8", "dense_ffn", args.k))]

    results = {
        "R1": ratio(best, "dense_ffn", args.k),
        "R2": ratio(best, "deepspeed_cf1.25_E8"),
        "R4": ratio("ours_dropless_E64", best),
        "R1_deepspeed": ratio("deepspeed_cf1.25_E8", "dense_ffn", args.k),
        "R1_floor": ratio("experts_alone_E8", "dense_ffn", args.k),
        "R1_vs_floor": statistics.median(r1_vs_floor),  # the loop backend (the floor is its experts)
        "R1_vs_floor_spread": _spread(r1_vs_floor),
        "R2_floor": ratio("experts_alone_E8", "deepspeed_cf1.25_E8"),
        "R4_floor": ratio("gemms_E64", "gemms_E8"),
        "R4_vs_floor": statistics.median(vs_floor),
        "R1_saved_activation": ratio("ours_dropless_E8_saved_act", "dense_ffn", args.k),
        "R1_spread": _spread(per_round(best, "dense_ffn", args.k)),
        "R1_saved_activation_spread": _spread(per_round("ours_dropless_E8_saved_act", "dense_ffn", args.k)),
        "saved_activation_vs_recompute": ratio("ours_dropless_E8_saved_act", "ours_dropless_E8_loop"),
        "saved_activation_vs_recompute_spread": _spread(per_round("ours_dropless_E8_saved_act",
                                                                  "ours_dropless_E8_loop")),
        "R2_spread": _spread(per_round(best, "deepspeed_cf1.25_E8")),
        "R4_spread": _spread(per_round("ours_dropless_E64", best)),
        "R4_floor_spread": _spread(per_round("gemms_E64", "gemms_E8")),
        "R4_vs_floor_spread": _spread(vs_floor),
        "time_vs_experts": {str(e): ratio(_ours_name(e), "ours_dropless_E8_loop") for e in EXPERT_COUNTS},
        "R4_deepspeed": ratio("deepspeed_cf1.25_E64", "deepspeed_cf1.25_E8"),
        "R1_loop": ratio("ours_dropless_E8_loop", "dense_ffn", args.k),
        "R1_grouped_mm": ratio("ours_dropless_E8_grouped_mm", "dense_ffn", args.k) if "ours_dropless_E8_grouped_mm"
        in times else None,
        "memory_vs_k_dense": mem["ours_dropless_E8_loop"] / (args.k * mem["dense_ffn"]),
        "memory_vs_k_dense_deepspeed": mem["deepspeed_cf1.25_E8"] / (args.k * mem["dense_ffn"]),
        "memory_vs_k_dense_saved_activation": mem["ours_dropless_E8_saved_act"] / (args.k * mem["dense_ffn"]),
        "time_vs_experts_slope_per_doubling": _slope_per_doubling(EXPERT_COUNTS, times),
        **({"R1_compiled": ratio("ours_capacity1.25_E8_compiled", "dense_ffn_compiled", args.k),
            "R1_compiled_spread": _spread(per_round("ours_capacity1.25_E8_compiled", "dense_ffn_compiled", args.k)),
            "R1_eager_same_config": ratio("ours_capacity1.25_E8_auto", "dense_ffn", args.k),
            "moe_layer_compiled_vs_eager": ratio("ours_capacity1.25_E8_compiled", "ours_capacity1.25_E8_auto")}
           if args.compile else {}),
        "median_ms": {name: 1e3 * t for name, t in med.items()},
        "page_faults_per_step": {name: statistics.median(f) for name, f in faults.items()},
        "saved_mb": {name: m / 2 ** 20 for name, m in mem.items()},
        "setup": {"tokens": args.tokens, "hidden": args.hidden, "ffn": args.ffn, "k": args.k, "reps": args.reps,
                  "threads": torch.get_num_threads(), "torch": torch.__version__, "dtype": str(dtype),
                  "device": str(device), "allocator": os.environ.get("LD_PRELOAD") or "glibc", "faster_backend": "grouped_mm" if "grouped" in best else "loop"},
    }
    print(f"{'variant':32s} {'median ms':>10s} {'x k*dense':>10s} {'saved MB':>9s} {'faults/step':>12s}")
    for name in variants:
        print(f"{name:32s} {1e3 * med[name]:10.1f} {med[name] / (args.k * dense):10.3f} {mem[name] / 2 ** 20:9.1f} "
              f"{results['page_faults_per_step'][name]:12.0f}")
    print()
    for key, target in (("R1", "<= 1.05"), ("R1_floor", ""), ("R1_vs_floor", ""), ("R1_saved_activation", ""),
                        ("saved_activation_vs_recompute", ""), ("R2", "<= 0.75"), ("R2_floor", ""),
                        ("R4", "<= 1.10"), ("R4_floor", ""),
                        ("R4_vs_floor", "<= 1.05"), ("time_vs_experts_slope_per_doubling", ""), ("R1_deepspeed", ""),
                        ("R4_deepspeed", ""), ("memory_vs_k_dense", ""), ("memory_vs_k_dense_deepspeed", ""),
                        ("memory_vs_k_dense_saved_activation", ""),
                        *((("R1_compiled", "<= 1.25"), ("R1_eager_same_config", ""), ("moe_layer_compiled_vs_eager", ""))
                          if args.compile else ())):
        spread = results.get(f"{key}_spread")
        rounds = f"rounds {spread[0]:.3f}-{spread[1]:.3f}" if spread else ""
        print(f"{key:34s} {results[key]:6.3f}  {target:8s} {rounds}")
    print("time vs E (dropless, fixed tokens and k):",
          "  ".join(f"E={e} {r:.3f}" for e, r in results["time_vs_experts"].items()))
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
