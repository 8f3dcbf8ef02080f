"""The layout grid of ``python -m bench.plan_memory --grid``: measured against planned, per layout.

Every layout trains moe-clip-tiny with 8 experts (``GRID_SETS``) from the same initial model on the same
batches (``measure(same_init=True)``), so a layout's losses must equal the ep_size-1 run's of the same
ZeRO stage and precision. ``layout_row`` compares one measurement with the planner; ``run_grid`` runs
the layouts (ep_size 1 first: the loss reference), prints the table and returns the rows.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from bench.memory import TINY, measure

GRID_SETS = ["model.name=moe-clip-tiny", "model.moe.num_experts=8", "activation_checkpointing=none"]
REDUCE_KINDS = ("all_reduce", "reduce", "reduce_scatter")


def grid_overrides(ep: int, zero: int, precision: str, micro_batch: int) -> List[str]:
    return [*GRID_SETS, f"ep_size={ep}", f"zero_stage={zero}", f"precision={precision}",
            f"batch.micro_batch={micro_batch}"]


def measured_gradient_bytes(comm_step: Dict[str, dict]) -> Dict[str, int]:
    """Gradient bytes of one step from ``moe_dist.distributed.comm_count``'s report: reductions (all-reduce, reduce,
    reduce-scatter) in forward, backward and step, the parameter all-gather, and the rest apart (scalars:
    norms and overflow flags; broadcasts)."""
    out = {"reduce": 0, "param_all_gather": 0, "other": 0}
    for phase in comm_step.values():
        for kind, sent in phase["bytes"].items():
            key = "reduce" if kind in REDUCE_KINDS else "param_all_gather" if kind == "all_gather" else "other"
            out[key] += sent
    return out


def layout_row(run: dict, plan: dict, reference: Optional[dict] = None) -> dict:
    """One layout: its measurement ``run`` (``bench.memory.measure``) held against the planner's estimate
    ``plan``, and its losses against the ep_size-1 ``reference`` run (None: this is the reference)."""
    ranks = run["per_rank"]
    grads = [measured_gradient_bytes(r["comm"][-1]) for r in ranks]
    loss_delta = 0.0
    if reference is not None:
        loss_delta = max(abs(a - b) for r, ref in zip(ranks, reference["per_rank"])
                         for a, b in zip(r["losses"], ref["losses"]))
    row = {"losses_rank0": ranks[0]["losses"], "loss_delta_vs_ep1": loss_delta,
           "all_to_all_bytes": {"measured": [r["all_to_all_bytes"][-1] for r in ranks]},
           "gradient_bytes": {"measured_reduce": [x["reduce"] for x in grads],
                              "measured_param_all_gather": [x["param_all_gather"] for x in grads],
                              "other": max(x["other"] for x in grads)},
           "peak_bytes": {"measured": [r["peak_bytes"] for r in ranks]},
           "states_bytes": {"measured": [r["states_bytes"] for r in ranks]},
           "phase_peak_bytes": [r["phase_peak_bytes"] for r in ranks]}
    return with_plan(row, plan)


def with_plan(row: dict, plan: dict) -> dict:
    """``row`` with the planner's figures (``plan``: ``planner.estimate``) beside its measured ones."""
    g, peaks = plan["gradient_bytes"], row["peak_bytes"]["measured"]
    predicted_peak = plan["per_gpu_bytes"]["total"]
    row["all_to_all_bytes"]["predicted"] = plan["all_to_all_bytes"]["total"]
    row["gradient_bytes"].update(predicted_reduce=g["all_reduce"] + g["bucket_all_reduce"],
                                 predicted_param_all_gather=g["param_all_gather"])
    row["peak_bytes"].update(predicted=predicted_peak, ratio_min=predicted_peak / max(peaks),
                             ratio_max=predicted_peak / min(peaks))
    row["states_bytes"]["predicted"] = {k: plan["per_gpu_bytes"][k]
                                        for k in ("parameters", "gradients", "optimizer", "buffers")}
    return row


HEADER = (f"{'W':>2} {'ep':>2} {'Z':>1} {'prec':4} {'loss d':>8} {'a2a meas':>9} {'a2a pred':>9} {'red meas':>9} "
          f"{'red pred':>9} {'ag meas':>8} {'ag pred':>8} {'peak MiB':>8} {'pred MiB':>8} {'ratio':>11}")


def _line(row: dict) -> str:
    a, g, p = row["all_to_all_bytes"], row["gradient_bytes"], row["peak_bytes"]
    same = "" if len(set(a["measured"])) == 1 and len(set(g["measured_reduce"])) == 1 else " (ranks differ)"
    return (f"{row['world_size']:2d} {row['ep_size']:2d} {row['zero_stage']:1d} {row['precision']:4} "
            f"{row['loss_delta_vs_ep1']:8.1e} {max(a['measured']):9d} {a['predicted']:9d} "
            f"{max(g['measured_reduce']):9d} {g['predicted_reduce']:9d} {max(g['measured_param_all_gather']):8d} "
            f"{g['predicted_param_all_gather']:8d} {max(p['measured']) / 2 ** 20:8.2f} {p['predicted'] / 2 ** 20:8.2f} "
            f"{p['ratio_min']:5.3f}-{p['ratio_max']:5.3f}{same}")


def run_grid(world_size: int, eps: Sequence[int], zeros: Sequence[int], precisions: Sequence[str], micro_batch: int,
             steps: int, predicted: Callable) -> dict:
    """Measure and plan every (precision, ZeRO stage, ep_size); print the table; return the rows."""
    print(HEADER)
    rows, references = [], {}
    for precision in precisions:
        for zero in zeros:
            for ep in eps:
                sets = grid_overrides(ep, zero, precision, micro_batch)
                run = measure(TINY, sets, world_size=world_size, steps=steps, same_init=True)
                if ep == 1:
                    references[(zero, precision)] = run
                row = layout_row(run, predicted(sets, world_size), references.get((zero, precision)))
                row.update(world_size=world_size, ep_size=ep, zero_stage=zero, precision=precision, overrides=sets)
                rows.append(row)
                print(_line(row), flush=True)
    return summary(rows, world_size, micro_batch, steps)


def summary(rows: List[dict], world_size: int, micro_batch: int, steps: int) -> dict:
    worst = max(max(abs(r["peak_bytes"]["ratio_min"] - 1), abs(r["peak_bytes"]["ratio_max"] - 1)) for r in rows)
    print(f"largest peak deviation: {worst:.1%} (target: within 15%)")
    return {"world_size": world_size, "micro_batch": micro_batch, "steps": steps, "sets": GRID_SETS,
            "largest_peak_deviation": worst, "rows": rows}


def replan(grid: dict, predicted: Callable) -> dict:
    """The stored measurements of ``grid`` against the planner as it is now (no run); prints the table."""
    print(HEADER)
    for row in grid["rows"]:
        with_plan(row, predicted(row["overrides"], row["world_size"]))
        print(_line(row))
    return summary(grid["rows"], grid["world_size"], grid["micro_batch"], grid["steps"])
