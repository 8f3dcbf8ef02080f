"""The MoE-versus-dense study on the emoji recipe: every run, its seeds, and the report in docs/results.md.

    python experiments/study.py prepare                  # the emoji recipe at 32 px, 20 % held out, a tokenizer
    python experiments/study.py run [--only moe dense]   # train what is not done yet (a re-run resumes the grid)
    python experiments/study.py report                   # tables + plots from runs/study/*/seed*/metrics.jsonl
    python experiments/study.py run --grid routing       # the routing study: the E=8-equivalent arms, seeds 0 1 2
    python experiments/study.py report --grid routing    # its tables into docs/results.md, routing_study.json, plots
    python experiments/study.py run --grid caption --eval-every 0   # the captioning study (caption_study.py)

Each run is ``moe-dist train --config experiments/emoji.yaml`` with the overrides below, in one process (the
models differ, not the cluster). A run counts as done once its metrics.jsonl holds the final evaluation, so an
interrupted grid continues where it stopped. The upcycled run starts from the dense run's checkpoint at half
the steps and trains the other half, so its total steps equal the MoE trained from scratch.

The routing grid (``--grid routing``, the arms in ROUTING) compares routers at equal active FLOPs. Besides the
held-out retrieval and the train loss, its report reads each run's expert loads from the TensorBoard
histograms ``moe/expert_load/<layer>`` (per-expert counts summed over each logging window of 10 steps; a
float per expert, so Soft MoE's slot weight mass reads as it is) over the last ``--load-window`` steps, and
its step time from metrics.jsonl's ``perf/step_time_s`` (the median over logged steps after
``--time-skip``). The ``moe`` arm is shared with the first study (same directory, same overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "emoji.yaml")
MOE8 = ["model.name=moe-clip-tiny", "model.moe.num_experts=8"]
# the recipe before the study: decoder lr x1 (coca-tiny now sets 3) and greedy final evals (eval.decoding's default is
# now beam 5 with reranking; `decode` re-scores the checkpoints with each decoding)
COCA = ["model.name=coca-tiny", "model.vision.layers=4", "model.text.layers=4", "model.decoder.lr_scale=1",
        "eval.tasks=[loss,retrieval,caption]", "eval.decoding.strategy=greedy", "eval.decoding.rerank=0"]
COCA_MOE = COCA + ["model.moe.num_experts=8", "model.moe.modality_experts=[]"]
COCA_DENSE = COCA + ["model.vision.moe.every=0", "model.text.moe.every=0", "model.decoder.cross_moe.every=0"]

# name -> (overrides, what it is). The first five are the study; the rest vary one setting of "moe" or "dense".
RUNS: Dict[str, tuple] = {
    "dense": (["model.name=clip-tiny-dense"], "two towers, dense MLPs"),
    "moe": (MOE8, "two towers, E=8 top-1 every other block (capacity 1.5)"),
    "moe-upcycled": (MOE8, "moe initialised from dense at half the steps, trained the other half"),
    "limoe-dense": (["model.name=limoe-tiny-dense"], "one shared tower, dense MLPs"),
    "limoe": (["model.name=limoe-tiny", "model.moe.num_experts=8"], "one shared tower, E=8 top-1, dropless"),
    "moe-e4": (["model.name=moe-clip-tiny", "model.moe.num_experts=4"], "moe with 4 experts"),
    "moe-e16": (["model.name=moe-clip-tiny", "model.moe.num_experts=16"], "moe with 16 experts"),
    "moe-dropless": (MOE8 + ["model.moe.dropless=true"], "moe without a capacity (no token dropped)"),
    "moe-no-aux": (MOE8 + ["model.moe.load_balance_coef=0", "model.moe.z_loss_coef=0"], "moe without aux losses"),
    "moe-aux0.1": (MOE8 + ["model.moe.load_balance_coef=0.1"], "moe with load-balance coefficient 0.1"),
    "moe-lr3e-4": (MOE8 + ["optimizer.lr=3.0e-4"], "moe at learning rate 3e-4"),
    "dense-lr3e-4": (["model.name=clip-tiny-dense", "optimizer.lr=3.0e-4"], "dense at learning rate 3e-4"),
    # the routing study: every arm has moe's active FLOPs per token (one expert-width MLP per MoE token)
    "moe-bias": (MOE8 + ["model.moe.router_bias=true", "model.moe.load_balance_coef=0"],
                 "moe balanced by a router bias (aux-loss-free, DeepSeek-V3), no load-balance loss"),
    "moe-global": (MOE8 + ["model.moe.load_balance=global_batch"], "moe with the balance loss over the global batch"),
    "moe-ec": (MOE8 + ["model.vision.moe.overrides.router=expert_choice",
                       "model.vision.moe.overrides.capacity_factor=1.0"],
               "moe, vision tower Expert-Choice (each expert takes T/E tokens)"),
    "moe-soft": (MOE8 + ["model.vision.moe.overrides.router=soft", "model.vision.moe.overrides.slots_per_expert=2"],
                 "moe, vision tower Soft MoE (8 experts x 2 slots per image)"),
    "moe-fine": (["model.name=moe-clip-tiny", "model.moe.num_experts=32", "model.moe.granularity=4",
                  "model.moe.top_k=3", "model.moe.num_shared_experts=1", "model.moe.score_func=sigmoid",
                  "model.moe.renormalize=true"],
                 "32 experts of width H/4, top-3 + 1 shared (sigmoid scores, renormalised)"),
    # one process with grad_accum 1 makes the global batch the micro batch (moe-global is moe exactly): the
    # pair below splits the same 64 samples into 4 micro batches of 16, where the two losses differ
    "moe-ga4": (MOE8 + ["batch.micro_batch=16", "batch.grad_accum=4"], "moe at 4 micro batches of 16 per step"),
    "moe-global-ga4": (MOE8 + ["batch.micro_batch=16", "batch.grad_accum=4", "model.moe.load_balance=global_batch"],
                       "moe-ga4 with the balance loss over the step's 4 micro batches"),
    # the captioning study (issue 28): CoCa with moe-clip-tiny's 4-layer towers, E=8 top-1 in every second tower
    # block and both decoder cross-attention blocks, and its dense twin; each recipe option one at a time
    "coca-dense": (COCA_DENSE, "CoCa, dense MLPs (equal active FLOPs to coca-moe)"),
    "coca-moe": (COCA_MOE, "CoCa-MoE: today's recipe (caption 2 : contrastive 1, patch tokens, greedy)"),
    "coca-moe-ls": (COCA_MOE + ["model.decoder.label_smoothing=0.1"], "coca-moe with label smoothing 0.1"),
    "coca-moe-pooler": (COCA_MOE + ["model.decoder.image_tokens=pooler", "model.decoder.pooler_queries=16"],
                        "coca-moe reading 16 attentional-pooler queries instead of the 16 patch tokens"),
    "coca-moe-cap4": (COCA_MOE + ["model.decoder.caption_loss_weight=4"], "coca-moe with caption weight 4 : 1"),
    "coca-moe-dec4": (COCA_MOE + ["model.decoder.layers=4"], "coca-moe with a 4-layer decoder"),
    "coca-moe-declr3": (COCA_MOE + ["model.decoder.lr_scale=3"], "coca-moe with 3x the learning rate on the decoder"),
    "coca-moe-long": (COCA_MOE, "coca-moe trained twice as long (600 steps)"),
    "coca-moe-declr10": (COCA_MOE + ["model.decoder.lr_scale=10"],
                         "coca-moe with 10x the learning rate on the decoder"),
    # the best combination of the options above (decoder learning rate x3, twice the steps), dense and MoE
    "coca-moe-best": (COCA_MOE + ["model.decoder.lr_scale=3"], "coca-moe, decoder lr x3, 600 steps"),
    "coca-dense-best": (COCA_DENSE + ["model.decoder.lr_scale=3"], "coca-dense, decoder lr x3, 600 steps"),
}
STEPS_FACTOR = {"coca-moe-long": 2, "coca-moe-best": 2, "coca-dense-best": 2}  # runs trained for a multiple of --steps
CAPTION = ["coca-dense", "coca-moe", "coca-moe-ls", "coca-moe-pooler", "coca-moe-cap4", "coca-moe-dec4",
           "coca-moe-declr3", "coca-moe-declr10", "coca-moe-long", "coca-dense-best", "coca-moe-best"]
STUDY = ["dense", "moe", "moe-upcycled", "limoe-dense", "limoe"]
ROUTING = ["moe", "moe-bias", "moe-global", "moe-ec", "moe-soft", "moe-fine", "moe-ga4", "moe-global-ga4"]
GRIDS = {"study": STUDY, "routing": ROUTING, "caption": CAPTION}
METRICS = {  # column -> metrics.jsonl key
    "zero-shot top-1": "val/zeroshot/top1",
    "macro F1": "val/zeroshot/macro_f1",
    "i->t R@1": "val/retrieval/image_to_text_R@1",
    "i->t R@10": "val/retrieval/image_to_text_R@10",
    "t->i R@1": "val/retrieval/text_to_image_R@1",
    "t->i R@10": "val/retrieval/text_to_image_R@10",
    "val loss": "val/loss/contrastive",
}

EXTRA = ["train loss", "best i->t R@1"]  # end-of-run train contrastive loss; the best eval of the run


def data_overrides(data: str) -> List[str]:
    return [f"data.train={data}", f"data.val={data}/val", f"data.tokenizer={data}/tok.model",
            f"eval.classes={data}/classes.json"]


def run_dir(out: str, name: str, seed: int) -> str:
    return os.path.join(out, name, f"seed{seed}")


def read_metrics(path: str) -> List[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def is_done(directory: str, steps: int) -> bool:
    return any(r.get("step") == steps and "val/retrieval/image_to_text_R@1" in r
               for r in read_metrics(os.path.join(directory, "metrics.jsonl")))


def prepare(data: str) -> None:
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        subprocess.run(["moe-dist-data", "recipe", "emoji", "--out", data, "--size", "32", "--val-fraction", "0.2"],
                       check=True)
    if not os.path.isfile(os.path.join(data, "tok.model")):
        subprocess.run(["moe-dist-data", "tokenizer", data, "--out", os.path.join(data, "tok.model"),
                        "--vocab-size", "1024"], check=True)


def train(name: str, seed: int, args: argparse.Namespace) -> None:
    directory = run_dir(args.out, name, seed)
    steps = args.steps * STEPS_FACTOR.get(name, 1)
    extra = [f"output_dir={directory}", f"seed={seed}"]
    if name == "moe-upcycled":
        half = args.steps // 2
        source = os.path.join(run_dir(args.out, "dense", seed), "checkpoints", f"step{half:08d}")
        if not os.path.isdir(source):
            raise SystemExit(f"moe-upcycled seed {seed} needs {source}: run 'dense' for this seed first")
        steps = args.steps - half
        extra.append(f"model.init={source}")
    elif name == "dense":  # keep the half-way checkpoint for moe-upcycled
        extra.append(f"checkpoint.every={args.steps // 2}")
    extra += [f"steps={steps}", f"eval.every={args.eval_every}"]
    if is_done(directory, steps):
        print(f"  {name} seed {seed}: done", flush=True)
        return
    overrides = RUNS[name][0] + data_overrides(args.data) + extra
    cmd = [sys.executable, "-m", "moe_dist", "train", "--config", CONFIG, "--resume", "none"]
    for o in overrides:
        cmd += ["--set", o]
    if getattr(args, "dry_run", False):
        print(f"  {name} seed {seed}: " + " ".join(cmd), flush=True)
        return
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, "metrics.jsonl")):  # an interrupted attempt: start it over
        subprocess.run(["rm", "-rf", directory], check=True)
        os.makedirs(directory)
    start = time.time()
    print(f"  {name} seed {seed}: training {steps} steps ...", flush=True)
    with open(os.path.join(directory, "train.log"), "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {code}); see {directory}/train.log")
    print(f"  {name} seed {seed}: {time.time() - start:.0f} s", flush=True)


def summary(values: List[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def collect(out: str, steps: int) -> dict:
    """{name: {"final": {column: summary}, "curves": {key: {step: [per seed]}}, "seeds": [..]}} for every run found."""
    result = {}
    for name in RUNS:
        seeds = sorted(int(d[4:]) for d in os.listdir(os.path.join(out, name))
                       if d.startswith("seed")) if os.path.isdir(os.path.join(out, name)) else []
        final: Dict[str, List[float]] = {c: [] for c in list(METRICS) + EXTRA}
        curves: Dict[str, Dict[int, List[float]]] = {"loss/contrastive": {}, METRICS["i->t R@1"]: {},
                                                     METRICS["zero-shot top-1"]: {}}
        done = []
        offset = steps // 2 if name == "moe-upcycled" else 0
        for seed in seeds:
            rows = read_metrics(os.path.join(run_dir(out, name, seed), "metrics.jsonl"))
            last = [r for r in rows if "val/retrieval/image_to_text_R@1" in r and r["step"] + offset == steps]
            if not last:
                continue
            done.append(seed)
            for column, key in METRICS.items():
                final[column].append(last[-1][key])
            train = [r["loss/contrastive"] for r in rows if "loss/contrastive" in r and "val/loss/total" not in r]
            final["train loss"].append(statistics.fmean(train[-3:]))  # the last 30 steps (logged every 10)
            evals = [r for r in rows if METRICS["i->t R@1"] in r]
            final["best i->t R@1"].append(max(r[METRICS["i->t R@1"]] for r in evals))
            for r in rows:
                for key in curves:
                    if key in r:
                        curves[key].setdefault(r["step"] + offset, []).append(r[key])
        if done:
            result[name] = {"seeds": done, "what": RUNS[name][1],
                            "final": {c: summary(v) for c, v in final.items()}, "curves": curves}
    return result


CURVES = (("loss/contrastive", "train contrastive loss", "curve_train_loss.png"),
          (METRICS["i->t R@1"], "held-out image->text R@1", "curve_retrieval.png"),
          (METRICS["zero-shot top-1"], "held-out zero-shot top-1", "curve_zeroshot.png"))


def plot(results: dict, where: str, names: List[str], prefix: str = "", curves=CURVES) -> List[str]:
    """One PNG per curve of ``curves`` ((key, title, file)) in ``where``, named ``prefix + file``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, title, file in curves:
        file = prefix + file
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in names:
            if name not in results:
                continue
            points = sorted(results[name]["curves"][key].items())
            if key.startswith("loss"):  # train loss every 10 steps: smooth over 5 points
                points = [(s, v) for s, v in points if len(v) == len(results[name]["seeds"])]
            steps = [s for s, _ in points]
            mean = [statistics.fmean(v) for _, v in points]
            lo = [min(v) for _, v in points]
            hi = [max(v) for _, v in points]
            if key.startswith("loss") and len(mean) > 5:
                mean = [statistics.fmean(mean[max(0, i - 4):i + 1]) for i in range(len(mean))]
            ax.plot(steps, mean, label=name, marker="" if key.startswith("loss") else "o")
            ax.fill_between(steps, lo, hi, alpha=0.15)
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{title} (mean, band = min..max over seeds)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(where, file), dpi=100)
        plt.close(fig)
        made.append(file)
    return made


def table(results: dict, names: List[str]) -> str:
    columns = list(METRICS) + EXTRA
    head = "| run | seeds | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for name in names:
        if name not in results:
            continue
        cells = [f"{s['mean']:.3f} ± {s['std']:.3f}" for s in results[name]["final"].values()]
        lines.append(f"| {name} | {len(results[name]['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- routing study
LOAD_TAG = "moe/expert_load/"  # + layer: engine/metrics.py's per-expert histogram (all modalities of the layer)
SLOT_TAG = "moe/slot_weight/"  # + layer: a Soft MoE layer's slot weight per expert (engine/metrics.py)
DROP_KEY = "moe/dropped_fraction/"  # + layer: metrics.jsonl, the logged step's last micro-batch
STEP_TIME_KEY = "perf/step_time_s"  # metrics.jsonl, the logged step's wall time (data wait included)
RETRIEVAL = ["i->t R@1", "i->t R@10", "t->i R@1", "t->i R@10"]
# column -> (format, what); the per-seed numbers of every column are in routing_study.json
ROUTING_COLUMNS = {
    **{c: (".3f", "held-out retrieval at the last step") for c in RETRIEVAL},
    "train loss": (".3f", "train contrastive loss, mean of the last 3 logged values (last 30 steps)"),
    "max/mean load (worst layer)": (".2f", "the largest max/mean expert load over the MoE layers"),
    "max/mean load (mean of layers)": (".2f", "max/mean expert load averaged over the MoE layers"),
    "dead experts (all layers)": (".1f", "experts with no load in the window, summed over the MoE layers"),
    "dead experts (worst layer)": (".1f", "the most dead experts of one layer"),
    "dropped": (".3f", "dropped assignments / chosen, mean over the window's logged steps and the layers"),
    "step time (s)": (".3f", "median seconds per optimizer step over the logged steps after --time-skip"),
}
DOCS_BEGIN, DOCS_END = "<!-- routing-report:begin -->", "<!-- routing-report:end -->"


def load_imbalance(loads: Sequence[float]) -> float:
    """max / mean of one layer's per-expert loads, the mean over all E experts (idle ones included): 1.0 is
    perfect balance, E is all load on one expert; NaN for a layer with no load at all. Loads may be floats
    (Soft MoE's slot weight mass)."""
    total = float(sum(loads))
    if not len(loads) or not total > 0:
        return float("nan")
    return float(max(loads)) / (total / len(loads))


def dead_experts(loads: Sequence[float]) -> int:
    """Experts whose load is 0 (not merely small: a Soft MoE expert's mass is never exactly 0)."""
    return sum(1 for x in loads if not x > 0)


def window_loads(histograms: Iterable[Tuple[int, Sequence[float]]], last_step: int,
                 window: int) -> Optional[List[float]]:
    """Per-expert sums of the load histograms logged at steps in (last_step - window, last_step]; each
    histogram holds one logging window, so with logging every 10 steps and ``window`` 50 the sums cover the
    last 50 steps exactly. None when no histogram falls in the window."""
    total: Optional[List[float]] = None
    for step, counts in histograms:
        if last_step - window < step <= last_step:
            if total is not None and len(counts) != len(total):
                raise ValueError(f"expert-load histograms of {len(total)} and {len(counts)} experts in one layer")
            total = [float(c) for c in counts] if total is None else [a + float(c) for a, c in zip(total, counts)]
    return total


def layer_load_summary(loads: Dict[str, Sequence[float]]) -> dict:
    """Per layer max/mean load and dead experts, and their aggregates over layers: the worst layer's
    max/mean, the mean of the layers' max/mean, dead experts summed over layers and the worst layer's."""
    per_layer = {layer: {"max_over_mean": load_imbalance(v), "dead": dead_experts(v), "experts": len(v),
                         "loads": [float(x) for x in v]} for layer, v in loads.items()}
    ratios = [p["max_over_mean"] for p in per_layer.values() if not math.isnan(p["max_over_mean"])]
    dead = [p["dead"] for p in per_layer.values()]
    nan = float("nan")
    return {"per_layer": per_layer,
            "max/mean load (worst layer)": max(ratios) if ratios else nan,
            "max/mean load (mean of layers)": statistics.fmean(ratios) if ratios else nan,
            "dead experts (all layers)": float(sum(dead)) if dead else nan,
            "dead experts (worst layer)": float(max(dead)) if dead else nan}


def median_step_time(rows: Iterable[dict], skip: int) -> float:
    """Median of metrics.jsonl's ``perf/step_time_s`` over the rows logged after step ``skip`` (the first
    steps pay for allocation and warm caches); NaN when none is left."""
    times = [float(r[STEP_TIME_KEY]) for r in rows if STEP_TIME_KEY in r and r["step"] > skip]
    return statistics.median(times) if times else float("nan")


def window_dropped(rows: Iterable[dict], last_step: int, window: int) -> Dict[str, float]:
    """Per MoE layer the mean ``moe/dropped_fraction/<layer>`` of the rows logged in the window."""
    values: Dict[str, List[float]] = {}
    for r in rows:
        if last_step - window < r.get("step", -1) <= last_step:
            for key, value in r.items():
                if key.startswith(DROP_KEY) and "/" not in key[len(DROP_KEY):]:  # not the per-modality copies
                    values.setdefault(key[len(DROP_KEY):], []).append(float(value))
    return {layer: statistics.fmean(v) for layer, v in values.items()}


def read_load_histograms(tb_dir: str) -> Dict[str, List[Tuple[int, List[float]]]]:
    """{layer: [(step, per-expert load)]} from a run's TensorBoard histograms ``moe/expert_load/<layer>``
    (the per-modality tags ``moe/expert_load/<modality>/<layer>`` are skipped), and a Soft MoE layer's
    ``moe/slot_weight/<layer>``; {} without a log."""
    if not os.path.isdir(tb_dir):
        return {}
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(tb_dir, size_guidance={ea.HISTOGRAMS: 0, ea.SCALARS: 1, ea.TENSORS: 1,
                                                     ea.COMPRESSED_HISTOGRAMS: 1, ea.IMAGES: 1, ea.AUDIO: 1})
    acc.Reload()
    out = {}
    for tag in acc.Tags().get(ea.HISTOGRAMS, []):
        prefix = next((p for p in (LOAD_TAG, SLOT_TAG) if tag.startswith(p)), None)
        layer = tag[len(prefix):] if prefix else ""
        if prefix and layer and "/" not in layer:
            by_step = {h.step: [float(c) for c in h.histogram_value.bucket] for h in acc.Histograms(tag)}
            out[layer] = sorted(by_step.items())
    return out


def run_numbers(directory: str, final_step: int, window: int, skip: int) -> Optional[dict]:
    """One finished run's routing-study numbers (ROUTING_COLUMNS, plus "layers"); None when the run has no
    final evaluation at ``final_step``."""
    rows = read_metrics(os.path.join(directory, "metrics.jsonl"))
    last = [r for r in rows if METRICS["i->t R@1"] in r and r["step"] == final_step]
    if not last:
        return None
    out = {c: float(last[-1][METRICS[c]]) for c in RETRIEVAL}
    train = [r["loss/contrastive"] for r in rows if "loss/contrastive" in r]
    out["train loss"] = statistics.fmean(train[-3:]) if train else float("nan")
    loads = {}
    for layer, histograms in read_load_histograms(os.path.join(directory, "tensorboard")).items():
        summed = window_loads(histograms, final_step, window)
        if summed is not None:
            loads[layer] = summed
    loads_summary = layer_load_summary(loads)
    dropped = window_dropped(rows, final_step, window)
    out.update({k: v for k, v in loads_summary.items() if k != "per_layer"})
    out["dropped"] = statistics.fmean(dropped.values()) if dropped else float("nan")
    out["step time (s)"] = median_step_time(rows, skip)
    out["layers"] = {layer: {**p, "dropped": dropped.get(layer, float("nan"))}
                     for layer, p in loads_summary["per_layer"].items()}
    return out


def finite_summary(values: List[float]) -> Optional[dict]:
    """``summary`` of the finite values (a seed without a load log leaves a gap, not a NaN); None if none."""
    values = [v for v in values if not math.isnan(v)]
    return summary(values) if values else None


def collect_routing(out: str, steps: int, names: List[str], window: int, skip: int) -> dict:
    """{name: {"seeds", "what", "overrides", "per_seed": {seed: run_numbers}, "final": {column: summary},
    "layers": {layer: {"max_over_mean": summary, "dead": summary, "dropped": summary}}}} of the finished runs."""
    result = {}
    for name in names:
        where = os.path.join(out, name)
        seeds = sorted(int(d[4:]) for d in os.listdir(where) if d.startswith("seed")) if os.path.isdir(where) else []
        per_seed = {}
        for seed in seeds:
            numbers = run_numbers(run_dir(out, name, seed), steps, window, skip)
            if numbers is not None:
                per_seed[seed] = numbers
        if not per_seed:
            continue
        final = {c: finite_summary([n[c] for n in per_seed.values()]) for c in ROUTING_COLUMNS}
        layer_names = list(dict.fromkeys(layer for n in per_seed.values() for layer in n["layers"]))
        layers = {layer: {key: finite_summary([float(n["layers"][layer][key]) for n in per_seed.values()
                                               if layer in n["layers"]])
                          for key in ("max_over_mean", "dead", "dropped")}
                  for layer in layer_names}
        result[name] = {"seeds": sorted(per_seed), "what": RUNS[name][1], "overrides": RUNS[name][0],
                        "per_seed": per_seed, "final": final, "layers": layers}
    return result


def _cell(s: Optional[dict], fmt: str) -> str:
    return "n/a" if s is None else f"{s['mean']:{fmt}} ± {s['std']:{fmt}}"


def routing_tables(results: dict, names: List[str], window: int, baseline: str = "moe") -> str:
    """The markdown of the routing report: the per-arm table, the per-layer table and the comparison with
    ``baseline``."""
    names = [n for n in names if n in results]
    cols = list(ROUTING_COLUMNS)
    lines = ["| arm | seeds | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
    for name in names:
        final = results[name]["final"]
        cells = [_cell(final[c], ROUTING_COLUMNS[c][0]) for c in cols]
        lines.append(f"| {name} | {len(results[name]['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", f"Per MoE layer, over the last {window} steps: max/mean expert load, dead experts (of E), "
              "dropped fraction (mean ± std over seeds):", ""]
    layer_names = list(dict.fromkeys(layer for n in names for layer in results[n]["layers"]))
    lines += ["| arm | " + " | ".join(layer_names) + " |", "|" + "---|" * (len(layer_names) + 1)]
    for name in names:
        cells = []
        for layer in layer_names:
            p = results[name]["layers"].get(layer)
            if p is None or p["max_over_mean"] is None:
                cells.append("n/a")
                continue
            experts = {len(n["layers"][layer]["loads"]) for n in results[name]["per_seed"].values()
                       if layer in n["layers"]}
            cells.append(f"{_cell(p['max_over_mean'], '.2f')}; dead {_cell(p['dead'], '.1f')} of "
                         f"{'/'.join(str(e) for e in sorted(experts))}; dropped {_cell(p['dropped'], '.3f')}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if baseline in results:
        base = results[baseline]["final"]
        compared = RETRIEVAL + ["train loss", "step time (s)"]
        lines += ["", f"Difference of the mean from {baseline} (* : larger than the larger of the two standard "
                  "deviations; retrieval higher is better, train loss and step time lower are better):", "",
                  "| arm | " + " | ".join(compared) + " | retrieval columns better* / worse* |",
                  "|" + "---|" * (len(compared) + 2)]
        for name in names:
            if name == baseline:
                continue
            final, cells, better, worse = results[name]["final"], [], 0, 0
            for c in compared:
                a, b = final[c], base[c]
                if a is None or b is None:
                    cells.append("n/a")
                    continue
                diff = a["mean"] - b["mean"]
                beyond = abs(diff) > max(a["std"], b["std"])
                cells.append(f"{diff:+{ROUTING_COLUMNS[c][0]}}{'*' if beyond else ''}")
                if beyond and c in RETRIEVAL:
                    better, worse = better + (diff > 0), worse + (diff < 0)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {better} / {worse} |")
    lines += ["", "Range over seeds (min..max) of image->text R@1: " + "; ".join(
        f"{n} {results[n]['final']['i->t R@1']['min']:.3f}..{results[n]['final']['i->t R@1']['max']:.3f}"
        for n in names if results[n]["final"]["i->t R@1"] is not None) + "."]
    return "\n".join(lines)


def arm_size(name: str) -> dict:
    """``moe-dist params`` of an arm's model (shapes only, no weights): {"params": ..., "flops": ...}, or
    {"error": why} when its overrides do not make a model here (e.g. a router option not merged yet)."""
    from moe_dist.config import parse_overrides
    from moe_dist.models.params import params_report

    model = [o.split("=", 1)[1] for o in RUNS[name][0] if o.startswith("model.name=")]
    rest = [o for o in RUNS[name][0] if o.startswith("model.") and not o.startswith("model.name=")]
    try:
        report = params_report(model[-1] if model else "moe-clip-tiny", parse_overrides(rest, prefix="model."))
    except Exception as err:  # noqa: BLE001 - reported in the table, the rest of the report goes on
        why = str(err).splitlines()[0].split("; valid fields")[0] if str(err) else ""
        return {"error": f"{type(err).__name__}: {why}"}
    return {"params": report["params"], "flops": report["flops"]}


def size_table(sizes: Dict[str, dict]) -> str:
    lines = ["| arm | params total | in experts | active / image token | active / text token | forward FLOPs "
             "per sample (image + text) |", "|---|---|---|---|---|---|"]
    for name, size in sizes.items():
        if "error" in size:
            lines.append(f"| {name} | n/a: {size['error'][:160].replace('|', '/')} | | | | |")
            continue
        p, f = size["params"], size["flops"]
        lines.append(f"| {name} | {p['total']:,} | {p['expert']:,} | {p.get('active/image', 0):,} | "
                     f"{p.get('active/text', 0):,} | {f['per_sample']:,} "
                     f"({f.get('image', 0):,} + {f.get('text', 0):,}) |")
    return "\n".join(lines)


def write_docs_block(path: str, text: str, begin: str = DOCS_BEGIN, end_marker: str = DOCS_END) -> bool:
    """Replace what lies between ``begin`` and ``end_marker`` (the routing report's by default) in ``path``
    with ``text``; False (nothing written) when the file or a marker is missing."""
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        doc = f.read()
    start, end = doc.find(begin), doc.find(end_marker)
    if start < 0 or end < start:
        return False
    doc = doc[:start + len(begin)] + "\n" + text.rstrip("\n") + "\n" + doc[end:]
    with open(path + ".tmp", "w") as f:
        f.write(doc)
    os.replace(path + ".tmp", path)
    return True


def routing_report(args: argparse.Namespace) -> None:
    names = args.only or ROUTING
    results = collect_routing(args.out, args.steps, names, args.load_window, args.time_skip)
    if not results:
        raise SystemExit(f"no finished routing run under {args.out}; run "
                         "'python experiments/study.py run --grid routing' first")
    os.makedirs(args.figures, exist_ok=True)
    curves = collect(args.out, args.steps)
    made = plot(curves, args.figures, names, prefix="routing_", curves=CURVES[:2])
    sizes = {name: arm_size(name) for name in names}
    with open(os.path.join(args.figures, "routing_study.json"), "w") as f:
        json.dump({"steps": args.steps, "load_window": args.load_window, "time_skip": args.time_skip,
                   "columns": {c: what for c, (_, what) in ROUTING_COLUMNS.items()}, "sizes": sizes,
                   "runs": results}, f, indent=1)
    rel = os.path.relpath(args.figures, os.path.dirname(os.path.abspath(args.docs)))
    text = (routing_tables(results, names, args.load_window) + "\n\nModel size and forward FLOPs per arm "
            "(`moe-dist params` of its overrides):\n\n" + size_table(sizes) + "\n\n" + " ".join(
                f"![{m[len('routing_curve_'):-4].replace('_', ' ')}]({rel}/{m})" for m in made))
    print(text)
    missing = [n for n in names if n not in results]
    if missing:
        print(f"\nnot finished (left out): {', '.join(missing)}")
    if write_docs_block(args.docs, text):
        print(f"\nwrote the tables into {args.docs}, {len(made)} plots and routing_study.json into {args.figures}")
    else:
        print(f"\n{args.docs} has no '{DOCS_BEGIN}' ... '{DOCS_END}' block: tables printed only")


def report(args: argparse.Namespace) -> None:
    if args.grid == "routing":
        return routing_report(args)
    if args.grid == "caption":
        import caption_study

        return caption_study.report(args)
    results = collect(args.out, args.steps)
    if not results:
        raise SystemExit(f"no finished run under {args.out}; run 'python experiments/study.py run' first")
    os.makedirs(args.figures, exist_ok=True)
    with open(os.path.join(args.figures, "emoji_study.json"), "w") as f:
        json.dump({"steps": args.steps, "runs": results}, f, indent=1)
    plot(results, args.figures, STUDY)
    print(table(results, STUDY))
    print()
    print(table(results, [n for n in RUNS if n not in STUDY] + ["moe", "dense"]))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["prepare", "run", "decode", "report"],
                        help="decode (--grid caption): decoding variants on the trained checkpoints")
    parser.add_argument("--data", default=os.path.join(ROOT, "datasets", "emoji32"), help="the recipe's --out")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "study"), help="where the runs go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (64 pairs each)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--grid", choices=list(GRIDS), default="study",
                        help="which runs 'run' trains and 'report' reports: the MoE-versus-dense study's five "
                             "(default) or the routing study's arms (ROUTING)")
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="runs to train or report (default: the grid's)")
    parser.add_argument("--figures", default=os.path.join(ROOT, "docs", "results"), help="plots and JSON")
    parser.add_argument("--docs", default=os.path.join(ROOT, "docs", "results.md"),
                        help="report --grid routing: the page whose routing-report block gets the tables")
    parser.add_argument("--load-window", type=int, default=50,
                        help="report --grid routing: expert loads and dropped fractions over the last N steps")
    parser.add_argument("--time-skip", type=int, default=20,
                        help="report --grid routing: step time from the steps logged after this one")
    parser.add_argument("--keep-going", action="store_true", help="run: a failed run does not stop the grid")
    parser.add_argument("--dry-run", action="store_true", help="run: print each training command, train nothing")
    args = parser.parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    if args.action == "prepare":
        prepare(args.data)
    elif args.action == "decode":
        import caption_study

        caption_study.decode(args)
    elif args.action == "run":
        if not args.dry_run:
            prepare(args.data)
        failed = []
        for seed in args.seeds:  # seed-major: a stopped grid still compares every model
            for name in args.only or GRIDS[args.grid]:
                try:
                    train(name, seed, args)
                except SystemExit as e:
                    if not args.keep_going:
                        raise
                    print(f"  {e}", flush=True)
                    failed.append(f"{name} seed {seed}")
        if failed:
            raise SystemExit(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())
