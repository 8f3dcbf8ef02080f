"""The captioning study (issue 28): CoCa-MoE and its dense twin on the emoji recipe, the recipe options one at
a time, decoding options on the trained checkpoints, and the report against the issue's three targets.

    python experiments/study.py run --grid caption --eval-every 0   # train the arms of CAPTION (3 seeds)
    python experiments/study.py decode --grid caption               # decoding variants on each final checkpoint
    python experiments/study.py report --grid caption               # tables into docs/results.md, JSON, plots

Every run evaluates once, at its end, on the held-out split: caption loss, retrieval, and greedy captions
scored with BLEU-4, CIDEr-D, token F1 and diversity beside the two baselines of ``moe-dist eval --task
caption`` (the best constant caption among the training captions, chosen in hindsight, and retrieval
captioning with the run's own towers). ``decode`` re-scores the saved checkpoints with each of DECODINGS
(one JSON per run and variant, so a stopped sweep continues; seeds other than 0 get EVERY_SEED's
variants only). The targets (held-out split): CIDEr-D above retrieval captioning, token F1 at least 1.5x
the best constant's, no caption given to more than 10 % of the images.
"""

from __future__ import annotations

import json
import os
import statistics
from typing import Dict, List, Optional

import study

# decoding variant -> eval.decoding fields (the default, greedy, is what training's final eval used)
DECODINGS: Dict[str, dict] = {
    "greedy": {},  # the run's own final eval
    "greedy-rep1.5": {"repetition_penalty": 1.5},
    "greedy-min3": {"min_length": 3},
    "beam5": {"strategy": "beam", "beam_width": 5},
    "beam5-rerank3": {"strategy": "beam", "beam_width": 5, "rerank": 3.0},
    "beam5-rerank10": {"strategy": "beam", "beam_width": 5, "rerank": 10.0},
}
EVERY_SEED = ["greedy", "beam5", "beam5-rerank3"]  # the variants decoded for every seed; the others on seed 0 only
DECODE_ARMS = ["coca-moe", "coca-dense", "coca-moe-best", "coca-dense-best"]  # `decode`'s arms (others: --only)
CAPTION_KEYS = {"BLEU-4": "bleu4", "CIDEr-D": "cider_d", "token F1": "token_f1", "distinct": "distinct",
                "top share": "top_caption_share"}
BEGIN, END = "<!-- caption-report:begin -->", "<!-- caption-report:end -->"


def final_row(directory: str) -> Optional[dict]:
    rows = study.read_metrics(os.path.join(directory, "metrics.jsonl"))
    done = [r for r in rows if "val/caption/token_f1" in r]
    return done[-1] if done else None


def train_caption_curve(directory: str) -> Dict[int, float]:
    return {r["step"]: r["loss/caption"] for r in study.read_metrics(os.path.join(directory, "metrics.jsonl"))
            if "loss/caption" in r}


def targets(m: dict) -> Dict[str, bool]:
    """The issue's three targets for one run's caption metrics (flat, ``caption_baselines`` keys)."""
    return {"CIDEr-D > retrieval": m["cider_d"] > m["retrieval_cider_d"],
            "F1 >= 1.5x constant": m["token_f1"] >= 1.5 * m["constant_token_f1"],
            "top share <= 10 %": m["top_caption_share"] <= 0.10}


def collect(out: str, names: List[str]) -> dict:
    """{arm: {"seeds", "what", "final": {column: summary}, "curve": {step: [per seed]}, "targets": {t: k of n}}}."""
    result = {}
    for name in names:
        per_seed = []
        curve: Dict[int, List[float]] = {}
        for seed_dir in sorted(os.listdir(os.path.join(out, name))) if os.path.isdir(os.path.join(out, name)) else []:
            directory = os.path.join(out, name, seed_dir)
            row = final_row(directory)
            if row is None:
                continue
            m = {k[len("val/caption/"):]: v for k, v in row.items() if k.startswith("val/caption/")}
            m["val caption loss"] = row["val/loss/caption"]
            m["i->t R@10"] = row["val/retrieval/image_to_text_R@10"]
            train = train_caption_curve(directory)
            m["train caption loss"] = statistics.fmean([v for _, v in sorted(train.items())[-5:]])
            per_seed.append(m)
            for step, value in train.items():
                curve.setdefault(step, []).append(value)
        if not per_seed:
            continue
        columns = sorted({k for m in per_seed for k in m if isinstance(m[k], (int, float))})
        hits = [targets(m) for m in per_seed]
        result[name] = {"seeds": len(per_seed), "what": study.RUNS[name][1],
                        "final": {c: study.summary([m[c] for m in per_seed]) for c in columns},
                        "curve": curve, "targets": {t: sum(h[t] for h in hits) for t in hits[0]}}
    return result


def _cell(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def main_table(results: dict, names: List[str]) -> str:
    head = ["arm", "seeds", "train caption loss", "val caption loss", *CAPTION_KEYS, "i->t R@10",
            "constant F1", "retrieval CIDEr-D", "targets met (of 3 per seed)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        if name not in results:
            continue
        r, f = results[name], results[name]["final"]
        met = ", ".join(f"{t}: {k}/{r['seeds']}" for t, k in r["targets"].items())
        lines.append("| " + " | ".join([name, str(r["seeds"]), _cell(f["train caption loss"], 2),
                                        _cell(f["val caption loss"], 2)]
                                       + [_cell(f[k]) for k in CAPTION_KEYS.values()]
                                       + [_cell(f["i->t R@10"]), _cell(f["constant_token_f1"]),
                                          _cell(f["retrieval_cider_d"]), met]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ decoding
def decode(args) -> None:
    """Score each finished run of ``args.only`` (default DECODE_ARMS) with every variant of DECODINGS."""
    from moe_dist.engine.config import DecodingSection
    from moe_dist.evaluation import evaluate
    from moe_dist.evaluation.caption_baselines import read_caption_pool
    from moe_dist.models import load_pretrained

    pool = read_caption_pool(args.data)
    for name in args.only or DECODE_ARMS:
        for seed in args.seeds:
            directory = study.run_dir(args.out, name, seed)
            if final_row(directory) is None:
                print(f"  {name} seed {seed}: not trained yet, skipped", flush=True)
                continue
            model, tokenizer = load_pretrained(os.path.join(directory, "checkpoints"), ep_size=1)
            for variant, fields in DECODINGS.items():
                path = os.path.join(directory, "decoding", f"{variant}.json")
                if os.path.isfile(path) or (seed != 0 and variant not in EVERY_SEED):
                    continue
                if not fields:  # the default decoding: what the run's final eval measured
                    scores = {k[len("val/caption/"):]: v for k, v in final_row(directory).items()
                              if k.startswith("val/caption/")}
                else:
                    scores = evaluate(model, tokenizer, os.path.join(args.data, "val"), ["caption"], batch_size=64,
                                      caption_pool=pool, generation=DecodingSection(**fields).generation(),
                                      progress=False).to_json()["caption"]
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    json.dump({"decoding": fields, **scores}, f, indent=1)
                print(f"  {name} seed {seed} {variant}: token F1 {scores['token_f1']:.3f}, CIDEr-D "
                      f"{scores['cider_d']:.3f}", flush=True)


def collect_decoding(out: str, names: List[str]) -> dict:
    """{arm: {variant: {"n", metric: summary, "targets": {t: k}}}} from the runs' decoding/*.json."""
    result: Dict[str, dict] = {}
    for name in names:
        for variant in DECODINGS:
            found = []
            base = os.path.join(out, name)
            for seed_dir in sorted(os.listdir(base)) if os.path.isdir(base) else []:
                path = os.path.join(base, seed_dir, "decoding", f"{variant}.json")
                if os.path.isfile(path):
                    with open(path) as f:
                        found.append(json.load(f))
            if found:
                hits = [targets(m) for m in found]
                result.setdefault(name, {})[variant] = {
                    "n": len(found), **{k: study.summary([m[k] for m in found]) for k in CAPTION_KEYS.values()},
                    "targets": {t: sum(h[t] for h in hits) for t in hits[0]}}
    return result


def decoding_table(results: dict) -> str:
    head = ["arm", "decoding", "seeds", *CAPTION_KEYS, "targets met (CIDEr-D > retrieval, F1 >= 1.5x, top <= 10 %)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, variants in results.items():
        for variant, r in variants.items():
            met = ", ".join(f"{k}/{r['n']}" for k in r["targets"].values())
            lines.append("| " + " | ".join([name, variant, str(r["n"])] + [_cell(r[k]) for k in CAPTION_KEYS.values()]
                                           + [met]) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ report
def plot_curves(results: dict, names: List[str], where: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab20").colors  # one colour per arm (the default cycle repeats after 10)
    for i, name in enumerate(names):
        if name not in results:
            continue
        points = sorted((s, v) for s, v in results[name]["curve"].items() if len(v) == results[name]["seeds"])
        mean = [statistics.fmean(v) for _, v in points]
        smooth = [statistics.fmean(mean[max(0, i - 4):i + 1]) for i in range(len(mean))]
        ax.plot([s for s, _ in points], smooth, label=name, color=colours[i % len(colours)],
                linestyle="--" if "dense" in name else "-")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per token")
    ax.set_title("train caption loss (mean over seeds, 50-step moving average)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    file = "caption_loss.png"
    fig.savefig(os.path.join(where, file), dpi=100)
    plt.close(fig)
    return file


def report(args) -> None:
    names = args.only or study.CAPTION
    results = collect(args.out, names)
    if not results:
        raise SystemExit(f"no finished caption run under {args.out}; run "
                         "'python experiments/study.py run --grid caption --eval-every 0' first")
    decoding = collect_decoding(args.out, [n for n in names if n in results])
    os.makedirs(args.figures, exist_ok=True)
    made = plot_curves(results, names, args.figures)
    with open(os.path.join(args.figures, "caption_study.json"), "w") as f:
        json.dump({"steps": args.steps, "runs": results, "decoding": decoding}, f, indent=1)
    rel = os.path.relpath(args.figures, os.path.dirname(os.path.abspath(args.docs)))
    text = (main_table(results, names) + "\n\nDecoding variants on the same checkpoints:\n\n"
            + decoding_table(decoding) + f"\n\n![train caption loss]({rel}/{made})")
    print(text)
    if study.write_docs_block(args.docs, text, BEGIN, END):
        print(f"\nwrote the tables into {args.docs}, {made} and caption_study.json into {args.figures}")
    else:
        print(f"\n{args.docs} has no '{BEGIN}' ... '{END}' block: tables printed only")
