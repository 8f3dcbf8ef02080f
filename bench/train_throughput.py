"""Training throughput on CPU, one process: moe-dist train vs open_clip_train.main, and MoE vs dense.

    python -m bench.train_throughput [--steps 40] [--batch 64] [--rounds 2] [--compile] [--device cpu] [--workers 1]

Architecture (both frameworks): ViT 4 x 192 wide, patch 8, 64 px; text 4 x 128 wide, context 32,
open_clip's BPE tokenizer; embed 128; batch 64; fp32; 1 data worker (``--workers``); same synth images.
open_clip_train reads them as a CSV of image files (its webdataset *training* path crashes on
webdataset >= 1.0's end-of-shard marker); moe-dist reads shards of the same images.
Throughput is the median of per-step samples/s after 5 warm-up steps, from each framework's own log
(open_clip_train's "N/s" field, our metrics.jsonl). Both clip gradients at norm 1.0. Our text
tower stops at each batch's last EOS (exact; models/clip.py), open_clip's runs the whole context. The MoE variant
puts E=8 top-1 experts in every other block of both towers: the same active FLOPs as the dense model.
``--compile`` adds both frameworks with torch.compile, the whole model as one graph (ours ``compile=model``;
open_clip_train ``--torchcompile``), and our MoE model compiled. Our eager runs say ``compile=none`` (the
default, ``auto``, compiles on an accelerator). Ratios
are medians of the per-round ratios (the runs of a round share the machine's state).
Writes bench/results/train_throughput.json with ``dense_vs_open_clip``, ``moe_vs_dense`` and, with
``--compile``, ``dense_vs_open_clip_compiled``, ``moe_compiled_vs_eager`` and ``moe_vs_dense_compiled``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from bench._results import save
RESULTS = os.path.join(ROOT, "bench", "results", "train_throughput.json")

VISION = {"image_size": 64, "patch_size": 8, "width": 192, "layers": 4, "heads": 3}
TEXT = {"vocab_size": 49408, "context_length": 32, "width": 128, "layers": 4, "heads": 2}


def make_data(root: str, n: int, shards: int = 4) -> str:
    """Synth shards plus the same images as files and a CSV for open_clip_train."""
    from data_tools.shard import ShardOptions, shard_items
    from data_tools.synth import synth_items

    shard_items(synth_items(n, seed=0, size=64), root, ShardOptions(per_shard=max(1, n // shards)), "bench",
                progress=False)
    images = os.path.join(root, "files")
    os.makedirs(images)
    rows = ["filepath\ttitle"]
    for path in sorted(os.listdir(os.path.join(root, "train"))):
        if not path.endswith(".tar"):
            continue
        with tarfile.open(os.path.join(root, "train", path)) as tar:
            members = {m.name: m for m in tar}
            for name in members:
                if name.endswith(".jpg"):
                    key = name[:-4]
                    target = os.path.join(images, name)
                    with open(target, "wb") as f:
                        f.write(tar.extractfile(members[name]).read())
                    caption = tar.extractfile(members[key + ".txt"]).read().decode()
                    rows.append(f"{target}\t{caption}")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return root


def model_json(root: str, moe: bool) -> str:
    spec = {"kind": "clip", "embed_dim": 128,
            "vision": {**VISION, "moe": {"every": 2 if moe else 0}},
            "text": {**TEXT, "moe": {"every": 2 if moe else 0}},
            "moe": {"num_experts": 8, "top_k": 1, "capacity_factor": 1.25}}
    path = os.path.join(root, f"bench-{'moe' if moe else 'dense'}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    return path


def run_ours(root: str, moe: bool, steps: int, batch: int, run: int = 0, compile: bool = False,
             workers: int = 1) -> float:
    out = os.path.join(root, f"ours-{'moe' if moe else 'dense'}-{run}{'-compiled' if compile else ''}")
    sets = {"compile": "model" if compile else "none", "model.name": model_json(root, moe),
            "data.train": os.path.join(root, "train"),
            "data.tokenizer": "openclip-bpe", "data.workers": workers, "output_dir": out, "steps": steps,
            "batch.micro_batch": batch, "ep_size": 1, "zero_stage": 0, "logging.progress": "false",
            "checkpoint.keep": 2, "logging.tensorboard": "false", "schedule.warmup_steps": 2}
    cmd = [sys.executable, "-m", "moe_dist", "train", "--resume", "none"]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode != 0:
        raise RuntimeError(f"moe-dist train failed:\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rates = [json.loads(line)["perf/samples_per_s"] for line in f if "perf/samples_per_s" in line]
    return statistics.median(rates[5:])


def run_open_clip(root: str, steps: int, batch: int, run: int = 0, compile: bool = False,
                  device: str = "cpu", workers: int = 1) -> float:
    cfg_dir = os.path.join(root, "open_clip_cfg")
    os.makedirs(cfg_dir, exist_ok=True)
    with open(os.path.join(cfg_dir, "bench-tiny.json"), "w") as f:
        json.dump({"embed_dim": 128,
                   "vision_cfg": {"image_size": 64, "layers": 4, "width": 192, "patch_size": 8, "head_width": 64},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 4}}, f)
    script = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
              "from open_clip_train.main import main; main(sys.argv[2:])")
    n_samples = steps * batch
    cmd = [sys.executable, "-c", script, cfg_dir, "--model", "bench-tiny", "--train-data",
           os.path.join(root, "train.csv"), "--dataset-type", "csv", "--csv-separator", "\t",
           "--train-num-samples", str(n_samples), "--batch-size", str(batch), "--workers", str(workers),
           "--epochs", "1",
           "--lr", "1e-3", "--warmup", "2", "--grad-clip-norm", "1.0", "--precision", "fp32", "--device", device,
           "--log-every-n-steps", "1",
           "--logs", os.path.join(root, "oc_logs"), "--name", f"bench{run}{'c' if compile else ''}", "--save-frequency", "0", "--report-to", ""]
    if compile:
        cmd.append("--torchcompile")
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count()))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root)
    log = res.stdout + res.stderr
    rates = [float(m) for m in re.findall(r"Batch \(t\): [\d.]+, ([\d.]+)/s", log)]
    if len(rates) < 6:
        raise RuntimeError(f"open_clip_train produced no throughput lines:\n{log[-3000:]}")
    return statistics.median(rates[5:])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the three runs")
    parser.add_argument("--compile", action="store_true", help="also run both frameworks with torch.compile")
    parser.add_argument("--device", default="cpu", help="open_clip_train's --device (ours uses the accelerator "
                                                        "DeepSpeed detects)")
    parser.add_argument("--workers", type=int, default=1, help="data workers of both frameworks (1 on this 2-core "
                                                                  "machine; more on a GPU host, or both wait on data)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    runs = {"open_clip_train_dense": [], "moe_dist_dense": [], "moe_dist_moe_e8_top1": []}
    if args.compile:
        runs.update(open_clip_train_dense_compiled=[], moe_dist_dense_compiled=[], moe_dist_moe_e8_top1_compiled=[])
    with tempfile.TemporaryDirectory() as root:
        make_data(root, args.steps * args.batch, shards=max(4, 2 * args.workers))

        def record(name: str, rate: float) -> None:
            runs[name].append(rate)
            print(f"round {len(runs[name])}: {name} {rate:.1f} samples/s", flush=True)
            save(args.out, {"partial": True, "per_round": runs})  # a killed run keeps what it measured

        for round_ in range(args.rounds):
            record("open_clip_train_dense", run_open_clip(root, args.steps, args.batch, round_, False, args.device,
                                                          args.workers))
            record("moe_dist_dense", run_ours(root, False, args.steps, args.batch, round_, workers=args.workers))
            record("moe_dist_moe_e8_top1", run_ours(root, True, args.steps, args.batch, round_, workers=args.workers))
            if args.compile:
                record("open_clip_train_dense_compiled", run_open_clip(root, args.steps, args.batch, round_, True,
                                                                       args.device, args.workers))
                record("moe_dist_dense_compiled", run_ours(root, False, args.steps, args.batch, round_, True,
                                                           args.workers))
                record("moe_dist_moe_e8_top1_compiled", run_ours(root, True, args.steps, args.batch, round_, True,
                                                                 args.workers))
    med = {k: statistics.median(v) for k, v in runs.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(runs[a], runs[b]))

    results = {"dense_vs_open_clip": ratio("moe_dist_dense", "open_clip_train_dense"),
               "moe_vs_dense": ratio("moe_dist_moe_e8_top1", "moe_dist_dense"),
               "samples_per_s": med, "per_round": runs,
               "setup": {"steps": args.steps, "batch": args.batch, "rounds": args.rounds, "vision": VISION,
                         "text": TEXT, "cpus": os.cpu_count(), "precision": "fp32", "workers": args.workers,
                         "device": args.device}}
    if args.compile:
        results["dense_vs_open_clip_compiled"] = ratio("moe_dist_dense_compiled", "open_clip_train_dense_compiled")
        results["moe_compiled_vs_eager"] = ratio("moe_dist_moe_e8_top1_compiled", "moe_dist_moe_e8_top1")
        results["moe_vs_dense_compiled"] = ratio("moe_dist_moe_e8_top1_compiled", "moe_dist_dense_compiled")
    print(f"{'run':26s} {'samples/s':>10s}")
    for name, value in med.items():
        print(f"{name:26s} {value:10.1f}")
    print(f"dense_vs_open_clip {results['dense_vs_open_clip']:.3f}  (target >= 1.1)")
    print(f"moe_vs_dense       {results['moe_vs_dense']:.3f}  (target >= 0.95)")
    if args.compile:
        print(f"dense_vs_open_clip_compiled {results['dense_vs_open_clip_compiled']:.3f}  (target >= 1.05)")
        print(f"moe_compiled_vs_eager       {results['moe_compiled_vs_eager']:.3f}")
        print(f"moe_vs_dense_compiled       {results['moe_vs_dense_compiled']:.3f}")
    save(args.out, results)
    return results


if __name__ == "__main__":
    main()
