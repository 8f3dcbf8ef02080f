"""What one DataLoader worker does: read its shards with webdataset, shuffle, decode, transform.

Worker outline (exact mode):
    1. every rank computes the same epoch plan: the shard list shuffled with (seed, epoch), then
       balanced over ranks and over each rank's workers by sample count (longest-first);
    2. the worker streams its shards through webdataset's tar reader (reading only the members it
       decodes) and a sample shuffle buffer seeded with (seed, epoch, rank, worker); a broken tar is
       counted and skipped, and so is each sample a shard's manifest lists but the shard lacks;
    3. each raw sample gets a position in that shuffled stream; on resume the worker skips the
       positions already consumed without decoding them;
    4. survivors are decoded (decode.py), transformed (torch RNG seeded per sample position) and
       tokenized, and sent in chunks tagged with (worker, position) plus the worker's cumulative
       counters. A final chunk says "done".
Resampled mode draws shards with replacement (weighted by source) from an RNG seeded with
(seed, epoch, rank, worker, resume generation), forever.
"""

from __future__ import annotations

import random
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import AbstractSet, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset import tariterators

from .decode import USED_KEYS, SampleError, decode_sample
from .spec import Shard, check_url, open_shard


def _seed(*parts) -> int:
    return hash(tuple(int(p) for p in parts)) & 0x7FFF_FFFF_FFFF


# The sample shuffle buffer draws from its own stream: the same (seed, epoch, rank, worker) as the
# resampled shard sampler plus this tag, so the two generators never coincide.
SHUFFLE_STREAM = 1


def balance(items: Sequence[Shard], bins: int) -> List[List[Shard]]:
    """Longest-first greedy split of shards into ``bins`` groups of near-equal sample counts
    (stable: equal-sized shards keep their given, shuffled order)."""
    groups: List[List[Shard]] = [[] for _ in range(bins)]
    loads = [0] * bins
    for shard in sorted(items, key=lambda s: -s.samples):
        i = loads.index(min(loads))
        groups[i].append(shard)
        loads[i] += shard.samples
    return groups


def epoch_plan(shards: Sequence[Shard], world_size: int, workers: int, seed: int,
               epoch: int) -> List[List[List[Shard]]]:
    """plan[rank][worker] -> that worker's shards for this epoch (exact mode)."""
    order = list(shards)
    random.Random(_seed(seed, epoch)).shuffle(order)
    return [balance(rank_shards, workers) for rank_shards in balance(order, world_size)]


@dataclass
class Chunk:
    """Up to ``chunk_size`` consecutive samples of one worker, stacked (one shared-memory transfer
    per tensor), with the worker's cumulative counters."""

    worker: int
    positions: List[int]
    images: Optional[torch.Tensor]  # [n, 3, S, S]
    tokens: Optional[torch.Tensor]  # [n, C]
    good: int
    failures: Dict[str, int]
    done: bool = False


@dataclass
class WorkerJob:
    """Everything a worker needs (pickled into the worker processes)."""

    mode: str
    shards: List[Shard]
    source_weights: Optional[List[float]]
    rank: int
    world_size: int
    num_workers: int
    epoch: int
    seed: int
    plan_seed: int
    shuffle_buffer: int
    start_positions: List[int]
    transform: Callable
    tokenize: Callable
    max_pixels: int
    draft_size: Optional[int]
    chunk_size: int = 64
    allow_pipe: bool = False


class SampleCounter:
    """Samples that decoded, and failures by reason."""

    def __init__(self):
        self.good, self.failures = 0, Counter()

    def end_shard(self, shard: Shard, read: int, broken: bool) -> None:
        """Count a shard whose reading stopped with an error once as "broken_tar", and each sample its
        index promised but it did not hold as "short_shard" (a truncated copy must not pass as padding)."""
        if broken:
            self.failures["broken_tar"] += 1
        if shard.shortfall(read):
            self.failures["short_shard"] += shard.shortfall(read)


_WDS_META = re.compile(r"__[^/]*__($|/)")  # names webdataset's tar reader skips


def tar_members(shard: Shard, keep: AbstractSet[str], errors: List[Exception],
                allow_pipe: bool = False) -> Iterator[dict]:
    """webdataset's file stage for one shard ({"fname", "data", "__url__"} per member, then the {}
    end-of-shard marker), except that a member whose extension is not in ``keep`` is passed over
    without being read (``data`` None): a 300 MB .npy costs no memory. An error stops the shard and
    goes to ``errors``; the members read before it are kept."""
    check_url(shard.url, allow_pipe)  # a refused URL is the spec's error, never a broken shard
    try:
        with open_shard(shard.url, allow_pipe) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg() and not _WDS_META.match(info.name):
                    _, suffix = tariterators.base_plus_ext(info.name)
                    used = suffix is not None and suffix.lower() in keep
                    yield {"fname": info.name, "data": tar.extractfile(info).read() if used else None,
                           "__url__": shard.url}
                tar.members = []  # a streamed tar otherwise keeps every header it has seen
    except Exception as err:  # tarfile, gzip, zlib and pipes fail in many types; all mean the same
        errors.append(err)
    yield {}


def raw_samples(shards: Iterator[Shard], counter: SampleCounter, allow_pipe: bool = False,
                keep: AbstractSet[str] = USED_KEYS) -> Iterator[dict]:
    """Samples (webdataset's key grouping over ``tar_members``), shard by shard; members outside
    ``keep`` appear with value None. Each shard's end goes to ``counter.end_shard``."""
    for shard in shards:
        errors: List[Exception] = []

        def handler(exn: Exception) -> bool:
            errors.append(exn)
            return True  # go on with what can still be read

        read = 0
        members = tar_members(shard, keep, errors, allow_pipe)
        for sample in tariterators.group_by_keys(members, handler=handler):
            read += 1
            yield sample
        counter.end_shard(shard, read, broken=bool(errors))


def _worker_shards(job: WorkerJob, worker: int) -> Iterator[Shard]:
    if job.mode == "exact":
        plan = epoch_plan(job.shards, job.world_size, job.num_workers, job.seed, job.epoch)
        yield from plan[job.rank][worker]
        return
    rng = random.Random(_seed(job.plan_seed, job.epoch, job.rank, worker))
    # Each shard of source s is drawn with probability proportional to w_s / (samples in s), so the
    # expected share of *samples* from s is w_s (shard count when sample counts are unknown).
    weights = job.source_weights or [1.0] * (1 + max(s.source for s in job.shards))
    sizes = Counter()
    for shard in job.shards:
        sizes[shard.source] += shard.samples
    if not all(sizes.values()):
        sizes = Counter(s.source for s in job.shards)
    shard_weights = [weights[s.source] / sizes[s.source] for s in job.shards]
    while True:
        yield rng.choices(job.shards, weights=shard_weights)[0]


def worker_stream(job: WorkerJob, worker: int) -> Iterator[Chunk]:
    counter = SampleCounter()
    raw = raw_samples(_worker_shards(job, worker), counter, job.allow_pipe)
    rng = random.Random(_seed(job.seed, job.epoch, job.rank, worker, SHUFFLE_STREAM))
    if job.shuffle_buffer > 1:
        raw = wds.filters.shuffle(bufsize=job.shuffle_buffer, initial=min(100, job.shuffle_buffer), rng=rng)(raw)
    positions, images, tokens = [], [], []

    def flush(done: bool = False) -> Chunk:
        stack = (lambda xs: torch.stack(xs)) if positions else (lambda xs: None)
        chunk = Chunk(worker, list(positions), stack(images), stack(tokens), counter.good, dict(counter.failures),
                      done)
        for buffer in (positions, images, tokens):
            buffer.clear()
        return chunk

    start = job.start_positions[worker]
    for position, sample in enumerate(raw):
        if position < start:
            continue
        try:
            image, caption = decode_sample(sample, job.max_pixels, job.draft_size)
        except SampleError as err:
            counter.failures[err.reason] += 1
            continue
        token_ids = job.tokenize(caption)
        counter.good += 1
        positions.append(position)
        # augmentation randomness is a function of the sample's place in the stream, so a resumed
        # worker reproduces the same crops (CPU generator only: torch.manual_seed also queues a seed
        # for every accelerator, 60 us a call, which cost this loader 40% of its throughput)
        torch.default_generator.manual_seed(_seed(job.seed, job.epoch, job.rank, worker, position))
        images.append(job.transform(image))
        tokens.append(token_ids)
        if len(positions) >= job.chunk_size:
            yield flush()
    yield flush(done=True)


class WorkerDataset(IterableDataset):
    """IterableDataset wrapper: each DataLoader worker runs ``worker_stream`` for its own index."""

    def __init__(self, job: WorkerJob):
        super().__init__()
        self.job = job

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        return worker_stream(self.job, info.id if info is not None else 0)
