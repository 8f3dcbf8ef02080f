"""Bytes one rank's DeepSpeed collectives send, counted by instrumenting ``deepspeed.comm`` (for
bench/memory.py and the planner's tests; training never enters it).

    with CommCounter() as comm:
        comm.phase = "backward"; engine.backward(loss)
        comm.phase = "step"; engine.step()
    comm.bytes_by("backward")   # {"all_reduce": ..., "reduce": ..., "all_gather": ..., ...}

Every collective DeepSpeed issues (ZeRO's gradient buckets, its parameter all-gather, the ZeRO-0 gradient
all-reduce, norms and overflow checks) goes through the backend object ``deepspeed.comm.comm.cdb``. For
the length of the block its methods are wrapped: each call is recorded with its operation, the bytes of
its tensor and the size d of its group, then runs unchanged. A call's bytes are what one rank sends
under the ring algorithms the planner assumes (planner/comm.py):
    all_reduce                      2 (d - 1) / d x the tensor's bytes
    reduce, reduce_scatter          (d - 1) / d x the input's bytes
    all_gather, broadcast           (d - 1) / d x the (gathered) output's bytes
Calls of at most ``SCALAR_ELEMENTS`` elements (gradient norms, overflow flags) are kept apart as
"scalars". All-to-alls are not recorded here: the MoE dispatcher's ``Traffic`` counter counts them. The
contrastive loss gathers embeddings with torch.distributed directly, so it is not seen either.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict

SCALAR_ELEMENTS = 16
_RING = {"all_reduce": 2.0, "all_reduce_coalesced": 2.0, "inference_all_reduce": 2.0, "reduce": 1.0,
         "reduce_scatter": 1.0, "reduce_scatter_tensor": 1.0, "all_gather": 1.0, "all_gather_into_tensor": 1.0,
         "broadcast": 1.0}


def _size(x):
    """(elements, bytes) of a tensor or a list of them."""
    if isinstance(x, (list, tuple)):
        sizes = [_size(t) for t in x]
        return sum(n for n, _ in sizes), sum(b for _, b in sizes)
    return (x.numel(), x.numel() * x.element_size()) if x is not None else (0, 0)


# the argument holding the collective's full tensor: the reduced one, the scattered input, the gathered output
_FULL = {"reduce_scatter_tensor": (1, "input_tensor"), "reduce_scatter": (1, "input_list"),
         "all_gather_into_tensor": (0, "output_tensor"), "all_gather": (0, "tensor_list"),
         "all_reduce_coalesced": (0, "tensors")}


def _payload(name: str, args, kwargs):
    """(elements, bytes) of the collective's full tensor."""
    index, key = _FULL.get(name, (0, "tensor"))
    return _size(kwargs[key] if key in kwargs else args[index])


def _group(name: str, args, kwargs):
    if "group" in kwargs:
        return kwargs["group"]
    if name in ("all_reduce", "all_reduce_coalesced", "inference_all_reduce") and len(args) > 2:
        return args[2]  # (tensor, op, group, ...): DeepSpeed passes these positionally
    return None


class CommCounter:
    """Records DeepSpeed's collectives of one rank by phase (``phase`` is set by the caller)."""

    def __init__(self):
        self.phase = "other"
        self.sent: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self._saved: Dict[str, object] = {}

    def __enter__(self):
        import deepspeed.comm.comm as ds_comm

        self._backend = ds_comm.cdb
        for name in _RING:
            method = getattr(self._backend, name, None)
            if method is not None:
                self._saved[name] = method
                setattr(self._backend, name, self._wrap(name, method))
        return self

    def __exit__(self, *exc):
        for name, method in self._saved.items():
            setattr(self._backend, name, method)
        return False

    def _wrap(self, name: str, method):
        import deepspeed.comm as ds_comm

        def counted(*args, **kwargs):
            d = ds_comm.get_world_size(group=_group(name, args, kwargs))
            elements, payload = _payload(name, args, kwargs)
            kind = name.replace("_into_tensor", "").replace("_tensor", "").replace("_coalesced", "")
            key = "scalars" if elements <= SCALAR_ELEMENTS else kind
            self.sent[self.phase][key] += _RING[name] * (d - 1) / d * payload
            self.calls[self.phase][key] += 1
            return method(*args, **kwargs)

        return counted

    def bytes_by(self, phase: str) -> Dict[str, int]:
        """Bytes sent per operation kind in ``phase`` (rounded to whole bytes)."""
        return {k: round(v) for k, v in self.sent.get(phase, {}).items()}

    def report(self) -> Dict[str, Dict[str, Dict[str, int]]]:
        return {phase: {"bytes": self.bytes_by(phase), "calls": dict(self.calls[phase])} for phase in self.sent}
