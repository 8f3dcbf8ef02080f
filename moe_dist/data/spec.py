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

from ..files import check_regular, open_regular
from . import localfiles, remote
from .localfiles import check_inside, shown_value
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
    return open_regular(url, "shard")


def _count_tar_samples(path: str) -> int:
    keys = set()
    try:
        with open_regular(path, "shard") as f, tarfile.open(fileobj=f) as tar:
            for member in tar:
                if member.isfile() and "." in os.path.basename(member.name):
                    keys.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError):
        pass  # a broken tar counts what it could read; the loader reports the error
    return len(keys)


def _index_name(name: object, index: str, where: str) -> str:
    """``name`` when it is a plain file name; ``where`` says where ``index`` holds it, for the message."""
    if not isinstance(name, str):
        raise ValueError(f"{_shown_path(index)}: {where} is {shown_value(name)}, not a file name; an index "
                         "lists the shards beside it by file name. Fix or remove the index")
    if name in ("", ".", "..") or name != os.path.basename(name) or "\\" in name or _SCHEME.match(name):
        raise ValueError(f"{_shown_path(index)} lists shard {_shown(name)}, which is not a file name in its directory; "
                         "an index may only name the shards beside it (no directories, '..', absolute paths or "
                         "URLs). Fix or remove the index")
    return name


def _shown_path(path: str) -> str:
    return remote.shown_url(path) if is_remote(path) else path


def _join(directory: str, name: str) -> str:
    return remote.join(directory, name) if is_remote(directory) else os.path.join(directory, name)


def _load_json(path: str, options: RemoteOptions = RemoteOptions()) -> Optional[object]:
    """The JSON at a local path or remote URL (read with ``options``); None when there is no such file or
    object. A local index must be a regular file inside its directory, within ``localfiles.INDEX_MAX_BYTES``."""
    if is_remote(path):
        try:
            return remote.read_json(path, options)
        except RemoteError as err:
            raise ValueError(f"cannot read {err}") from None
    directory = os.path.dirname(path) or "."
    if os.path.lexists(path):
        check_inside(path, directory, f"the index of {directory}")
    return localfiles.read_json_file(path, "index")


def _count(value: object, path: str, where: str, name: str) -> int:
    """A shard's sample count from an index: a whole number of at least 1 (a JSON true is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{_shown_path(path)}: {where} is {shown_value(value)}, not a whole number of samples; fix "
                         "the index, or remove it to have the tars counted")
    if value < 1:
        raise ValueError(f"{_shown_path(path)} lists shard {_shown(name)} with {value} samples, but a listed shard "
                         "holds at least 1: correct the count, or remove the entry (and an empty tar); moe-dist-data "
                         "shard rebuilds shards with a correct manifest.json")
    return value


def _not_object(path: str, data: object, expected: str) -> ValueError:
    return ValueError(f"{_shown_path(path)} holds {shown_value(data, 40)}, not an object {expected}; fix or "
                      "remove it")


def index_counts(data: object, path: str) -> Dict[str, int]:
    """Sample counts by file name from the parsed ``manifest.json`` or ``sizes.json`` at ``path``, checked
    whole: ValueError (one line naming the file) for a wrong shape or type, a name that is not a file
    beside it, a name listed twice or a count below 1. A dataset directory's manifest (``splits``, no
    ``shards``) lists no shard: {}."""
    if os.path.basename(remote.path_of(path) if is_remote(path) else path) == SIZES:
        if not isinstance(data, dict):
            raise _not_object(path, data, '{"shard.tar": samples, ...}')
        entries = [(name, "a name", value, f"the count of {_shown(name)}") for name, value in data.items()]
    else:
        if not isinstance(data, dict):
            raise _not_object(path, data, '{"shards": [{"name": ..., "samples": N}, ...]}')
        if "shards" not in data:
            if "splits" in data:
                return {}
            raise ValueError(f'{_shown_path(path)} has no "shards" list (a shard directory\'s manifest) and no '
                             '"splits" (a dataset directory\'s); fix or remove it')
        shards = data["shards"]
        if not isinstance(shards, list):
            raise ValueError(f'{_shown_path(path)}: "shards" is {shown_value(shards)}, not a list of '
                             '{"name": ..., "samples": N}; fix or remove the index')
        entries = []
        for i, entry in enumerate(shards):
            if not isinstance(entry, dict) or "name" not in entry or "samples" not in entry:
                raise ValueError(f'{_shown_path(path)}: shards[{i}] is {shown_value(entry)}, not an object with "name" '
                                 'and "samples"; fix or remove the index')
            entries.append((entry["name"], f'shards[{i}]["name"]', entry["samples"], f'shards[{i}]["samples"]'))
    counts: Dict[str, int] = {}
    for name, name_at, value, value_at in entries:
        name = _index_name(name, path, name_at)
        if name in counts:
            raise ValueError(f"{_shown_path(path)} lists shard {_shown(name)} twice; fix or remove the index")
        counts[name] = _count(value, path, value_at, name)
    return counts


def read_index(directory: str, options: RemoteOptions = RemoteOptions()) -> Tuple[Dict[str, int], Optional[str]]:
    """Sample counts by file name from ``directory``'s manifest.json (ours) or sizes.json (open_clip,
    img2dataset), and the index file's name; ({}, None) when there is neither. ``directory`` may be an
    http(s):// or s3:// URL (read with ``options``).

    Raises:
        ValueError: an index that is malformed (``index_counts``), not a regular file inside ``directory``,
            too large, not UTF-8 or not JSON.
    """
    for index in (MANIFEST, SIZES):
        path = _join(directory, index)
        data = _load_json(path, options)
        if data is None:
            continue
        return index_counts(data, path), index
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
    any other directory. Such a directory holds a top ``manifest.json`` with ``splits`` and no shards.

    Raises:
        ValueError: ``splits`` of a wrong shape or type (one line naming the manifest).
    """
    path = _join(directory, MANIFEST)
    data = _load_json(path, options)
    if not isinstance(data, dict) or "splits" not in data or "shards" in data:
        return None
    if not isinstance(data["splits"], dict):
        raise ValueError(f'{_shown_path(path)}: "splits" is {shown_value(data["splits"])}, not an object '
                         '{"train": {"path": ..., "shards": N, "samples": N}, ...}; fix or remove it')
    splits = {}
    for name, entry in sorted(data["splits"].items()):
        where = f"splits[{json.dumps(name)}]"
        if not isinstance(entry, dict):
            raise ValueError(f'{_shown_path(path)}: {where} is {shown_value(entry)}, not an object '
                             '{"path": ..., "shards": N, "samples": N}; fix or remove the manifest')
        sub = _index_name(entry.get("path", name), path, f'{where}["path"]')  # a directory beside the manifest
        counts = []
        for key in ("shards", "samples"):
            value = entry.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'{_shown_path(path)}: {where}["{key}"] is {shown_value(value)}, not a whole number '
                                 "of at least 0; fix or remove the manifest")
            counts.append(value)
        if not is_remote(directory) and os.path.lexists(os.path.join(directory, sub)):
            check_inside(os.path.join(directory, sub), directory, f"listed in {path}")
        splits[name] = Split(name, _join(directory, sub), *counts)
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
        names, index_file = read_index(source)
        urls = [os.path.join(source, n) for n in sorted(names)] if names else sorted(
            glob.glob(os.path.join(glob.escape(source), "*.tar")))
        found = f"listed in {os.path.join(source, index_file)}" if names else f"found in {source}"
        for url in urls:  # what an index or *.tar finds lies in the directory, never behind a link out of it
            check_inside(url, source, found)
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
        need_counts: count the members of local tars no index describes, and refuse one that holds no
            sample (else their count is 0: unknown).
        remote_counts: refuse a remote tar no index describes (exact mode needs every count); else it counts 0.
        options: retries, timeouts and backoff of remote index reads (``data.remote_*``).
    Raises:
        ValueError: a URL that ``check_url`` refuses, a spec that matches no file, a missing file, a shard
            that is not a regular file (a FIFO, a device, a directory), a malformed index or one naming
            something other than a file beside it, a shard an index or ``*.tar`` found that links out of
            its directory, a shard counted to no sample, or weights that do not match the sources.
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
        for url in local:  # a FIFO, a device or a directory is refused by what it is, and never opened
            if os.path.exists(url):
                check_regular(url, "shard")
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
            if count is None and need_counts and url in local:
                count = _count_tar_samples(url)
                if count == 0:  # planned as 0 samples; were all of them so, no epoch would have a step
                    raise ValueError(f"shard {_shown(url)} holds no sample (an empty tar, or not a tar at all); "
                                     "remove it, or rebuild the shards (moe-dist-data validate SPEC lists what is "
                                     "broken)")
            shards.append(Shard(url, count or 0, index, index_file))
    return shards
