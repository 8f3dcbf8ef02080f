"""Count the places where code reads a tensor's values on the host.

On an accelerator each such read makes the host wait for the device (a stream sync) and breaks a
``torch.compile`` graph, so the MoE layer is held to a count per call (tests/unit/test_host_reads.py,
``bench.profile_step``'s ``host_reads_per_call``). Counted, on any device (a CPU run counts what a GPU
run would wait on):
    - Python-level reads (a ``TorchFunctionMode``): ``tolist``, ``item``, ``bool()``, ``int()``,
      ``float()``, ``index()`` of a tensor, ``.cpu()`` and ``nonzero``;
    - operator-level reads (a ``TorchDispatchMode``): ``aten._local_scalar_dense`` and every operator
      whose output shape depends on the data (torch's ``dynamic_output_shape`` tag: boolean masks,
      ``repeat_interleave`` without ``output_size``, ``unique``, indexing with a boolean mask), and the
      operators registered with ``reads_inside`` (custom operators that read their inputs on the host
      within, such as the experts' CPU loop).
A read seen at both levels (``x.item()`` runs ``_local_scalar_dense``) counts once. Backward runs in the
modes too, so ``loss.backward()`` inside the context is counted.
"""

from __future__ import annotations

from typing import List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_PYTHON_READS = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__,
                 torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.nonzero,
                 torch.nonzero}


_READS_INSIDE = set()
# indexing is tagged dynamic_output_shape for its boolean-mask form only
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default}


def reads_inside(op) -> None:
    """Count every call of ``op`` (an operator overload) as one host read."""
    _READS_INSIDE.add(op)


def _reads_data(func, args, kwargs) -> bool:
    if func in _READS_INSIDE or func is torch.ops.aten._local_scalar_dense.default:
        return True
    if func in _INDEX_OPS:
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])
    if func is torch.ops.aten.repeat_interleave.Tensor:  # a given output_size is the data-free form
        return kwargs.get("output_size") is None
    return torch.Tag.dynamic_output_shape in getattr(func, "tags", ())


class _PythonReads(TorchFunctionMode):
    def __init__(self, counter: "HostReads"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _PYTHON_READS:
            self.counter.reads.append(getattr(func, "__name__", str(func)))
            self.counter._inside += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter._inside -= 1
        return func(*args, **(kwargs or {}))


class _OperatorReads(TorchDispatchMode):
    def __init__(self, counter: "HostReads"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.counter._inside and _reads_data(func, args, kwargs or {}):
            self.counter.reads.append(str(func))
        return func(*args, **(kwargs or {}))


class HostReads:
    """Context manager: ``reads`` lists what read the device's data on the host, in order.

    Example::

        with HostReads() as counter:
            layer(x).output.sum().backward()
        assert counter.count == 0, counter.reads
    """

    def __init__(self):
        self.reads: List[str] = []
        self._inside = 0
        self._modes = (_PythonReads(self), _OperatorReads(self))

    @property
    def count(self) -> int:
        return len(self.reads)

    def __enter__(self) -> "HostReads":
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
