"""Auxiliary losses against hand-worked values; padding and modality rules."""

import math

import pytest
import torch

from moe_dist.moe import MODALITY_NAMES, MoEConfig, MoELayer
from moe_dist.moe.losses import summarize

LN3 = math.log(3.0)


def _two_expert_layer(**kw):
    """D=2, E=2, identity linear router: token [a, b] gets logits [a, b]."""
    cfg = MoEConfig(hidden_size=2, ffn_hidden_size=4, num_experts=2, top_k=1, dropless=True, **kw)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.proj.weight.copy_(torch.eye(2))
    return layer


def test_losses_hand_worked_one_group():
    # Both tokens have logits [ln 3, 0] -> p = [3/4, 1/4], both pick expert 0 (top-1).
    #   load_balance = E * sum_e f_e P_e = 2 * (1 * 3/4 + 0 * 1/4) = 1.5
    #   z_loss       = logsumexp([ln 3, 0])^2 = (ln 4)^2
    #   entropy_local  = H([3/4, 1/4]) = -(3/4 ln 3/4 + 1/4 ln 1/4)
    #   entropy_global = -H(mean p) = -H([3/4, 1/4])
    layer = _two_expert_layer(load_balance_coef=0.5, z_loss_coef=0.25, entropy_local_coef=0.0)
    x = torch.tensor([[LN3, 0.0], [LN3, 0.0]], dtype=torch.float64)
    out = layer(x)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(out.losses["load_balance"]) == pytest.approx(1.5, rel=1e-12)
    assert float(out.losses["z_loss"]) == pytest.approx(math.log(4.0) ** 2, rel=1e-12)
    assert float(out.losses["entropy_local"]) == pytest.approx(h, rel=1e-12)
    assert float(out.losses["entropy_global"]) == pytest.approx(-h, rel=1e-12)
    # aux_loss = 0.5 * 1.5 + 0.25 * (ln 4)^2; entropy coefficients are 0, so they are not added.
    assert float(out.aux_loss) == pytest.approx(0.75 + 0.25 * math.log(4.0) ** 2, rel=1e-12)
    assert out.stats["tokens_per_expert"].tolist() == [2, 0]


def test_losses_hand_worked_per_modality():
    # Token 0 (image): p = [3/4, 1/4]; token 1 (text): p = [1/4, 3/4]. Each modality has one token, so
    #   entropy_local  = H(p0) + H(p1) = 2h
    #   entropy_global = -H(p0) - H(p1) = -2h   (per modality, then summed)
    # Together the tokens split evenly: f = [1/2, 1/2], P = [1/2, 1/2] -> load_balance = 2 * 1/2 = 1.
    layer = _two_expert_layer(entropy_local_coef=1.0, entropy_global_coef=1.0, load_balance_coef=0.0,
                              z_loss_coef=0.0)
    x = torch.tensor([[LN3, 0.0], [0.0, LN3]], dtype=torch.float64)
    out = layer(x, modality=torch.tensor([0, 1]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(out.losses["entropy_local"]) == pytest.approx(2 * h, rel=1e-12)
    assert float(out.losses["entropy_global"]) == pytest.approx(-2 * h, rel=1e-12)
    assert float(out.losses["load_balance"]) == pytest.approx(1.0, rel=1e-12)
    assert float(out.aux_loss) == pytest.approx(0.0, abs=1e-12)
    assert out.stats["tokens_per_expert/image"].tolist() == [1, 0]
    assert out.stats["tokens_per_expert/text"].tolist() == [0, 1]
    assert float(out.stats["router_entropy/text"]) == pytest.approx(h, rel=1e-12)
    # Without modality the two tokens form one group: global = -H([1/2, 1/2]) = -ln 2.
    out = layer(x)
    assert float(out.losses["entropy_global"]) == pytest.approx(-math.log(2.0), rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dropless", [True, False])
def test_padding_changes_neither_losses_nor_stats(k, dropless):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=k, dropless=dropless,
                    capacity_factor=0.75, min_capacity=1, entropy_local_coef=0.1, entropy_global_coef=0.1)
    layer = MoELayer(cfg).double()
    real = torch.randn(10, 8, dtype=torch.float64)
    mod = torch.randint(0, 2, (10,))
    base = layer(real, modality=mod)
    padded_x = torch.cat([real, 100 * torch.randn(5, 8, dtype=torch.float64)])
    pad = torch.arange(15) >= 10
    padded = layer(padded_x, modality=torch.cat([mod, torch.zeros(5, dtype=torch.long)]), padding_mask=pad)
    for name in base.losses:
        assert float(padded.losses[name]) == pytest.approx(float(base.losses[name]), rel=1e-12), name
    for name in base.stats:
        assert torch.equal(padded.stats[name].double(), base.stats[name].double()), name
    assert torch.allclose(padded.output[:10], base.output, rtol=0, atol=1e-12)
    assert float(padded.output[10:].abs().max()) == 0.0


@pytest.mark.parametrize("force_balanced", [False, True])
def test_modality_experts_never_see_other_modality(force_balanced):
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=6, top_k=2, dropless=True,
                    modality_experts=(2, 1), force_balanced=force_balanced)
    layer = MoELayer(cfg)
    seen = {}

    def spy(module, args):  # record which local expert each dispatched row goes to, per modality
        offs = args[1].tolist()
        seen["counts"] = [end - start for start, end in zip([0] + offs[:-1], offs)]

    layer.experts.register_forward_pre_hook(spy)
    for mod_id, forbidden in ((0, [2]), (1, [0, 1])):
        x = torch.randn(64, 8) * 5
        out = layer(x, modality=torch.full((64,), mod_id))
        counts = seen["counts"]
        assert all(counts[e] == 0 for e in forbidden), (mod_id, counts)
        assert sum(counts) == 128
        name = "image" if mod_id == 0 else "text"
        assert out.stats[f"tokens_per_expert/{name}"].sum() == 128


def test_forced_balanced_routes_round_robin():
    cfg = MoEConfig(hidden_size=4, ffn_hidden_size=8, num_experts=4, top_k=2, force_balanced=True, dropless=True)
    out = MoELayer(cfg)(torch.randn(6, 4))
    # token t takes experts (2t, 2t+1) mod 4 -> each expert gets 3 of the 12 assignments
    assert out.stats["tokens_per_expert"].tolist() == [3, 3, 3, 3]


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, router_noise="gumbel", router_noise_eps=1.0)
    layer = MoELayer(cfg)
    x = torch.randn(32, 8)
    layer.eval()
    a, b = layer.router.gate_logits(x), layer.router.gate_logits(x)
    assert torch.equal(a, b)
    layer.train()
    assert not torch.equal(layer.router.gate_logits(x), a)


def _reference_summary(routing, kept_TK):
    """The losses and stats of the module docstring, token by token in float64 (no fused sums)."""
    probs = routing.probs_TE.double()
    T, E = probs.shape
    real = [t for t in range(T) if routing.token_mask_T[t]]

    def H(p):
        return -sum(float(v) * math.log(float(v)) for v in p if v > 0)

    def group(tokens):
        routed, kept = [0] * E, [0] * E
        for t in tokens:
            for k in range(routing.experts_TK.shape[1]):
                e = int(routing.experts_TK[t, k])
                routed[e] += bool(routing.valid_TK[t, k])
                kept[e] += bool(kept_TK[t, k])
        n = max(len(tokens), 1)
        mean_p = [sum(float(probs[t, e]) for t in tokens) / n for e in range(E)]
        return {"routed_per_expert": routed, "tokens_per_expert": kept, "num_tokens": len(tokens),
                "dropped_fraction": 1 - sum(kept) / max(sum(routed), 1),
                "router_entropy": sum(H(probs[t]) for t in tokens) / n}, mean_p

    everyone, mean_p_all = group(real)
    stats = dict(everyone)
    groups = [real]
    if routing.modality_T is not None:
        groups = [[t for t in real if int(routing.modality_T[t]) == m] for m in routing.modalities]
        for m, tokens in zip(routing.modalities, groups):
            stats.update({f"{key}/{MODALITY_NAMES[m]}": v for key, v in group(tokens)[0].items()})
    f = [r / max(sum(everyone["routed_per_expert"]), 1) for r in everyone["routed_per_expert"]]
    lse = torch.logsumexp(routing.logits_TE.double(), -1)
    losses = {"load_balance": E * sum(fe * pe for fe, pe in zip(f, mean_p_all)),
              "z_loss": sum(float(lse[t]) ** 2 for t in real) / max(len(real), 1),
              "entropy_local": sum(group(tokens)[0]["router_entropy"] for tokens in groups),
              "entropy_global": -sum(H(group(tokens)[1]) for tokens in groups)}
    return losses, stats


_SUMMARY_CASES = [dict(dropless=True), dict(dropless=False, capacity_factor=0.75, min_capacity=1),
                  dict(router="threshold", max_k=3, threshold=0.2, dropless=False, capacity_factor=1.0)]


@pytest.mark.parametrize("case, with_modality", [
    *[(case, False) for case in _SUMMARY_CASES], *[(case, True) for case in _SUMMARY_CASES],
    (dict(num_experts=6, dropless=False, capacity_factor=0.5, min_capacity=1, modality_experts=(1, 1, 1)), True),
])
def test_fused_summary_equals_token_by_token_reference(case, with_modality):
    """summarize's fused per-group sums give what the module docstring defines, per token, including an
    empty modality group (three modalities, no "cross" token), padding and capacity drops."""
    torch.manual_seed(3)
    cfg = MoEConfig(**{"hidden_size": 8, "ffn_hidden_size": 16, "num_experts": 4, "top_k": 2, **case})
    layer = MoELayer(cfg).double()
    x = torch.randn(30, 8, dtype=torch.float64) * 2
    # modality 1 only on real tokens below 10; with three modalities no token is "cross" (an empty group)
    modality = (torch.arange(30) < 10).long() if with_modality else None
    padding = torch.arange(30) % 7 == 3
    out = layer(x, modality=modality, padding_mask=padding)
    routing = layer.router(x, modality, ~padding)
    want_losses, want_stats = _reference_summary(routing, layer.policy.keep(routing, True))
    assert set(out.losses) == set(want_losses) and set(out.stats) == set(want_stats)
    for name, value in want_losses.items():
        assert float(out.losses[name]) == pytest.approx(value, rel=1e-12, abs=1e-12), name
    for name, value in want_stats.items():
        got = out.stats[name]
        if isinstance(value, (list, int)):
            assert got.dtype == torch.long and got.tolist() == value, name
        else:
            assert float(got) == pytest.approx(value, rel=1e-12, abs=1e-12), name


def _graph_nodes(t: torch.Tensor) -> set:
    """The names of the autograd nodes ``t``'s backward runs."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return names


def test_only_weighted_losses_are_differentiated():
    """A loss with coefficient 0 is reported, but backward never runs through what only it uses: with
    z_loss alone weighted, the aux loss's graph holds no entropy (its log) and no softmax-probability
    column, and its router gradient is z_loss's."""
    torch.manual_seed(0)
    base = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=1, dropless=True)
    x = torch.randn(20, 8, dtype=torch.float64)
    modality = torch.zeros(20, dtype=torch.long)
    only_z = MoELayer(MoEConfig(**base, load_balance_coef=0.0, z_loss_coef=1.0)).double()
    out = only_z(x, modality=modality)
    nodes = _graph_nodes(out.aux_loss)
    assert "LogBackward0" not in nodes and "ExpBackward0" not in nodes, nodes
    assert "LogsumexpBackward0" in nodes
    grad_fused = torch.autograd.grad(out.aux_loss, only_z.router.proj.weight)[0]
    logits = only_z.router.gate_logits(x)
    grad_ref = torch.autograd.grad(torch.logsumexp(logits, -1).square().mean(), only_z.router.proj.weight)[0]
    assert torch.allclose(grad_fused, grad_ref, rtol=1e-12, atol=1e-14)
    # weighting an entropy loss brings the probabilities into the graph (the local one: H = lse - sum p
    # logit), and the global one its log (so the test above could see them)
    with_entropy = MoELayer(MoEConfig(**base, load_balance_coef=0.0, z_loss_coef=1.0, entropy_local_coef=0.1)).double()
    assert "ExpBackward0" in _graph_nodes(with_entropy(x, modality=modality).aux_loss)
    with_entropy = MoELayer(MoEConfig(**base, load_balance_coef=0.0, z_loss_coef=1.0, entropy_global_coef=0.1)).double()
    assert "LogBackward0" in _graph_nodes(with_entropy(x, modality=modality).aux_loss)
    # nothing weighted: no loss carries a graph at all
    none = MoELayer(MoEConfig(**base, load_balance_coef=0.0, z_loss_coef=0.0)).double()
    out = none(x)
    assert not any(loss.requires_grad for loss in out.losses.values())
    routing = none.router(x)
    with pytest.raises(ValueError, match="unknown losses"):
        summarize(routing, routing.valid_TK, differentiate=["zloss"])


def test_entropy_gradient_stays_finite_with_masked_experts_at_a_large_loss_scale():
    """Forbidden experts get a finite masked logit; the local entropy's p * logit then has gradient
    -logit * upstream there, which must not overflow under fp16 loss scaling (2^16 here): with the dtype's
    lowest value as the mask it did, and exp's backward turned 0 * inf into NaN router gradients."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=6, top_k=2, dropless=True,
                               modality_experts=(2, 2), entropy_local_coef=0.01, entropy_global_coef=0.01))
    out = layer(torch.randn(16, 8), modality=torch.arange(16) % 2)
    (out.aux_loss * 2.0 ** 16).backward()
    assert torch.isfinite(layer.router.proj.weight.grad).all()
