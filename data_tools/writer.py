"""Writing samples into webdataset tar shards plus the manifests that account for every input.

Layout of an output directory:
    OUT/train/train-000000.tar ...  OUT/train/manifest.json   (per-shard samples and bytes)
    OUT/val/val-000000.tar ...      OUT/val/manifest.json     (only with --val-fraction > 0)
    OUT/manifest.json               inputs, written, failed (each input with its reason), splits
Samples use the keys img2dataset and open_clip use: jpg/png/webp + txt + json.

Every manifest lists exactly the shards that exist under their final names: a shard is written to a
temporary file and renamed when complete, its split's manifest is rewritten after each one, and
after a failed write (a full disk, ``ulimit -f``) the incomplete shard is removed and the top
manifest records the error and the samples lost with it. An ``OUT`` that holds a dataset is refused
unless it is cleared first (``--overwrite``). With a ``publish`` callback (publish.py, ``--out s3://``)
every file is handed over once complete: each shard (with its manifest entry, which then also holds
its sha256) before the manifest that lists it, the top manifest last.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import webdataset as wds

from moe_dist.files import TMP_MARK, atomic_json, atomic_path

FORMAT = "moe_dist.shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val")


class OpenShard:
    """A shard being written: a TarWriter on a temporary file beside ``path`` (moe_dist.files.atomic_path)
    that takes the final name only when the shard is closed whole."""

    def __init__(self, path: str):
        self.entry: Dict[str, object] = {"name": os.path.basename(path), "samples": 0, "payload_bytes": 0}
        self._stack = contextlib.ExitStack()  # atomic_path's block spans many write() calls
        tmp = self._stack.enter_context(atomic_path(path))
        # our own file object: a path would go through webdataset's gopen (URL schemes, GOPEN_REWRITE)
        stream = self._stack.enter_context(open(tmp, "wb"))
        # fixed integer mtime: byte-identical shards, and plain ustar headers (no pax) that read faster
        self.writer = wds.TarWriter(stream, mtime=0)

    def close(self) -> Dict[str, object]:
        """Write the tar's end, then flush, fsync and rename it to its final name; returns its entry."""
        self.writer.close()
        self._stack.close()
        return self.entry

    def discard(self, err: BaseException) -> None:
        """Remove the temporary file after ``err`` (the tar is incomplete; writing its end may fail too)."""
        with contextlib.suppress(Exception):
            self.writer.close()
        with contextlib.suppress(Exception):  # atomic_path removes the file however the unwinding ends
            self._stack.__exit__(type(err), err, err.__traceback__)


@dataclass
class ShardSet:
    """Rotating shards of one split: a new shard after ``per_shard`` samples or ``max_bytes``. The split's
    manifest.json is rewritten after every shard that completes, so it always lists exactly the
    complete shards under their final names."""

    directory: str
    prefix: str
    per_shard: int
    max_bytes: int
    shards: List[Dict[str, object]] = field(default_factory=list)  # complete shards
    publish: Optional[Callable[..., None]] = None  # publish(path, entry=None), see the module docstring
    _open: Optional[OpenShard] = None

    def write(self, sample: Dict[str, object]) -> None:
        size = sum(len(v) for k, v in sample.items() if isinstance(v, (bytes, str)) and not k.startswith("__"))
        entry = self._open.entry if self._open else None
        if entry is None or entry["samples"] >= self.per_shard or \
                (entry["samples"] and entry["payload_bytes"] + size > self.max_bytes):
            self.close()
            os.makedirs(self.directory, exist_ok=True)
            self._open = OpenShard(os.path.join(self.directory, f"{self.prefix}-{len(self.shards):06d}.tar"))
            entry = self._open.entry
        entry["samples"] += 1  # counted first: a sample whose write fails is lost with its shard
        entry["payload_bytes"] += size
        self._open.writer.write(sample)

    def close(self) -> None:
        """Complete the open shard (if any) and list it in the split's manifest."""
        if self._open is None:
            return
        entry = self._open.close()
        self._open = None
        path = os.path.join(self.directory, entry["name"])
        entry["bytes"] = os.path.getsize(path)
        if self.publish is not None:
            entry["sha256"] = _sha256(path)
            self.publish(path, entry)
        self.shards.append(entry)
        atomic_json(os.path.join(self.directory, MANIFEST), self.manifest())
        if self.publish is not None:
            self.publish(os.path.join(self.directory, MANIFEST))

    def discard(self, err: BaseException) -> int:
        """Drop the open shard after a failed write; returns how many samples it held."""
        if self._open is None:
            return 0
        lost = self._open.entry["samples"]
        self._open.discard(err)
        self._open = None
        return lost

    def manifest(self) -> Dict[str, object]:
        return {"format": FORMAT, "shards": self.shards, "samples": sum(s["samples"] for s in self.shards),
                "bytes": sum(s["bytes"] for s in self.shards), "split": self.prefix}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_of(key: str, val_fraction: float, seed: int) -> str:
    """Deterministic train/val assignment from the sample key."""
    if val_fraction <= 0:
        return "train"
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction else "train"


def dataset_files(out: str) -> List[str]:
    """The files of a dataset under ``out`` that a new one replaces: manifests first (the top one
    before the splits'), then shards and temporaries a crashed writer left."""
    found = [os.path.join(out, MANIFEST)] + [os.path.join(out, split, MANIFEST) for split in SPLITS]
    for split in SPLITS:
        directory = glob.escape(os.path.join(out, split))
        found += sorted(path for pattern in ("*.tar", f"*{TMP_MARK}*")
                        for path in glob.glob(os.path.join(directory, pattern)))
    return [path for path in found if os.path.isfile(path)]


def clear_out(out: str, overwrite: bool) -> None:
    """Make ``out`` ready for a new dataset: refuse one that holds a dataset unless ``overwrite``, then
    remove the old dataset's files, manifests first, so that no manifest ever describes other shards.

    Raises:
        ValueError: ``out`` holds a dataset and ``overwrite`` is False.
    """
    found = dataset_files(out)
    if found and not overwrite:
        raise ValueError(f"--out {out} already holds a dataset ({len(found)} files, e.g. {found[0]}); pass "
                         "--overwrite to replace it, or choose another --out")
    for path in found:
        os.remove(path)


class DatasetWriter:
    """Splits samples into train/val shard sets and records failed inputs; ``finish`` (or, after an
    error, ``abort``) writes the top manifest, which lists exactly the complete shards."""

    def __init__(self, out: str, per_shard: int = 10000, max_bytes: int = 1 << 30, val_fraction: float = 0.0,
                 seed: int = 0, publish: Optional[Callable[..., None]] = None):
        self.out, self.val_fraction, self.seed, self.publish = out, val_fraction, seed, publish
        self.sets = {name: ShardSet(os.path.join(out, name), name, per_shard, max_bytes, publish=publish)
                     for name in SPLITS}
        self.failed: List[Dict[str, str]] = []
        self.inputs = 0

    def add(self, sample: Dict[str, object]) -> None:
        self.inputs += 1
        self.sets[split_of(sample["__key__"], self.val_fraction, self.seed)].write(sample)

    def fail(self, ref: str, reason: str) -> None:
        self.inputs += 1
        self.failed.append({"input": ref, "reason": reason})

    def finish(self, source: str, options: Dict[str, object]) -> Dict[str, object]:
        """Complete the open shards and write the top manifest; returns it."""
        for shard_set in self.sets.values():
            shard_set.close()
        return self._write_manifest(source, options)

    def abort(self, source: str, options: Dict[str, object], err: BaseException) -> Dict[str, object]:
        """After ``err``: drop the incomplete shards and write a top manifest of the complete ones, with
        the error and the number of samples that were lost with the dropped shards; returns it."""
        unwritten = sum(shard_set.discard(err) for shard_set in self.sets.values())
        return self._write_manifest(source, options, {"error": f"{type(err).__name__}: {err}",
                                                      "unwritten": unwritten})

    def _write_manifest(self, source: str, options: Dict[str, object],
                        incomplete: Optional[Dict[str, object]] = None) -> Dict[str, object]:
        splits = {name: s.manifest() for name, s in self.sets.items() if s.shards}
        written = sum(m["samples"] for m in splits.values())
        manifest = {"format": FORMAT, "source": source, "options": options, "inputs": self.inputs,
                    "written": written, "failed_count": len(self.failed), "failed": self.failed,
                    "splits": {n: {"samples": m["samples"], "bytes": m["bytes"], "shards": len(m["shards"]),
                                   "path": n} for n, m in splits.items()}, **(incomplete or {})}
        unwritten = (incomplete or {}).get("unwritten", 0)
        assert written + len(self.failed) + unwritten == self.inputs, "every input is written, failed or unwritten"
        os.makedirs(self.out, exist_ok=True)
        atomic_json(os.path.join(self.out, MANIFEST), manifest)
        if self.publish is not None:
            self.publish(os.path.join(self.out, MANIFEST))
        return manifest
