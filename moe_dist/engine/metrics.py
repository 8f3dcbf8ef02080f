"""Rank 0's view of training: TensorBoard scalars and expert-load histograms, metrics.jsonl, a
progress bar with ETA, and the one-screen summary at start."""

from __future__ import annotations

import json
import os
import resource
from typing import Dict, Optional

import torch
from tqdm import tqdm

MODALITIES = ("", "/image", "/text")


def memory_mb() -> Dict[str, float]:
    from deepspeed.accelerator import get_accelerator

    out = {"memory/host_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        out["memory/device_allocated_mb"] = accelerator.memory_allocated() / 2 ** 20
        out["memory/device_max_allocated_mb"] = accelerator.max_memory_allocated() / 2 ** 20
    return out


def read_scalars(values: Dict[str, object]) -> Dict[str, float]:
    """``values`` (tensors of one element on any device, numbers, or None for 0.0) as floats, with every
    tensor read in one device-to-host copy: each ``float(tensor)`` is its own copy and host sync."""
    tensors = {k: v for k, v in values.items() if torch.is_tensor(v)}
    read = {}
    if tensors:
        stacked = torch.stack([v.detach().reshape(()).to(torch.float64) for v in tensors.values()])
        read = dict(zip(tensors, stacked.tolist()))
    return {k: read[k] if k in read else 0.0 if v is None else float(v) for k, v in values.items()}


def stats_to_host(layer_stats: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
    """Every layer's statistics on the host, in one device-to-host copy (exact: counts stay below 2^53)."""
    items = [(layer, key, t) for layer, stats in layer_stats.items() for key, t in stats.items()]
    if all(t.device.type == "cpu" for _, _, t in items):
        return layer_stats
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for _, _, t in items]).cpu()
    out: Dict[str, Dict[str, torch.Tensor]] = {layer: {} for layer in layer_stats}
    offset = 0
    for layer, key, t in items:
        out[layer][key] = flat[offset:offset + t.numel()].view(t.shape).to(t.dtype)
        offset += t.numel()
    return out


# per-expert load keys: token counts, or Soft MoE's slot weights (moe/soft.py)
LOAD_KEYS = ("tokens_per_expert", "slot_weight_per_expert")


def moe_scalars(layer_stats: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Per layer: dropped fraction and router entropy (overall and per modality), and from the expert
    loads: the busiest expert's load over the mean (1 = balanced) and the experts with no load."""
    out = {}
    for layer, stats in layer_stats.items():
        for suffix in MODALITIES:
            for name in ("dropped_fraction", "router_entropy"):
                if name + suffix in stats and int(stats["num_tokens" + suffix]) > 0:
                    out[f"moe/{name}{suffix}/{layer}"] = float(stats[name + suffix])
        load = next((stats[key] for key in LOAD_KEYS if key in stats), None)
        if load is not None and float(load.sum()) > 0:
            load = load.double()
            out[f"moe/load_max_over_mean/{layer}"] = float(load.max() / load.mean())
            out[f"moe/dead_experts/{layer}"] = float((load == 0).sum())
    return out


class ExpertLoadWindow:
    """Per-expert token counts summed over the micro-batches of a logging window and, when logged, over
    all ranks (rank 0's last micro-batch alone would show a sample of one)."""

    PREFIX = LOAD_KEYS

    def __init__(self):
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}

    def add(self, layer_stats: Dict[str, Dict[str, torch.Tensor]]) -> None:
        for layer, stats in layer_stats.items():
            acc = self.sums.setdefault(layer, {})
            for key, value in stats.items():
                if key.startswith(self.PREFIX):
                    acc[key] = acc.get(key, 0) + value.detach().double()

    def reduce(self, layer_stats: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, Dict[str, torch.Tensor]]:
        """``layer_stats`` with its per-expert counts replaced by the window's all-rank sums (collective:
        every rank calls it at the same step); the window starts afresh."""
        import deepspeed.comm as dist

        keys = [(layer, key) for layer in sorted(self.sums) for key in sorted(self.sums[layer])]
        if not keys:
            return layer_stats
        flat = torch.cat([self.sums[layer][key].flatten() for layer, key in keys])
        dist.all_reduce(flat)
        out = {layer: dict(stats) for layer, stats in layer_stats.items()}
        offset = 0
        for layer, key in keys:
            n = self.sums[layer][key].numel()
            out.setdefault(layer, {})[key] = flat[offset:offset + n]
            offset += n
        self.sums = {}
        return out


class MetricsLogger:
    """Does nothing on ranks other than 0."""

    def __init__(self, output_dir: str, rank: int, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress: bool = True):
        self.active = rank == 0
        self.writer = None
        self.jsonl = None
        self.bar: Optional[tqdm] = None
        if not self.active:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.jsonl = open(os.path.join(output_dir, "metrics.jsonl"), "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = os.path.join(output_dir, "tensorboard")
            self.writer = SummaryWriter(self.tb_dir)
        self.bar = tqdm(total=total_steps, initial=start_step, unit="step", desc="train", disable=not progress,
                        dynamic_ncols=True)

    def log(self, step: int, scalars: Dict[str, float], layer_stats: Dict[str, Dict[str, torch.Tensor]]) -> None:
        if not self.active or not (scalars or layer_stats):
            return
        layer_stats = stats_to_host(layer_stats)
        scalars = {**scalars, **moe_scalars(layer_stats)}
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            for layer, stats in layer_stats.items():
                for suffix in MODALITIES:
                    counts = stats.get("tokens_per_expert" + suffix)
                    if counts is not None and int(counts.sum()) > 0:
                        self._expert_histogram(f"moe/expert_load{suffix}/{layer}", counts, step)
                weights = stats.get("slot_weight_per_expert")
                if weights is not None and float(weights.sum()) > 0:
                    self._expert_histogram(f"moe/slot_weight/{layer}", weights, step)
            self.writer.flush()

    def _expert_histogram(self, tag: str, counts: torch.Tensor, step: int) -> None:
        """Exact per-expert token counts as a TensorBoard histogram (bucket e = expert e)."""
        counts = counts.double().cpu()
        experts = torch.arange(len(counts), dtype=torch.float64)
        self.writer.add_histogram_raw(tag, min=0.0, max=float(len(counts) - 1), num=float(counts.sum()),
                                      sum=float((experts * counts).sum()),
                                      sum_squares=float((experts ** 2 * counts).sum()),
                                      bucket_limits=(experts + 0.5).tolist(), bucket_counts=counts.tolist(),
                                      global_step=step)

    def progress(self, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.0f}", refresh=False)
            self.bar.refresh()

    def print(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        self.jsonl.close()
        self.active = False  # closing again does nothing


def summary(cfg, env, model_cfg, params: Dict[str, int], ds_config: Dict[str, object]) -> str:
    dp = env.world_size
    lines = [
        "=" * 72,
        f"moe-dist train  model={model_cfg.name} ({model_cfg.kind})  launcher={env.launcher}",
        f"world size {env.world_size}: data-parallel {dp}, expert-parallel {cfg.ep_size} "
        f"(x{env.world_size // cfg.ep_size} expert replicas), ZeRO-{cfg.zero_stage}, {cfg.precision}",
        f"params: total {params['total']:,}  experts {params['expert']:,}  active/image {params['active/image']:,}  "
        f"active/text {params['active/text']:,}",
        f"batch: global {ds_config['train_batch_size']} = micro {ds_config['train_micro_batch_size_per_gpu']} x "
        f"accum {ds_config['gradient_accumulation_steps']} x dp {dp}; steps {cfg.steps}",
        f"deepspeed: {json.dumps(ds_config, sort_keys=True)}",
        f"output: {os.path.abspath(cfg.output_dir)}",
        "=" * 72,
    ]
    return "\n".join(lines)
