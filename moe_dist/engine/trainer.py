"""``moe-dist train``: the DeepSpeed engine with ZeRO and expert parallelism on the shard pipeline.

The loop (``Trainer.train``) reads top to bottom; setup, the start on the checkpoint directory
(resume.py), checkpoints, metrics, evaluation and signals (stop.py) are collaborators. Exit codes: 0
done, EXIT_PREEMPTED after a signal-triggered checkpoint (or a stop requested before the first step), 1
a data error or repeated non-finite losses (every rank stops with the same message), 2 a configuration
error.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import random
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch

from ..files import atomic_write
from ..models.pretrained import model_files
from ..moe import end_optimizer_step, record_loads
from ..text.tokenizer import sentencepiece_path
from . import checkpoint
from .collectives import all_gather_text, all_reduce
from .config import RunConfig
from .metrics import ExpertLoadWindow, MetricsLogger, memory_mb, read_scalars, summary
from .resume import Resumer
from .stop import DebugFaults, GracefulStop

EXIT_PREEMPTED = 75  # "checkpoint saved after SIGTERM/SIGUSR1; requeue me" (EX_TEMPFAIL)


class NonFiniteError(RuntimeError):
    pass


@dataclass
class StepOutput:
    """One micro-batch forward: the loss to backpropagate, its unweighted parts, the model's output."""

    loss: torch.Tensor
    parts: Dict[str, torch.Tensor]
    model: object  # models.ModelOutput


class Trainer:
    def __init__(self, cfg: RunConfig, env, stop: Optional[GracefulStop] = None, resume: str = "auto"):
        import deepspeed
        import deepspeed.comm as dist

        from ..data import ShardLoader
        from ..models import build_loss, build_model
        from ..models.params import count_params
        from ..text import get_tokenizer
        from .optim import build_optimizer, build_schedule, clip_grad_norm

        self.cfg, self.env = cfg, env
        self.stop = stop or GracefulStop(cfg.stop_timeout_s)
        self.log: Optional[MetricsLogger] = None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        random.seed(cfg.seed + self.rank)
        torch.manual_seed(cfg.seed)  # identical non-expert init on every rank
        self.model_cfg = cfg.model_config()
        model = build_model(self.model_cfg, ep_size=cfg.ep_size)
        if cfg.model.init and not checkpoint.resume_candidates(cfg.checkpoint_dir, resume):
            # sparse upcycling before ZeRO copies the weights; a resume loads its checkpoint instead
            from ..models.upcycle import init_from_dense

            report = init_from_dense(model, cfg.model.init)
            if self.rank == 0:
                print(f"model.init: {len(report['experts'])} MoE layers upcycled from {cfg.model.init}", flush=True)
        from ..models.moe_blocks import configure_blocks, moe_mlps

        self._moe_layers = {m.layer_name: m.moe for m in moe_mlps(model)}  # for moe/balance.py's step updates

        from deepspeed.accelerator import get_accelerator

        configure_blocks(model, cfg.activation_checkpointing, cfg.compile, get_accelerator().device_name())
        with torch.device("meta"):  # global counts (all experts), whatever this rank holds
            self.params = count_params(build_model(self.model_cfg), self.model_cfg)
        optimizer = build_optimizer(model, cfg)
        self.ds_config = cfg.deepspeed_config(self.world, trainer_clips=cfg.clips_in_trainer())
        self._clip = clip_grad_norm if cfg.clips_in_trainer() else None
        self._grad_norm: Optional[torch.Tensor] = None
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 lr_scheduler=build_schedule(optimizer, cfg),
                                                                 config=self.ds_config)
        if self.world == 1 and cfg.zero_stage == 0:
            # one rank: DeepSpeed would still flatten, "all-reduce" and copy back every gradient (~2% of a step)
            self.engine.enable_backward_allreduce = False
        torch.manual_seed(cfg.seed + self.rank)
        t = self.model_cfg.text
        self.tokenizer = get_tokenizer(cfg.data.tokenizer or t.tokenizer, t.context_length)
        # batches in pinned memory on an accelerator: their copies then never wait for the device (_forward)
        train_cfg = dataclasses.replace(self._loader_config("train"), pin_memory=self.engine.device.type != "cpu")
        self.loader = ShardLoader(train_cfg, self.tokenizer, self.rank, self.world)
        self.loss_fn = build_loss(self.model_cfg, self.rank, self.world, self.tokenizer)  # coca: + captioning
        if cfg.debug.nan_loss_steps or cfg.debug.raise_at_step >= 0:
            self.loss_fn = DebugFaults(self.loss_fn, self)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.precision]
        self.step, self.skipped, self.consecutive_skips, self.micro_step = 0, 0, 0, 0
        self.run_id = ""
        self._stream: Optional[Iterator] = None
        self._caption_pool: Optional[List[str]] = None  # eval.caption_pool, read at the first caption eval
        self._expert_load = ExpertLoadWindow()
        self._saved_step, self._saved_path = -1, ""
        self.resumer = Resumer(cfg, self.model_cfg, self.rank, self.world)  # the checkpoint directory: lock, resume
        self._children_before = {p.pid for p in multiprocessing.active_children()}

    def _loader_config(self, split: str, eval_samples: int = 0):
        return self.cfg.data.loader_config(split, self.cfg.batch.micro_batch, self.model_cfg.vision.image_size,
                                           self.cfg.seed, eval_samples)

    # ------------------------------------------------------------------ collaborators
    def save(self) -> str:
        if self._saved_step == self.step:  # e.g. a checkpoint.every step that a stop request also asks for
            return self._saved_path
        client = {"step": self.step, "skipped": self.skipped, "micro_step": self.micro_step,
                  "loader": self.loader.state_dict(), "rng": checkpoint.rng_state()}
        self._saved_path = checkpoint.save(self.engine, self.cfg.checkpoint_dir, self.step, client,
                                           self.cfg.checkpoint.keep, self._run_files(), self.run_id,
                                           self.cfg.debug.pause_in_save_s)
        self._saved_step = self.step
        return self._saved_path

    def _run_files(self) -> Dict[str, object]:
        """What the run was (name -> text or bytes): written to output_dir at start and into every
        checkpoint. ``model_config.json`` and the tokenizer make a checkpoint usable on its own
        (``moe_dist.models.load_pretrained``)."""
        resolved = {**self.cfg.to_dict(), "_world_size": self.world}
        files: Dict[str, object] = {"run_config.json": json.dumps(resolved, indent=2),
                                    "deepspeed_config.json": json.dumps(self.ds_config, indent=2)}
        tokenizer: object = "openclip-bpe"
        path = sentencepiece_path(self.cfg.data.tokenizer or self.model_cfg.text.tokenizer)
        if path:
            with open(path, "rb") as f:
                tokenizer = f.read()
        files.update(model_files(self.model_cfg, tokenizer))
        return files

    def _write_run_files(self) -> None:
        if self.rank != 0:
            return
        os.makedirs(self.cfg.output_dir, exist_ok=True)
        for name, text in self._run_files().items():
            atomic_write(os.path.join(self.cfg.output_dir, name), text, durable=False)

    def _batches(self) -> Iterator:
        """Batches forever; a DataError on this rank yields a placeholder batch and the error text, so
        this rank still joins the step's collectives and all ranks stop together (``_agree_step``)."""
        from ..data import Batch, DataError

        while True:
            try:
                for batch in self.loader:
                    yield batch, ""
            except DataError as err:
                B, v, t = self.cfg.batch.micro_batch, self.model_cfg.vision, self.model_cfg.text
                placeholder = Batch(torch.zeros(B, 3, v.image_size, v.image_size),
                                    torch.full((B, t.context_length), t.pad_id, dtype=torch.long))
                while True:
                    yield placeholder, str(err)

    def _agree_step(self, loss: torch.Tensor, data_error: str) -> bool:
        """One all-reduce per micro step: True when the loss is finite on every rank. A data error on any
        rank stops every rank with that rank's message."""
        status = -1.0 if data_error else torch.isfinite(loss.detach()).all()  # stays on the device
        agreed = all_reduce(status, "MIN")
        if agreed < 0:
            from ..data import DataError

            errors = [e for e in all_gather_text(data_error, self.world) if e]
            raise DataError(errors[0])
        return agreed > 0

    def _forward(self, batch, cut_text: bool = True) -> StepOutput:
        from ..models.clip import text_to_device

        device = self.engine.device  # asynchronous from pinned memory; the cast runs on the device
        images = batch.images.to(device, non_blocking=True).to(self.dtype)
        # text cut after its last EOS from the host batch (nothing read back); a data error's placeholder
        # keeps its full length (one shape the compiled model has seen, on the way to stopping)
        tokens = text_to_device(self.engine.module if cut_text else None, batch.tokens, device)
        out = self.engine(images, tokens)
        result = self.loss_fn(out)
        return StepOutput(result.total, result.parts, out)

    def evaluate(self) -> Dict[str, float]:
        """``eval.tasks`` on the full ``data.val`` (every sample once over all ranks, dropless routing):
        the code of ``moe-dist eval``; scalars as val/<task>/<metric>."""
        if not self.cfg.data.val:
            return {}
        from ..evaluation import evaluate

        e, d = self.cfg.eval, self.cfg.data
        if "caption" in e.tasks and e.caption_pool != "none" and self._caption_pool is None:  # read once
            from ..evaluation.caption_baselines import read_caption_pool

            self._caption_pool = read_caption_pool(e.caption_pool or d.train, e.caption_pool_size, d.allow_pipe,
                                                   d.remote_options())
        result = evaluate(self.engine.module, self.tokenizer, d.val, e.tasks, batch_size=self.cfg.batch.micro_batch,
                          classes=e.classes or None, rank=self.rank, world_size=self.world, allow_pipe=d.allow_pipe,
                          label_key=e.label_key, progress=False, remote=d.remote_options(),
                          caption_pool=self._caption_pool, generation=e.decoding.generation())
        self.engine.train()
        return {f"val/{name}": float(value) for name, value in result.scalars().items()}

    def close(self) -> None:
        """Stop the data workers and the loggers, restore the signal handlers; safe to call twice.

        Workers ignore SIGTERM (stream.py leaves preemption to the trainer), so a worker still alive here
        would block interpreter exit in multiprocessing's join: closing the batch stream shuts the
        DataLoader down, and any worker left (its iterator kept alive by a traceback) is killed."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        left = [c for c in multiprocessing.active_children() if c.pid not in self._children_before]
        for child in left:  # this trainer's data workers, not the caller's processes
            child.kill()
        for child in left:
            try:
                child.join(timeout=10)
            except RuntimeError:  # torch's SIGCHLD handler, for a worker its DataLoader still tracked
                pass
        if self.log is not None:
            self.log.close()
        self.resumer.release()
        self.stop.close()

    # ------------------------------------------------------------------ the loop
    def train(self, resume: str = "auto", weights_only: bool = False) -> int:
        cfg = self.cfg
        self.resumer.lock()  # before the logger writes into output_dir: a refused start writes nothing
        self.log = MetricsLogger(cfg.output_dir, self.rank, cfg.steps, 0, cfg.logging.tensorboard,
                                 cfg.logging.progress)
        at = self.resumer.resume(resume, weights_only, self.engine, self.scheduler, self.loader, self.log.print)
        self.run_id, self.step, self.skipped, self.micro_step = at.run_id, at.step, at.skipped, at.micro_step
        self._write_run_files()
        self.log.print(summary(cfg, self.env, self.model_cfg, self.params, self.ds_config))
        if self.step >= cfg.steps:
            self.log.print(f"nothing to do: the checkpoint is at step {self.step} of {cfg.steps}")
            return 0
        if all_reduce(float(self.stop.requested), "MAX") > 0:  # a signal during setup or resume
            self.log.print(f"stop requested before step {self.step + 1}; nothing new to save")
            return EXIT_PREEMPTED
        batches = self._stream = self._batches()
        while self.step < cfg.steps:
            # 1. one optimizer step = grad_accum micro-batches whose loss is finite on every rank
            start, wait = time.perf_counter(), 0.0
            boundary_step = self.engine.global_steps + 1
            skipped_before = self.engine.skipped_steps
            while self.engine.global_steps < boundary_step:
                t = time.perf_counter()
                batch, data_error = next(batches)
                wait += time.perf_counter() - t
                step_out = self._forward(batch, cut_text=not data_error)
                self.micro_step += 1
                if not self._agree_step(step_out.loss, data_error):
                    self._skip_nonfinite()
                    continue
                self.consecutive_skips = 0
                self._expert_load.add(step_out.model.moe.layer_stats)
                self.engine.backward(step_out.loss)
                record_loads(self._moe_layers, step_out.model.moe.layer_loads)  # after backward: moe/balance.py
                if self._clip is not None and self.engine.is_gradient_accumulation_boundary():
                    self._grad_norm = self._clip(self.engine.module.parameters(), cfg.grad_clip)
                self.engine.step()
            # the selection biases move (moe/balance.py), unless DeepSpeed skipped the update (fp16 overflow)
            end_optimizer_step(self._moe_layers.values(), update=self.engine.skipped_steps == skipped_before)
            self.step += 1
            # 2. metrics, signals, checkpoints, evaluation (a stop never waits for an evaluation, and an
            # evaluation error never costs the checkpoint before it)
            elapsed = time.perf_counter() - start
            self._log_step(step_out, elapsed, wait)
            if all_reduce(float(self.stop.requested), "MAX") > 0:
                path = self.save()
                self.log.print(f"stopped by signal at step {self.step}; checkpoint {path}")
                return EXIT_PREEMPTED
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.steps:
                self.save()
            if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < cfg.steps:
                self.log.log(self.step, self.evaluate(), {})
        path = self.save()
        self.log.log(self.step, self.evaluate(), {})
        tensorboard = f"; TensorBoard logs {os.path.abspath(self.log.tb_dir)}" if self.log.writer is not None else ""
        self.log.print(f"done: {self.step} steps; checkpoint {path}{tensorboard}")
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
        grad_norm = self._grad_norm if self._clip is not None else self.engine.get_global_grad_norm()
        out = step_out.model
        scalars = read_scalars({"loss/total": step_out.loss, **{f"loss/{k}": v for k, v in step_out.parts.items()},
                                "train/lr": lr, "train/grad_norm": grad_norm, "train/logit_scale": out.logit_scale,
                                "train/skipped_steps": self.skipped, "perf/samples_per_s": samples_per_s,
                                "perf/step_time_s": elapsed, "perf/data_wait_fraction": wait / elapsed,
                                **memory_mb()})
        self.log.log(self.step, scalars, self._expert_load.reduce(out.moe.layer_stats))
        self.log.progress(self.step, scalars["loss/total"], lr, samples_per_s)


def run(cfg: RunConfig, resume: str = "auto", weights_only: bool = False) -> int:
    """Validate, start the process group, train; returns the exit code.

    Stop requests are honoured from here on (a signal during setup is a clean stop), and whatever ends
    the run (success, an error on this rank) shuts the data workers down, so the process exits promptly.
    """
    from ..distributed import detect_env, init_distributed

    # deprecation notices that open_clip ClipLoss and DeepSpeed ZeRO would print every step
    warnings.filterwarnings("ignore", message=".*all_gather.* is deprecated")
    stop = GracefulStop(cfg.stop_timeout_s)
    try:
        env = detect_env()
        cfg.validate(env.world_size)  # before any process group starts
        if weights_only and resume in ("auto", "latest", "none", ""):
            raise ValueError("--weights-only needs --resume PATH (a checkpoint directory or a run's checkpoint root)")
        cfg.check_inputs(resume)
        init_distributed(env)
        trainer = Trainer(cfg, env, stop, resume)
        try:
            return trainer.train(resume, weights_only)
        finally:
            trainer.close()
    finally:
        stop.close()
