"""Streaming image-text input pipeline over webdataset shards.

    spec.py    shard specs -> shards with sample counts
    remote.py  http(s):// and s3:// shards: a stream that retries at the byte; S3 uploads
    decode.py  safe decoding of one sample (PIL only, pixel limit, strict UTF-8)
    stream.py  what a DataLoader worker does (webdataset reading, shuffle, decode, transform)
    loader.py  ShardLoader: canonical batch order, equal steps per rank, error policy, resume (also elastic)
    evalset.py EvalSet: one exact pass for evaluation, shards split over ranks, batches within a shard
"""

from .evalset import EvalBatch, EvalSet, eval_batches
from .loader import Batch, DataError, LoaderConfig, ShardLoader, merge_states
from .remote import RemoteError, RemoteOptions
from .spec import resolve_spec

__all__ = ["Batch", "DataError", "EvalBatch", "EvalSet", "LoaderConfig", "RemoteError", "RemoteOptions", "ShardLoader",
           "eval_batches", "merge_states", "resolve_spec"]
