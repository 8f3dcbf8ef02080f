"""ZeRO-1/2's reduce / all-gather bucket: the rule the run config writes into DeepSpeed's config and the
planner (``planner/memory.py``) counts, in one place below both."""

from __future__ import annotations

from typing import Sequence

REDUCE_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce_bucket_size
BUCKET_SHARE = 16  # the planned ZeRO bucket holds at most 1/16 of a rank's parameters
BUCKET_ALIGNMENT = 2  # DeepSpeed asserts allgather_bucket_size % nccl_start_alignment_factor (2) == 0


def planned_bucket_elements(numels: Sequence[int]) -> int:
    """ZeRO-1/2's reduce / all-gather bucket (elements) for a rank holding tensors of ``numels`` elements.

    DeepSpeed allocates the reduce bucket afresh every backward (in the gradient dtype) and all-reduces
    a flattened copy of what it holds, so the bucket is a transient of up to twice its size on top of
    the partitioned states. Its default (5e8 elements: 2 GB of fp32) dwarfs a small model's states, and
    a bucket as large as the model undoes most of what ZeRO partitions. The choice:

        max(largest tensor, min(5e8, ceil(sum / 16))), rounded up to a multiple of 2

    At least the largest tensor: DeepSpeed 0.19 sends a tensor larger than the bucket around it
    (``extra_large_param_to_reduce``, reduced and flattened on its own), so a smaller bucket would not
    lower the transient and would split the reduction over more calls. At most 1/16 of the parameters
    (a 6% transient) and DeepSpeed's default. Even: DeepSpeed asserts ``allgather_bucket_size % 2 == 0``.

    Example: moe-clip-tiny at ep_size 1 (887,553 parameters, the largest tensor 65,536): 65,536.
    """
    largest = max(numels, default=0)
    share = -(-sum(numels) // BUCKET_SHARE)
    chosen = max(largest, min(REDUCE_BUCKET_ELEMENTS, share), BUCKET_ALIGNMENT)
    return -(-chosen // BUCKET_ALIGNMENT) * BUCKET_ALIGNMENT
