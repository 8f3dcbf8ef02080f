"""Peak memory per rank of real training steps: model states plus activations, on CPU and on accelerators.

    python -m bench.memory [--steps 2] [--models tiny,small] [--micro-batch 8] [--checkpointing none,blocks]
                           [--zero 0,1,2] [--world-size 2] [--set KEY=VALUE ...]
    python -m bench.memory --layouts 2:1,4:1,4:2,8:1,8:2,8:4 [--zero 0,1,2] [--precision fp32]
                           [--set zero_bucket_elements=N] [--out bench/results/memory_layouts.json]
    from bench.memory import measure; measure("configs/runs/tiny-synth.yaml", ["zero_stage=1"], world_size=2)

What is measured (``measure``): ``world_size`` real ranks (spawned processes, the accelerator's
backend: gloo on CPU, NCCL on CUDA) each build the run's model exactly as ``moe-dist train`` does
(``build_model``, ``configure_blocks`` for ``activation_checkpointing`` / ``compile``, AdamW groups,
``deepspeed.initialize`` with the generated DeepSpeed config: ZeRO stage, precision, ep_size) and train
``steps`` steps on random images and token sequences of the run's ``batch.micro_batch`` (no data
loader, so no worker processes and no decoded-sample buffers are counted). Bytes are those of live
tensors the process allocated since just before the model was built:
    CPU:  the allocation and free events of torch's CPU allocator as torch.profiler records them
          (``profile_memory=True``), summed in time order. The interpreter, imported libraries, the
          allocator's cached or fragmented pages and the data pipeline are not counted (RSS would
          count them: ``max_rss_bytes`` is reported beside it for comparison). Allocations made on
          threads the profiler does not follow (gloo's own buffers) are not counted either.
    CUDA: ``max_memory_allocated`` / ``memory_allocated`` of the accelerator (peak stats reset before
          the model is built), the same definition (live tensors, not the caching allocator's reserve).
Per rank: ``peak_bytes`` (the highest live total during the training steps: parameters, gradients,
optimizer states, activations, communication buffers), ``init_peak_bytes`` (the highest during
``deepspeed.initialize``, which makes flat copies), ``states_bytes`` (live at the start of the last step:
parameters, optimizer states, and whatever gradient buffers ZeRO keeps between steps), ``step_bytes``
(= peak of the last step - states_bytes: activations, gradients, transient buffers), ``phase_peak_bytes``
(the same for its forward, backward and optimizer step), ``param_bytes``
(this rank's parameter tensors, counted from the module), ``max_rss_bytes``. The first step allocates
the Adam moments, so ``steps`` >= 2 gives a steady-state last step.

What each step sends and computes, per rank (none of it allocates tensors the tracker would count):
``losses`` (the total loss of each step), ``all_to_all_bytes`` (per step: what the MoE dispatchers'
``Traffic`` counters saw), ``comm`` (per step and phase (forward, backward, step): the bytes DeepSpeed's
collectives sent, by operation, as ``moe_dist/distributed/comm_count.py`` counts them). With ``same_init`` every rank
starts from the ep_size-1 model of the run's seed (rank r of an expert-parallel group holds its experts
[rL, (r+1)L)), so runs of different ep_size train the same model on the same batches.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing as mp
import os
import queue
import resource
import traceback
from typing import Dict, List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "memory.json")
LAYOUTS = os.path.join(ROOT, "bench", "results", "memory_layouts.json")
TINY = os.path.join(ROOT, "configs", "runs", "tiny-synth.yaml")
MARK = "moe_dist.bench.memory."


def measure(config_path: str, overrides: Sequence[str] = (), world_size: int = 2, steps: int = 2,
            timeout: float = 900.0, same_init: bool = False) -> dict:
    """Peak memory per rank of ``steps`` training steps of a run config (see the module docstring).

    Args:
        config_path: a run YAML (``moe-dist train --config``).
        overrides: ``a.b=c`` strings, as ``--set`` takes them (e.g. ``["zero_stage=1",
            "activation_checkpointing=blocks"]``).
        world_size: ranks to start (ep_size must divide it).
        steps: optimizer steps (>= 2 for a steady state; the first allocates the optimizer states).
        same_init: start from the ep_size-1 model's weights (see the module docstring).

    Returns:
        {"config", "overrides", "world_size", "steps", "device", "method",
         "per_rank": [{"rank", "peak_bytes", "init_peak_bytes", "states_bytes", "step_bytes",
         "param_bytes", "max_rss_bytes", "losses", "all_to_all_bytes", "comm"}, ...]}. Raises
        RuntimeError with the failing rank's traceback.
    """
    from moe_dist.distributed import free_port
    from moe_dist.engine.config import load_run_config

    cfg = load_run_config(config_path, list(overrides))
    cfg.data.train = cfg.data.train or "unused"  # the data section is not used here
    cfg.validate(world_size)  # a bad override fails here, before any rank starts
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, config_path, list(overrides), steps, same_init,
                                                     results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    per_rank: Dict[int, dict] = {}
    try:
        while len(per_rank) < world_size:
            rank, ok, value = results.get(timeout=timeout)
            if not ok:
                raise RuntimeError(f"bench.memory rank {rank} failed:\n{value}")
            per_rank[rank] = value
    except queue.Empty:
        raise RuntimeError(f"bench.memory: no result from ranks {sorted(set(range(world_size)) - set(per_rank))} "
                           f"after {timeout:.0f} s") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    device = per_rank[0].pop("device")
    for r in per_rank.values():
        r.pop("device", None)
    return {"config": os.path.relpath(config_path, ROOT), "overrides": list(overrides), "world_size": world_size,
            "steps": steps, "device": device,
            "method": "cpu allocator events (torch.profiler)" if device == "cpu" else "max_memory_allocated",
            "per_rank": [per_rank[r] for r in range(world_size)]}


def _rank_entry(rank, world_size, port, config_path, overrides, steps, same_init, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    try:
        import deepspeed
        import torch
        from deepspeed.accelerator import get_accelerator

        torch.set_num_threads(1)
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
        results.put((rank, True, _measure_rank(rank, world_size, config_path, overrides, steps, same_init)))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _measure_rank(rank: int, world_size: int, config_path: str, overrides: List[str], steps: int,
                  same_init: bool) -> dict:
    import torch
    from deepspeed.accelerator import get_accelerator

    from moe_dist.distributed.comm_count import CommCounter
    from moe_dist.engine.config import load_run_config
    from moe_dist.models.moe_blocks import moe_mlps
    from moe_dist.moe.dispatch import Traffic

    cfg = load_run_config(config_path, overrides)
    accelerator = get_accelerator()
    on_cpu = accelerator.device_name() == "cpu"
    reference = _ep1_weights(cfg, rank) if same_init else None  # before tracking: its bytes are not the run's
    tracker = _CpuTracker() if on_cpu else _AcceleratorTracker(accelerator)
    losses, all_to_all, comm = [], [], []
    with tracker:
        with tracker.phase("init"):
            engine, loss_fn, dtype, model_cfg = _build(cfg, rank, world_size, reference)
        dispatchers = [m.moe.dispatcher for m in moe_mlps(engine.module)]
        gen = torch.Generator().manual_seed(1000 + rank)
        for step in range(steps):
            images, text = _random_batch(model_cfg, cfg.batch.micro_batch, gen)
            for d in dispatchers:
                d.traffic = Traffic()
            with tracker.phase(f"step{step}"), CommCounter() as counter:
                counter.phase = "forward"
                with tracker.phase(f"step{step}/forward"):
                    out = engine(images.to(engine.device, dtype=dtype), text.to(engine.device))
                    loss = loss_fn(out).total
                counter.phase = "backward"
                with tracker.phase(f"step{step}/backward"):
                    engine.backward(loss)
                counter.phase = "step"
                with tracker.phase(f"step{step}/step"):
                    engine.step()
                losses.append(loss.item())
                del out, loss
            all_to_all.append(sum(d.traffic.rows + d.traffic.counts for d in dispatchers))
            comm.append(counter.report())
    last = tracker.phases[f"step{steps - 1}"]
    return {"rank": rank, "peak_bytes": max(tracker.phases[f"step{s}"]["peak"] for s in range(steps)),
            "init_peak_bytes": tracker.phases["init"]["peak"], "states_bytes": last["start"],
            "step_bytes": last["peak"] - last["start"],
            "param_bytes": sum(p.numel() * p.element_size() for p in engine.module.parameters()),
            "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "phase_peak_bytes": {p: tracker.phases[f"step{steps - 1}/{p}"]["peak"] - last["start"]
                                 for p in ("forward", "backward", "step")},
            "losses": losses, "all_to_all_bytes": all_to_all, "comm": comm,
            "device": accelerator.device_name()}


def _ep1_weights(cfg, rank: int) -> Dict[str, object]:
    """This rank's share of the ep_size-1 model of ``cfg.seed`` (``expert_parallel_share``)."""
    import torch

    from moe_dist.models import build_model, expert_parallel_share

    torch.manual_seed(cfg.seed)
    return expert_parallel_share(build_model(cfg.model_config()), cfg.ep_size, rank % cfg.ep_size)


def _build(cfg, rank: int, world_size: int, reference=None):
    """The model, optimizer and engine as ``engine/trainer.py`` builds them (weights from ``reference``
    when given)."""
    import deepspeed
    import torch

    from moe_dist.engine.optim import build_optimizer, build_schedule
    from moe_dist.models import build_model
    from moe_dist.models.loss import ContrastiveLoss
    from moe_dist.models.moe_blocks import configure_blocks

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    model = build_model(model_cfg, ep_size=cfg.ep_size)
    if reference is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(reference[name])
    from deepspeed.accelerator import get_accelerator

    configure_blocks(model, cfg.activation_checkpointing, cfg.compile, get_accelerator().device_name())
    optimizer = build_optimizer(model, cfg)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=build_schedule(optimizer, cfg),
                                      config=cfg.deepspeed_config(world_size))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
    return engine, ContrastiveLoss(model_cfg.loss, rank, world_size), dtype, model_cfg


def _random_batch(model_cfg, batch: int, gen):
    """Images [B, 3, S, S] and token ids [B, C] with an EOS and padding after it (text padding is not routed)."""
    import torch

    v, t = model_cfg.vision, model_cfg.text
    images = torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)
    C = t.context_length
    lengths = torch.randint(C // 4, C, (batch,), generator=gen)
    text = torch.randint(4, t.vocab_size, (batch, C), generator=gen)
    positions = torch.arange(C)[None, :]
    text = torch.where(positions == lengths[:, None], t.eos_id, text)
    return images, torch.where(positions > lengths[:, None], t.pad_id, text)


class _CpuTracker:
    """Live CPU tensor bytes over time from the profiler's allocator events; ``phases[name]`` holds the
    live total at the phase's start and its peak."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.phases: Dict[str, Dict[str, int]] = {}
        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def phase(self, name: str):
        from torch.profiler import record_function

        return record_function(MARK + name)

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return False
        events = self._prof.profiler.kineto_results.events()
        memory = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
        times = [t for t, _ in memory]
        live = list(itertools.accumulate(n for _, n in memory))
        import bisect

        for e in events:
            if not e.name().startswith(MARK):
                continue
            lo = bisect.bisect_left(times, e.start_ns())
            hi = bisect.bisect_right(times, e.start_ns() + e.duration_ns())
            start = live[lo - 1] if lo else 0
            self.phases[e.name()[len(MARK):]] = {"start": start, "peak": max(live[lo:hi], default=start)}
        return False


class _AcceleratorTracker:
    """The accelerator's own counters (CUDA: the caching allocator's allocated bytes)."""

    def __init__(self, accelerator):
        self.acc = accelerator
        self.phases: Dict[str, Dict[str, int]] = {}

    def __enter__(self):
        self.acc.synchronize()
        self.acc.reset_peak_memory_stats()
        self._base = self.acc.memory_allocated()
        return self

    def __exit__(self, *exc):
        return False

    def phase(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def run():
            self.acc.synchronize()
            self.acc.reset_peak_memory_stats()
            start = self.acc.memory_allocated() - self._base
            yield
            self.acc.synchronize()
            self.phases[name] = {"start": start, "peak": self.acc.max_memory_allocated() - self._base}

        return run()


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:9.1f}"


def planned(overrides: Sequence[str], world_size: int) -> dict:
    """The planner's estimate (``moe_dist.planner.estimate``) of TINY + ``overrides`` on one node of
    ``world_size`` GPUs."""
    from moe_dist.engine.config import load_run_config
    from moe_dist.planner import Cluster, Hardware, Layout, estimate, model_facts

    cfg = load_run_config(TINY, list(overrides))
    layout = Layout(cfg.ep_size, cfg.zero_stage, cfg.batch.micro_batch)
    return estimate(model_facts(cfg), cfg, Cluster(1, world_size), Hardware(), layout)


def layout_table(layouts: Sequence[str], zeros: Sequence[str], precision: str, micro_batch: int, steps: int,
                 sets: Sequence[str], out: str) -> None:
    """``--layouts``: moe-clip-tiny at each W:ep layout and ZeRO stage. Per layout: the largest peak and
    states (bytes live between steps: parameters and optimizer states) over the ranks, the planner's
    (states: parameters + optimizer), and each ZeRO stage's states over those of the same ep_size at the
    smallest W measured (how they fall with the data-parallel size), measured and planned."""
    from bench._results import save

    rows, base = [], {}
    print(f"{'W':>2} {'ep':>2} {'edp':>3} {'Z':>1} {'peak MiB':>8} {'planned':>8} {'ratio':>5} {'states':>8} "
          f"{'planned':>8} {'ratio':>5} {'states/W0 meas':>14} {'planned':>7}")
    for layout, zero in itertools.product(layouts, zeros):
        W, ep = (int(x) for x in layout.split(":"))
        overrides = ["model.name=moe-clip-tiny", f"ep_size={ep}", f"zero_stage={zero}", f"precision={precision}",
                     "activation_checkpointing=none", f"batch.micro_batch={micro_batch}", *sets]
        run = measure(TINY, overrides, world_size=W, steps=steps)
        plan = planned(overrides, W)["per_gpu_bytes"]
        peak, states = (max(r[k] for r in run["per_rank"]) for k in ("peak_bytes", "states_bytes"))
        states_plan = plan["parameters"] + plan["optimizer"]
        first = base.setdefault((ep, zero), (states, states_plan))
        row = {"world_size": W, "ep_size": ep, "expert_data_parallel": W // ep, "zero_stage": int(zero),
               "precision": precision, "peak_bytes": peak, "planned_peak_bytes": plan["total"],
               "states_bytes": states, "planned_states_bytes": states_plan,
               "states_over_first": states / first[0], "planned_states_over_first": states_plan / first[1],
               "overrides": overrides, "run": run}
        rows.append(row)
        save(out, {"precision": precision, "micro_batch": micro_batch, "steps": steps, "rows": rows})
        print(f"{W:2d} {ep:2d} {W // ep:3d} {zero:>1} {peak / 2 ** 20:8.2f} {plan['total'] / 2 ** 20:8.2f} "
              f"{plan['total'] / peak:5.2f} {states / 2 ** 20:8.2f} {states_plan / 2 ** 20:8.2f} "
              f"{states_plan / states:5.2f} {row['states_over_first']:14.3f} {row['planned_states_over_first']:7.3f}",
              flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Peak memory per rank (model states + activations) of the tiny and "
                                            "small configs, with and without activation checkpointing, ZeRO 0/1/2; "
                                            "prints a table and writes bench/results/memory.json")
    p.add_argument("--models", default="tiny,small", help="comma list of tiny (moe-clip-tiny), small (moe-clip-small)")
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement (>= 2)")
    p.add_argument("--micro-batch", type=int, default=8, help="samples per rank per step")
    p.add_argument("--checkpointing", default="none,blocks", help="comma list of activation_checkpointing modes")
    p.add_argument("--zero", default="0,1,2", help="comma list of ZeRO stages")
    p.add_argument("--world-size", type=int, default=2, help="ranks (one GPU: 1, with --set ep_size=1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    p.add_argument("--layouts", default="", help="comma list of W:ep_size (e.g. 2:1,4:1,4:2,8:1,8:2,8:4): the "
                                                 "per-layout table of moe-clip-tiny instead (bench/results/"
                                                 "memory_layouts.json unless --out)")
    p.add_argument("--precision", default="fp32", help="--layouts: precision")
    p.add_argument("--out", default="", help="results JSON")
    args = p.parse_args(argv)
    from bench._results import save

    if args.layouts:
        layout_table(args.layouts.split(","), args.zero.split(","), args.precision, args.micro_batch, args.steps,
                     args.set, args.out or LAYOUTS)
        return
    args.out = args.out or RESULTS
    models = {"tiny": "moe-clip-tiny", "small": "moe-clip-small"}
    rows = []
    print(f"{'model':8} {'ckpt':6} {'zero':4} {'rank':4} {'peak MiB':>9} {'states':>9} {'step':>9} "
          f"{'params':>9} {'init pk':>9} {'max RSS':>9}")
    for model, ckpt, zero in itertools.product(args.models.split(","), args.checkpointing.split(","),
                                               args.zero.split(",")):
        sets = [f"model.name={models[model]}", f"zero_stage={zero}", f"activation_checkpointing={ckpt}",
                f"batch.micro_batch={args.micro_batch}", *args.set]
        result = measure(TINY, sets, world_size=args.world_size, steps=args.steps)
        result.update(model=model, activation_checkpointing=ckpt, zero_stage=int(zero))
        rows.append(result)
        save(args.out, {"device": rows[0]["device"], "method": rows[0]["method"], "micro_batch": args.micro_batch,
                        "steps": args.steps, "world_size": args.world_size, "runs": rows})  # after every run
        for r in result["per_rank"]:
            print(f"{model:8} {ckpt:6} {zero:4} {r['rank']:4} {_mib(r['peak_bytes'])} {_mib(r['states_bytes'])} "
                  f"{_mib(r['step_bytes'])} {_mib(r['param_bytes'])} {_mib(r['init_peak_bytes'])} "
                  f"{_mib(r['max_rss_bytes'])}", flush=True)


if __name__ == "__main__":
    main()
