"""``moe-dist-data shard --out s3://BUCKET/PREFIX``: shards written locally, then uploaded, manifests last.

Outline:
    1. the writer (writer.py) writes into a local staging directory exactly as for a local ``--out``;
    2. each shard, once complete under its final name, is uploaded to PREFIX/SPLIT/NAME and removed from
       the staging directory; only then is the split's manifest.json uploaded, so a reader of the bucket
       never sees a manifest listing a shard that is not there whole;
    3. the top manifest.json is uploaded last, when every split is complete (or after an error, listing
       the complete shards);
    4. a re-run into the same prefix skips the upload of every shard that its split's manifest already
       lists with the same samples, bytes and sha256 (shards are byte-identical for the same input and
       options), so an interrupted run resumes where it stopped. A prefix holding another dataset (a top
       manifest with another source or options) is refused unless ``--overwrite``.
Credentials and the endpoint come from boto3's standard chain (moe_dist/data/remote.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Dict, Optional

from moe_dist.data import remote

from .writer import MANIFEST, SPLITS


class S3Publisher:
    """Uploads what the writer completes in ``staging`` to the s3:// prefix ``out`` (see the outline)."""

    def __init__(self, out: str, staging: str):
        self.out, self.staging = out.rstrip("/"), staging
        self.uploaded, self.skipped = 0, 0
        self.existing: Dict[str, Dict[str, object]] = {}
        for split in SPLITS:
            manifest = remote.read_json(remote.join(self.out, f"{split}/{MANIFEST}")) or {}
            shards = manifest.get("shards") if isinstance(manifest, dict) else None
            for entry in shards if isinstance(shards, list) else []:
                if isinstance(entry, dict) and isinstance(entry.get("name"), str):  # else: uploaded again
                    self.existing[f"{split}/{entry['name']}"] = entry

    def __call__(self, path: str, entry: Optional[Dict[str, object]] = None) -> None:
        """Publish the completed local file ``path`` (a shard with its manifest ``entry``, or a manifest)."""
        rel = os.path.relpath(path, self.staging).replace(os.sep, "/")
        old = self.existing.get(rel)
        if entry is not None and old is not None and all(old.get(k) == entry[k] for k in ("samples", "bytes",
                                                                                            "sha256")):
            self.skipped += 1
        else:
            remote.upload(path, remote.join(self.out, rel))
            self.uploaded += entry is not None
        if entry is not None:
            os.remove(path)  # the staging directory holds at most the shards being written


def check_prefix(out: str, source: str, options: Dict[str, object], overwrite: bool) -> None:
    """Refuse an s3:// prefix that holds another dataset (its top manifest names another source or other
    options) unless ``overwrite``; the same dataset is resumed (complete shards are not uploaded again)."""
    url = remote.join(out, MANIFEST)
    top = remote.read_json(url)
    if top is None or overwrite:
        return
    if not isinstance(top, dict):
        raise ValueError(f"--out {out} holds a {MANIFEST} that is not a dataset's ({remote.shown_url(url)} is not a "
                         "JSON object); pass --overwrite to replace it, or choose another prefix")
    if top.get("source") != source or top.get("options") != options:
        raise ValueError(f"--out {out} already holds a dataset of another input or options (its manifest.json "
                         f"names source {top.get('source')!r}); pass --overwrite to replace it, or choose another "
                         "prefix")


def staging_dir() -> str:
    return tempfile.mkdtemp(prefix="moe-dist-shard-")


def remove_staging(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def write_json(out: str, name: str, data: object) -> None:
    """Write ``data`` as ``out/name``: atomically into a local directory, or uploaded to an s3:// prefix."""
    from moe_dist.files import atomic_json

    if not remote.is_remote(out):
        atomic_json(os.path.join(out, name), data)
        return
    staging = staging_dir()
    try:
        atomic_json(os.path.join(staging, name), data)
        remote.upload(os.path.join(staging, name), remote.join(out, name))
    finally:
        remove_staging(staging)
