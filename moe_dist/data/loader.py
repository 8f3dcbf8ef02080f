"""The training input pipeline of one rank: shards -> batches of (images, tokens).

Loader outline:
    1. resolve the shard spec (spec.py) and fix steps per epoch, the same on every rank:
       exact: ceil(samples of the fullest rank / batch); resampled: epoch_samples / (world x batch).
       Exact mode needs every shard's count (>= 1, which resolution enforces): a fresh epoch without a
       step is a DataError on every rank, never an empty epoch after which the next one starts;
    2. DataLoader workers run stream.worker_stream and send chunks in any order;
    3. the main process re-orders them canonically: one sample per worker in turn (skipping
       finished workers), independent of chunking and timing, so the batch sequence is a pure
       function of (seed, epoch, rank) and a resumed loader continues it exactly;
    4. failures are counted by reason (a sample that a shard's manifest lists but the shard lacks is a
       "short_shard" failure); past ``max_failure_fraction`` (or when nothing decodes) the loader
       raises ``DataError`` naming the reasons;
    5. in exact mode a rank that runs out before the common step count (unbalanced shards, corrupt
       samples, short shards within the threshold) repeats its most recent samples and counts them
       as ``padded``;
    6. exact mode records which samples were delivered by id (shard, ordinal): ``state_dict`` holds
       this rank's part of the epoch's global position. Resuming at the same world size and workers
       continues the batch sequence exactly; ``merge_states`` of every rank's state resumes at any
       world size and worker count (elastic): the epoch's plan is remade from what is left, so every
       sample of the epoch is delivered exactly once over both runs.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from .decode import DEFAULT_MAX_PIXELS
from .remote import RemoteOptions
from .spec import resolve_spec
from .stream import Chunk, Consumed, WorkerDataset, WorkerJob, epoch_plan
from .urls import shown_spec, shown_url

log = logging.getLogger(__name__)
WORKER_NICENESS = 10
# A resumed resampled stream must not replay the shard draws of the run it resumes: each resume
# generation reseeds the shard sampler with this multiple (a prime, so generations never collide).
RESUME_SEED_STRIDE = 7919
SHORT_SHARD_HINT = ("short_shard: samples a shard's manifest.json or sizes.json lists but the tar lacks, e.g. a "
                    "truncated copy; copy the shards again")


def _init_worker(worker_id: int) -> None:
    """1. SLURM signals every process of a job step; workers leave SIGTERM/SIGUSR1 to the trainer,
    which finishes its step, checkpoints and shuts them down.
    2. Workers run at a lower CPU priority: they need a fraction of a core and keep a prefetch queue
    full, while the trainer's compute threads lose less to them when cores are scarce."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:
        pass


def _stack(rows: List[torch.Tensor], pin_memory: bool) -> torch.Tensor:
    """``torch.stack``, into page-locked memory when asked: a copy from there to an accelerator runs
    asynchronously (``non_blocking=True``), while one from pageable memory makes the host wait for the
    device's queue to drain first. Pinned blocks come from torch's caching host allocator, which keeps a
    block until the copies that read it are done."""
    if not pin_memory:
        return torch.stack(rows)
    out = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=True)
    return torch.stack(rows, out=out)


def _shutdown_workers(chunks: Iterator) -> None:
    """End a DataLoader iterator's worker processes. Left to garbage collection, they outlive an error
    whose traceback holds the iterator, and since they ignore SIGTERM (``_init_worker``), the interpreter's
    exit, which terminates and then joins its children, would wait for them forever."""
    try:
        shutdown = getattr(chunks, "_shutdown_workers", None)  # torch's orderly shutdown: queues told to end
        if shutdown is not None:
            shutdown()
        for worker in getattr(chunks, "_workers", []):
            if worker.is_alive():
                worker.kill()
                worker.join()
    except Exception as err:  # never hide the error that ended the epoch
        log.warning("stopping the data workers failed: %s", err)


class DataError(RuntimeError):
    """The data cannot feed training (too many broken samples, no shards for the workers, ...)."""


@dataclass
class LoaderConfig:
    spec: str
    batch_size: int
    mode: str = "exact"  # or "resampled"
    weights: Optional[List[float]] = None
    workers: int = 2
    image_size: int = 224
    train_transform: bool = True
    seed: int = 0
    shuffle_buffer: int = 1000
    epoch_samples: int = 0  # resampled mode: samples per epoch over all ranks
    max_failure_fraction: float = 0.1
    min_samples_before_failure_check: int = 64
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    draft: bool = True  # decode JPEGs at reduced size when the target is smaller
    allow_pipe: bool = False
    remote: RemoteOptions = RemoteOptions()  # retries, timeout, backoff of http(s):// and s3:// shards
    skip_unreadable_shards: bool = False  # a remote shard unreadable after its retries is counted, not fatal
    pin_memory: bool = False  # batches in page-locked memory, for asynchronous copies to an accelerator

    def __post_init__(self):
        if self.mode not in ("exact", "resampled"):
            raise ValueError(f"data.mode={self.mode!r}; use 'exact' or 'resampled'")
        if self.batch_size < 1 or self.workers < 0:
            raise ValueError(f"data batch size ({self.batch_size}) must be >= 1 and workers ({self.workers}) >= 0")
        if not 0.0 <= self.max_failure_fraction <= 1.0:
            raise ValueError(f"data.max_failure_fraction={self.max_failure_fraction} must lie in [0, 1]")


@dataclass
class Batch:
    """One micro-batch. Text padding is not carried: the models derive it from the EOS position."""

    images: torch.Tensor  # [B, 3, S, S]
    tokens: torch.Tensor  # [B, C]


class ShardLoader:
    """Iterate one epoch of batches per ``iter()``; ``state_dict`` resumes mid-epoch exactly.

    Args:
        cfg: LoaderConfig.
        tokenizer: object with ``encode(texts) -> (tokens, padding_mask)`` (moe_dist.text); only the
            tokens are used.
        rank, world_size: this rank and the data-parallel world.
        transform: image transform; defaults to open_clip's train/eval transform at ``cfg.image_size``.
    """

    def __init__(self, cfg: LoaderConfig, tokenizer, rank: int = 0, world_size: int = 1, transform=None):
        self.cfg, self.tokenizer, self.rank, self.world_size = cfg, tokenizer, rank, world_size
        self.shards = resolve_spec(cfg.spec, cfg.weights, cfg.allow_pipe, remote_counts=cfg.mode == "exact",
                                   options=cfg.remote)
        self.num_workers = max(1, cfg.workers)
        unknown = [s for s in self.shards if s.samples < 1]
        if cfg.mode == "exact" and unknown:  # planned as 0 samples, such shards would make epochs without a step
            raise ValueError(f"shard {shown_url(unknown[0].url)!r} ({len(unknown)} of {len(self.shards)} shards) "
                             "has no known sample count: a pipe: URL is not run to count it. Exact mode plans each "
                             "epoch by the shards' counts: use data.mode=resampled, or name the tars themselves")
        if cfg.mode == "exact" and len(self.shards) < world_size * self.num_workers:
            raise DataError(f"{len(self.shards)} shards cannot feed {world_size} ranks x {self.num_workers} workers "
                            "in exact mode: every worker needs at least one shard. Reshard into more shards "
                            "(moe-dist-data shard --per-shard N), use fewer workers, or use data.mode=resampled")
        if transform is None:
            from open_clip.transform import image_transform

            transform = image_transform(cfg.image_size, is_train=cfg.train_transform)
        self.transform = transform
        self.epoch = 0
        self.last_epoch_stats: Dict[str, object] = {}
        self._reset_epoch_state()

    # ---------------------------------------------------------------- public
    @property
    def steps_per_epoch(self) -> int:
        B = self.cfg.batch_size
        if self.cfg.mode == "resampled":
            total = self.cfg.epoch_samples or sum(s.samples for s in self.shards)
            return max(1, total // (self.world_size * B))
        fullest = max(sum(s.samples for w in rank for s in w) for rank in self._plan())
        return -(-fullest // B)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._reset_epoch_state()

    def stats(self) -> Dict[str, object]:
        failures = collections.Counter(self._base_failures)
        for f in self._worker_failures.values():
            failures.update(f)
        good = self._base_good + sum(self._worker_good.values())
        return {"good": good, "failed": sum(failures.values()), "failures": dict(failures),
                "padded": self._padded, "wait_s": self._wait_s,
                "retries": self._base_retries + sum(self._worker_retries.values())}

    def state_dict(self) -> Dict[str, object]:
        """This rank's position: its batch sequence (for a resume at the same world size and workers) and
        the ids of the samples it delivered (``consumed``; ``merge_states`` joins all ranks' for an elastic
        resume). ``base`` is what an elastic resume had consumed when this epoch's plan was made."""
        stats = self.stats()
        return {"epoch": self.epoch, "mode": self.cfg.mode, "seed": self.cfg.seed, "step": self._step,
                "next_positions": list(self._next_positions), "turn": self._turn, "done": sorted(self._done),
                "good": stats["good"], "failures": stats["failures"], "padded": self._padded,
                "retries": stats["retries"], "recent": [t.clone() for t in self._recent_tensors()],
                "resumes": self._resumes, "world_size": self.world_size, "workers": self.num_workers,
                "rank": self.rank, "consumed": self._consumed.to_state(), "base": self._base.to_state(),
                "shards": len(self.shards)}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Resume from ``state_dict()`` of this rank at the same world size and workers (the batches
        continue exactly), or from ``merge_states`` of all ranks' states, or a 1-rank run's state, at
        any world size and workers (exact mode: the rest of the epoch, each sample once)."""
        if state["mode"] != self.cfg.mode:
            raise ValueError(f"loader state was saved with data.mode={state['mode']}; this loader has "
                             f"data.mode={self.cfg.mode}. Keep the mode to resume the data stream, or start afresh")
        same = state["world_size"] == self.world_size and state["workers"] == self.num_workers
        ranks = state.get("ranks")
        if same and ranks is not None:
            state = ranks[self.rank]
        elif not same and (self.cfg.mode != "exact" or (ranks is None and state["world_size"] != 1)):
            raise ValueError(f"loader state was saved with world_size={state['world_size']}, workers="
                             f"{state['workers']}; this loader has world_size={self.world_size}, workers="
                             f"{self.num_workers}. " + ("A resampled stream resumes only at the same layout; "
                                                       "start the epoch afresh" if self.cfg.mode != "exact" else
                                                       "One rank's state holds only its part of the epoch: load "
                                                       "moe_dist.data.merge_states([every rank's state])"))
        if not same:
            if "consumed" not in state:
                raise ValueError("this loader state predates elastic resume (it records no delivered samples); "
                                 f"resume it at world_size={state['world_size']}, workers={state['workers']}")
            if state.get("shards", len(self.shards)) != len(self.shards):
                raise ValueError(f"loader state was saved over {state['shards']} shards; this spec has "
                                 f"{len(self.shards)}. Samples are named by their shard's place in the spec: "
                                 "resume with the same data.train")
            return self._load_elastic(state)
        self.epoch = int(state["epoch"])
        self._reset_epoch_state()
        self._base = Consumed.from_state(state.get("base", {"done": [], "partial": []}))
        self._consumed = Consumed.from_state(state.get("consumed", {"done": [], "partial": []}))
        self._base_retries = int(state.get("retries", 0))
        self._step, self._turn = int(state["step"]), int(state["turn"])
        self._next_positions = list(state["next_positions"])
        self._done = set(state["done"])
        self._base_good, self._base_failures = int(state["good"]), dict(state["failures"])
        self._padded, self._resumes = int(state["padded"]), int(state["resumes"]) + 1
        images, tokens = state["recent"] or (None, None)
        if images is not None:
            self._recent.extend(zip(images, tokens))

    def _load_elastic(self, state: Dict[str, object]) -> None:
        """Continue the epoch of a run at another layout: plan what is left over this layout."""
        self.epoch = int(state["epoch"])
        self._reset_epoch_state()
        self._base = Consumed.from_state(state["consumed"])
        self._consumed = Consumed.from_state(state["consumed"])
        self._resumes = int(state["resumes"]) + 1
        images, tokens = state["recent"] or (None, None)
        if images is not None:  # something to repeat should this rank's share of the rest run short
            self._recent.extend(zip(images, tokens))
        log.info("rank %d: elastic resume of epoch %d from %d ranks x %d workers: %d shards done, %d in progress",
                 self.rank, self.epoch, state["world_size"], state["workers"], len(self._base.done),
                 len(self._base.partial))

    def __iter__(self) -> Iterator[Batch]:
        steps = self.steps_per_epoch
        if steps == 0 and self._step == 0 and not (self._base.done or self._base.partial):
            # a fresh epoch with nothing planned (an elastic resume may find its epoch delivered already): every
            # rank computes the same plan, so all stop here, at the same step, instead of looping on empty epochs
            raise DataError(f"epoch {self.epoch} of {shown_spec(self.cfg.spec)!r} has no sample to deliver: its "
                            f"shards count {sum(s.samples for s in self.shards)} samples in all; fix the shards or "
                            "their index (moe-dist-data validate SPEC)")
        chunks = self._chunks() if self._step < steps else iter(())
        try:
            while self._step < steps:
                rows = [self._next_sample(chunks) for _ in range(self.cfg.batch_size)]
                self._step += 1
                pin = self.cfg.pin_memory
                yield Batch(_stack([r[0] for r in rows], pin), _stack([r[1] for r in rows], pin))
        finally:  # an error, or the caller stopping mid-epoch: the workers go now, not at garbage collection
            _shutdown_workers(chunks)
        self.last_epoch_stats = self.stats()
        self.set_epoch(self.epoch + 1)

    # ---------------------------------------------------------------- internals
    def _plan(self):
        return epoch_plan(self.shards, self.world_size, self.num_workers, self.cfg.seed, self.epoch, self._base)

    def _reset_epoch_state(self) -> None:
        self._base, self._consumed = Consumed(), Consumed()
        self._base_retries, self._worker_retries = 0, {}
        self._step, self._turn, self._done = 0, 0, set()
        self._next_positions = [0] * self.num_workers
        self._queues: Dict[int, Deque] = {w: collections.deque() for w in range(self.num_workers)}
        self._base_good, self._base_failures, self._padded, self._resumes = 0, {}, 0, 0
        self._worker_good: Dict[int, int] = {}
        self._worker_failures: Dict[int, Dict[str, int]] = {}
        self._recent: Deque = collections.deque(maxlen=self.cfg.batch_size)
        self._wait_s = 0.0

    def _recent_tensors(self):
        if not self._recent:
            return []
        return [torch.stack(list(col)) for col in zip(*self._recent)]

    def _job(self) -> WorkerJob:
        cfg = self.cfg

        def tokenize(text, tok=self.tokenizer):
            return tok.encode([text])[0][0]

        return WorkerJob(mode=cfg.mode, shards=self.shards, source_weights=cfg.weights, rank=self.rank,
                         world_size=self.world_size, num_workers=self.num_workers, epoch=self.epoch, seed=cfg.seed,
                         plan_seed=cfg.seed + RESUME_SEED_STRIDE * self._resumes, shuffle_buffer=cfg.shuffle_buffer,
                         start_positions=list(self._next_positions) if cfg.mode == "exact" else [0] * self.num_workers,
                         transform=self.transform, tokenize=tokenize, max_pixels=cfg.max_image_pixels,
                         draft_size=cfg.image_size if cfg.draft else None, chunk_size=min(64, cfg.batch_size),
                         allow_pipe=cfg.allow_pipe, work=self._plan()[self.rank] if cfg.mode == "exact" else None,
                         remote=cfg.remote, skip_unreadable=cfg.skip_unreadable_shards)

    def _chunks(self) -> Iterator[Chunk]:
        # own generator: creating the iterator must not consume the training process's global RNG
        loader = DataLoader(WorkerDataset(self._job()), batch_size=None, num_workers=self.cfg.workers,
                            prefetch_factor=4 if self.cfg.workers else None, generator=torch.Generator(),
                            worker_init_fn=_init_worker)
        return iter(loader)

    def _next_sample(self, chunks: Iterator[Chunk]):
        """The next sample in canonical order: worker by worker in turn, skipping finished ones."""
        while any(w not in self._done or self._queues[w] for w in range(self.num_workers)):
            w = self._turn % self.num_workers
            queue = self._queues[w]
            if w in self._done and not queue:
                self._turn += 1
                continue
            while not queue and w not in self._done:
                start = time.perf_counter()
                chunk = next(chunks)
                self._wait_s += time.perf_counter() - start
                self._receive(chunk)
            if queue:
                self._turn += 1
                position, sample_id, *row = queue.popleft()
                self._next_positions[w] = position + 1
                if sample_id is not None:
                    self._consumed.mark(*sample_id)
                self._recent.append(tuple(row))
                return row
        return self._pad()

    def _receive(self, chunk: Chunk) -> None:
        if chunk.error:
            raise DataError(chunk.error)
        if chunk.positions:
            ids = chunk.ids or [None] * len(chunk.positions)
            self._queues[chunk.worker].extend(zip(chunk.positions, ids, chunk.images.unbind(0),
                                                  chunk.tokens.unbind(0)))
        for sample_id in chunk.failed_ids or ():  # a failed sample fails again: consumed when seen
            self._consumed.mark(*sample_id)
        for shard, read in (chunk.ended or {}).items():
            self._consumed.end(shard, read)
        self._worker_good[chunk.worker] = chunk.good
        self._worker_failures[chunk.worker] = chunk.failures
        self._worker_retries[chunk.worker] = chunk.retries
        if chunk.done:
            self._done.add(chunk.worker)
        self._check_failures(final=len(self._done) == self.num_workers)

    def _check_failures(self, final: bool) -> None:
        stats = self.stats()
        seen = stats["good"] + stats["failed"]
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(stats["failures"].items(), key=lambda kv: -kv[1]))
        if "short_shard" in stats["failures"]:
            reasons += f"; {SHORT_SHARD_HINT}"
        if final and stats["good"] == 0 and not self._recent:
            raise DataError(f"no sample of {shown_spec(self.cfg.spec)!r} could be used on rank {self.rank} "
                            f"({seen} failed: {reasons or 'the shards are empty'}); fix the shards "
                            "(moe-dist-data validate SPEC lists the broken samples)")
        if seen >= self.cfg.min_samples_before_failure_check and stats["failed"] > self.cfg.max_failure_fraction * seen:
            raise DataError(f"{stats['failed']} of {seen} samples failed on rank {self.rank} ({reasons}), more than "
                            f"data.max_failure_fraction={self.cfg.max_failure_fraction}; fix the shards "
                            "(moe-dist-data validate SPEC) or raise the threshold")

    def _pad(self):
        if not self._recent:
            self._check_failures(final=True)
            raise DataError(f"rank {self.rank} ran out of samples with nothing to repeat")
        if self._padded == 0:
            steps = self.steps_per_epoch
            if self._step == steps - 1 and not self.stats()["failed"]:  # the epoch ends mid-batch: expected
                log.info("rank %d: the epoch ends inside step %d; its last batch repeats recent samples",
                         self.rank, steps)
            else:
                log.warning("rank %d: out of samples before step %d of %d; repeating recent samples to keep "
                            "ranks in step (unbalanced shards or skipped samples)", self.rank, self._step + 1, steps)
        self._padded += 1
        row = self._recent[0]
        self._recent.rotate(-1)
        return list(row)


def merge_states(states: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """The global position of an exact-mode epoch from every rank's ``ShardLoader.state_dict()``: a state
    that ``load_state_dict`` resumes at any world size and workers (and, at the saving layout, exactly).

    Raises:
        ValueError: states of different runs, epochs or layouts, or not one per rank.
    """
    first = states[0]
    keys = ("mode", "seed", "epoch", "world_size", "workers")
    if any(tuple(s[k] for k in keys) != tuple(first[k] for k in keys) for s in states) or \
            sorted(s.get("rank", 0) for s in states) != list(range(first["world_size"])):
        got = ", ".join(f"rank {s.get('rank')} of {s['world_size']} at epoch {s['epoch']}" for s in states)
        raise ValueError(f"merge_states needs one loader state per rank of one run at one epoch; got {got}")
    consumed = Consumed()
    for state in states:
        consumed.merge(Consumed.from_state(state["consumed"]))
    merged = {k: first[k] for k in keys + ("shards",) if k in first}
    merged.update(consumed=consumed.to_state(), ranks={s.get("rank", 0): s for s in states},
                  recent=first["recent"], resumes=max(int(s["resumes"]) for s in states))
    return merged
