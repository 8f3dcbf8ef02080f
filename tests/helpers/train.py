"""Launch real ``moe-dist train`` jobs for tests: deepspeed launcher, torchrun, or one process per rank
with SLURM-style variables (as srun starts them)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from helpers import proc
from helpers.harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUN_CONFIG = os.path.join(ROOT, "configs", "runs", "tiny-synth.yaml")


def make_synth(directory, n=480):
    """Synth shards (train/val) and a sentencepiece model, once per test module."""
    from data_tools.cli import main as data_cli

    data_cli(["synth", "--out", str(directory), "--n", str(n), "--per-shard", "40", "--val-fraction", "0.1", "-q"])
    data_cli(["tokenizer", str(directory / "train"), "--out", str(directory / "tok.model"), "--vocab-size", "200",
              "-q"])
    return directory


def overrides(data_dir, out_dir, **extra):
    base = {"data.train": data_dir / "train", "data.val": data_dir / "val", "data.tokenizer": data_dir / "tok.model",
            "output_dir": out_dir, "logging.progress": "false", "batch.micro_batch": 16, "data.workers": 1}
    base.update(extra)
    args = []
    for key, value in base.items():
        args += ["--set", f"{key}={value}"]
    return args


def clean_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def deepspeed_cmd(args, ranks=2):
    return [shutil.which("deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module",
            "moe_dist", "train", "--config", RUN_CONFIG] + args


def torchrun_cmd(args, ranks=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
            str(free_port()), "-m", "moe_dist", "train", "--config", RUN_CONFIG] + args


def run(cmd, timeout=300):
    return proc.run(cmd, timeout, env=clean_env(), cwd=ROOT)


def start_srun_style(args, ranks=2, log_dir=None):
    """One process per rank with SLURM_PROCID/SLURM_NTASKS, like srun; returns the Popen list."""
    port = free_port()
    procs = []
    for rank in range(ranks):
        env = dict(clean_env(), SLURM_PROCID=str(rank), SLURM_NTASKS=str(ranks), SLURM_LOCALID=str(rank),
                   SLURM_JOB_NODELIST="localhost", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(os.path.join(log_dir, f"rank{rank}.log"), "w") if log_dir else subprocess.DEVNULL
        procs.append(proc.popen([sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG] + args,
                                env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def wait_for(predicate, timeout=120, interval=0.05):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(interval)
    return False


def kill_all(procs, sig=signal.SIGKILL):
    for p in procs:
        proc.kill_group(p, sig)


def metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses_by_step(out_dir):
    return {m["step"]: m["loss/total"] for m in metrics(out_dir) if "loss/total" in m}
