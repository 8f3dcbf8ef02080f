"""Inputs ``moe-dist-data shard`` understands, each turned into a stream of ``Item``s.

    table    CSV / TSV / JSONL with image-path and caption columns (paths relative to the file);
             other columns become per-sample JSON metadata; a row that does not parse is a failure
    coco     a COCO-captions JSON (--images DIR holds the images): one sample per caption
    folder   images with sidecar .txt captions (and optional .json), searched recursively; this is
             also img2dataset's "files" output layout
    shards   existing webdataset shards (brace pattern, .tar, or a shard directory): resharding

Image paths (and folder sidecars) must stay inside the input's directory (the table's directory,
--images, the folder): ``..``, absolute paths and symlinks out fail as "path_outside_input" unless
``allow_outside`` is given.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple

from moe_dist.data.decode import SampleError, decode_metadata, image_key
from moe_dist.data.spec import Shard, resolve_spec
from moe_dist.data.stream import SampleCounter, raw_samples
from moe_dist.data.urls import shown_spec, shown_url

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


def inside(path: str, root: str) -> bool:
    """Whether ``path`` (symlinks resolved) lies under the directory ``root``."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


@dataclass
class Reader:
    """What every file-based reader shares: where its paths must stay, and whether they may leave it."""

    root: str
    allow_outside: bool = False

    def item(self, ref: str, caption: object, path: Optional[str], meta: Dict[str, object], *extra: str) -> Item:
        """An Item for the image at ``path``; a failure Item when it (or one of the ``extra`` sidecar
        files read for it) leaves ``root`` and that is not allowed."""
        if not path:
            return Item(ref, caption, failure="missing_image_file")
        if not self.allow_outside and not all(inside(p, self.root) for p in (path,) + extra):
            return Item(ref, caption, failure="path_outside_input")
        return Item(ref, caption, path=path, meta=meta)


def _jsonl_rows(f) -> Iterator[Tuple[int, object]]:
    for line, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except ValueError:
            row = None
        yield line, row if isinstance(row, dict) else "invalid_jsonl_row"


def _csv_rows(f, delimiter: str) -> Iterator[Tuple[int, object]]:
    rows = csv.DictReader(f, delimiter=delimiter)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except csv.Error:  # e.g. a field over csv.field_size_limit(); the reader goes on at the next line
            row = "invalid_csv_row"
        yield rows.line_num, row


def _check_header(path: str, image_column: str, caption_column: str) -> None:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        try:
            header = next(csv.reader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","), [])
        except csv.Error as err:
            raise ValueError(f"{path}: the header line does not parse as CSV ({err})") from None
    if image_column not in header or caption_column not in header:
        raise ValueError(f"{path}: the header lacks the columns {image_column!r} and {caption_column!r}; it has "
                         f"{header}. Pass --image-column/--caption-column")


def read_table(path: str, image_column: str, caption_column: str, allow_outside: bool = False) -> Iterator[Item]:
    """Items of a CSV/TSV (checked header) or JSONL file; a row that cannot be parsed, or lacks a column,
    is a failure Item."""
    if not path.lower().endswith(".jsonl"):
        _check_header(path, image_column, caption_column)
    return _table_items(path, image_column, caption_column, Reader(os.path.dirname(os.path.abspath(path)),
                                                                  allow_outside))


def _table_items(path: str, image_column: str, caption_column: str, reader: Reader) -> Iterator[Item]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = _jsonl_rows(f) if path.lower().endswith(".jsonl") else \
            _csv_rows(f, "\t" if path.lower().endswith(".tsv") else ",")
        for line, row in rows:
            ref = f"{path}:{line}"
            if isinstance(row, str):
                yield Item(ref, None, failure=row)
            elif image_column not in row or caption_column not in row:
                yield Item(ref, None, failure="missing_column")
            else:
                image = row[image_column]
                meta = {k: v for k, v in row.items() if k not in (image_column, caption_column)}
                meta["source_image"] = image
                path_ok = isinstance(image, str) and image
                yield reader.item(ref, row[caption_column], os.path.join(reader.root, image) if path_ok else None,
                                  meta)


def read_coco(path: str, images_dir: Optional[str], allow_outside: bool = False) -> Iterator[Item]:
    """One Item per caption of a COCO captions file; images are looked up in ``images_dir``. A file that is
    not UTF-8 JSON with an "images" and an "annotations" list is one ValueError line naming it; an image or
    annotation entry of the wrong shape is a failed input ("invalid_coco_entry")."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # json.JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not UTF-8 JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) or \
            not isinstance(data.get("images"), list):
        raise ValueError(f"{path} is not a COCO captions file (needs an 'images' and an 'annotations' list)")
    reader = Reader(images_dir or os.path.dirname(os.path.abspath(path)), allow_outside)
    return _coco_items(path, data, reader)


def _coco_items(path: str, data: dict, reader: Reader) -> Iterator[Item]:
    files = {img.get("id"): img.get("file_name") for img in data["images"] if isinstance(img, dict)}
    for n, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or isinstance(ann["image_id"], (dict, list)):
            yield Item(f"{path}:annotations[{n}]", None, failure="invalid_coco_entry")
            continue
        name = files.get(ann["image_id"])
        ref = f"{path}:annotation {ann.get('id', '?')}"
        meta = {"coco_image_id": ann["image_id"], "coco_caption_id": ann.get("id")}
        image = os.path.join(reader.root, name) if isinstance(name, str) and name else None
        yield reader.item(ref, ann.get("caption"), image, meta)


def _sidecar_meta(path: str) -> Dict[str, object]:
    """The sidecar .json of a folder image as metadata ({} when there is none); SampleError "bad_json" when it
    does not parse, as for a sample's .json member."""
    if not os.path.isfile(path):
        return {}
    with open(path, "rb") as f:
        return decode_metadata({"json": f.read()})


def read_folder(path: str, allow_outside: bool = False) -> Iterator[Item]:
    """Images under ``path`` (recursively) with their sidecar .txt captions and .json metadata."""
    reader = Reader(path, allow_outside)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTS:
                continue
            image, txt, meta_path = (os.path.join(root, n) for n in (name, stem + ".txt", stem + ".json"))
            item = reader.item(image, None, image, {}, txt, meta_path)
            if item.failure is None:
                try:
                    item.caption = open(txt, "rb").read() if os.path.isfile(txt) else None
                    item.meta = _sidecar_meta(meta_path)
                except OSError:
                    item = Item(image, None, failure="unreadable_sidecar_file")
                except SampleError as err:
                    item = Item(image, None, failure=err.reason)
            yield item


def read_shards(spec: str, allow_pipe: bool = False) -> Iterator[Item]:
    """Items of existing shards (resharding); the spec is resolved and checked before this returns."""
    return _shard_items(spec, resolve_spec(spec, allow_pipe=allow_pipe, need_counts=False), allow_pipe)


def _shard_items(spec: str, shards: List[Shard], allow_pipe: bool) -> Iterator[Item]:
    counter = SampleCounter()
    for sample in raw_samples(iter(shards), counter, allow_pipe):
        key = image_key(sample)
        ref = f"{shown_url(sample['__url__'])}:{sample['__key__']}"
        try:
            meta = decode_metadata(sample)
        except SampleError as err:  # a broken sample, as evaluation and validate count it
            yield Item(ref, None, failure=err.reason)
            continue
        yield Item(ref, sample.get("txt"),
                   data=sample.get(key) if key else None, ext=key or "jpg", meta=meta)
    for reason, count in counter.failures.items():
        for _ in range(count):
            yield Item(f"{shown_spec(spec)}: {reason}", None, failure=reason)


def read_items(path: str, kind: Optional[str] = None, image_column: str = "image", caption_column: str = "caption",
               images_dir: Optional[str] = None, allow_outside: bool = False,
               allow_pipe: bool = False) -> Iterator[Item]:
    """The Items of an input of ``kind`` (detected when None). Whatever can be checked before reading
    (the spec, a table's header, a COCO file's structure) raises ValueError here, before any Item.

    Args:
        allow_outside: read image (and sidecar) paths that leave the input's directory (``..``,
            absolute paths, symlinks out); otherwise each such input fails as "path_outside_input".
        allow_pipe: allow pipe: URLs in a shard spec.
    """
    kind = kind or detect(path)
    if kind == "table":
        return read_table(path, image_column, caption_column, allow_outside)
    if kind == "coco":
        return read_coco(path, images_dir, allow_outside)
    if kind == "folder":
        return read_folder(path, allow_outside)
    if kind == "shards":
        return read_shards(path, allow_pipe)
    raise ValueError(f"unknown input kind {kind!r}; use table, coco, folder or shards")
