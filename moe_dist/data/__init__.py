"""Streaming image-text input pipeline over webdataset shards.

    spec.py    shard specs -> shards with sample counts
    decode.py  safe decoding of one sample (PIL only, pixel limit, strict UTF-8)
    stream.py  what a DataLoader worker does (webdataset reading, shuffle, decode, transform)
    loader.py  ShardLoader: canonical batch order, equal steps per rank, error policy, resume
    evalset.py EvalSet: one exact pass for evaluation, shards split over ranks, batches within a shard
"""

from .evalset import EvalBatch, EvalSet, eval_batches
from .loader import Batch, DataError, LoaderConfig, ShardLoader
from .spec import resolve_spec

__all__ = ["Batch", "DataError", "EvalBatch", "EvalSet", "LoaderConfig", "ShardLoader", "eval_batches",
           "resolve_spec"]
