"""How a run starts on its checkpoint directory: the lock, whose checkpoints are there, recovery, which
checkpoint to resume and loading it, so that ``Trainer`` stays the loop.

Outline (nothing in the directory is touched before 2 has passed):
    1. ``lock`` (before the run writes anything): rank 0 locks the checkpoint directory until the run
       ends; a live run holding it refuses this start on every rank;
    2. every rank checks whose checkpoints the directory holds: a fresh start refuses another run's, a
       resume refuses a directory that also holds other runs' (``checkpoint.continued_run``);
    3. rank 0 recovers the continued run's own interrupted saves (exact names, its run id only);
    4. the first candidate every rank can load is chosen (``auto`` falls back past broken ones); a
       checkpoint that is not its run's newest leaves the newer ones behind as ``*.abandoned``;
    5. it is loaded, one of three ways:
       - the same layout (world size, ep_size, ZeRO stage, precision): all of it through DeepSpeed
         (optimizer state, counters, data-loader state, RNG), bit for bit;
       - another layout: the weights, Adam's master weights, moments and step per parameter
         (``optim_state``), the counters, the LR schedule at the step, and the data stream continued
         where the checkpoint's ranks left it;
       - ``weights_only`` (any layout): the weights, the LR schedule and the data stream; Adam starts afresh.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import IO, Callable, List, Optional, Tuple

from ..checkpoint_files import leftovers, recover
from . import checkpoint
from .collectives import all_gather_text, rank0_value
from .optim_state import LAYOUT_FREE_FILE, OptimizerStates, check_engine, checkpoint_layout, load_into


@dataclass
class Resumed:
    """Where the run starts: its id and counters (zeros for a new run) and the checkpoint it came from."""

    run_id: str
    step: int = 0
    skipped: int = 0
    micro_step: int = 0
    source: str = ""  # the checkpoint directory, "" for a new run


class Resumer:
    """Steps 1-5 above for one run. ``print`` logs on rank 0 (the trainer's ``MetricsLogger.print``)."""

    def __init__(self, cfg, model_cfg, rank: int, world: int):
        self.cfg, self.model_cfg, self.rank, self.world = cfg, model_cfg, rank, world
        self.root = cfg.checkpoint_dir
        self.layout = {"world_size": world, "ep_size": cfg.ep_size, "zero_stage": cfg.zero_stage,
                       "precision": cfg.precision}
        self._lock: Optional[IO] = None

    def lock(self) -> None:
        """1. Rank 0 takes the checkpoint directory's lock, held until ``release`` or exit; every rank
        raises its refusal (a live run holds it) before the run writes anything."""
        problem = ""
        if self.rank == 0:
            try:
                self._lock = checkpoint.lock_root(self.root)
            except ValueError as err:
                problem = str(err)
        problem = rank0_value(problem, self.world)
        if problem:
            raise ValueError(problem)

    def release(self) -> None:
        if self._lock is not None:  # the checkpoint directory is free for the next run
            self._lock.close()
            self._lock = None

    def resume(self, how: str, weights_only: bool, engine, scheduler, loader, print: Callable[[str], None]) -> Resumed:
        """2-5 above for ``--resume how`` (auto | latest | none | PATH); after ``lock``."""
        import deepspeed.comm as dist

        continued = checkpoint.continued_run(self.root, how)
        if self.rank == 0:
            if continued is not None:
                for tag in recover(self.root, continued):
                    print(f"recovered checkpoint {tag} from an interrupted save")
            others = sorted(name for name, run in leftovers(self.root).items() if run != continued)
            if others:
                print(f"warning: left alone in {self.root}: {', '.join(others)} (interrupted saves of another run, "
                      "or from before saves recorded their run); delete them once that run is gone")
        dist.barrier()  # every rank sees the same directory from here on
        candidates = checkpoint.resume_candidates(self.root, how)
        found = self._first_loadable(candidates, how == "auto", weights_only, print)
        if found is None:
            if candidates:
                raise ValueError(f"no checkpoint in {self.root} could be loaded (see the warnings above); fix or "
                                 "remove them, or resume another checkpoint with --resume PATH")
            return Resumed(rank0_value(checkpoint.new_run_id(), self.world))
        src_root, tag, states = found
        if states is not None:
            check_engine(engine)  # an optimizer the layout change cannot fill: refused before any rename
        self._abandon_newer(src_root, tag, print)
        tag_dir = os.path.join(src_root, tag)
        run_id = str(checkpoint.read_marker(tag_dir).get("run_id", ""))
        if states is not None:
            return self._across_layouts(tag_dir, run_id, states, engine, scheduler, loader, print)
        if weights_only:
            step, stream = self._any_layout(tag_dir, None, engine, scheduler, loader)
            print(f"warning: weights-only resume from {tag_dir} at step {step}: the model weights are loaded; the "
                  f"optimizer state (Adam moments) starts afresh; {stream}")
            return Resumed(run_id, step, source=tag_dir)
        client = checkpoint.load(engine, src_root, tag, self.rank)
        loader.load_state_dict(client["loader"])
        checkpoint.set_rng_state(client["rng"])
        print(f"resumed from {tag_dir} at step {client['step']}")
        return Resumed(run_id, client["step"], client["skipped"], client["micro_step"], tag_dir)

    def _first_loadable(self, candidates: List[Tuple[str, str]], fallback: bool, weights_only: bool,
                        print: Callable[[str], None]) -> Optional[Tuple[str, str, Optional[OptimizerStates]]]:
        """4. The first candidate whose files every rank can read; with ``fallback`` a broken one is
        skipped with a warning, otherwise its error is raised. A checkpoint of this run's layout is read
        by DeepSpeed (each rank its own files); one of another layout is indexed here (every rank reads
        every optimizer file's index), so that a missing shard is refused before anything is renamed.
        Returns (root, tag, the optimizer state index, or None for DeepSpeed's own load or weights only).
        A checkpoint of another model (other experts, widths, ...) is refused at once."""
        for root, tag in candidates:
            tag_dir = os.path.join(root, tag)
            if not weights_only and checkpoint.read_marker(tag_dir).get("weights_only"):
                raise ValueError(f"checkpoint {tag_dir} holds model weights only (a moe-dist reshard output without "
                                 "--with-optimizer); resume it with --resume PATH --weights-only")
            checkpoint.check_same_model(tag_dir, self.model_cfg)  # another model is no broken checkpoint
            layout = checkpoint_layout(tag_dir)  # None: too old to say; DeepSpeed's own load decides
            across = not weights_only and (layout is not None and layout != self.layout
                                           or os.path.isfile(os.path.join(tag_dir, LAYOUT_FREE_FILE)))
            own_files = not weights_only and not across
            states, problem = None, ""
            try:
                checkpoint.verify_safe(tag_dir, self.rank if own_files else None, (self.rank, self.world))
                if across:
                    states = OptimizerStates.from_checkpoint(tag_dir, self.model_cfg)
            except ValueError as err:
                problem = str(err)
            problems = [p for p in all_gather_text(problem, self.world) if p]
            if not problems:
                return root, tag, states
            if not fallback:
                raise ValueError(problems[0])
            print(f"warning: skipping checkpoint {tag_dir}: {problems[0]}; trying the one before")
        return None

    def _across_layouts(self, tag_dir: str, run_id: str, states: OptimizerStates, engine, scheduler, loader,
                        print: Callable[[str], None]) -> Resumed:
        """5, another layout: weights, Adam's state per parameter, the schedule and the stream; the counters."""
        step, stream = self._any_layout(tag_dir, states, engine, scheduler, loader)
        client = os.path.join(tag_dir, "client_rank0.pt")
        counters = checkpoint.load_weights_only(client) if os.path.isfile(client) else {}
        was = ", ".join(f"{k} {v}" for k, v in states.layout.items())
        now = ", ".join(f"{k} {v}" for k, v in self.layout.items())
        print(f"resumed from {tag_dir} at step {step} on another layout ({was} -> {now}): the weights, Adam's "
              f"moments and step count ({states.step:g}) carried over; {stream}")
        return Resumed(run_id, step, int(counters.get("skipped", 0)), int(counters.get("micro_step", 0)), tag_dir)

    def _any_layout(self, tag_dir: str, states: Optional[OptimizerStates], engine, scheduler,
                    loader) -> Tuple[int, str]:
        """Load at this run's layout what any layout can give: the weights, Adam's state when ``states`` is
        given, the LR schedule at the step counter and the merged data stream. Returns (step, what the
        stream did)."""
        root, tag = os.path.split(tag_dir)
        step = checkpoint.load_weights(engine, root, tag)
        if states is not None:
            load_into(engine, states)
        scheduler.last_epoch = step - 1
        scheduler.step()  # the LR schedule continues at the step counter
        return step, self._continue_stream(tag_dir, loader)

    def _abandon_newer(self, src_root: str, tag: str, print: Callable[[str], None]) -> None:
        """Resuming a checkpoint that is not its run's newest in this directory: the newer ones are of a
        branch this run leaves; they are renamed ``step########.abandoned`` (kept, but never resumed or
        pruned), so that pruning and a later ``--resume auto`` follow the resumed branch."""
        import deepspeed.comm as dist

        root = self.root
        if os.path.abspath(src_root) != os.path.abspath(root):
            return
        run_id = checkpoint.read_marker(os.path.join(root, tag)).get("run_id", "")
        newer = [t for t in checkpoint.run_ids(root).get(run_id, []) if t > tag]
        if newer and self.rank == 0:
            for t in newer:
                os.replace(os.path.join(root, t), os.path.join(root, f"{t}.abandoned.{int(time.time())}"))
            print(f"warning: resuming {tag}, so the newer checkpoints {newer} of this run will not be resumed or "
                  "pruned: renamed to *.abandoned (delete them when you no longer need them)")
        dist.barrier()

    def _continue_stream(self, tag_dir: str, loader) -> str:
        """After a weights-only resume: continue the checkpoint's exact-mode epoch at this run's layout
        (every rank's loader state merged, so no sample of the epoch is repeated or skipped over both
        parts); where that cannot be (resampled mode, a reshard output, another spec) the stream starts
        afresh. Returns what happened, for the log."""
        from ..data import merge_states

        states = checkpoint.loader_states(tag_dir)
        if not states or self.cfg.data.mode != "exact":
            return "the data stream starts afresh"
        try:
            loader.load_state_dict(merge_states(states))
        except (ValueError, KeyError) as err:
            return f"the data stream starts afresh ({err})"
        return (f"the data stream continues epoch {states[0]['epoch']} where the {len(states)} rank(s) of "
                "the checkpoint left it")
