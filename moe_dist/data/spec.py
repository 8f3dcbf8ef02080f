"""Shard specs: which tar files a run reads, how many samples each holds, and with what weight.

A spec is one or more sources joined by "::". A source is a brace pattern
("data/train-{000000..000099}.tar"), a single tar, or a directory holding shards and the
``manifest.json`` that ``moe-dist-data shard`` writes. Sample counts come from manifest.json, from an
open_clip-style sizes.json, or (last resort) from counting tar members. ``pipe:`` URLs are refused
unless explicitly allowed, since they run a shell command.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from braceexpand import braceexpand

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    source: int = 0  # index of the source in the spec


def _count_tar_samples(path: str) -> int:
    keys = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and "." in os.path.basename(member.name):
                    keys.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        pass  # a broken tar counts what it could read; the loader reports the error
    return len(keys)


def _sizes_from_dir(directory: str) -> Dict[str, int]:
    """basename -> sample count from manifest.json (ours) or sizes.json (open_clip/img2dataset)."""
    manifest = os.path.join(directory, MANIFEST)
    if os.path.isfile(manifest):
        with open(manifest) as f:
            data = json.load(f)
        return {s["name"]: int(s["samples"]) for s in data.get("shards", [])}
    sizes = os.path.join(directory, "sizes.json")
    if os.path.isfile(sizes):
        with open(sizes) as f:
            return {os.path.basename(k): int(v) for k, v in json.load(f).items()}
    return {}


def expand_source(source: str, allow_pipe: bool = False) -> List[str]:
    source = source.strip()
    if source.startswith("pipe:"):
        if not allow_pipe:
            raise ValueError(f"shard spec {source[:60]!r} is a pipe: URL, which runs a shell command; set "
                             "data.allow_pipe=true to allow it")
        return list(braceexpand(source))
    if os.path.isdir(source):
        names = _sizes_from_dir(source)
        urls = [os.path.join(source, n) for n in sorted(names)] if names else sorted(
            glob.glob(os.path.join(source, "*.tar")))
        return urls
    return list(braceexpand(source))


def resolve_spec(spec: str, weights: Optional[Sequence[float]] = None, allow_pipe: bool = False,
                 need_counts: bool = True) -> List[Shard]:
    """Expand a spec into shards with sample counts.

    Raises:
        ValueError: the spec matches no file, a file is missing, or weights do not match the sources.
    """
    sources = [s for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError("the shard spec is empty; give a brace pattern, a .tar or a shard directory")
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} sampling weights for {len(sources)} sources in {spec!r}")
    shards: List[Shard] = []
    for index, source in enumerate(sources):
        urls = expand_source(source, allow_pipe)
        local = [u for u in urls if not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if not urls or (local and len(missing) == len(local)):
            raise ValueError(f"shard spec {source!r} matches no shard file; check the path or brace pattern "
                             f"(e.g. data/train-{{000000..000009}}.tar or a directory with {MANIFEST})")
        if missing:
            raise ValueError(f"shard spec {source!r}: {len(missing)} of {len(urls)} shards are missing, "
                             f"first {missing[0]!r}")
        sizes: Dict[str, int] = {}
        for directory in {os.path.dirname(u) for u in local}:
            sizes.update({os.path.join(directory, k): v for k, v in _sizes_from_dir(directory).items()})
        for url in urls:
            count = sizes.get(url)
            if count is None:
                count = _count_tar_samples(url) if (need_counts and not url.startswith("pipe:")) else 0
            shards.append(Shard(url, count, index))
    return shards
