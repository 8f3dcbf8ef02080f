"""``validate``, ``stats`` and ``tokenizer``: reading every sample of a shard spec."""

from __future__ import annotations

import collections
import io
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from tqdm import tqdm

from moe_dist.data.decode import SampleError, decode_caption, decode_image, decode_metadata, image_key
from moe_dist.data.spec import Shard, resolve_spec
from moe_dist.data.stream import SampleCounter, raw_samples
from moe_dist.data.urls import shown_url


@dataclass
class ShardRead:
    """One step of a scan: a raw sample of ``shard``, or (``sample`` None, once per shard after its
    samples) how many samples the shard held and its shard-level failures by reason."""

    shard: Shard
    sample: Optional[dict] = None
    read: int = 0
    failures: Dict[str, int] = field(default_factory=dict)

    def mismatch(self) -> Optional[str]:
        """How the samples read differ from what the shard's index lists (None when they agree)."""
        shard = self.shard
        if shard.index is None or self.read == shard.samples:
            return None
        return f"manifest_mismatch: {self.read} samples, its {shard.index} lists {shard.samples}"


def iter_samples(spec: str, progress: bool = True, desc: str = "read", allow_pipe: bool = False) -> Iterator[ShardRead]:
    """Every readable sample of ``spec``, shard by shard, and after each shard its ShardRead summary.
    The spec is resolved (and refused) here, before the first sample is asked for. Tars no index
    describes are not counted first: the scan reads them anyway, and reports an empty or broken one
    (``empty_shard``, ``broken_tar``) where training refuses it."""
    return _scan(resolve_spec(spec, allow_pipe=allow_pipe, need_counts=False), progress, desc, allow_pipe)


def _scan(shards: List[Shard], progress: bool, desc: str, allow_pipe: bool) -> Iterator[ShardRead]:
    bar = tqdm(total=sum(s.samples for s in shards) or None, unit="sample", desc=desc, disable=not progress)
    for shard in shards:
        counter, read = SampleCounter(), 0
        for sample in raw_samples(iter([shard]), counter, allow_pipe):
            bar.update(1)
            read += 1
            yield ShardRead(shard, sample)
        yield ShardRead(shard, read=read, failures=dict(counter.failures))
    bar.close()


def validate(spec: str, progress: bool = True, allow_pipe: bool = False) -> Dict[str, object]:
    """Decode every sample (image, caption and the .json member, which evaluation reads) and compare each
    shard with its index; returns {"samples", "ok", "broken": [{"shard", "key", "reason"}]} (key None for a
    shard-level problem)."""
    broken: List[Dict[str, str]] = []
    total = 0
    for read in iter_samples(spec, progress, "validate", allow_pipe):
        url, sample = shown_url(read.shard.url), read.sample  # a report: never a query string
        if sample is None:
            reasons = [r for r in read.failures if r != "short_shard"] + [read.mismatch()]
            broken.extend({"shard": url, "key": None, "reason": reason} for reason in reasons if reason)
            continue
        total += 1
        try:
            key = image_key(sample)
            if key is None:
                raise SampleError("missing_image")
            decode_caption(sample.get("txt"))
            decode_image(sample[key])
            decode_metadata(sample)
        except SampleError as err:
            broken.append({"shard": url, "key": sample["__key__"], "reason": err.reason})
    return {"samples": total, "ok": total - sum(1 for b in broken if b["key"] is not None), "broken": broken}


def _bucket(value: int, edges=(32, 64, 128, 256, 512, 1024)) -> str:
    for lo, hi in zip((0,) + edges, edges + (math.inf,)):
        if lo <= value < hi:
            return f"{lo}-{hi - 1}" if hi != math.inf else f">={lo}"
    return "?"


def stats(spec: str, progress: bool = True, allow_pipe: bool = False) -> Dict[str, object]:
    """Counts, bytes, image-size and caption-length histograms and key sets; "unreadable" counts broken
    tars, "missing" the samples indexes list but shards lack."""
    from PIL import Image

    shards = resolve_spec(spec, allow_pipe=allow_pipe, need_counts=False)
    out = {"shards": len(shards), "samples": 0, "bytes": 0, "image_longest_side": collections.Counter(),
           "caption_words": collections.Counter(), "key_sets": collections.Counter(), "unreadable": 0,
           "missing": 0}
    out["bytes"] = sum(os.path.getsize(s.url) for s in shards if os.path.isfile(s.url))
    for read in iter_samples(spec, progress, "stats", allow_pipe):
        sample = read.sample
        if sample is None:
            out["unreadable"] += read.failures.get("broken_tar", 0)
            out["missing"] += read.failures.get("short_shard", 0)
            continue
        out["samples"] += 1
        out["key_sets"][",".join(sorted(k for k in sample if not k.startswith("__")))] += 1
        key = image_key(sample)
        if key:
            try:
                out["image_longest_side"][_bucket(max(Image.open(io.BytesIO(sample[key])).size))] += 1
            except Exception:
                out["image_longest_side"]["undecodable"] += 1
        try:
            out["caption_words"][_bucket(len(decode_caption(sample.get("txt")).split()), (4, 8, 16, 32, 64))] += 1
        except SampleError as err:
            out["caption_words"][err.reason] += 1
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in out.items()}


def captions(spec: str, progress: bool = True, allow_pipe: bool = False) -> Iterator[str]:
    """The decodable captions of ``spec``, in shard order (the spec is resolved before this returns)."""
    return _decodable_captions(iter_samples(spec, progress, "captions", allow_pipe))


def _decodable_captions(reads: Iterator[ShardRead]) -> Iterator[str]:
    for read in reads:
        if read.sample is None:
            continue
        try:
            yield decode_caption(read.sample.get("txt"))
        except SampleError:
            continue
