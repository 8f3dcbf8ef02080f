"""An evaluation set: one full, exact pass over a shard spec, split over ranks.

Outline:
    1. resolve the spec (spec.py); the shards are split over ranks by sample count , the
       same split on every rank: every shard goes to exactly one rank, nothing is padded or repeated, and
       a rank may get no shard at all;
    2. each rank's shards are split over its DataLoader workers (round robin); a worker reads a shard
       through ``raw_samples`` (bounded reads, checked URLs) and decodes each sample (decode.py);
    3. batches never span shards: a shard's samples form the same batches whichever rank or worker reads
       it, so a sample's embedding is computed in the same batch at any world size and the metrics of an
       N-rank eval equal a 1-process eval bit for bit;
    4. every sample carries its canonical key (shard index in the spec, position in the shard) and an
       image identity (sha1 of the encoded image bytes: an image stored with several captions, as COCO
       shards do, is one image). Broken samples are counted by reason and skipped; each shard ends with
       a batch (possibly empty) carrying the failures not yet reported, so counts are complete.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .decode import DEFAULT_MAX_PIXELS, SampleError, decode_metadata, decode_sample, image_key
from .remote import RemoteOptions
from .spec import Shard, resolve_spec
from .stream import SampleCounter, raw_samples


@dataclass
class EvalBatch:
    """Up to ``batch_size`` consecutive samples of one shard (B may be 0 on a shard's closing batch)."""

    images: torch.Tensor  # [B, 3, S, S] transformed images
    tokens: torch.Tensor  # [B, C] token ids
    captions: List[str]  # B captions as stored (stripped)
    metadata: List[Dict[str, object]]  # B dicts from each sample's .json ({} if absent)
    image_ids: List[str]  # B sha1 hex digests of the encoded image bytes
    keys: torch.Tensor  # [B, 2] (shard index in the spec, position in the shard): the canonical order
    failures: Dict[str, int] = field(default_factory=dict)  # broken samples skipped since the last batch


def split_shards(shards: Sequence[Shard], rank: int, world_size: int) -> List[int]:
    """Indices (into ``shards``) of the shards ``rank`` evaluates, in spec order.

    A partition over ranks, the same on every rank: largest shard first to the rank with the fewest
    samples so far, then the fewest shards (so shards of unknown size, counted 0, still spread out)."""
    loads = [(0, 0)] * world_size
    owner = [0] * len(shards)
    for i in sorted(range(len(shards)), key=lambda i: -shards[i].samples):
        owner[i] = loads.index(min(loads))
        loads[owner[i]] = (loads[owner[i]][0] + shards[i].samples, loads[owner[i]][1] + 1)
    return [i for i in range(len(shards)) if owner[i] == rank]


class EvalSet(IterableDataset):
    """The batches of one rank's shards (see the module outline).

    Args:
        spec: shard spec (brace patterns, tars, shard directories joined by "::").
        transform: PIL image -> [3, S, S] tensor (e.g. open_clip's ``image_transform(S, is_train=False)``).
        tokenizer: callable ``texts -> LongTensor [B, C]`` (moe_dist.text, open_clip).
        batch_size: samples per batch at most.
        rank, world_size: this rank's share of the shards.
        allow_pipe: allow ``pipe:`` shard URLs.
        max_pixels: refuse larger images (counted as "image_too_large").
        remote: retries, timeouts and backoff of http(s):// and s3:// shards and index files (None: defaults).
    """

    def __init__(self, spec: str, transform: Callable, tokenizer: Callable, batch_size: int = 64, rank: int = 0,
                 world_size: int = 1, allow_pipe: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 remote: Optional[RemoteOptions] = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"eval batch size {batch_size} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.remote = remote or RemoteOptions()
        self.shards = resolve_spec(spec, allow_pipe=allow_pipe, options=self.remote)
        self.mine = split_shards(self.shards, rank, world_size)
        self.transform, self.tokenizer, self.batch_size = transform, tokenizer, batch_size
        self.allow_pipe, self.max_pixels = allow_pipe, max_pixels

    @property
    def samples(self) -> int:
        """Samples the shards' indexes promise over all ranks (0 for a shard counted as unknown)."""
        return sum(s.samples for s in self.shards)

    def __iter__(self) -> Iterator[EvalBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index in self.mine[worker::workers]:
            yield from self._shard_batches(index)

    def _shard_batches(self, index: int) -> Iterator[EvalBatch]:
        counter = SampleCounter(self.remote)
        reported: Counter = Counter()
        rows: List[tuple] = []

        def flush() -> EvalBatch:
            failures = dict(counter.failures - reported)
            reported.update(failures)
            batch = self._collate(index, rows, failures)
            rows.clear()
            return batch

        for position, sample in enumerate(raw_samples(iter([self.shards[index]]), counter, self.allow_pipe)):
            try:
                image, caption = decode_sample(sample, self.max_pixels)
                metadata = decode_metadata(sample)
            except SampleError as err:
                counter.failures[err.reason] += 1
                continue
            counter.good += 1
            identity = hashlib.sha1(sample[image_key(sample)]).hexdigest()
            rows.append((position, self.transform(image), caption, metadata, identity))
            if len(rows) == self.batch_size:
                yield flush()
        yield flush()  # the shard's tail, and failures after its last full batch (end_shard counts)

    def _collate(self, index: int, rows: List[tuple], failures: Dict[str, int]) -> EvalBatch:
        positions, images, captions, metadata, identities = (list(col) for col in zip(*rows)) if rows \
            else ([], [], [], [], [])
        tokens = self.tokenizer(captions) if captions else torch.zeros(0, 0, dtype=torch.long)
        keys = torch.tensor([[index, p] for p in positions], dtype=torch.long).reshape(-1, 2)
        stacked = torch.stack(images) if images else torch.zeros(0)
        return EvalBatch(stacked, tokens, captions, metadata, identities, keys, failures)


def first_metadata(spec: str, allow_pipe: bool = False, remote: Optional[RemoteOptions] = None) -> Dict[str, object]:
    """The metadata of the spec's first sample with an image and a caption ({} if none): what the data offers
    (a "label" in it makes zero-shot classification possible)."""
    remote = remote or RemoteOptions()
    shards = resolve_spec(spec, allow_pipe=allow_pipe, options=remote)
    for sample in raw_samples(iter(shards), SampleCounter(remote), allow_pipe):
        try:
            if image_key(sample) and sample.get("txt") is not None:
                return decode_metadata(sample)
        except SampleError:
            pass
    return {}


def eval_batches(evalset: EvalSet, workers: int = 0) -> Iterator[EvalBatch]:
    """The rank's batches, read by ``workers`` DataLoader processes (0: in this process); batch order
    across workers is not canonical (use ``EvalBatch.keys``)."""
    workers = min(workers, len(evalset.mine))
    loader = DataLoader(evalset, batch_size=None, num_workers=workers, prefetch_factor=2 if workers else None)
    return iter(loader)


def default_eval_transform(image_size: int) -> Callable:
    """open_clip's eval transform (resize shortest side, centre crop, CLIP mean/std) at ``image_size``."""
    from open_clip.transform import image_transform

    return image_transform(image_size, is_train=False)

