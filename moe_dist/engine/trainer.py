"""``moe-dist train``: the DeepSpeed engine with ZeRO and expert parallelism on the shard pipeline.

The loop (``Trainer.train``) reads top to bottom; setup, checkpoints, metrics, evaluation and
signals are collaborators. Exit codes: 0 done, EXIT_PREEMPTED after a signal-triggered checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator

import torch

from ..files import atomic_write
from . import checkpoint
from .config import RunConfig
from .metrics import MetricsLogger, memory_mb, summary

EXIT_PREEMPTED = 75  # "checkpoint saved after SIGTERM/SIGUSR1; requeue me" (EX_TEMPFAIL)


class NonFiniteError(RuntimeError):
    pass


class GracefulStop:
    """SIGTERM/SIGUSR1, or the file named by $MOE_DIST_STOP_FILE appearing (what launch/slurm/train.sbatch
    creates on a preemption notice), ask for a stop; the loop finishes its step and all ranks agree."""

    def __init__(self):
        self.signalled = False
        self.stop_file = os.environ.get("MOE_DIST_STOP_FILE", "")
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signalled = True

    @property
    def requested(self) -> bool:
        return self.signalled or bool(self.stop_file and os.path.exists(self.stop_file))


@dataclass
class StepOutput:
    """One micro-batch forward: the loss to backpropagate, its unweighted parts, the model's output."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor]
    model: object  # models.ModelOutput


class NanInjector:
    """Debug (``debug.nan_loss_steps``): wraps the loss so that it is NaN at the given micro steps on
    one rank, to exercise the all-rank skip. Installed only when configured."""

    def __init__(self, loss_fn, trainer: "Trainer"):
        self.loss_fn, self.trainer = loss_fn, trainer

    def __call__(self, out):
        result = self.loss_fn(out)
        debug = self.trainer.cfg.debug
        if self.trainer.micro_step in debug.nan_loss_steps and self.trainer.rank == debug.nan_loss_rank:
            result.total = result.total * float("nan")
        return result


def _all_reduce(value: float, op: str) -> float:
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    t = torch.tensor([value], dtype=torch.float32, device=get_accelerator().device_name())
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return float(t.item())


class Trainer:
    def __init__(self, cfg: RunConfig, env):
        import deepspeed
        import deepspeed.comm as dist

        from ..data import ShardLoader
        from ..models import build_model
        from ..models.loss import ContrastiveLoss
        from ..models.params import count_params
        from ..text import get_tokenizer
        from .optim import build_optimizer, build_schedule

        self.cfg, self.env = cfg, env
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed)  # identical non-expert init on every rank
        self.model_cfg = cfg.model_config()
        model = build_model(self.model_cfg, ep_size=cfg.ep_size)
        with torch.device("meta"):  # global counts (all experts), whatever this rank holds
            self.params = count_params(build_model(self.model_cfg), self.model_cfg)
        optimizer = build_optimizer(model, cfg)
        self.ds_config = cfg.deepspeed_config(self.world)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=build_schedule(optimizer, cfg),
                                                                 config=self.ds_config)
        if self.world == 1 and cfg.zero_stage == 0:
            # one rank: DeepSpeed would still flatten, "all-reduce" and copy back every gradient (~2% of a step)
            self.engine.enable_backward_allreduce = False
        torch.manual_seed(cfg.seed + self.rank)
        t = self.model_cfg.text
        self.tokenizer = get_tokenizer(cfg.data.tokenizer or t.tokenizer, t.context_length)
        self.loader = ShardLoader(self._loader_config("train"), self.tokenizer, self.rank, self.world)
        self.loss_fn = ContrastiveLoss(self.model_cfg.loss, self.rank, self.world)
        if cfg.debug.nan_loss_steps:
            self.loss_fn = NanInjector(self.loss_fn, self)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.step, self.skipped, self.consecutive_skips, self.micro_step = 0, 0, 0, 0

    def _loader_config(self, split: str, eval_samples: int = 0):
        return self.cfg.data.loader_config(split, self.cfg.batch.micro_batch, self.model_cfg.vision.image_size,
                                           self.cfg.seed, eval_samples)

    # ------------------------------------------------------------------ collaborators
    def resume(self, how: str) -> None:
        found = checkpoint.find_resume(self.cfg.checkpoint_dir, how)
        if found is None:
            return
        root, tag = found
        checkpoint.check_compatible(os.path.join(root, tag), self.world, self.cfg.ep_size)
        client = checkpoint.load(self.engine, root, tag, self.rank)
        self.step, self.skipped, self.micro_step = client["step"], client["skipped"], client["micro_step"]
        self.loader.load_state_dict(client["loader"])
        checkpoint.set_rng_state(client["rng"])
        self.log.print(f"resumed from {os.path.join(root, tag)} at step {self.step}")

    def save(self) -> str:
        client = {"step": self.step, "skipped": self.skipped, "micro_step": self.micro_step,
                  "loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        return checkpoint.save(self.engine, self.cfg.checkpoint_dir, self.step, client, self.cfg.checkpoint.keep,
                               self._run_files(), self.cfg.debug.pause_in_save_s)

    def _run_files(self) -> Dict[str, str]:
        """What the run was (name -> text): written to output_dir at start and into every checkpoint."""
        resolved = {**self.cfg.to_dict(), "_world_size": self.world}
        return {"run_config.json": json.dumps(resolved, indent=2),
                "deepspeed_config.json": json.dumps(self.ds_config, indent=2)}

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        for name, text in self._run_files().items():
            atomic_write(os.path.join(self.cfg.output_dir, name), text, durable=False)

    def _batches(self) -> Iterator:
        while True:
            yield from self.loader

    def _forward(self, batch) -> StepOutput:
        images = batch.images.to(self.engine.device, dtype=self.dtype)
        out = self.engine(images, batch.tokens.to(self.engine.device))
        result = self.loss_fn(out)
        return StepOutput(result.total, result.parts, out)

    def evaluate(self) -> Dict[str, float]:
        """Validation contrastive loss over ``eval.batches`` batches per rank (the eval issue adds
        zero-shot and retrieval metrics here)."""
        if not self.cfg.data.val:
            return {}
        from ..data import ShardLoader

        samples = self.cfg.eval.batches * self.cfg.batch.micro_batch * self.world
        loader = ShardLoader(self._loader_config("val", samples), self.tokenizer, self.rank, self.world)
        self.engine.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in loader:
                total, count = total + float(self._forward(batch).parts["contrastive"]), count + 1
        self.engine.train()
        return {"val/contrastive": _all_reduce(total / max(count, 1), "SUM") / self.world}

    # ------------------------------------------------------------------ the loop
    def train(self, resume: str = "auto") -> int:
        cfg = self.cfg
        self.log = MetricsLogger(cfg.output_dir, self.rank, cfg.steps, 0, cfg.logging.tensorboard,
                                 cfg.logging.progress)
        self.resume(resume)
        self._write_run_files()
        self.log.print(summary(cfg, self.env, self.model_cfg, self.params, self.ds_config))
        if self.step >= cfg.steps:
            self.log.print(f"nothing to do: the checkpoint is at step {self.step} of {cfg.steps}")
            self.log.close()
            return 0
        stop, batches = GracefulStop(), self._batches()
        while self.step < cfg.steps:
            # 1. one optimizer step = grad_accum micro-batches whose loss is finite on every rank
            start, wait = time.perf_counter(), 0.0
            boundary_step = self.engine.global_steps + 1
            while self.engine.global_steps < boundary_step:
                t = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t
                step_out = self._forward(batch)
                self.micro_step += 1
                if _all_reduce(float(torch.isfinite(step_out.loss.detach()).all()), "MIN") < 1:
                    self._skip_nonfinite()
                    continue
                self.consecutive_skips = 0
                self.engine.backward(step_out.loss)
                self.engine.step()
            self.step += 1
            # 2. metrics, evaluation, checkpoints, signals
            elapsed = time.perf_counter() - start
            self._log_step(step_out, elapsed, wait)
            if cfg.eval.every and self.step % cfg.eval.every == 0:
                self.log.log(self.step, self.evaluate(), {})
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                self.save()
            if _all_reduce(float(stop.requested), "MAX") > 0:
                path = self.save()
                self.log.print(f"stopped by signal at step {self.step}; checkpoint {path}")
                self.log.close()
                return EXIT_PREEMPTED
        self.log.log(self.step, self.evaluate(), {})
        path = self.save()
        tensorboard = f"; TensorBoard logs {os.path.abspath(self.log.tb_dir)}" if self.log.writer is not None else ""
        self.log.print(f"done: {self.step} steps; checkpoint {path}{tensorboard}")
        self.log.close()
        return 0

    def _skip_nonfinite(self) -> None:
        self.skipped += 1
        self.consecutive_skips += 1
        self.log.print(f"non-finite loss at micro step {self.micro_step}: skipped on all ranks "
                       f"({self.skipped} skipped so far)")
        self.log.log(self.step, {"train/skipped_steps": float(self.skipped)}, {})
        if self.consecutive_skips >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(f"{self.consecutive_skips} consecutive micro steps had a non-finite loss "
                                 f"(max_nonfinite_steps={self.cfg.max_nonfinite_steps}); stopping. Lower the learning "
                                 "rate, check the data, or use fp32/bf16 instead of fp16")

    def _log_step(self, step_out: StepOutput, elapsed: float, wait: float) -> None:
        if self.step % self.cfg.logging.every and self.step != self.cfg.steps:
            return
        samples_per_s = self.ds_config["train_batch_size"] / elapsed
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self.engine.get_global_grad_norm()
        out = step_out.model
        scalars = {"loss/total": float(step_out.loss.detach()),
                   **{f"loss/{k}": float(v.detach()) for k, v in step_out.parts.items()},
                   "train/lr": lr, "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                   "train/logit_scale": float(out.logit_scale.detach()), "train/skipped_steps": float(self.skipped),
                   "perf/samples_per_s": samples_per_s, "perf/step_time_s": elapsed,
                   "perf/data_wait_fraction": wait / elapsed, **memory_mb()}
        self.log.log(self.step, scalars, out.moe.layer_stats)
        self.log.progress(self.step, scalars["loss/total"], lr, samples_per_s)


def run(cfg: RunConfig, resume: str = "auto") -> int:
    """Validate, start the process group, train; returns the exit code."""
    from ..distributed import detect_env, init_distributed

    # deprecation notices that open_clip ClipLoss and DeepSpeed ZeRO would print every step
    warnings.filterwarnings("ignore", message=".*all_gather.* is deprecated")
    env = detect_env()
    cfg.validate(env.world_size)  # before any process group starts
    init_distributed(env)
    trainer = Trainer(cfg, env)
    return trainer.train(resume)
