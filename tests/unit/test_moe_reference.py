"""MoELayer against the fp64 per-token reference: outputs and gradients to <= 1e-10 relative error."""

import pytest
import torch

from helpers.reference import reference_forward, rel_err, saved_bytes
from moe_dist.moe import MoEConfig, MoELayer

T, D, H, E = 24, 8, 12, 4

CASES = {
    "top1_dropless": dict(top_k=1, dropless=True),
    "top2_dropless": dict(top_k=2, dropless=True),
    "top3_dropless": dict(top_k=3, dropless=True),
    "top2_renorm": dict(top_k=2, dropless=True, renormalize=True),
    "threshold": dict(router="threshold", threshold=0.3, max_k=3, dropless=True),
    "threshold_renorm": dict(router="threshold", threshold=0.2, max_k=3, dropless=True, renormalize=True),
    "top_p": dict(router="top_p", top_p=0.6, max_k=3, dropless=True),
    "top2_capacity_position": dict(top_k=2, capacity_factor=0.5, drop_priority="position"),
    "top2_capacity_random": dict(top_k=2, capacity_factor=0.5, drop_priority="random"),
    "top2_capacity_score": dict(top_k=2, capacity_factor=0.5, drop_priority="score"),
    "top1_capacity_score": dict(top_k=1, capacity_factor=0.6, drop_priority="score"),
    "threshold_capacity": dict(router="threshold", threshold=0.25, max_k=2, capacity_factor=0.5),
    "mlp_router_swiglu_shared": dict(top_k=2, dropless=True, router_hidden_size=6, activation="swiglu",
                                     shared_expert=True),
    "modality_padding": dict(top_k=2, dropless=True, modality_experts=(1, 1)),
    "no_bias_relu": dict(top_k=2, dropless=True, expert_bias=False, activation="relu"),
    "top2_quick_gelu": dict(top_k=2, dropless=True, activation="quick_gelu"),  # OpenAI CLIP's MLPs, upcycled
}


def _token_order(layer, cfg, seed):
    """The priority order the layer will use (see CapacityDrop's docstring)."""
    if cfg.drop_priority == "random":
        torch.manual_seed(seed)
        return torch.randperm(T)
    return None


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_fp64_reference(case):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, min_capacity=1, **CASES[case])
    layer = MoELayer(cfg).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    modality = torch.randint(0, 2, (T,)) if cfg.uses_modality else None
    padding = (torch.arange(T) % 5 == 4) if case == "modality_padding" else None
    weight = torch.randn(T, D, dtype=torch.float64)
    params = [x] + [p for p in layer.parameters()]

    seed = 1234
    torch.manual_seed(seed)
    out = layer(x, modality=modality, padding_mask=padding)
    got = torch.autograd.grad((out.output * weight).sum(), params, allow_unused=True)

    order = _token_order(layer, cfg, seed)
    if cfg.drop_priority == "score" and not cfg.dropless:
        probs = torch.softmax(layer.router.proj.weight.detach() @ x.detach().T, 0).T
        order = sorted(range(T), key=lambda t: (-float(probs[t].max()), t))
    ref, kept = reference_forward(layer, x, modality, padding, order)
    want = torch.autograd.grad((ref * weight).sum(), params, allow_unused=True)

    assert rel_err(out.output, ref) <= 1e-10
    for g, w in zip(got, want):
        if w is None:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            assert rel_err(g, w) <= 1e-10
    kept_count = int(out.stats["tokens_per_expert"].sum())
    assert kept_count == len(kept)
    if not cfg.dropless:
        assert float(out.stats["dropped_fraction"]) > 0, "the capacity cases must actually drop"
    if padding is not None:
        assert float(out.output[padding].abs().max()) == 0.0


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_backends_agree_fp32(backend):
    """Both expert backends give the fp32 result of the fp64 reference (rounding-level error), the
    gradients of every expert tensor included (grouped_mm's bias gradient is its own product)."""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, dropless=True,
                    expert_backend=backend)
    layer = MoELayer(cfg)
    x = torch.randn(T, D, requires_grad=True)
    out = layer(x)
    names = ["w1", "b1", "w2", "b2"]
    grads = torch.autograd.grad(out.output.square().sum(), [x, *(getattr(layer.experts, n) for n in names)])
    ref_layer = MoELayer(cfg.replace(expert_backend="loop")).double()
    ref_layer.load_state_dict(layer.state_dict())
    xd = x.detach().double().requires_grad_()
    ref, _ = reference_forward(ref_layer, xd)
    ref_grads = torch.autograd.grad(ref.square().sum(), [xd, *(getattr(ref_layer.experts, n) for n in names)])
    assert rel_err(out.output.double(), ref) < 1e-5
    for g, w in zip(grads, ref_grads):
        assert rel_err(g.double(), w) < 1e-5


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu"])
def test_saved_activation_matches_recompute_and_keeps_one_more_hidden(activation):
    """recompute_activation=False gives the same output and gradients (fp64) and saves exactly the
    activation rows [A, H] more for backward."""
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, dropless=True,
                    expert_backend="loop", activation=activation)
    layers = [MoELayer(cfg).double(), MoELayer(cfg.replace(recompute_activation=False)).double()]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    results = []
    for layer in layers:
        outs = []
        nbytes = saved_bytes(lambda: outs.append(layer(x)))
        grads = torch.autograd.grad(outs[0].output.square().sum(), [x, *layer.parameters()])
        results.append((outs[0].output, grads, nbytes))
    (y0, g0, bytes0), (y1, g1, bytes1) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert bytes1 - bytes0 == T * 2 * H * 8  # A = T * k rows of act(h), fp64


def test_bf16_autocast_keeps_router_fp32_and_output_dtype():
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2))
    x = torch.randn(2, 5, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = layer.router(x.reshape(-1, D).bfloat16())
        out = layer(x.bfloat16())
    assert routing.logits_TE.dtype == torch.float32 and routing.probs_TE.dtype == torch.float32
    assert out.output.dtype == torch.bfloat16 and out.output.shape == x.shape
    assert out.aux_loss.dtype == torch.float32


def test_empty_input_and_all_padding():
    layer = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, dropless=True))
    x = torch.randn(0, D, requires_grad=True)
    out = layer(x)
    (out.output.sum() + out.aux_loss).backward()
    assert out.output.shape == (0, D)
    x = torch.randn(3, D)
    out = layer(x, padding_mask=torch.ones(3, dtype=torch.bool))
    assert float(out.output.abs().max()) == 0.0 and int(out.stats["tokens_per_expert"].sum()) == 0
