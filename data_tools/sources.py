"""Inputs ``moe-dist-data shard`` understands, each turned into a stream of ``Item``s.

    table    CSV / TSV / JSONL with image-path and caption columns (paths relative to the file);
             other columns become per-sample JSON metadata
    coco     a COCO-captions JSON (--images DIR holds the images): one sample per caption
    folder   images with sidecar .txt captions (and optional .json), searched recursively; this is
             also img2dataset's "files" output layout
    shards   existing webdataset shards (brace pattern, .tar, or a shard directory): resharding
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class Item:
    """One input: where it came from (for error reports), image bytes or a path, caption, metadata;
    or, with ``failure`` set, an input that could not even be read (the reason)."""

    ref: str
    caption: object  # str, bytes (undecoded, from shards) or None
    path: Optional[str] = None
    data: Optional[bytes] = None
    ext: str = "jpg"
    meta: Dict[str, object] = field(default_factory=dict)
    failure: Optional[str] = None


def detect(path: str) -> str:
    low = path.lower()
    if low.endswith((".csv", ".tsv", ".jsonl")):
        return "table"
    if low.endswith(".json"):
        return "coco"
    if low.endswith(".tar") or "{" in path or "::" in path:
        return "shards"
    if os.path.isdir(path):
        names = os.listdir(path)
        if "manifest.json" in names or any(n.endswith(".tar") for n in names):
            return "shards"
        return "folder"
    raise ValueError(f"input {path!r} does not exist or is not a CSV/TSV/JSONL, COCO .json, folder or shard spec")


def read_table(path: str, image_column: str, caption_column: str) -> Iterator[Item]:
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        if path.lower().endswith(".jsonl"):
            rows = (json.loads(line) for line in f if line.strip())
        else:
            rows = csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ",")
        for line, row in enumerate(rows, start=2 if not path.lower().endswith(".jsonl") else 1):
            if image_column not in row or caption_column not in row:
                raise ValueError(f"{path}: line {line} lacks the columns {image_column!r} and {caption_column!r}; "
                                 f"it has {sorted(row)}. Pass --image-column/--caption-column")
            image = str(row[image_column])
            meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
            meta["source_image"] = image
            yield Item(f"{path}:{line}", row[caption_column], path=os.path.join(base, image), meta=meta)


def read_coco(path: str, images_dir: Optional[str]) -> Iterator[Item]:
    with open(path) as f:
        data = json.load(f)
    if "annotations" not in data or "images" not in data:
        raise ValueError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    images_dir = images_dir or os.path.dirname(os.path.abspath(path))
    files = {img["id"]: img["file_name"] for img in data["images"]}
    for ann in data["annotations"]:
        name = files.get(ann["image_id"])
        ref = f"{path}:annotation {ann.get('id', '?')}"
        meta = {"coco_image_id": ann["image_id"], "coco_caption_id": ann.get("id")}
        yield Item(ref, ann.get("caption"), path=os.path.join(images_dir, name) if name else None, meta=meta)


def read_folder(path: str) -> Iterator[Item]:
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            txt = os.path.join(root, stem + ".txt")
            caption = open(txt, "rb").read() if os.path.isfile(txt) else None
            meta_path = os.path.join(root, stem + ".json")
            meta = {}
            if os.path.isfile(meta_path):
                try:
                    meta = json.load(open(meta_path))
                except ValueError:
                    meta = {}
            meta = meta if isinstance(meta, dict) else {"value": meta}
            yield Item(os.path.join(root, name), caption, path=os.path.join(root, name), meta=meta)


def read_shards(spec: str) -> Iterator[Item]:
    from moe_dist.data.decode import decode_metadata, image_key
    from moe_dist.data.spec import resolve_spec
    from moe_dist.data.stream import SampleCounter, raw_samples

    shards = resolve_spec(spec, need_counts=False)
    counter = SampleCounter()
    for shard in shards:
        for sample in raw_samples(iter([shard.url]), counter):
            key = image_key(sample)
            try:
                meta = decode_metadata(sample)
            except Exception:
                meta = {}
            yield Item(f"{shard.url}:{sample['__key__']}", sample.get("txt"), data=sample.get(key) if key else None,
                       ext=key or "jpg", meta=meta)
    for reason, count in counter.failures.items():
        for _ in range(count):
            yield Item(f"{spec}: {reason}", None, failure=reason)


def read_items(path: str, kind: Optional[str] = None, image_column: str = "image", caption_column: str = "caption",
               images_dir: Optional[str] = None) -> Iterator[Item]:
    kind = kind or detect(path)
    if kind == "table":
        return read_table(path, image_column, caption_column)
    if kind == "coco":
        return read_coco(path, images_dir)
    if kind == "folder":
        return read_folder(path)
    if kind == "shards":
        return read_shards(path)
    raise ValueError(f"unknown input kind {kind!r}; use table, coco, folder or shards")
