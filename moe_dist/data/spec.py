"""Shard specs: which tar files a run reads, how many samples each holds, and with what weight.

A spec is one or more sources joined by "::". A source is a brace pattern
("data/train-{000000..000099}.tar"), a single tar, a directory of shards (with the split's
``manifest.json`` or an open_clip ``sizes.json``), or the output directory of ``moe-dist-data shard``
(``DIR/manifest.json`` with ``DIR/train/``, ``DIR/val/``), which means its train split. Another split is
named by its directory: ``DIR/val``; there is no other split syntax. Sample counts come from
manifest.json, from an open_clip-style sizes.json, or (last resort, local tars only) from counting tar
members. The same holds for http(s):// and s3:// sources (remote.py), except that a remote directory
cannot be listed: it needs its manifest.json or sizes.json.

What a shard may be is decided once, by ``check_url``, on every final URL: after the "::" split, after
brace expansion and after reading the names a manifest.json or sizes.json lists. A local path is
allowed; http://, https:// and s3:// URLs are read by remote.py's own clients; a ``pipe:`` URL (which
runs a shell command) only with ``allow_pipe``; any other scheme (file:, gs:, ftp:, ...) never. An index
lists plain file names in its own directory. Everything that opens a shard goes through ``open_shard``,
so nothing unchecked reaches webdataset's ``gopen`` (which would run pipes, call curl, or apply
``GOPEN_REWRITE``).
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

from . import remote
from .remote import RemoteError, RemoteOptions, is_remote
from .urls import shown_spec, url_problem

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
    url = shown_spec(url)  # never a password or a query string (a presigned token)
    return repr(url if len(url) <= 80 else url[:77] + "...")  # repr: a newline cannot split the message


def _named(source: str) -> str:
    """A spec or source as messages name it: whole, but without the secrets ``_shown`` leaves out."""
    return repr(shown_spec(source))


def check_url(url: str, allow_pipe: bool = False) -> str:
    """The one rule for what a shard URL may be; returns ``url`` when it may be read.

    Args:
        url: a final shard URL (after "::" splitting, brace expansion and index files).
        allow_pipe: allow ``pipe:`` URLs (``data.allow_pipe``, ``moe-dist-data --allow-pipe``).
    Raises:
        ValueError: a pipe: URL without ``allow_pipe``, a scheme other than http, https and s3, or a remote
            URL that breaks the URL rule (``urls.url_problem``: userinfo, a malformed host or port, ...).
    """
    match = _SCHEME.match(url)
    if match is None:
        return url
    if is_remote(url):
        problem = url_problem(url)
        if problem:
            raise ValueError(f"shard URL {_shown(url)} {problem}")
        return url
    scheme = match.group(1)
    if scheme == "pipe":
        if allow_pipe:
            return url
        raise ValueError(f"shard URL {_shown(url)} is a pipe: URL, which runs a shell command; set "
                         "data.allow_pipe=true (moe-dist-data: --allow-pipe) only if you trust the spec")
    raise ValueError(f"shard URL {_shown(url)} uses the {scheme}: scheme, but shards are read from local paths, "
                     "http://, https:// and s3:// URLs only; copy or mount them locally, or fetch them with a pipe: "
                     "URL (e.g. 'pipe:curl -sL URL') and data.allow_pipe=true; a local file whose name has a ':' "
                     "can be given as ./NAME")


def open_shard(url: str, allow_pipe: bool = False, options: RemoteOptions = RemoteOptions(),
               on_retry=None) -> BinaryIO:
    """A binary stream of the shard at ``url``: local files with ``open``, http(s):// and s3:// through
    remote.py (retried at the byte, ``on_retry`` called per retry), allowed pipes through webdataset."""
    check_url(url, allow_pipe)
    if is_remote(url):
        return remote.open_remote(url, options, on_retry)
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


def _join(directory: str, name: str) -> str:
    return remote.join(directory, name) if is_remote(directory) else os.path.join(directory, name)


def _load_json(path: str, options: RemoteOptions = RemoteOptions()) -> Optional[object]:
    """The JSON at a local path or remote URL (read with ``options``); None when there is no such file or object."""
    if is_remote(path):
        try:
            return remote.read_json(path, options)
        except RemoteError as err:
            raise ValueError(f"cannot read {err}") from None
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def read_index(directory: str, options: RemoteOptions = RemoteOptions()) -> Tuple[Dict[str, int], Optional[str]]:
    """Sample counts by file name from ``directory``'s manifest.json (ours) or sizes.json (open_clip,
    img2dataset), and the index file's name; ({}, None) when there is neither. ``directory`` may be an
    http(s):// or s3:// URL (read with ``options``)."""
    for index in (MANIFEST, SIZES):
        path = _join(directory, index)
        data = _load_json(path, options)
        if data is None:
            continue
        entries = [(s["name"], s["samples"]) for s in data.get("shards", [])] if index == MANIFEST \
            else list(data.items())
        return {_index_name(str(name), path): int(samples) for name, samples in entries}, index
    return {}, None


@dataclass(frozen=True)
class Split:
    """One split of a ``moe-dist-data shard`` output directory."""

    name: str
    path: str  # the split's directory: the spec that names it
    shards: int
    samples: int


def dataset_splits(directory: str, options: RemoteOptions = RemoteOptions()) -> Optional[Dict[str, Split]]:
    """The splits of ``directory`` when ``moe-dist-data shard`` (or ``synth``) wrote it, by name; None for
    any other directory. Such a directory holds a top ``manifest.json`` with ``splits`` and no shards."""
    path = _join(directory, MANIFEST)
    data = _load_json(path, options)
    if not isinstance(data, dict) or "splits" not in data or "shards" in data:
        return None
    splits = {}
    for name, entry in sorted(data["splits"].items()):
        sub = _index_name(str(entry.get("path", name)), path)  # a split is a directory beside the manifest
        splits[name] = Split(name, _join(directory, sub), int(entry.get("shards", 0)),
                             int(entry.get("samples", 0)))
    return splits


def describe_splits(directory: str, splits: Dict[str, Split]) -> str:
    """"DIR holds splits train (8 shards), val (1 shard)": for messages that point at a split."""
    listed = ", ".join(f"{s.name} ({s.shards} shard{'s' if s.shards != 1 else ''})" for s in splits.values())
    return f"{directory} holds split{'s' if len(splits) != 1 else ''} {listed}" if splits else \
        f"{directory} holds no split"


def _split_hint(source: str) -> Optional[str]:
    """For a source like "DIR:val" that names nothing, where DIR is a shard output directory: the fix."""
    head, sep, tail = source.rpartition(":")
    if not sep or not head or not os.path.isdir(head):
        return None
    splits = dataset_splits(head)
    if splits is None:
        return None
    target = splits[tail].path if tail in splits else os.path.join(head, tail)
    return (f"shard spec {source!r} is not a path; a split is named by its directory: use {target} "
            f"({describe_splits(head, splits)})")


def _source_dir(source: str, options: RemoteOptions = RemoteOptions()) -> str:
    """The directory of shards a directory source stands for: itself, or the train split of a
    ``moe-dist-data shard`` output directory."""
    splits = dataset_splits(source, options)
    if splits is None:
        return source
    if "train" in splits and (is_remote(source) or os.path.isdir(splits["train"].path)):
        return splits["train"].path
    others = ", ".join(f"{s.path} for the {s.name} split" for s in splits.values())
    raise ValueError(f"shard spec {_named(source)} is a dataset directory without a train split, which it would mean; "
                     f"{describe_splits(source, splits)}" + (f": use {others}" if others else ""))


def _subdir_hint(source: str) -> str:
    """For a directory without shards: the subdirectories that hold some, as specs to use instead."""
    found = []
    for name in sorted(os.listdir(source)):
        sub = os.path.join(source, name)
        if os.path.isdir(sub) and (os.path.isfile(os.path.join(sub, MANIFEST)) or glob.glob(
                os.path.join(glob.escape(sub), "*.tar"))):
            found.append(sub)
    return f"; it has shard directories {', '.join(found)}: use one of them" if found else ""


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _remote_directory(source: str, allow_pipe: bool, options: RemoteOptions) -> List[str]:
    """The shard URLs a remote directory's index lists (its train split for a dataset directory)."""
    check_url(source, allow_pipe)  # before its index is read
    if "?" in source:
        raise ValueError(f"shard spec {_named(source)} is a remote directory with a query string, which cannot "
                         "apply to its index and shards (each object has its own); name the shards (a .tar or a "
                         "brace pattern of .tar URLs may carry a query)")
    directory = _source_dir(source.rstrip("/"), options)
    names, _ = read_index(directory, options)
    if not names:
        raise ValueError(f"shard spec {_named(source)} is a remote directory without a manifest.json or sizes.json "
                         "(remote directories cannot be listed); upload the index beside the shards, or give a "
                         "brace pattern such as https://host/train-{000000..000099}.tar")
    return [check_url(remote.join(directory, n), allow_pipe) for n in sorted(names)]


def expand_source(source: str, allow_pipe: bool = False, options: RemoteOptions = RemoteOptions()) -> List[str]:
    """The checked shard URLs of one source: a directory's indexed (or globbed) tars (a shard output
    directory's train split), or a brace pattern. Remote index files are read with ``options``."""
    source = source.strip()
    if is_remote(source) and "{" not in source and not remote.path_of(source).endswith(TAR_SUFFIXES):
        return _remote_directory(source, allow_pipe, options)
    if os.path.isdir(source):
        source = _source_dir(source)
        names, _ = read_index(source)
        urls = [os.path.join(source, n) for n in sorted(names)] if names else sorted(
            glob.glob(os.path.join(glob.escape(source), "*.tar")))
    else:
        hint = None if os.path.exists(source) else _split_hint(source)
        if hint:
            raise ValueError(hint)
        urls = list(braceexpand(source))
    return [check_url(url, allow_pipe) for url in urls]


def resolve_spec(spec: str, weights: Optional[Sequence[float]] = None, allow_pipe: bool = False,
                 need_counts: bool = True, remote_counts: bool = True,
                 options: RemoteOptions = RemoteOptions()) -> List[Shard]:
    """Expand a spec into shards with sample counts; every URL is checked before anything is opened.

    Args:
        spec: sources joined by "::" (brace patterns, .tar files, shard directories).
        weights: per-source sampling weights, one per source (resampled mode).
        allow_pipe: allow ``pipe:`` URLs.
        need_counts: count the members of local tars no index describes (else their count is 0).
        remote_counts: refuse a remote tar no index describes (exact mode needs every count); else it counts 0.
        options: retries, timeouts and backoff of remote index reads (``data.remote_*``).
    Raises:
        ValueError: a URL that ``check_url`` refuses, a spec that matches no file, a missing file, an
            index naming something other than a file beside it, or weights that do not match the sources.
    """
    sources = [s for s in spec.split("::") if s.strip()]
    if not sources:
        raise ValueError("the shard spec is empty; give a brace pattern, a .tar or a shard directory")
    if weights is not None and len(weights) != len(sources):
        raise ValueError(f"{len(weights)} sampling weights for {len(sources)} sources in {_named(spec)}")
    expanded = [expand_source(source, allow_pipe, options) for source in sources]  # check all before any is read
    shards: List[Shard] = []
    for index, (source, urls) in enumerate(zip(sources, expanded)):
        local = [u for u in urls if not u.startswith("pipe:") and not is_remote(u)]
        missing = [u for u in local if not os.path.isfile(u)]
        if not urls or (local and len(missing) == len(local)):
            hint = _subdir_hint(source.strip()) if os.path.isdir(source.strip()) else ""
            raise ValueError(f"shard spec {_named(source)} matches no shard file; check the path or brace pattern "
                             f"(e.g. data/train-{{000000..000009}}.tar, a shard directory, or the --out "
                             f"directory of moe-dist-data shard){hint}")
        if missing:
            raise ValueError(f"shard spec {source!r}: {len(missing)} of {len(urls)} shards are missing, "
                             f"first {missing[0]!r}")
        counts: Dict[str, Tuple[int, str]] = {}
        directories = {os.path.dirname(u) for u in local} | {remote.parent(u) for u in urls if is_remote(u)}
        for directory in sorted(directories):
            names, index_file = read_index(directory, options)
            counts.update({_join(directory, k): (v, index_file) for k, v in names.items()})
        for url in urls:
            count, index_file = counts.get(url.split("?", 1)[0] if is_remote(url) else url, (None, None))
            if count is None and need_counts and remote_counts and is_remote(url):
                raise ValueError(f"shard {remote.shown_url(url)} has no sample count: its directory holds no "
                                 "manifest.json or sizes.json listing it (a remote tar is not downloaded to count "
                                 "it); upload the index that moe-dist-data shard writes, or use data.mode=resampled")
            if count is None:
                count = _count_tar_samples(url) if (need_counts and url in local) else 0
            shards.append(Shard(url, count, index, index_file))
    return shards
