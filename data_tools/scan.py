"""``validate``, ``stats`` and ``tokenizer``: reading every sample of a shard spec."""

from __future__ import annotations

import collections
import io
import math
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

from tqdm import tqdm

from moe_dist.data.decode import SampleError, decode_caption, decode_image, image_key
from moe_dist.data.spec import resolve_spec
from moe_dist.data.stream import SampleCounter, raw_samples


@dataclass
class ShardRead:
    """One step of a scan: a raw sample of shard ``url``, or (``sample`` None, once per shard after its
    samples) the errors that stopped the tar reader, by reason."""

    url: str
    sample: Optional[dict] = None
    tar_errors: Dict[str, int] = field(default_factory=dict)


def iter_samples(spec: str, progress: bool = True, desc: str = "read") -> Iterator[ShardRead]:
    """Every readable sample of ``spec``, shard by shard, and each shard's tar errors."""
    shards = resolve_spec(spec)
    bar = tqdm(total=sum(s.samples for s in shards) or None, unit="sample", desc=desc, disable=not progress)
    for shard in shards:
        counter = SampleCounter()
        for sample in raw_samples(iter([shard.url]), counter):
            bar.update(1)
            yield ShardRead(shard.url, sample)
        if counter.failures:
            yield ShardRead(shard.url, tar_errors=dict(counter.failures))
    bar.close()


def validate(spec: str, progress: bool = True) -> Dict[str, object]:
    """Decode every sample; returns {"samples", "ok", "broken": [{"shard", "key", "reason"}]}."""
    broken: List[Dict[str, str]] = []
    total = 0
    for read in iter_samples(spec, progress, "validate"):
        url, sample = read.url, read.sample
        if sample is None:
            broken.extend({"shard": url, "key": None, "reason": reason} for reason in read.tar_errors)
            continue
        total += 1
        try:
            key = image_key(sample)
            if key is None:
                raise SampleError("missing_image")
            decode_caption(sample.get("txt"))
            decode_image(sample[key])
        except SampleError as err:
            broken.append({"shard": url, "key": sample["__key__"], "reason": err.reason})
    return {"samples": total, "ok": total - sum(1 for b in broken if b["key"] is not None), "broken": broken}


def _bucket(value: int, edges=(32, 64, 128, 256, 512, 1024)) -> str:
    for lo, hi in zip((0,) + edges, edges + (math.inf,)):
        if lo <= value < hi:
            return f"{lo}-{hi - 1}" if hi != math.inf else f">={lo}"
    return "?"


def stats(spec: str, progress: bool = True) -> Dict[str, object]:
    """Counts, bytes, image-size and caption-length histograms and key sets."""
    from PIL import Image

    shards = resolve_spec(spec)
    out = {"shards": len(shards), "samples": 0, "bytes": 0, "image_longest_side": collections.Counter(),
           "caption_words": collections.Counter(), "key_sets": collections.Counter(), "unreadable": 0}
    out["bytes"] = sum(os.path.getsize(s.url) for s in shards if os.path.isfile(s.url))
    for read in iter_samples(spec, progress, "stats"):
        sample = read.sample
        if sample is None:
            out["unreadable"] += sum(read.tar_errors.values())
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


def captions(spec: str, progress: bool = True) -> Iterator[str]:
    for read in iter_samples(spec, progress, "captions"):
        if read.sample is None:
            continue
        try:
            yield decode_caption(read.sample.get("txt"))
        except SampleError:
            continue
