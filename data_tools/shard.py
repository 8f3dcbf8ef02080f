"""``moe-dist-data shard``: inputs -> validated, optionally re-encoded samples -> shards + manifests.

Outline:
    1. read the input as a stream of Items (sources.py), numbered in input order;
    2. a pool of workers checks each item (image decodes through PIL within the pixel limit, caption
       is non-empty UTF-8 text of at most --max-caption-chars) and re-encodes it if asked (--resize,
       --format, --quality); a bad input is a failure with its reason, never the end of the run;
    3. results come back in input order, so keys (9-digit input index) and shard contents are
       deterministic for any --workers; failures go to the manifest with their reason;
    4. the writer splits train/val by key hash and rotates shards by count and bytes; each shard takes
       its final name only when complete, and a failed write leaves manifests of the complete ones;
    5. an ``s3://`` --out is written through a local staging directory and uploaded shard by shard,
       manifests last (publish.py); a re-run skips the shards already uploaded whole.
"""

from __future__ import annotations

import io
import itertools
import multiprocessing as mp
import os
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Tuple, Union

from tqdm import tqdm

from moe_dist.data.decode import DEFAULT_MAX_PIXELS, Oversized, SampleError, decode_caption, decode_image
from moe_dist.data.remote import is_remote
from moe_dist.data.spec import resolve_spec
from moe_dist.data.urls import shown_spec, shown_url, url_problem

from . import DEFAULT_MAX_CAPTION_CHARS
from . import publish
from .sources import Item, detect, inside, read_items
from .writer import SPLITS, DatasetWriter, clear_out

FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass
class ShardOptions:
    per_shard: int = 10000
    max_shard_bytes: int = 1 << 30
    resize: int = 0  # longest side; 0 keeps the size
    format: str = "keep"  # keep | jpg | webp
    quality: int = 90
    workers: int = 1
    val_fraction: float = 0.0
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS

    def __post_init__(self):
        if self.format not in ("keep", "jpg", "webp"):
            raise ValueError(f"--format {self.format!r}; use keep, jpg or webp")
        if self.per_shard < 1 or self.max_shard_bytes < 1:
            raise ValueError("--per-shard and --max-shard-bytes must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction {self.val_fraction} must lie in [0, 1)")
        if self.resize < 0 or not 1 <= self.quality <= 100 or self.workers < 1:
            raise ValueError("--resize must be >= 0, --quality in 1..100 and --workers >= 1")
        if self.max_caption_chars < 1:
            raise ValueError(f"--max-caption-chars {self.max_caption_chars} must be >= 1")


def _caption(raw: object, max_chars: int) -> str:
    """The caption of an input (str, bytes or None; anything else is refused), at most ``max_chars``."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError as err:  # undecodable bytes kept as surrogates by the table reader
            raise SampleError("caption_not_utf8", str(err)) from None
    elif raw is not None and not isinstance(raw, (bytes, Oversized)):  # Oversized: decode_caption counts it
        raise SampleError("caption_not_text", f"a {type(raw).__name__}")
    caption = decode_caption(raw)
    if len(caption) > max_chars:
        raise SampleError("caption_too_long", f"{len(caption)} characters; --max-caption-chars is {max_chars}")
    return caption


def _image_bytes(item: Item) -> bytes:
    if item.data is not None:
        return item.data
    if not item.path or not os.path.isfile(item.path):
        raise SampleError("missing_image_file", str(item.path))
    try:
        with open(item.path, "rb") as f:
            return f.read()
    except OSError as err:
        raise SampleError("unreadable_image_file", str(err)) from None


def prepare(item: Item, opts: ShardOptions) -> Union[Dict[str, object], Tuple[str, str]]:
    """A sample dict without ``__key__``, or (ref, reason) when the input cannot be used."""
    if item.failure:
        return item.ref, item.failure
    try:
        caption = _caption(item.caption, opts.max_caption_chars)
        data = _image_bytes(item)
        if not data:
            raise SampleError("missing_image", "empty image")
        image = decode_image(data, opts.max_pixels)
    except SampleError as err:
        return item.ref, err.reason
    from PIL import Image

    source_format = Image.open(io.BytesIO(data)).format
    ext = FORMATS.get(source_format, "jpg")
    if opts.resize and max(image.size) > opts.resize:
        image.thumbnail((opts.resize, opts.resize), Image.Resampling.BICUBIC)
    else:
        image = None if opts.format == "keep" else image
    if image is not None:  # re-encode
        ext = ext if opts.format == "keep" else opts.format
        out = io.BytesIO()
        image.save(out, format={"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext], quality=opts.quality)
        data = out.getvalue()
    return {ext: data, "txt": caption, "json": item.meta}


def _prepare_star(args):
    return prepare(*args)


def shard_items(items: Iterator[Item], out: str, opts: ShardOptions, source: str,
                total: Optional[int] = None, progress: bool = True, overwrite: bool = False) -> Dict[str, object]:
    """Write ``items`` as shards under ``out``; returns the top-level manifest.

    Args:
        out: a local directory, or an s3:// prefix (publish.py: uploaded shard by shard, manifests last;
            a re-run skips the shards already uploaded whole).
    Raises:
        ValueError: ``out`` holds a dataset and ``overwrite`` is False (for s3://: another dataset).
        OSError: writing failed (a full disk); ``out`` then lists exactly the complete shards.
    """
    options = dict(vars(opts))
    if is_remote(out):
        return _shard_to_s3(items, out, opts, source, total, progress, overwrite)
    clear_out(out, overwrite)
    return _write(items, DatasetWriter(out, opts.per_shard, opts.max_shard_bytes, opts.val_fraction, opts.seed),
                  out, opts, source, options, total, progress)


def _shard_to_s3(items: Iterator[Item], out: str, opts: ShardOptions, source: str, total: Optional[int],
                 progress: bool, overwrite: bool) -> Dict[str, object]:
    if not out.startswith("s3://"):
        raise ValueError(f"--out {shown_url(out)}: shards are written to a local directory or an s3:// prefix")
    if url_problem(out):
        raise ValueError(f"--out {shown_url(out)} {url_problem(out)}")
    options = dict(vars(opts))
    publish.check_prefix(out, source, options, overwrite)
    staging = publish.staging_dir()
    try:
        publisher = publish.S3Publisher(out, staging)
        writer = DatasetWriter(staging, opts.per_shard, opts.max_shard_bytes, opts.val_fraction, opts.seed,
                               publish=publisher)
        manifest = _write(items, writer, out, opts, source, options, total, progress)
        if publisher.skipped:
            print(f"{publisher.skipped} complete shards were already in {out} and were not uploaded again; "
                  f"{publisher.uploaded} uploaded")
        return manifest
    finally:
        publish.remove_staging(staging)


def _write(items: Iterator[Item], writer: DatasetWriter, out: str, opts: ShardOptions, source: str,
           options: Dict[str, object], total: Optional[int], progress: bool) -> Dict[str, object]:
    jobs = ((item, opts) for item in items)
    pool = mp.get_context("fork").Pool(opts.workers) if opts.workers > 1 else None
    try:
        results = pool.imap(_prepare_star, jobs, chunksize=16) if pool else map(_prepare_star, jobs)
        bar = tqdm(results, total=total, unit="sample", desc="shard", disable=not progress)
        for index, result in zip(itertools.count(), bar):
            if isinstance(result, tuple):
                writer.fail(*result)
            else:
                result["__key__"] = f"{index:09d}"
                writer.add(result)
            bar.set_postfix(failed=len(writer.failed), refresh=False)
        return writer.finish(source, options)
    except BaseException as err:
        if pool:
            pool.terminate()
        kept = writer.abort(source, options, err)
        if isinstance(err, OSError):
            again = "run the same command again (complete shards are not uploaded again)" if is_remote(out) \
                else "run again with --overwrite"
            raise OSError(f"writing shards into {out} failed ({err}); the {kept['written']} samples of the "
                          f"complete shards are kept and listed in {os.path.join(out, 'manifest.json')}; fix "
                          f"the cause (disk space, ulimit -f, the store's credentials) and {again}") from err
        raise
    finally:
        if pool:
            pool.close()
            pool.join()


def _refuse_deleting_inputs(input_path: str, kind: str, out: str, allow_pipe: bool) -> None:
    """--overwrite clears ``out``'s splits before reading the input: refuse when the input lies there."""
    paths = [s.url for s in resolve_spec(input_path, allow_pipe=allow_pipe, need_counts=False)] \
        if kind == "shards" else [input_path]
    for path in paths:
        if any(inside(path, os.path.join(out, split)) for split in SPLITS):
            raise ValueError(f"--overwrite would delete the input {path!r} before reading it (it lies in {out}); "
                             "write to another --out and move it afterwards")


def shard(input_path: str, out: str, opts: ShardOptions, kind: Optional[str] = None, image_column: str = "image",
          caption_column: str = "caption", images_dir: Optional[str] = None, progress: bool = True,
          allow_outside: bool = False, allow_pipe: bool = False, overwrite: bool = False) -> Dict[str, object]:
    """Shard one input (see sources.py for the kinds) into ``out``; returns the top-level manifest.

    Args:
        allow_outside: read image paths that leave the input's directory (else counted failures).
        allow_pipe: allow pipe: URLs in a shard-spec input.
        overwrite: replace a dataset already in ``out`` (else refused).
    """
    kind = kind or detect(input_path)
    items = read_items(input_path, kind, image_column, caption_column, images_dir, allow_outside, allow_pipe)
    if overwrite and not is_remote(out):
        _refuse_deleting_inputs(input_path, kind, out, allow_pipe)
    source = os.path.abspath(input_path) if os.path.exists(input_path) else shown_spec(input_path)  # no token
    return shard_items(items, out, opts, source=source, progress=progress, overwrite=overwrite)
