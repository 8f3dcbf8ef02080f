"""Writing samples into webdataset tar shards plus the manifests that account for every input.

Layout of an output directory:
    OUT/train/train-000000.tar ...  OUT/train/manifest.json   (per-shard samples and bytes)
    OUT/val/val-000000.tar ...      OUT/val/manifest.json     (only with --val-fraction > 0)
    OUT/manifest.json               inputs, written, failed (each input with its reason), splits
Samples use the keys img2dataset and open_clip use: jpg/png/webp + txt + json.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import webdataset as wds

from moe_dist.files import atomic_json

FORMAT = "moe_dist.shards/1"


@dataclass
class ShardSet:
    """Rotating TarWriter for one split: a new shard after ``per_shard`` samples or ``max_bytes``."""

    directory: str
    prefix: str
    per_shard: int
    max_bytes: int
    shards: List[Dict[str, object]] = field(default_factory=list)
    _writer: Optional[wds.TarWriter] = None

    def write(self, sample: Dict[str, object]) -> None:
        size = sum(len(v) for k, v in sample.items() if isinstance(v, (bytes, str)) and not k.startswith("__"))
        current = self.shards[-1] if self.shards else None
        if self._writer is None or current["samples"] >= self.per_shard or \
                (current["samples"] and current["payload_bytes"] + size > self.max_bytes):
            self._open_next()
            current = self.shards[-1]
        self._writer.write(sample)
        current["samples"] += 1
        current["payload_bytes"] += size

    def _open_next(self) -> None:
        self.close()
        os.makedirs(self.directory, exist_ok=True)
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        # fixed integer mtime: byte-identical shards, and plain ustar headers (no pax) that read faster
        self._writer = wds.TarWriter(os.path.join(self.directory, name), mtime=0)
        self.shards.append({"name": name, "samples": 0, "payload_bytes": 0})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def finish(self, extra: Dict[str, object]) -> Dict[str, object]:
        self.close()
        for shard in self.shards:
            shard["bytes"] = os.path.getsize(os.path.join(self.directory, shard["name"]))
        manifest = {"format": FORMAT, "shards": self.shards,
                    "samples": sum(s["samples"] for s in self.shards),
                    "bytes": sum(s["bytes"] for s in self.shards), **extra}
        if self.shards:
            atomic_json(os.path.join(self.directory, "manifest.json"), manifest)
        return manifest


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """Deterministic train/val assignment from the sample key."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction else "train"


class DatasetWriter:
    """Splits samples into train/val shard sets and records failed inputs."""

    def __init__(self, out: str, per_shard: int = 10000, max_bytes: int = 1 << 30, val_fraction: float = 0.0,
                 seed: int = 0):
        self.out, self.val_fraction, self.seed = out, val_fraction, seed
        self.sets = {name: ShardSet(os.path.join(out, name), name, per_shard, max_bytes) for name in ("train", "val")}
        self.failed: List[Dict[str, str]] = []
        self.inputs = 0

    def add(self, sample: Dict[str, object]) -> None:
        self.inputs += 1
        self.sets[split_of(sample["__key__"], self.val_fraction, self.seed)].write(sample)

    def fail(self, ref: str, reason: str) -> None:
        self.inputs += 1
        self.failed.append({"input": ref, "reason": reason})

    def finish(self, source: str, options: Dict[str, object]) -> Dict[str, object]:
        splits = {name: s.finish({"split": name}) for name, s in self.sets.items()}
        written = sum(m["samples"] for m in splits.values())
        manifest = {"format": FORMAT, "source": source, "options": options, "inputs": self.inputs,
                    "written": written, "failed_count": len(self.failed), "failed": self.failed,
                    "splits": {n: {"samples": m["samples"], "bytes": m["bytes"], "shards": len(m["shards"]),
                                   "path": n} for n, m in splits.items() if m["shards"]}}
        assert written + len(self.failed) == self.inputs, "every input is written or reported failed"
        os.makedirs(self.out, exist_ok=True)
        atomic_json(os.path.join(self.out, "manifest.json"), manifest)
        return manifest
