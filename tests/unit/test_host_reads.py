"""Host reads per MoE layer call (forward and backward), counted with ``moe_dist.host_reads.HostReads``.

On an accelerator every read of a device value on the host stalls the stream and breaks a compiled graph.
At ep_size 1 the layer's device path (expert_backend grouped_mm) reads nothing, for every router, with and
without a modality tensor and a padding mask, dropless and with capacity; the CPU loop backend reads its
offsets exactly once in each of its two operators. Each case also holds its result against the fp64
per-token reference, so a layer that skipped work to save a read would fail.
"""

import itertools

import pytest
import torch

from helpers.reference import reference_forward, rel_err
from moe_dist.host_reads import HostReads
from moe_dist.moe import MoEConfig, MoELayer

D, H, E = 8, 16, 4
ROUTERS = {"topk": dict(top_k=2), "threshold": dict(router="threshold", threshold=0.3, max_k=3),
           "top_p": dict(router="top_p", top_p=0.6, max_k=3)}


def test_counter_sees_each_kind_of_read_once():
    """The counter itself: every kind of read counts, once; device-side operations do not."""
    x = torch.arange(6.0) - 2
    with HostReads() as reads:
        x.sum().item()                      # item (and its _local_scalar_dense, counted once)
        x.tolist()
        bool(x[0] > 0)
        x[x > 0]                            # a boolean mask: data-dependent shape
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]))  # output size read
        x.nonzero()
    assert reads.count == 6, reads.reads
    with HostReads() as reads:
        x[torch.tensor([0, 2])]             # integer indexing: no read
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 0]), output_size=3)
        torch.argsort(x).cumsum(0)
    assert reads.count == 0, reads.reads


def _run(cfg, T=24, modality=False, padding=False, seed=0):
    """(HostReads of one forward + backward, output error and grad_x error against the fp64 reference)."""
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    x = torch.randn(T, D, requires_grad=True)
    modality_T = torch.randint(0, 2, (T,)) if modality else None
    padding_T = (torch.arange(T) % 5 == 4) if padding else None
    weight = torch.randn(T, D)
    with HostReads() as reads:
        out = layer(x, modality=modality_T, padding_mask=padding_T)
        ((out.output * weight).sum() + out.aux_loss).backward()
    ref_layer = MoELayer(cfg.replace(expert_backend="loop")).double()
    ref_layer.load_state_dict(layer.state_dict())
    xd = x.detach().double().requires_grad_()
    ref, _ = reference_forward(ref_layer, xd, modality_T, padding_T)
    (grad_ref,) = torch.autograd.grad((ref * weight.double()).sum(), [xd])
    if padding_T is not None:  # the layer differentiates its aux losses too: compare the FFN part only
        ref = torch.where(padding_T[:, None], 0.0, ref)
    return reads, rel_err(out.output.double(), ref), (x.grad.double(), grad_ref)


@pytest.mark.parametrize("router,tokens,dropless", list(itertools.product(
    ROUTERS, ["plain", "modality_padding"], [True, False])))
def test_grouped_mm_layer_reads_nothing(router, tokens, dropless):
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, dropless=dropless, capacity_factor=0.5,
                    min_capacity=1, expert_backend="grouped_mm", load_balance_coef=0.0, z_loss_coef=0.0,
                    modality_experts=(1, 1) if tokens != "plain" else (0, 0), **ROUTERS[router])
    with_tokens = tokens != "plain"
    reads, err, _ = _run(cfg, modality=with_tokens, padding=with_tokens)
    assert reads.count == 0, reads.reads
    assert err < 1e-5


def test_loop_backend_reads_once_per_operator():
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, expert_backend="loop",
                    load_balance_coef=0.0, z_loss_coef=0.0)
    reads, err, (grad, grad_ref) = _run(cfg)
    assert reads.reads == ["moe_dist.expert_loop.default", "moe_dist.expert_loop_backward.default"]
    assert err < 1e-5 and rel_err(grad, grad_ref) < 1e-5


def _grouped(**kw):
    base = dict(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, dropless=True,
                expert_backend="grouped_mm", load_balance_coef=0.0, z_loss_coef=0.0)
    return MoEConfig(**{**base, **kw})


@pytest.mark.parametrize("backend,reads_expected", [("grouped_mm", 0), ("loop", 2)])
def test_idle_expert_odd_row_count_and_empty_modality_group(backend, reads_expected):
    """T*K = 26 rows (a multiple of no alignment); experts: 0 image-only, 1 text-only, 2 and 3 shared.
    Every token is an image token, so the text group is empty and expert 1 idle, and expert 3 is never
    chosen (a large negative router weight on positive inputs). Zero reads, the reference's values, zero
    gradients for the idle experts (the loop backend leaves them to be zeroed, all else it writes)."""
    torch.manual_seed(0)
    cfg = _grouped(top_k=2, modality_experts=(1, 1), expert_backend=backend)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.proj.weight[3] = -100.0
    x = torch.rand(13, D, requires_grad=True) + 0.1
    modality_T = torch.zeros(13, dtype=torch.long)
    with HostReads() as reads:
        out = layer(x, modality=modality_T)
        out.output.square().sum().backward()
    assert reads.count == reads_expected, reads.reads
    assert int(out.stats["tokens_per_expert"][3]) == 0 and int(out.stats["num_tokens/text"]) == 0
    for e in (1, 3):
        assert float(layer.experts.w1.grad[e].abs().max()) == 0.0 and float(layer.experts.b2.grad[e].abs().max()) == 0.0
    ref_layer = MoELayer(cfg.replace(expert_backend="loop")).double()
    ref_layer.load_state_dict(layer.state_dict())
    ref, _ = reference_forward(ref_layer, x.detach().double(), modality_T)
    assert rel_err(out.output.double(), ref) < 1e-5


@pytest.mark.parametrize("dropless", [True, False])
def test_all_padding_batch(dropless):
    layer = MoELayer(_grouped(dropless=dropless))
    x = torch.randn(2, 5, D, requires_grad=True)
    with HostReads() as reads:
        out = layer(x, padding_mask=torch.ones(2, 5, dtype=torch.bool))
        (out.output.sum() + out.aux_loss).backward()
    assert reads.count == 0, reads.reads
    assert float(out.output.abs().max()) == 0.0 and float(x.grad.abs().max()) == 0.0
    assert int(out.stats["tokens_per_expert"].sum()) == 0 and torch.isfinite(out.aux_loss)


class _Unwritten(torch.autograd.Function):
    """torch._grouped_mm whose rows past offs[-1] hold NaN, in its output and in its input gradient: what
    the kernel's contract allows there (it leaves them unwritten)."""

    @staticmethod
    def forward(ctx, a, b, offs):
        ctx.save_for_backward(a, b, offs)
        return _poison(_REAL_GROUPED_MM(a, b, offs=offs), offs)

    @staticmethod
    def backward(ctx, grad):
        a, b, offs = ctx.saved_tensors
        with torch.enable_grad():
            a_, b_ = a.detach().requires_grad_(), b.detach().requires_grad_()
            grad_a, grad_b = torch.autograd.grad(_REAL_GROUPED_MM(a_, b_, offs=offs), (a_, b_), grad.contiguous())
        return _poison(grad_a, offs), grad_b, None


_REAL_GROUPED_MM = torch._grouped_mm


def _poison(t, offs):
    return t.masked_fill((torch.arange(t.shape[0]) >= offs[-1])[:, None], float("nan"))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_grouped_mm_never_uses_unwritten_rows(monkeypatch, activation):
    """Capacity drops and padding leave rows past the last group end; whatever _grouped_mm leaves there
    (NaN here) must not reach the output or any gradient: every expert tensor's gradient equals the loop
    backend's (which writes zeros)."""
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, offs: _Unwritten.apply(a, b, offs))
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, capacity_factor=0.5, min_capacity=1,
                    activation=activation, expert_backend="grouped_mm")
    layers = [MoELayer(cfg), MoELayer(cfg.replace(expert_backend="loop"))]
    layers[1].load_state_dict(layers[0].state_dict())
    x, padding = torch.randn(24, D), torch.arange(24) % 4 == 3
    grads = []
    for layer in layers:
        xi = x.clone().requires_grad_()
        out = layer(xi, padding_mask=padding)
        assert float(out.stats["dropped_fraction"]) > 0
        out.output.square().sum().backward()
        grads.append([out.output, xi.grad] + [getattr(layer.experts, n).grad for n in ("w1", "b1", "w2", "b2")])
    for got, want in zip(*grads):
        assert torch.isfinite(got).all() and rel_err(got.double(), want.double()) < 1e-5
