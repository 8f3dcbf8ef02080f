"""This rank's experts as stacked weights, computed group by group.

Shape legend: N rows sorted by local expert, D hidden, H expert FFN hidden (2H for SwiGLU's fused
gate+up projection), L local experts.

Expert f_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]. Two interchangeable backends compute all
experts at once over contiguous, expert-sorted rows:
    loop:        one matmul per expert on its slice (fastest on CPU, see bench/moe_layer.py);
    grouped_mm:  torch._grouped_mm, one kernel per projection (float32/bf16/fp16 only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class Activation:
    """An expert activation and, where a closed form is cheaper than autograd, its backward:
    ``grad(h, grad_a)`` = d fn(h) / dh applied to ``grad_a``. ``width`` multiplies H for the first
    projection (SwiGLU's fused gate + up projection is 2H wide)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
    width: int = 1
    out: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None  # fn(h) written into a given tensor

    def apply_into(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """fn(h) written into ``out`` (straight from the kernel when the activation has an out= form)."""
        if self.out is not None:
            self.out(h, out)
        else:
            out.copy_(self.fn(h))
        return out

    def backward(self, h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
        if self.grad is not None:
            return self.grad(h, grad_a)
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            return torch.autograd.grad(self.fn(h), h, grad_a)[0]


ACTIVATIONS: Registry[Activation] = Registry("activation", {
    "gelu": Activation(F.gelu, lambda h, g: torch.ops.aten.gelu_backward(g, h, approximate="none"),
                       out=lambda h, out: torch.ops.aten.gelu.out(h, approximate="none", out=out)),
    "gelu_tanh": Activation(lambda h: F.gelu(h, approximate="tanh"),
                            lambda h, g: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
                            out=lambda h, out: torch.ops.aten.gelu.out(h, approximate="tanh", out=out)),
    "relu": Activation(F.relu, lambda h, g: g * (h > 0), out=lambda h, out: torch.clamp_min(h, 0, out=out)),
    "swiglu": Activation(_swiglu, width=2),
})


def tag_expert_params(module: nn.Module, group_name: str) -> None:
    """The one place expert parameters are marked for DeepSpeed: they are reduced over the
    expert-data-parallel group ``group_name`` and get their own ZeRO param groups."""
    for p in module.parameters():
        p.allreduce = False
        p.group_name = group_name


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (_grouped_mm needs it)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _ExpertLoop(torch.autograd.Function):
    """All local experts over expert-sorted rows, one matmul per expert and projection.

    Autograd over per-expert slices of stacked weights would build each weight gradient as a stack of
    strided slices (a full extra copy, 30% of the layer time at E=64). Here every matmul writes straight
    into its slice of a preallocated output or gradient. With ``recompute`` backward keeps only x and
    the pre-activation h and recomputes act(h) (16% less activation memory than a dense FFN per row);
    without, it also keeps act(h), as a dense FFN does, and skips that pass (bench/moe_layer.py).
    """

    @staticmethod
    def forward(ctx, x_ND, w1, b1, w2, b2, counts, act: Activation, recompute: bool = True):
        y_ND = x_ND.new_empty(x_ND.shape[0], w2.shape[-1])
        h_NH = x_ND.new_empty(x_ND.shape[0], w1.shape[-1])
        a_NA = None if recompute else x_ND.new_empty(x_ND.shape[0], w2.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            if b1 is None:
                torch.mm(x_ND[rows], w1[e], out=h_NH[rows])
            else:
                torch.addmm(b1[e], x_ND[rows], w1[e], out=h_NH[rows])
            a = act.fn(h_NH[rows]) if a_NA is None else act.apply_into(h_NH[rows], a_NA[rows])
            if b2 is None:
                torch.mm(a, w2[e], out=y_ND[rows])
            else:
                torch.addmm(b2[e], a, w2[e], out=y_ND[rows])
            start += n
        ctx.save_for_backward(x_ND, h_NH, a_NA, w1, w2)
        ctx.counts, ctx.act, ctx.has_bias = counts, act, (b1 is not None, b2 is not None)
        return y_ND

    @staticmethod
    def backward(ctx, grad_y):
        x_ND, h_NH, a_NA, w1, w2 = ctx.saved_tensors
        act = ctx.act
        grad_y = grad_y.contiguous()
        # Every row belongs to one expert, so only the gradients of idle experts need zeroing.
        grad_x = torch.empty_like(x_ND)
        grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
        grad_b1 = w1.new_empty(w1.shape[0], w1.shape[2]) if ctx.has_bias[0] else None
        grad_b2 = w2.new_empty(w2.shape[0], w2.shape[2]) if ctx.has_bias[1] else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (grad_w1, grad_w2, grad_b1, grad_b2):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            h, g_y = h_NH[rows], grad_y[rows]
            torch.mm((act.fn(h) if a_NA is None else a_NA[rows]).t(), g_y, out=grad_w2[e])
            g_h = act.backward(h, g_y @ w2[e].t())
            torch.mm(x_ND[rows].t(), g_h, out=grad_w1[e])
            torch.mm(g_h, w1[e].t(), out=grad_x[rows])
            if grad_b1 is not None:
                torch.sum(g_h, 0, out=grad_b1[e])
            if grad_b2 is not None:
                torch.sum(g_y, 0, out=grad_b2[e])
            start += n
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


class _AddExpertBias(torch.autograd.Function):
    """``x_NH + b_LH[expert_N]``, whose bias gradient is one [L, N] x [N, H] product with the rows'
    one-hot expert matrix. Autograd's own gradient of the gather is an index_put with accumulation,
    whose CUDA kernel sums each expert's thousands of duplicate rows serially: 8.5 of 18 ms of an E=8
    bf16 layer on an H200 (bench/profile_step.py)."""

    @staticmethod
    def forward(ctx, x_NH, b_LH, expert_N):
        ctx.save_for_backward(expert_N)
        ctx.num_experts = b_LH.shape[0]
        return x_NH + b_LH.index_select(0, expert_N)

    @staticmethod
    def backward(ctx, grad):
        (expert_N,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:  # a frozen bias
            return grad, None, None
        experts_L1 = torch.arange(ctx.num_experts, device=expert_N.device)[:, None]
        onehot_LN = (experts_L1 == expert_N[None, :]).to(grad.dtype)
        return grad, onehot_LN @ grad, None


def _loop_backend(experts: "GroupedExperts", x_ND: torch.Tensor, counts: List[int]) -> torch.Tensor:
    dtype = x_ND.dtype  # under autocast, run the experts in the autocast dtype
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type)
    params = [None if p is None else p.to(dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2)]
    with torch.autocast(x_ND.device.type, enabled=False):
        return _ExpertLoop.apply(x_ND.to(dtype), *params, list(counts), experts.act, experts.recompute_activation)


def _grouped_mm_backend(experts: "GroupedExperts", x_ND: torch.Tensor, counts: List[int]) -> torch.Tensor:
    if not _grouped_mm_usable(experts, x_ND):
        raise ValueError(f"expert_backend='grouped_mm' cannot run {x_ND.dtype} on {x_ND.device.type} with "
                         f"hidden sizes {experts.w1.shape[1]}/{experts.w2.shape[1]} (rows must be 16-byte "
                         "aligned); use expert_backend='auto' or 'loop'")
    counts_L = torch.tensor(counts)
    if x_ND.device.type != "cpu":  # from pinned memory the copy does not wait for the device
        counts_L = counts_L.pin_memory().to(x_ND.device, non_blocking=True)
    offs = counts_L.cumsum(0).to(torch.int32)
    h = _ContiguousGrad.apply(torch._grouped_mm(x_ND, experts.w1.to(x_ND.dtype), offs=offs))
    if experts.b1 is not None or experts.b2 is not None:
        expert_N = torch.repeat_interleave(torch.arange(len(counts), device=x_ND.device), counts_L,
                                           output_size=x_ND.shape[0])
    if experts.b1 is not None:
        h = _AddExpertBias.apply(h, experts.b1.to(h.dtype), expert_N)
    y = _ContiguousGrad.apply(torch._grouped_mm(experts.act.fn(h), experts.w2.to(x_ND.dtype), offs=offs))
    if experts.b2 is not None:
        y = _AddExpertBias.apply(y, experts.b2.to(y.dtype), expert_N)
    return y


def grouped_mm_supported(x: torch.Tensor, widths) -> bool:
    """torch._grouped_mm exists, takes this dtype on this device, and every row is 16-byte aligned."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if any(w * x.element_size() % 16 for w in widths):
        return False
    if x.device.type == "cuda":  # the CUDA kernel is bf16-only, on sm90+
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_usable(experts: "GroupedExperts", x_ND: torch.Tensor) -> bool:
    return grouped_mm_supported(x_ND, (experts.w1.shape[1], experts.w1.shape[2], experts.w2.shape[1]))


def _auto_backend(experts: "GroupedExperts", x_ND: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """grouped_mm where it runs off the CPU; the per-expert loop wins on CPU (bench/moe_layer.py)."""
    if x_ND.device.type != "cpu" and _grouped_mm_usable(experts, x_ND):
        return _grouped_mm_backend(experts, x_ND, counts)
    return _loop_backend(experts, x_ND, counts)


ExpertBackend = Callable[["GroupedExperts", torch.Tensor, List[int]], torch.Tensor]
EXPERT_BACKENDS: Registry[ExpertBackend] = Registry("expert_backend", {
    "auto": _auto_backend, "loop": _loop_backend, "grouped_mm": _grouped_mm_backend})


class GroupedExperts(nn.Module):
    """L experts stored as stacked tensors ``w1 [L, D, H]``, ``b1 [L, H]``, ``w2 [L, H, D]``, ``b2 [L, D]``.

    Args:
        num_local: L.
        hidden_size: D.
        ffn_hidden_size: H.
        activation: a name in ``ACTIVATIONS``.
        bias: include b1 and b2.
        backend: a name in ``EXPERT_BACKENDS``: "auto" (grouped_mm on CUDA bf16 sm90+, else loop), "loop"
            or "grouped_mm".
        group_name: DeepSpeed expert group name used to tag the parameters.
        recompute_activation: the loop backend keeps only the pre-activation for backward and recomputes
            the activation there (less memory, one more elementwise pass); False keeps both, as a dense
            FFN does. grouped_mm keeps both either way (autograd).
    """

    def __init__(self, num_local: int, hidden_size: int, ffn_hidden_size: int, activation: str = "gelu",
                 bias: bool = True, backend: str = "auto", group_name: str = "ep_size_1",
                 recompute_activation: bool = True):
        super().__init__()
        self.activation = activation
        self.recompute_activation = recompute_activation
        self.act = ACTIVATIONS.get(activation)
        width = self.act.width * ffn_hidden_size
        self.backend = EXPERT_BACKENDS.get(backend)
        self.w1 = nn.Parameter(torch.empty(num_local, hidden_size, width))
        self.w2 = nn.Parameter(torch.empty(num_local, ffn_hidden_size, hidden_size))
        self.b1 = nn.Parameter(torch.empty(num_local, width)) if bias else None
        self.b2 = nn.Parameter(torch.empty(num_local, hidden_size)) if bias else None
        self.reset_parameters()
        tag_expert_params(self, group_name)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Per expert, the same init as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[1])
            w.uniform_(-bound, bound)
            if b is not None:
                b.uniform_(-bound, bound)

    def forward(self, x_ND: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """Apply expert l to its ``counts[l]`` consecutive rows of ``x_ND``; returns [N, D]."""
        return self.backend(self, x_ND, counts)
