"""What one DataLoader worker does: read its shards with webdataset, shuffle, decode, transform.

Worker outline (exact mode):
    1. every rank computes the same epoch plan: the epoch's order of the shard list, a function of
       (seed, epoch, shards) alone, less what an elastic resume says was consumed, balanced over
       ranks and over each rank's workers by samples left (longest-first); the main process hands
       each worker its list of ``Work`` (shard, ordinals to skip);
    2. the worker streams its shards through webdataset's tar reader (reading only the members it
       decodes; remote shards through remote.py, which retries at the byte) and a sample shuffle
       buffer seeded with (seed, epoch, rank, worker); every sample is named by its id (shard, ordinal
       in the shard); a broken tar is counted and skipped, and so is each sample a shard's manifest
       lists but the shard lacks, and a shard no index describes that holds nothing ("empty_shard"); a
       remote shard that cannot be read ends the stream with an error chunk (or, with
       ``skip_unreadable``, is counted and skipped);
    3. each raw sample gets a position in that shuffled stream; on resume the worker skips the
       positions already consumed without decoding them;
    4. survivors are decoded (decode.py), transformed (torch RNG seeded per sample position) and
       tokenized, and sent in chunks tagged with (worker, position, id) plus the ids of failed samples,
       the shards whose reading ended, and the worker's cumulative counters; failures alone also fill a
       chunk, so the loader's failure threshold is checked while nothing decodes. A final chunk says "done".
Resampled mode draws shards with replacement (weighted by source) from an RNG seeded with
(seed, epoch, rank, worker, resume generation), forever; once it has read every shard without finding a
sample, the stream ends with an error chunk.
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

from .decode import USED_KEYS, SampleError, decode_sample, member_value
from .remote import RemoteError, RemoteOptions, shown_url
from .spec import Shard, check_url, open_shard


def _seed(*parts) -> int:
    return hash(tuple(int(p) for p in parts)) & 0x7FFF_FFFF_FFFF


# The sample shuffle buffer draws from its own stream: the same (seed, epoch, rank, worker) as the
# resampled shard sampler plus this tag, so the two generators never coincide.
SHUFFLE_STREAM = 1


@dataclass(frozen=True)
class Work:
    """One shard of an exact-mode epoch plan: its index in the spec's shard list, the samples left to
    read (what balancing weighs) and the ordinals already delivered (skipped unread after a resume)."""

    shard: int
    samples: int
    skip: frozenset = frozenset()


def balance(items: Sequence, bins: int) -> List[List]:
    """Longest-first greedy split of items with ``.samples`` into ``bins`` groups of near-equal sample
    counts (stable: equal-sized items keep their given, shuffled order)."""
    groups: List[List] = [[] for _ in range(bins)]
    loads = [0] * bins
    for shard in sorted(items, key=lambda s: -s.samples):
        i = loads.index(min(loads))
        groups[i].append(shard)
        loads[i] += shard.samples
    return groups


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int) -> List[int]:
    """The epoch's shard order (indices into ``shards``): a function of (seed, epoch, shard list) alone."""
    order = list(range(len(shards)))
    random.Random(_seed(seed, epoch)).shuffle(order)
    return order


def epoch_plan(shards: Sequence[Shard], world_size: int, workers: int, seed: int, epoch: int,
               consumed: Optional["Consumed"] = None) -> List[List[List[Work]]]:
    """plan[rank][worker] -> that worker's ``Work`` for this epoch (exact mode), less what ``consumed``
    (an elastic resume's record of the samples delivered before it) holds."""
    consumed = consumed or Consumed()
    work = [Work(i, shards[i].samples - len(consumed.partial.get(i, ())), frozenset(consumed.partial.get(i, ())))
            for i in epoch_order(shards, seed, epoch) if i not in consumed.done]
    return [balance(rank_work, workers) for rank_work in balance(work, world_size)]


@dataclass
class Consumed:
    """Which samples of an epoch were delivered (or failed): whole shards, and the ordinals of shards in
    progress. Ids are (shard index in the spec's list, ordinal in the shard), the same at any world size."""

    done: set = None
    partial: Dict[int, set] = None
    ended: Dict[int, int] = None  # shard -> samples its reading found (reported by the worker)

    def __post_init__(self):
        self.done = set(self.done or ())
        self.partial = {int(k): set(v) for k, v in (self.partial or {}).items()}
        self.ended = dict(self.ended or {})

    def mark(self, shard: int, ordinal: int) -> None:
        self.partial.setdefault(shard, set()).add(ordinal)
        self._settle(shard)

    def end(self, shard: int, read: int) -> None:
        self.ended[shard] = read
        self._settle(shard)

    def _settle(self, shard: int) -> None:
        if shard in self.ended and len(self.partial.get(shard, ())) >= self.ended[shard]:
            self.done.add(shard)
            self.partial.pop(shard, None)
            self.ended.pop(shard)

    def merge(self, other: "Consumed") -> None:
        self.done |= other.done
        for shard, ordinals in other.partial.items():
            self.partial.setdefault(shard, set()).update(ordinals)
        for shard in self.done:
            self.partial.pop(shard, None)

    def to_state(self) -> Dict[str, object]:
        """Plain lists (a checkpoint's client file is loaded with ``weights_only``): partial shards as
        [shard, [[first, last], ...]] runs of ordinals."""
        return {"done": sorted(self.done), "partial": [[s, _runs(o)] for s, o in sorted(self.partial.items())]}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "Consumed":
        return cls(set(state["done"]), {s: {i for a, b in runs for i in range(a, b + 1)} for s, runs in
                                        state["partial"]})


def _runs(ordinals) -> List[List[int]]:
    runs: List[List[int]] = []
    for i in sorted(ordinals):
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return runs


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
    ids: List[tuple] = None  # (shard, ordinal) of each sample (exact mode)
    failed_ids: List[tuple] = None  # (shard, ordinal) of samples that failed to decode since the last chunk
    ended: Dict[int, int] = None  # shard -> samples read, for shards whose reading ended since the last chunk
    retries: int = 0  # remote reopenings so far
    error: str = ""  # the stream cannot go on (a remote shard that cannot be read): the loader raises this


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
    work: Optional[List[List[Work]]] = None  # exact mode: each worker's shards
    remote: RemoteOptions = RemoteOptions()
    skip_unreadable: bool = False


class SampleCounter:
    """Samples that decoded, failures by reason, and remote retries; how remote shards are read.

    Args:
        remote: retries, timeout and backoff of remote reads.
        skip_unreadable: a remote shard that cannot be read after its retries (or is missing or
            forbidden) is counted ("unreadable_shard", per sample its index promised) and skipped;
            otherwise its ``RemoteError`` ends the stream.
    """

    def __init__(self, remote: RemoteOptions = RemoteOptions(), skip_unreadable: bool = False):
        self.good, self.failures, self.retries = 0, Counter(), 0
        self.read = 0  # raw samples the shards held (decodable or not)
        self.remote, self.skip_unreadable = remote, skip_unreadable

    def count_retry(self, url: str, attempt: int, err: RemoteError) -> None:
        self.retries += 1

    def end_shard(self, shard: Shard, read: int, errors: Sequence[Exception]) -> None:
        """Count a shard whose reading stopped with an error once as "broken_tar", and each sample its
        index promised but it did not hold as "short_shard" (a truncated copy must not pass as padding).
        A shard no index describes that held no sample at all counts once as "empty_shard" (shards of
        unknown size: a resampled stream of only such shards would otherwise draw forever).
        A remote read error is raised, or counted as "unreadable_shard" with ``skip_unreadable``."""
        self.read += read
        unreadable = next((e for e in errors if isinstance(e, RemoteError)), None)
        if unreadable is not None:
            if not self.skip_unreadable:
                raise unreadable
            self.failures["unreadable_shard"] += max(1, shard.shortfall(read))
            return
        if errors:
            self.failures["broken_tar"] += 1
        elif read == 0 and shard.index is None:
            self.failures["empty_shard"] += 1
        if shard.shortfall(read):
            self.failures["short_shard"] += shard.shortfall(read)


_WDS_META = re.compile(r"__[^/]*__($|/)")  # names webdataset's tar reader skips


def tar_members(shard: Shard, keep: AbstractSet[str], errors: List[Exception], allow_pipe: bool = False,
                counter: Optional[SampleCounter] = None) -> Iterator[dict]:
    """webdataset's file stage for one shard ({"fname", "data", "__url__"} per member, then the {}
    end-of-shard marker), except that a member whose extension is not in ``keep`` is passed over
    without being read (``data`` None): a 300 MB .npy costs no memory; nor is a used member past its
    cap (``decode.MAX_MEMBER_BYTES``; ``data`` an ``Oversized``, whose decoding is a counted failure). An
    error stops the shard and goes to ``errors``; the members read before it are kept."""
    check_url(shard.url, allow_pipe)  # a refused URL is the spec's error, never a broken shard
    counter = counter or SampleCounter()
    try:
        with open_shard(shard.url, allow_pipe, counter.remote, counter.count_retry) as stream, \
                tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if info.isreg() and not _WDS_META.match(info.name):
                    _, suffix = tariterators.base_plus_ext(info.name)
                    used = suffix is not None and suffix.lower() in keep
                    data = member_value(suffix, info.size, tar.extractfile(info).read) if used else None
                    yield {"fname": info.name, "data": data, "__url__": shard.url}
                tar.members = []  # a streamed tar otherwise keeps every header it has seen
    except Exception as err:  # tarfile, gzip, zlib and pipes fail in many types; all mean the same
        errors.append(_remote_cause(err) or err)
    yield {}


def _remote_cause(err: BaseException) -> Optional[RemoteError]:
    """The RemoteError behind ``err`` (tarfile may wrap the stream's error in its own)."""
    while err is not None and not isinstance(err, RemoteError):
        err = err.__cause__ or err.__context__
    return err


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
        members = tar_members(shard, keep, errors, allow_pipe, counter)
        for sample in tariterators.group_by_keys(members, handler=handler):
            read += 1
            yield sample
        counter.end_shard(shard, read, errors)


def _exact_samples(job: WorkerJob, worker: int, counter: SampleCounter, ended: Dict[int, int]) -> Iterator[dict]:
    """The worker's raw samples in plan order, each named by ``__id__`` (shard, ordinal); ordinals an
    elastic resume already delivered are passed over unread; ``ended`` gets each shard's read count."""
    for work in job.work[worker]:
        read = 0
        for sample in raw_samples(iter([job.shards[work.shard]]), counter, job.allow_pipe):
            if read not in work.skip:
                sample["__id__"] = (work.shard, read)
                yield sample
            read += 1
        ended[work.shard] = read


class StreamError(Exception):
    """The worker's stream cannot go on: the loader raises its message as a DataError."""


def _resampled_shards(job: WorkerJob, worker: int, counter: SampleCounter) -> Iterator[Shard]:
    """Shards drawn with replacement, forever; a StreamError once every shard was drawn and none held a
    sample (shards of unknown size can all be empty; no draw would ever end that stream)."""
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
    drawn = set()
    while True:
        index = rng.choices(range(len(job.shards)), weights=shard_weights)[0]
        yield job.shards[index]  # resumed once the shard was read whole
        if counter.read == 0:
            drawn.add(index)
            if len(drawn) == len(job.shards):
                reasons = ", ".join(f"{k}: {v}" for k, v in sorted(counter.failures.items()))
                raise StreamError(f"none of the {len(job.shards)} shards held a sample on rank {job.rank} (each was "
                                  f"read: {reasons}); fix the shards (moe-dist-data validate SPEC lists them)")


def unreadable_message(err: RemoteError, skip_hint: bool = True) -> str:
    """One line for a remote shard that cannot be read: the URL, the error, the way on."""
    way = "check the URL and the credentials (~/.netrc; AWS_* variables, ~/.aws) or the server's permissions" \
        if err.permanent else "check the server; data.remote_retries and data.remote_timeout_s bound the retries"
    return (f"cannot read shard {shown_url(err.url)}: {err.detail}; {way}"
            + ("; or set data.skip_unreadable_shards=true to skip and count such shards" if skip_hint else ""))


def worker_stream(job: WorkerJob, worker: int) -> Iterator[Chunk]:
    counter = SampleCounter(job.remote, job.skip_unreadable)
    ended: Dict[int, int] = {}
    raw = _exact_samples(job, worker, counter, ended) if job.mode == "exact" else \
        raw_samples(_resampled_shards(job, worker, counter), counter, job.allow_pipe)
    rng = random.Random(_seed(job.seed, job.epoch, job.rank, worker, SHUFFLE_STREAM))
    if job.shuffle_buffer > 1:
        raw = wds.filters.shuffle(bufsize=job.shuffle_buffer, initial=min(100, job.shuffle_buffer), rng=rng)(raw)
    positions, ids, failed_ids, images, tokens = [], [], [], [], []

    def flush(done: bool = False, error: str = "") -> Chunk:
        stack = (lambda xs: torch.stack(xs)) if positions else (lambda xs: None)
        chunk = Chunk(worker, list(positions), stack(images), stack(tokens), counter.good, dict(counter.failures),
                      done, list(ids), list(failed_ids), dict(ended), counter.retries, error)
        for buffer in (positions, ids, failed_ids, images, tokens, ended):
            buffer.clear()
        return chunk

    start = job.start_positions[worker]
    reported = 0  # failures the last chunk carried

    def failing() -> bool:
        """Enough new failures for a chunk of their own: the loader checks its failure threshold per chunk,
        and a stream where nothing decodes (resampled mode never ends) must still reach it."""
        return sum(counter.failures.values()) - reported >= job.chunk_size

    try:
        for position, sample in enumerate(raw):
            if failing():
                reported = sum(counter.failures.values())
                yield flush()
            if position < start:
                continue
            try:
                image, caption = decode_sample(sample, job.max_pixels, job.draft_size)
            except SampleError as err:
                counter.failures[err.reason] += 1
                if "__id__" in sample:
                    failed_ids.append(sample["__id__"])
                continue
            token_ids = job.tokenize(caption)
            counter.good += 1
            positions.append(position)
            if "__id__" in sample:
                ids.append(sample["__id__"])
            # augmentation randomness is a function of the sample's place in the stream, so a resumed
            # worker reproduces the same crops (CPU generator only: torch.manual_seed also queues a seed
            # for every accelerator, 60 us a call, which cost this loader 40% of its throughput)
            torch.default_generator.manual_seed(_seed(job.seed, job.epoch, job.rank, worker, position))
            images.append(job.transform(image))
            tokens.append(token_ids)
            if len(positions) >= job.chunk_size:
                reported = sum(counter.failures.values())
                yield flush()
    except RemoteError as err:
        yield flush(done=True, error=unreadable_message(err))
        return
    except StreamError as err:
        yield flush(done=True, error=str(err))
        return
    yield flush(done=True)


class WorkerDataset(IterableDataset):
    """IterableDataset wrapper: each DataLoader worker runs ``worker_stream`` for its own index."""

    def __init__(self, job: WorkerJob):
        super().__init__()
        self.job = job

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        return worker_stream(self.job, info.id if info is not None else 0)
