"""Auxiliary losses against hand-worked values; padding and modality rules."""

import math

import pytest
import torch

from moe_dist.moe import MoEConfig, MoELayer

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
        seen["counts"] = args[1]

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
