"""Shard specs: which tar files a run reads, how many samples each holds, and with what weight.

A spec is one or more sources joined by "::". A source is a brace pattern
("data/train-{000000..000099}.tar"), a single tar, or a directory holding shards and the
``manifest.json`` that ``moe-dist-data shard`` writes. Sample counts come from manifest.json, from an
open_clip-style sizes.json, or (last resort) from counting tar members.

What a shard may be is decided once, by ``check_url``, on every final URL: after the "::" split, after
brace expansion and after reading the names a manifest.json or sizes.json lists. A local path is
allowed; a ``pipe:`` URL (which runs a shell command) only with ``allow_pipe``; any other scheme
(http:, https:, file:, s3:, gs:, ...) never. An index lists plain file names in its own directory.
Everything that opens a shard goes through ``open_shard``, so nothing unchecked reaches webdataset's
``gopen`` (which would run pipes, call curl, or apply ``GOPEN_REWRITE``).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

from braceexpand import braceexpand

MANIFEST = "manifest.json"
SIZES = "sizes.json"
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int
    source: int = 0  # index of the source in the spec
    index: Optional[str] = None  # the file that declared ``samples`` (manifest.json, sizes.json); None: counted

    def shortfall(self, read: int) -> int:
        """Samples missing when the shard yielded ``read``: nonzero only where an index promised more."""
        return max(0, self.samples - read) if self.index else 0


def _shown(url: str) -> str:
    return repr(url if len(url) <= 80 else url[:77] + "...")  # repr: a newline cannot split the message


def check_url(url: str, allow_pipe: bool = False) -> str:
    """The one rule for what a shard URL may be; returns ``url`` when it may be read.

    Args:
        url: a final shard URL (after "::" splitting, brace expansion and index files).
        allow_pipe: allow ``pipe:`` URLs (``data.allow_pipe``, ``moe-dist-data --allow-pipe``).
    Raises:
        ValueError: a pipe: URL without ``allow_pipe``, or any other URL scheme.
    """
    match = _SCHEME.match(url)
    if match is None:
        return url
    scheme = match.group(1)
    if scheme == "pipe":
        if allow_pipe:
            return url
        raise ValueError(f"shard URL {_shown(url)} is a pipe: URL, which runs a shell command; set "
                         "data.allow_pipe=true (moe-dist-data: --allow-pipe) only if you trust the spec")
    raise ValueError(f"shard URL {_shown(url)} uses the {scheme}: scheme, but shards are read from local paths "
                     "only; copy or mount them locally, or fetch them with a pipe: URL (e.g. 'pipe:curl -sL URL') "
                     "and data.allow_pipe=true; a local file whose name has a ':' can be given as ./NAME")


def open_shard(url: str, allow_pipe: bool = False) -> BinaryIO:
    """A binary stream of the shard at ``url``: local files with ``open``, allowed pipes through webdataset."""
    check_url(url, allow_pipe)
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    return open(url, "rb")


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


def _index_name(name: str, index: str) -> str:
    if name in ("", ".", "..") or name != os.path.basename(name) or "\\" in name or _SCHEME.match(name):
        raise ValueError(f"{index} lists shard {_shown(name)}, which is not a file name in its directory; an "
                         "index may only name the shards beside it (no directories, '..', absolute paths or "
                         "URLs). Fix or remove the index")
    return name


def read_index(directory: str) -> Tuple[Dict[str, int], Optional[str]]:
    """Sample counts by file name from ``directory``'s manifest.json (ours) or sizes.json (open_clip,
    img2dataset), and the index file's name; ({}, None) when there is neither."""
    for index in (MANIFEST, SIZES):
        path = os.path.join(directory, index)
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            data = json.load(f)
        entries = [(s["name"], s["samples"]) for s in data.get("shards", [])] if index == MANIFEST \
            else list(data.items())
        return {_index_name(str(name), path): int(samples) for name, samples in entries}, index
    return {}, None


def expand_source(source: str, allow_pipe: bool = False) -> List[str]:
    """The checked shard URLs of one source: a directory's indexed (or globbed) tars, or a brace pattern."""
    source = source.strip()
    if os.path.isdir(source):
        names, _ = read_index(source)
        urls = [os.path.join(source, n) for n in sorted(names)] if names else sorted(
            glob.glob(os.path.join(glob.escape(source), "*.tar")))
    else:
        urls = list(braceexpand(source))
    return [check_url(url, allow_pipe) for url in urls]


def resolve_spec(spec: str, weights: Optional[Sequence[float]] = None, allow_pipe: bool = False,
                 need_counts: bool = True) -> List[Shard]:
    """Expand a spec into shards with sample counts; every URL is checked before anything is opened.

    Args:
        spec: sources joined by "::" (brace patterns, .tar files, shard directories).
        weights: per-source sampling weights, one per source (resampled mode).
        allow_pipe: allow ``pipe:`` URLs.
        need_counts: count the members of tars no index describes (else their count is 0).
    Raises:
        ValueError: a URL that ``check_url`` refuses, a spec that matches no file, a missing file, an
            index naming something other than a file beside it, or weights that do not match the sources.
    """
    sources = [s for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError("the shard spec is empty; give a brace pattern, a .tar or a shard directory")
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} sampling weights for {len(sources)} sources in {spec!r}")
    expanded = [expand_source(source, allow_pipe) for source in sources]  # check all before any is read
    shards: List[Shard] = []
    for index, (source, urls) in enumerate(zip(sources, expanded)):
        local = [u for u in urls if not u.startswith("pipe:")]
        missing = [u for u in local if not os.path.isfile(u)]
        if not urls or (local and len(missing) == len(local)):
            raise ValueError(f"shard spec {source!r} matches no shard file; check the path or brace pattern "
                             f"(e.g. data/train-{{000000..000009}}.tar or a directory with {MANIFEST})")
        if missing:
            raise ValueError(f"shard spec {source!r}: {len(missing)} of {len(urls)} shards are missing, "
                             f"first {missing[0]!r}")
        counts: Dict[str, Tuple[int, str]] = {}
        for directory in {os.path.dirname(u) for u in local}:
            names, index_file = read_index(directory)
            counts.update({os.path.join(directory, k): (v, index_file) for k, v in names.items()})
        for url in urls:
            count, index_file = counts.get(url, (None, None))
            if count is None:
                count = _count_tar_samples(url) if (need_counts and url in local) else 0
            shards.append(Shard(url, count, index, index_file))
    return shards
