"""The MoE-versus-dense study on the emoji recipe: every run, its seeds, and the report in docs/results.md.

    python experiments/study.py prepare                  # the emoji recipe at 32 px, 20 % held out, a tokenizer
    python experiments/study.py run [--only moe dense]   # train what is not done yet (a re-run resumes the grid)
    python experiments/study.py report                   # tables + plots from runs/study/*/seed*/metrics.jsonl

Each run is ``moe-dist train --config experiments/emoji.yaml`` with the overrides below, in one process (the
models differ, not the cluster). A run counts as done once its metrics.jsonl holds the final evaluation, so an
interrupted grid continues where it stopped. The upcycled run starts from the dense run's checkpoint at half
the steps and trains the other half, so its total steps equal the MoE trained from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "emoji.yaml")
MOE8 = ["model.name=moe-clip-tiny", "model.moe.num_experts=8"]

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
}
STUDY = ["dense", "moe", "moe-upcycled", "limoe-dense", "limoe"]
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
    steps = args.steps
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


def plot(results: dict, where: str, names: List[str]) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for key, title, file in (("loss/contrastive", "train contrastive loss", "curve_train_loss.png"),
                             (METRICS["i->t R@1"], "held-out image->text R@1", "curve_retrieval.png"),
                             (METRICS["zero-shot top-1"], "held-out zero-shot top-1", "curve_zeroshot.png")):
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


def report(args: argparse.Namespace) -> None:
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
    parser.add_argument("action", choices=["prepare", "run", "report"])
    parser.add_argument("--data", default=os.path.join(ROOT, "datasets", "emoji32"), help="the recipe's --out")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "study"), help="where the runs go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (64 pairs each)")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="runs to train (default: the study's five)")
    parser.add_argument("--figures", default=os.path.join(ROOT, "docs", "results"), help="plots and JSON")
    args = parser.parse_args(argv)
    args.data, args.out = os.path.abspath(args.data), os.path.abspath(args.out)
    if args.action == "prepare":
        prepare(args.data)
    elif args.action == "run":
        prepare(args.data)
        for seed in args.seeds:  # seed-major: a stopped grid still compares every model
            for name in args.only or STUDY:
                train(name, seed, args)
    else:
        report(args)


if __name__ == "__main__":
    sys.exit(main())
