"""This rank's experts as stacked weights, computed group by group.

Shape legend: N rows sorted by local expert, D hidden, H expert FFN hidden (2H for SwiGLU's fused
gate+up projection), L local experts.

Expert f_e(x) = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]. The experts take rows sorted by expert and the
groups' cumulative ends ``offs_L`` as a device tensor, so nothing about the grouping is read on the host
by the caller: N is fixed by the layout (T*K rows at ep_size 1), and rows past ``offs_L[-1]`` are
unused (their output is zero, their input gradient zero). Two interchangeable backends:
    loop:        one matmul per expert on its slice (fastest on CPU, see bench/moe_layer.py). A custom
                 operator, opaque to torch.compile, that reads the offsets on the host inside (CPU:
                 nothing to wait for). Every matmul writes straight into its slice of a preallocated
                 output or gradient (autograd over per-expert slices would build each weight gradient as
                 a stack of strided slices, 30% of the layer at E=64). Backward keeps x and the
                 pre-activation h and, with ``recompute_activation``, recomputes act(h) (16% less
                 activation memory than a dense FFN per row); without, it also keeps act(h).
    grouped_mm:  torch._grouped_mm, one kernel per projection, offsets read by the kernel on the
                 device: no host read at all (float32/bf16/fp16 on CPU, bf16 on CUDA sm90+).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..host_reads import reads_inside
from .registry import ACTIVATIONS, EXPERT_BACKENDS
from .tensors import cast


def _swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def _swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """d silu(g) u = sigmoid(g) (1 + g (1 - sigmoid(g))) u dg + silu(g) du."""
    gate, up = h.chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    return torch.cat([grad_a * up * sig * (1 + gate * (1 - sig)), grad_a * gate * sig], dim=-1)


def _quick_gelu(h: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation, as open_clip's QuickGELU computes it."""
    return h * torch.sigmoid(1.702 * h)


def _quick_gelu_backward(h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """d h sigmoid(a h) = sigmoid(a h) (1 + a h (1 - sigmoid(a h))) dh, a = 1.702."""
    sig = torch.sigmoid(1.702 * h)
    return grad_a * sig * (1 + 1.702 * h * (1 - sig))


@dataclass(frozen=True)
class Activation:
    """An expert activation and its backward in closed form (the loop backend's operator runs below
    autograd): ``grad(h, grad_a)`` = d fn(h) / dh applied to ``grad_a``. ``width`` multiplies H for the first
    projection (SwiGLU's fused gate + up projection is 2H wide)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
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
        return self.grad(h, grad_a)


for _name, _activation in {
    "gelu": Activation(F.gelu, lambda h, g: torch.ops.aten.gelu_backward(g, h, approximate="none"),
                       out=lambda h, out: torch.ops.aten.gelu.out(h, approximate="none", out=out)),
    "gelu_tanh": Activation(lambda h: F.gelu(h, approximate="tanh"),
                            lambda h, g: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
                            out=lambda h, out: torch.ops.aten.gelu.out(h, approximate="tanh", out=out)),
    "quick_gelu": Activation(_quick_gelu, _quick_gelu_backward),
    "relu": Activation(F.relu, lambda h, g: g * (h > 0), out=lambda h, out: torch.clamp_min(h, 0, out=out)),
    "swiglu": Activation(_swiglu, _swiglu_backward, width=2),
}.items():
    ACTIVATIONS.register(_name, _activation)


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


def _groups(offs: torch.Tensor):
    """The ``offs`` cumulative ends read on the host (the loop's one read): ([(expert, row slice)] of the
    non-empty groups, [idle experts], the end of the last group)."""
    ranges, idle, start = [], [], 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            ranges.append((e, slice(start, end)))
        else:
            idle.append(e)
        start = end
    return ranges, idle, start


# The loop backend is a pair of custom operators: opaque to torch.compile, which then sees fixed output
# shapes ([N, ...] whatever the offsets) and no data-dependent control flow, and traces no graph break.
# Inside, the loop reads the offsets on the host: this backend is for CPU, where that waits on nothing.
@torch.library.custom_op("moe_dist::expert_loop", mutates_args=())
def _expert_loop(x_ND: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                 b2: Optional[torch.Tensor], offs: torch.Tensor, activation: str,
                 keep_act: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All local experts over expert-sorted rows, one matmul per expert and projection; returns
    (y_ND, h_NH, a_NA): the output, the pre-activation and (``keep_act``, else empty) the activation.
    Rows past ``offs[-1]`` are zero in y."""
    act = ACTIVATIONS.get(activation)
    ranges, _, end = _groups(offs)
    y_ND = x_ND.new_empty(x_ND.shape[0], w2.shape[-1])
    y_ND[end:].zero_()  # every other row is written by its expert
    h_NH = x_ND.new_empty(x_ND.shape[0], w1.shape[-1])
    a_NA = x_ND.new_empty(x_ND.shape[0] if keep_act else 0, w2.shape[1])
    for e, rows in ranges:
        if b1 is None:
            torch.mm(x_ND[rows], w1[e], out=h_NH[rows])
        else:
            torch.addmm(b1[e], x_ND[rows], w1[e], out=h_NH[rows])
        a = act.apply_into(h_NH[rows], a_NA[rows]) if keep_act else act.fn(h_NH[rows])
        if b2 is None:
            torch.mm(a, w2[e], out=y_ND[rows])
        else:
            torch.addmm(b2[e], a, w2[e], out=y_ND[rows])
    return y_ND, h_NH, a_NA


@_expert_loop.register_fake
def _(x_ND, w1, b1, w2, b2, offs, activation, keep_act):
    N = x_ND.shape[0]
    return (x_ND.new_empty(N, w2.shape[-1]), x_ND.new_empty(N, w1.shape[-1]),
            x_ND.new_empty(N if keep_act else 0, w2.shape[1]))


@torch.library.custom_op("moe_dist::expert_loop_backward", mutates_args=())
def _expert_loop_backward(grad_y: torch.Tensor, x_ND: torch.Tensor, h_NH: torch.Tensor, a_NA: torch.Tensor,
                          w1: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, activation: str,
                          bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, w1, b1, w2, b2) of ``_expert_loop``; the bias ones are empty without ``bias``. The
    activation is recomputed from h where ``a_NA`` is empty."""
    act = ACTIVATIONS.get(activation)
    ranges, idle, end = _groups(offs)
    grad_y = grad_y.contiguous()
    # every row up to offs[-1] belongs to one expert, which writes its gradients: only the rows past it
    # and the idle experts' weight gradients are zeros (a full zero fill cost a pass over every weight)
    grad_x = torch.empty_like(x_ND)
    grad_x[end:].zero_()
    grad_w1, grad_w2 = torch.empty_like(w1), torch.empty_like(w2)
    grad_b1 = w1.new_empty(w1.shape[0], w1.shape[2] if bias else 0)
    grad_b2 = w2.new_empty(w2.shape[0], w2.shape[2] if bias else 0)
    for e in idle:
        for grad in (grad_w1, grad_w2, grad_b1, grad_b2):
            grad[e].zero_()
    for e, rows in ranges:
        h, g_y = h_NH[rows], grad_y[rows]
        torch.mm((a_NA[rows] if a_NA.shape[0] else act.fn(h)).t(), g_y, out=grad_w2[e])
        g_h = act.backward(h, g_y @ w2[e].t())
        torch.mm(x_ND[rows].t(), g_h, out=grad_w1[e])
        torch.mm(g_h, w1[e].t(), out=grad_x[rows])
        if bias:
            torch.sum(g_h, 0, out=grad_b1[e])
            torch.sum(g_y, 0, out=grad_b2[e])
    return grad_x, grad_w1, grad_b1, grad_w2, grad_b2


@_expert_loop_backward.register_fake
def _(grad_y, x_ND, h_NH, a_NA, w1, w2, offs, activation, bias):
    return (torch.empty_like(x_ND), torch.empty_like(w1), w1.new_empty(w1.shape[0], w1.shape[2] if bias else 0),
            torch.empty_like(w2), w2.new_empty(w2.shape[0], w2.shape[2] if bias else 0))


def _expert_loop_setup(ctx, inputs, output):
    x_ND, w1, b1, w2, b2, offs, activation, keep_act = inputs
    _, h_NH, a_NA = output
    ctx.save_for_backward(x_ND, h_NH, a_NA, w1, w2, offs)
    ctx.activation, ctx.bias = activation, (b1 is not None, b2 is not None)
    # h and act(h) are outputs only to be saved: no zero-filled [N, H] gradients for them in backward
    ctx.set_materialize_grads(False)


def _expert_loop_grad(ctx, grad_y, grad_h, grad_a):
    # h and act(h) are outputs only to be saved for this backward: nothing may differentiate through them
    assert grad_h is None and grad_a is None, "the loop operator's h and act(h) outputs are not differentiable"
    x_ND, h_NH, a_NA, w1, w2, offs = ctx.saved_tensors
    if grad_y is None:  # the output was not used
        grad_y = x_ND.new_zeros(x_ND.shape[0], w2.shape[-1])
    has_b1, has_b2 = ctx.bias
    grads = _expert_loop_backward(grad_y, x_ND, h_NH, a_NA, w1, w2, offs, ctx.activation, has_b1 or has_b2)
    grad_x, grad_w1, grad_b1, grad_w2, grad_b2 = grads
    return (grad_x, grad_w1, grad_b1 if has_b1 else None, grad_w2, grad_b2 if has_b2 else None, None, None, None)


_expert_loop.register_autograd(_expert_loop_grad, setup_context=_expert_loop_setup)
reads_inside(torch.ops.moe_dist.expert_loop.default)
reads_inside(torch.ops.moe_dist.expert_loop_backward.default)


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


def _loop_backend(experts: "GroupedExperts", x_ND: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
    dtype = x_ND.dtype  # under autocast, run the experts in the autocast dtype
    if torch.is_autocast_enabled(x_ND.device.type):
        dtype = torch.get_autocast_dtype(x_ND.device.type)
    params = [None if p is None else cast(p, dtype) for p in (experts.w1, experts.b1, experts.w2, experts.b2)]
    with torch.autocast(x_ND.device.type, enabled=False):
        y_ND, _, _ = _expert_loop(cast(x_ND, dtype), *params, offs_L, experts.activation,
                                  not experts.recompute_activation)
    return y_ND


def _grouped_mm_backend(experts: "GroupedExperts", x_ND: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
    if not _grouped_mm_usable(experts, x_ND):
        raise ValueError(f"expert_backend='grouped_mm' cannot run {x_ND.dtype} on {x_ND.device.type} with "
                         f"hidden sizes {experts.w1.shape[1]}/{experts.w2.shape[1]} (rows must be 16-byte "
                         "aligned); use expert_backend='auto' or 'loop'")
    # _grouped_mm leaves the rows past offs[-1] unwritten, in its output and in its input gradient: the
    # rows are masked on the way in and out of each product (the mask before the activation also keeps
    # the second product's unwritten input gradient out of b1's gradient), so only zeros cross them
    rows_N = torch.arange(x_ND.shape[0], device=x_ND.device, dtype=offs_L.dtype)
    live_N1 = (rows_N < offs_L[-1])[:, None]
    x_ND = torch.where(live_N1, x_ND, 0)
    h = _ContiguousGrad.apply(torch._grouped_mm(x_ND, cast(experts.w1, x_ND.dtype), offs=offs_L))
    if experts.b1 is not None:
        # each row's expert, without a host read: how many of the first L - 1 groups end at or before it
        expert_N = torch.searchsorted(offs_L[:-1], rows_N, right=True)
        h = _AddExpertBias.apply(h, cast(experts.b1, h.dtype), expert_N)
    h = torch.where(live_N1, h, 0)
    y = _ContiguousGrad.apply(torch._grouped_mm(experts.act.fn(h), cast(experts.w2, x_ND.dtype), offs=offs_L))
    if experts.b2 is not None:
        y = _AddExpertBias.apply(y, cast(experts.b2, y.dtype), expert_N)
    return torch.where(live_N1, y, 0)


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


def _auto_backend(experts: "GroupedExperts", x_ND: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
    """grouped_mm where it runs off the CPU; the per-expert loop wins on CPU (bench/moe_layer.py)."""
    if x_ND.device.type != "cpu" and _grouped_mm_usable(experts, x_ND):
        return _grouped_mm_backend(experts, x_ND, offs_L)
    return _loop_backend(experts, x_ND, offs_L)


EXPERT_BACKENDS.register("auto", _auto_backend)
EXPERT_BACKENDS.register("loop", _loop_backend)
EXPERT_BACKENDS.register("grouped_mm", _grouped_mm_backend)


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

    def forward(self, x_ND: torch.Tensor, offs_L: torch.Tensor) -> torch.Tensor:
        """Apply expert l to rows ``[offs_L[l-1], offs_L[l])`` of ``x_ND`` (``offs_L`` [L] int32 cumulative
        group ends, on x's device); returns [N, D], zero on the rows past ``offs_L[-1]``."""
        return self.backend(self, x_ND, offs_L)
