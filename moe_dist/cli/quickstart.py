"""``moe-dist quickstart``: the whole system end to end in a few minutes on a CPU.

    moe-dist quickstart [--out DIR (runs/quickstart)] [--steps N] [--model NAME] [--ranks N]
                        [--data SPEC [--val SPEC] [--classes FILE]]

Outline (every step runs the command a user would run, as a subprocess; its output is streamed and
kept in RUN/logs/<step>.log, and a failure stops the quickstart with one line naming the step and log):
    1. data: ``moe-dist-data synth`` into DIR/data (skipped when it is there, or with --data), then
       ``moe-dist-data validate`` of the train and val specs;
    2. tokenizer: ``moe-dist-data tokenizer`` on the train spec into DIR/tokenizer (once per spec);
    3. train: configs/runs/tiny-synth.yaml with ``--set`` overrides through the deepspeed launcher on
       --ranks ranks (ep_size=2 when it divides them, ZeRO-2), evaluating on the val split at the end;
    4. eval: ``moe-dist eval`` (zero-shot with classes, retrieval, loss) of the final checkpoint on the
       held-out split, as JSON;
    5. ``moe-dist export`` and ``moe-dist analyze-routing`` (plots); RUN/summary.json holds the absolute
       paths of everything and the metrics, and DIR/summary.json is a copy of the latest run's.

Layout: DIR/data and DIR/tokenizer are made once and reused; every run trains into its own
DIR/runs/<UTC time> with ``--resume none``, so a re-run is a fresh run that never meets another run's
checkpoints (docs/guarantees.md).

The synth data is laid out so that no rank runs short: the train split holds ranks x workers x m
shards of 8 micro-batches each, so every rank reads the same whole number of batches per epoch.

DeepSpeed's CPU backend compiles a C++ op on first use (about a minute on 2 cores). The children get
``TORCH_EXTENSIONS_DIR`` = ~/.cache/moe_dist/torch_extensions/<this install> unless it is set, so two
installs (other torch or deepspeed) on one machine never rebuild over each other's op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List

RUN_CONFIG = "tiny-synth.yaml"
SYNTH_SAMPLES = 1900  # about this many train samples (the layout rounds it to whole shards)
SYNTH_VAL_FRACTION = 0.05
SYNTH_SEED = 0
VOCAB_SIZE = 1000
STEPS = 5


class StepFailed(RuntimeError):
    """A step's command exited non-zero."""


@dataclass
class Plan:
    """What the quickstart will run, resolved before anything starts."""

    out: str
    run: str
    ranks: int
    ep_size: int
    config: str
    sets: List[str]
    train: str
    val: str
    classes: str
    tokenizer: str
    synth_n: int = 0  # 0: the user's --data
    synth_per_shard: int = 0
    notes: List[str] = field(default_factory=list)


def run_config_path() -> str:
    """configs/runs/tiny-synth.yaml of the source tree, else of the install prefix."""
    from pathlib import Path

    for root in (Path(__file__).resolve().parents[2] / "configs", Path(sys.prefix) / "share" / "moe_dist" / "configs"):
        if (root / "runs" / RUN_CONFIG).is_file():
            return str(root / "runs" / RUN_CONFIG)
    raise ValueError(f"configs/runs/{RUN_CONFIG} is not installed; reinstall moe-dist (pip install -e .)")


def extensions_dir() -> str:
    """Where DeepSpeed's JIT-built ops go: $TORCH_EXTENSIONS_DIR, else a directory private to this install
    (keyed by the deepspeed and torch it was built against)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import deepspeed
    import torch

    key = f"{os.path.realpath(deepspeed.__file__)}|{deepspeed.__version__}|{torch.__version__}|{sys.version}"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "moe_dist", "torch_extensions", hashlib.sha256(key.encode()).hexdigest()[:12])


def synth_layout(ranks: int, workers: int, micro_batch: int) -> tuple:
    """(n, per_shard): a synth size whose train split is ranks x workers x m full shards of 8 micro-batches,
    so exact-mode epochs give every rank the same whole number of batches (no padding)."""
    from data_tools.writer import split_of

    per_shard = 8 * micro_batch
    streams = ranks * max(1, workers)
    train = streams * max(1, round(SYNTH_SAMPLES / (streams * per_shard))) * per_shard
    n = seen = 0
    while seen < train:  # the writer assigns sample i (key i) to val by a hash of its key
        seen += split_of(f"{n:09d}", SYNTH_VAL_FRACTION, SYNTH_SEED) == "train"
        n += 1
    return n, per_shard


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")  # a source that is a URL (http://, s3://, pipe:), not a path


def absolute_spec(spec: str) -> str:
    """``spec`` with its local sources made absolute (the children run elsewhere); URLs stay as they are."""
    return "::".join(s if not s.strip() or _URL.match(s.strip()) else os.path.abspath(s) for s in spec.split("::"))


def held_out(spec: str) -> str:
    """The val split beside a train spec that is a shard output dir or its train split (local, http(s)://
    or s3://), else ''."""
    from ..data.remote import is_remote
    from ..data.spec import dataset_splits

    path = spec.rstrip("/")
    if re.search(r"::|[{?]", path):  # several sources, a pattern or a query: no single directory
        return ""
    for directory in (path, os.path.dirname(path)):
        splits = dataset_splits(directory) if is_remote(directory) or os.path.isdir(directory) else None
        if splits and "val" in splits and (directory == path or os.path.basename(path) == "train"):
            return splits["val"].path
    return ""


def plan(args: argparse.Namespace) -> Plan:
    """Resolve paths, the run config and the data layout; ValueError before anything runs. Specs may be
    local or remote (http(s)://, s3://), as for ``moe-dist train``; local sources are made absolute."""
    from ..data import resolve_spec
    from ..data.urls import shown_spec
    from ..engine import load_run_config

    if args.ranks < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError(f"--ranks ({args.ranks}) and --steps ({args.steps}) must be >= 1")
    out = os.path.abspath(args.out)
    run = os.path.join(out, "runs", time.strftime("%Y%m%d-%H%M%S", time.gmtime()))
    while os.path.exists(run):
        run += "a"
    config = run_config_path()
    base = load_run_config(config, [f"model.name={args.model}"])
    experts = base.model_config().expert_counts()  # every tower's (overrides may differ)
    ep_size = 2 if args.ranks % 2 == 0 and all(e % 2 == 0 for e in experts) else 1
    notes = []
    if args.data:
        train = absolute_spec(args.data)
        shards = resolve_spec(train, need_counts=False)
        val = absolute_spec(args.val) if args.val else held_out(train)
        if not val:
            raise ValueError(f"--data {shown_spec(args.data)} has no val split beside it; give held-out shards with "
                             "--val SPEC")
        classes = os.path.abspath(args.classes) if args.classes else ""
        synth_n = per_shard = 0
        if len(shards) < args.ranks * max(1, base.data.workers):
            notes.append(f"{len(shards)} train shard(s) cannot feed {args.ranks} ranks x {base.data.workers} "
                         "worker(s) once per epoch: data.mode=resampled")
    else:
        data = os.path.join(out, "data")
        train, val, classes = data, os.path.join(data, "val"), os.path.join(data, "classes.json")
        synth_n, per_shard = synth_layout(args.ranks, base.data.workers, base.batch.micro_batch)
        if args.classes:
            raise ValueError("--classes goes with --data; the synth data brings its own classes.json")
    tasks = "[loss,zeroshot,retrieval]" if classes else "[loss,retrieval]"
    sets = [f"model.name={args.model}", f"data.train={train}", f"data.val={val}",
            f"data.tokenizer={os.path.join(out, 'tokenizer', 'tok.model')}", f"output_dir={run}",
            f"ep_size={ep_size}", f"eval.tasks={tasks}"] + ([f"eval.classes={classes}"] if classes else [])
    sets += [f"steps={args.steps}"] if args.steps else []
    sets += ["data.mode=resampled"] if notes else []
    load_run_config(config, sets).validate(args.ranks)  # a bad --model / --ranks fails here, in seconds
    return Plan(out, run, args.ranks, ep_size, config, sets, train, val, classes,
                os.path.join(out, "tokenizer", "tok.model"), synth_n, per_shard, notes)


class Runner:
    """Runs the steps' commands: output streamed to the terminal and into RUN/logs/<name>.log."""

    def __init__(self, plan: Plan, env: Dict[str, str]):
        self.plan, self.env, self.timings = plan, env, {}
        os.makedirs(os.path.join(plan.run, "logs"), exist_ok=True)

    def __call__(self, step: int, name: str, shown: str, cmd: List[str]) -> None:
        from ..data.urls import shown_spec

        log_path = os.path.join(self.plan.run, "logs", f"{step}-{name.replace(' ', '-')}.log")
        print(f"  $ {shown_spec(shown)}", flush=True)  # a presigned URL's token is never printed
        start = time.time()
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
            out = sys.stdout.buffer
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out.write(chunk)
                out.flush()
                log.write(chunk)
            code = proc.wait()
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - start
        if code != 0:
            raise StepFailed(f"step {step}/{STEPS} ({name}) failed with exit code {code}; its output is in {log_path}")


def child_env(ext_dir: str) -> Dict[str, str]:
    from deepspeed.accelerator import get_accelerator

    from ..distributed.allocator import allocator_env

    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=ext_dir)
    env.setdefault("OMP_NUM_THREADS", "1")  # ranks x threads within the cores; what launch/deepspeed.sh does
    if get_accelerator().device_name() == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")  # detected already; the children need not detect it again
        env.update(allocator_env(env))  # tcmalloc when installed: no page faults on fresh expert gradients
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_steps(p: Plan, run: Runner) -> None:
    from ..data.remote import is_remote
    from ..data.urls import shown_spec

    data_cli, data_tool = [sys.executable, "-m", "data_tools.cli"], "moe-dist-data"
    if p.synth_n:
        manifest = _read_json(os.path.join(p.train, "manifest.json"))
        made = (manifest.get("inputs"), manifest.get("options", {}).get("per_shard"))
        if manifest and not str(manifest.get("source", "")).startswith("synth("):
            raise StepFailed(f"{p.train} holds a dataset the quickstart did not make ({manifest.get('source')}); "
                             f"pass it as --data {p.train}, or choose another --out")
        if made == (p.synth_n, p.synth_per_shard) and "error" not in manifest:
            print(f"  reusing the synth data in {p.train}")
        else:
            args = ["synth", "--out", p.train, "--n", str(p.synth_n), "--per-shard", str(p.synth_per_shard),
                    "--val-fraction", str(SYNTH_VAL_FRACTION), "--seed", str(SYNTH_SEED)]
            args += ["--overwrite"] if manifest else []  # our own synth, for other --ranks or interrupted
            run(1, "synth", shlex.join([data_tool] + args), data_cli + args)
    for spec in (p.train, p.val):
        run(1, "validate", shlex.join([data_tool, "validate", spec]), data_cli + ["validate", spec, "-q"])
    print(f"[2/{STEPS}] tokenizer: sentencepiece on the train captions", flush=True)
    manifest = {} if is_remote(p.train) else _read_json(os.path.join(p.train, "manifest.json"))
    source = {"spec": shown_spec(p.train), "vocab_size": VOCAB_SIZE, "data": manifest.get("inputs")}
    record = os.path.join(os.path.dirname(p.tokenizer), "source.json")
    if os.path.isfile(p.tokenizer) and _read_json(record) == source:
        print(f"  reusing {p.tokenizer}")
        return
    args = ["tokenizer", p.train, "--out", p.tokenizer, "--vocab-size", str(VOCAB_SIZE)]
    run(2, "tokenizer", shlex.join([data_tool] + args), data_cli + args + ["-q"])
    from ..files import atomic_json

    atomic_json(record, source)


def _read_json(path: str) -> dict:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _train_step(p: Plan, run: Runner, ext_dir: str) -> None:
    op = os.path.join(ext_dir, "deepspeed_shm_comm", "deepspeed_shm_comm.so")
    if run.env.get("DS_ACCELERATOR") == "cpu" and not os.path.isfile(op):
        print(f"  note: DeepSpeed compiles a C++ op (shm communication) on its first use here: about a minute "
              f"on 2 cores, with no output; it is kept in {ext_dir} for the next runs", flush=True)
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    cmd = [launcher] if launcher else [sys.executable, "-m", "deepspeed.launcher.runner"]
    # --log_level error: the runner's INFO lines and its one warning for a one-node run (no hostfile)
    cmd += ["--num_gpus", str(p.ranks), "--master_port", str(free_port()), "--log_level", "error", "--module",
            "moe_dist", "train", "--config", p.config, "--resume", "none"]
    for s in p.sets:
        cmd += ["--set", s]
    shown = shlex.join(["deepspeed", "--num_gpus", str(p.ranks), "--module", "moe_dist"] + cmd[cmd.index("train"):])
    run(3, "train", shown, cmd)


def _eval_steps(p: Plan, run: Runner) -> Dict[str, object]:
    from ..data.urls import shown_spec

    moe_dist = [sys.executable, "-m", "moe_dist"]
    ckpt = os.path.join(p.run, "checkpoints")
    paths = {"eval_json": os.path.join(p.run, "eval.json"), "export": os.path.join(p.run, "model.safetensors"),
             "routing_dir": os.path.join(p.run, "routing")}
    tasks = "zeroshot,retrieval,loss" if p.classes else "retrieval,loss"
    args = ["eval", "--checkpoint", ckpt, "--data", p.val, "--task", tasks, "--json", paths["eval_json"]]
    if p.classes:
        paths["confusion_png"] = os.path.join(p.run, "plots", "confusion.png")
        args += ["--classes", p.classes, "--confusion-png", paths["confusion_png"]]
    print(f"[4/{STEPS}] eval: {tasks} on the held-out split {shown_spec(p.val)}", flush=True)
    run(4, "eval", shlex.join(["moe-dist"] + args), moe_dist + args + ["--no-progress"])
    print(f"[5/{STEPS}] export and routing analysis", flush=True)
    args = ["export", "--checkpoint", ckpt, "--out", paths["export"]]
    run(5, "export", shlex.join(["moe-dist"] + args), moe_dist + args)
    args = ["analyze-routing", "--checkpoint", ckpt, "--data", p.val, "--out", paths["routing_dir"]]
    args += ["--classes", p.classes] if p.classes else []
    run(5, "analyze-routing", shlex.join(["moe-dist"] + args), moe_dist + args)
    return paths


def summarize(p: Plan, paths: Dict[str, object], timings: Dict[str, float]) -> Dict[str, object]:
    """summary.json: absolute paths of every artefact and the metrics (final training loss, eval); the data
    specs as ``plan`` resolved them (URLs without their query string)."""
    from ..checkpoint_files import find_checkpoint
    from ..data.urls import shown_spec

    with open(os.path.join(p.run, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [(r["step"], r["loss/total"]) for r in rows if "loss/total" in r]
    result = _read_json(str(paths["eval_json"]))
    routing = str(paths.pop("routing_dir"))
    plots = sorted(os.path.join(routing, n) for n in os.listdir(routing) if n.endswith(".png"))
    plots += [str(paths["confusion_png"])] if "confusion_png" in paths else []
    metrics = {"train": {"steps": losses[-1][0], "first_loss": losses[0][1], "final_loss": losses[-1][1]}}
    for task in ("zeroshot", "retrieval", "loss"):
        if task in result:
            metrics[task] = {k: v for k, v in result[task].items() if not isinstance(v, (list, dict))}
    if "zeroshot" in metrics and p.classes:
        metrics["zeroshot"]["chance_top1"] = 1 / len(_read_json(p.classes).get("classes", [None]))
    if "retrieval" in metrics and metrics["retrieval"].get("images"):
        metrics["retrieval"]["chance_R@10"] = min(1.0, 10 / metrics["retrieval"]["images"])
    return {
        "run": p.run, "ranks": p.ranks, "ep_size": p.ep_size,
        "paths": {"checkpoint": find_checkpoint(os.path.join(p.run, "checkpoints")),
                  "checkpoints": os.path.join(p.run, "checkpoints"), "export": paths["export"],
                  "tensorboard": os.path.join(p.run, "tensorboard"), "metrics": os.path.join(p.run, "metrics.jsonl"),
                  "eval_json": paths["eval_json"], "routing_json": os.path.join(routing, "routing.json"),
                  "plots": plots, "train_data": shown_spec(p.train), "val_data": shown_spec(p.val),
                  "tokenizer": p.tokenizer, "classes": p.classes or None, "logs": os.path.join(p.run, "logs")},
        "metrics": metrics, "seconds": {k: round(v, 1) for k, v in timings.items()}}


def print_summary(summary: Dict[str, object], total_s: float) -> None:
    m, paths = summary["metrics"], summary["paths"]
    t = m["train"]
    print("=" * 72)
    print(f"moe-dist quickstart done in {total_s / 60:.1f} min ({summary['ranks']} ranks, "
          f"ep_size={summary['ep_size']})")
    print(f"  train loss        {t['first_loss']:.3f} -> {t['final_loss']:.3f} after {t['steps']} steps")
    if "zeroshot" in m:
        z = m["zeroshot"]
        print(f"  zero-shot         top-1 {z['top1']:.3f}, top-5 {z['top5']:.3f}, macro F1 {z['macro_f1']:.3f} "
              f"(chance top-1 {z['chance_top1']:.3f})")
    if "retrieval" in m:
        r = m["retrieval"]
        print(f"  retrieval         image->text R@1 {r['image_to_text_R@1']:.3f} R@10 {r['image_to_text_R@10']:.3f}, "
              f"text->image R@1 {r['text_to_image_R@1']:.3f} R@10 {r['text_to_image_R@10']:.3f} over "
              f"{r['images']} images (chance R@10 {r['chance_R@10']:.3f})")
    for key in ("checkpoint", "export", "tensorboard", "metrics", "eval_json", "routing_json", "logs"):
        print(f"  {key:17s} {paths[key]}")
    print(f"  {'plots':17s} {len(paths['plots'])} PNGs, e.g. {paths['plots'][0]}" if paths["plots"] else "")
    print(f"  {'summary':17s} {os.path.join(summary['run'], 'summary.json')}")
    print(f"next: tensorboard --logdir {paths['tensorboard']}; "
          f"python -c \"from moe_dist.models import load_pretrained; load_pretrained('{paths['export']}')\"")


def _run(args: argparse.Namespace) -> int:
    from ..data.urls import shown_spec
    from ..files import atomic_json

    start = time.time()
    p = plan(args)
    ext_dir = extensions_dir()
    run = Runner(p, child_env(ext_dir))
    print(f"moe-dist quickstart: {STEPS} steps into {p.out}; this run: {p.run}", flush=True)
    for note in p.notes:
        print(f"  note: {note}")
    try:
        what = (f"synth, {p.synth_n} samples, train shards of {p.synth_per_shard} -> {p.train}" if p.synth_n
                else f"your shards {shown_spec(p.train)}, held out {shown_spec(p.val)}")
        print(f"[1/{STEPS}] data: {what}", flush=True)
        _data_steps(p, run)
        print(f"[3/{STEPS}] train: {args.model} on {p.ranks} rank(s) through the deepspeed launcher "
              f"(ep_size={p.ep_size}, ZeRO-2)", flush=True)
        _train_step(p, run, ext_dir)
        paths = _eval_steps(p, run)
    except StepFailed as err:
        print(f"moe-dist quickstart: error: {err}", file=sys.stderr)
        return 1
    summary = summarize(p, paths, run.timings)
    for path in (os.path.join(p.run, "summary.json"), os.path.join(p.out, "summary.json")):
        atomic_json(path, summary, durable=False)
    print_summary(summary, time.time() - start)
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="synth data, tokenizer, 2-rank training, eval, export and routing plots "
                                          "in a few minutes on a CPU", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join("runs", "quickstart"),
                   help="directory for the data, tokenizer and runs (default: runs/quickstart); a re-run reuses the "
                        "data and tokenizer and trains a fresh run in DIR/runs/<time>")
    p.add_argument("--steps", type=int, default=None, help=f"training steps (default: configs/runs/{RUN_CONFIG}'s)")
    p.add_argument("--model", default="moe-clip-tiny",
                   help="model name (configs/models) or JSON (default: moe-clip-tiny)")
    p.add_argument("--ranks", type=int, default=2, help="ranks started by the deepspeed launcher (default: 2)")
    p.add_argument("--data", metavar="SPEC", help="your own train shards instead of synth (e.g. the --out DIR of "
                                                  "moe-dist-data shard); the tokenizer is trained on them")
    p.add_argument("--val", metavar="SPEC", help="held-out shards for evaluation (default with --data DIR: DIR/val)")
    p.add_argument("--classes", metavar="FILE", help='with --data: zero-shot classes, JSON {"classes": [...], '
                                                     '"templates": [...]}; without it zero-shot is skipped')
    p.set_defaults(func=_run)
