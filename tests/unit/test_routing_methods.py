"""The routing methods of issue 27 against fp64 references written from the papers' formulas, token by
token (python loops over the layer's own parameters), outputs and gradients:

    sigmoid scores + group-limited top-k + selection bias + fine-grained and shared experts (DeepSeek-V3)
    Expert-Choice (Zhou et al. 2022), with padding and modality-reserved experts
    Soft MoE (Puigcerver et al. 2023), with padding
    the global-batch (Qwen) and sequence (DeepSeek-V2) balance losses, per modality
    the selection bias's update, hand-worked
and every refusal at config load.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers.reference import rel_err
from moe_dist.models.config import load_model_config
from moe_dist.moe import MoEConfig, build_moe_layer
from moe_dist.moe.balance import LoadTracker, bias_update, end_optimizer_step

D, H, E = 8, 16, 8


def _expert(layer, e, x):
    ex = layer.experts
    h = x @ ex.w1[e] + ex.b1[e]
    if layer.config.activation == "swiglu":
        g, u = h.chunk(2)
        h = F.silu(g) * u
    else:
        h = F.gelu(h)
    return h @ ex.w2[e] + ex.b2[e]


def _shared(layer, x):
    mlp = layer.shared_mlp
    h = mlp[0].weight @ x + mlp[0].bias
    if layer.config.activation == "swiglu":
        g, u = h.chunk(2)
        h = F.silu(g) * u
    else:
        h = F.gelu(h)
    return mlp[2].weight @ h + mlp[2].bias


def _allowed(cfg, modality):
    """Experts a token of ``modality`` may use (image-only, text-only, then shared experts)."""
    n_img, n_txt = cfg.modality_experts[:2]
    if not cfg.uses_modality:
        return list(range(cfg.num_experts))
    forbidden = range(n_img, n_img + n_txt) if modality == 0 else range(0, n_img)
    return [e for e in range(cfg.num_experts) if e not in forbidden]


def _token_scores(layer, x, modality):
    """(scores over all E experts, 0 where forbidden; the gate distribution p)."""
    cfg = layer.config
    logits = layer.router.proj.weight @ x
    allowed = _allowed(cfg, modality)
    if cfg.score_func == "sigmoid":
        s = torch.stack([torch.sigmoid(logits[e]) if e in allowed else logits.new_zeros(()) for e in range(E)])
        return s, s / s.sum()
    z = torch.stack([logits[e] for e in allowed]).logsumexp(0)
    p = torch.stack([torch.exp(logits[e] - z) if e in allowed else logits.new_zeros(()) for e in range(E)])
    return p, p


def reference_topk(layer, x_TD, modality_T=None):
    """DeepSeek-V3 routing per token: selection on score + bias within the best groups (a group scores
    the sum of its two best biased scores), gate = unbiased score, renormalised; plus shared experts."""
    cfg = layer.config
    bias = layer.router.selection_bias_ME
    rows = []
    for t in range(x_TD.shape[0]):
        m = 0 if modality_T is None else int(modality_T[t])
        s, _ = _token_scores(layer, x_TD[t], m)
        allowed = _allowed(cfg, m)
        sel = {e: float(s[e]) + (float(bias[m, e]) if bias is not None else 0.0) for e in allowed}
        if cfg.n_groups > 1:
            size = E // cfg.n_groups
            group_score = {g: sum(sorted([sel[e] for e in range(g * size, (g + 1) * size) if e in sel],
                                         reverse=True)[:2]) for g in range(cfg.n_groups)}
            best = sorted(group_score, key=lambda g: -group_score[g])[:cfg.topk_groups]
            sel = {e: v for e, v in sel.items() if e // size in best}
        chosen = sorted(sel, key=lambda e: -sel[e])[:cfg.top_k]
        gates = [s[e] for e in chosen]
        if cfg.renormalize:
            total = sum(gates)
            gates = [g / total for g in gates]
        y = sum(g * _expert(layer, e, x_TD[t]) for e, g in zip(chosen, gates))
        if layer.shared_mlp is not None:
            y = y + _shared(layer, x_TD[t])
        rows.append(y)
    return torch.stack(rows)


def _grads_match(out, ref, params, weight):
    got = torch.autograd.grad((out * weight).sum(), params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad((ref * weight).sum(), params, retain_graph=True, allow_unused=True)
    for g, w in zip(got, want):
        if w is None or float(w.abs().max()) == 0:
            assert g is None or float(g.abs().max()) == 0.0
        else:
            assert rel_err(g, w) <= 1e-10


@pytest.mark.parametrize("case", ["sigmoid_groups_bias_shared_swiglu", "softmax_bias_modality", "granular_shared"])
def test_deepseek_routing_matches_fp64_reference(case):
    fields = {
        "sigmoid_groups_bias_shared_swiglu": dict(top_k=2, score_func="sigmoid", renormalize=True, n_groups=4,
                                                  topk_groups=2, router_bias=True, num_shared_experts=2,
                                                  activation="swiglu"),
        "softmax_bias_modality": dict(top_k=2, router_bias=True, modality_experts=(2, 2)),
        "granular_shared": dict(top_k=3, granularity=4, num_shared_experts=1, score_func="sigmoid",
                                renormalize=True),
    }[case]
    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, dropless=True, **fields)
    layer = build_moe_layer(cfg).double()
    if cfg.granularity > 1:
        assert layer.experts.w2.shape[1] == H // cfg.granularity
        assert layer.shared_mlp[2].weight.shape[1] == H // cfg.granularity
    if cfg.router_bias:  # a bias big enough to change choices, so the test sees selection != gate
        with torch.no_grad():
            layer.router.selection_bias_ME.copy_(0.3 * torch.randn_like(layer.router.selection_bias_ME))
    T = 20
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    modality = torch.randint(0, 2, (T,)) if cfg.uses_modality else None
    out = layer(x, modality=modality)
    ref = reference_topk(layer, x, modality)
    assert rel_err(out.output, ref) <= 1e-10
    _grads_match(out.output, ref, [x, *layer.parameters()], torch.randn(T, D, dtype=torch.float64))


def test_the_bias_changes_the_choice_but_not_the_gate_weight():
    """Hand-worked: the router prefers expert 0, a bias of +1 on expert 3 makes 3 the choice, and its
    gate weight is its own softmax probability, not biased."""
    cfg = MoEConfig(hidden_size=2, ffn_hidden_size=4, num_experts=4, top_k=1, router_bias=True, dropless=True)
    layer = build_moe_layer(cfg).double()
    with torch.no_grad():
        layer.router.proj.weight.copy_(torch.tensor([[2.0, 0], [0, 0], [0, 0], [1.0, 0]], dtype=torch.float64))
        layer.router.selection_bias_ME[0, 3] = 1.0
    routing = layer.router(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert int(routing.experts_TK[0, 0]) == 3
    # softmax of logits (2, 0, 0, 1): e / (e^2 + 2 + e)
    assert math.isclose(float(routing.weights_TK[0, 0]), math.e / (math.e ** 2 + 2 + math.e), rel_tol=1e-12)


def reference_expert_choice(layer, x_TD, padding_T, modality_T):
    cfg = layer.config
    T = x_TD.shape[0]
    C = max(1, min(T, math.ceil(cfg.capacity_factor * T / E)))
    real = [t for t in range(T) if not bool(padding_T[t])]
    p = {t: _token_scores(layer, x_TD[t], int(modality_T[t]))[0] for t in real}
    y = [torch.zeros_like(x_TD[t]) for t in range(T)]
    chosen_per_expert = []
    for e in range(E):
        candidates = [t for t in real if e in _allowed(cfg, int(modality_T[t]))]
        chosen = sorted(candidates, key=lambda t: -float(p[t][e]))[:C]
        chosen_per_expert.append(len(chosen))
        for t in chosen:
            y[t] = y[t] + p[t][e] * _expert(layer, e, x_TD[t])
    return torch.stack(y), chosen_per_expert


@pytest.mark.parametrize("capacity_factor", [1.0, 2.0])
def test_expert_choice_matches_fp64_reference(capacity_factor):
    torch.manual_seed(1)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, router="expert_choice",
                    capacity_factor=capacity_factor, modality_experts=(2, 2))
    layer = build_moe_layer(cfg).double()
    T = 24
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    padding = torch.arange(T) % 6 == 5
    modality = torch.randint(0, 2, (T,))
    out = layer(x, modality=modality, padding_mask=padding)
    ref, per_expert = reference_expert_choice(layer, x, padding, modality)
    assert rel_err(out.output, ref) <= 1e-10
    assert out.stats["tokens_per_expert"].tolist() == per_expert
    assert float(out.output[padding].abs().max()) == 0.0
    _grads_match(out.output, ref, [x, *layer.parameters()], torch.randn(T, D, dtype=torch.float64))


def reference_soft(layer, x_BLD, padding_BL):
    cfg = layer.config
    B, L, _ = x_BLD.shape
    P = cfg.slots_per_expert
    phi, scale = layer.router.phi, layer.router.scale[0]
    S = phi.shape[1]
    out = torch.zeros_like(x_BLD)
    rows = []
    for b in range(B):
        real = [l for l in range(L) if not bool(padding_BL[b, l])]
        logit = {(l, s): scale * (x_BLD[b, l] / x_BLD[b, l].norm()) @ (phi[:, s] / phi[:, s].norm())
                 for l in range(L) for s in range(S)}
        slot_out = []
        for s in range(S):
            z = torch.stack([logit[l, s] for l in real]).logsumexp(0)
            slot = sum(torch.exp(logit[l, s] - z) * x_BLD[b, l] for l in real)
            slot_out.append(_expert(layer, s // P, slot))
        for l in real:
            z = torch.stack([logit[l, s] for s in range(S)]).logsumexp(0)
            rows.append(sum(torch.exp(logit[l, s] - z) * slot_out[s] for s in range(S)))
            out = out.index_put((torch.tensor(b), torch.tensor(l)), rows[-1])
    return out


def test_soft_moe_matches_fp64_reference():
    torch.manual_seed(2)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=4, router="soft", slots_per_expert=2)
    layer = build_moe_layer(cfg).double()
    with torch.no_grad():
        layer.router.scale.fill_(3.0)  # sharper than at init, so the mixes are far from uniform
    B, L = 3, 5
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 3:] = True
    out = layer(x, padding_mask=padding)
    ref = reference_soft(layer, x, padding)
    assert rel_err(out.output, ref) <= 1e-10
    assert float(out.output[padding].abs().max()) == 0.0
    weights = out.stats["slot_weight_per_expert"]
    assert weights.shape == (4,) and math.isclose(float(weights.sum()), int((~padding).sum()), rel_tol=1e-12)
    _grads_match(out.output, ref, [x, *layer.parameters()], torch.randn(B, L, D, dtype=torch.float64))


# ----------------------------------------------------------------------------- balance losses
def _balance_layer(load_balance, **fields):
    torch.manual_seed(3)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=2, dropless=True,
                    load_balance=load_balance, modality_experts=(2, 2), **fields)
    return build_moe_layer(cfg).double()


def _selections(layer, x_TD, modality_T, padding_T):
    """[(modality, chosen experts, p)] of every real token, by the reference routing."""
    out = []
    for t in range(x_TD.shape[0]):
        if padding_T is not None and bool(padding_T[t]):
            continue
        m = int(modality_T[t])
        s, p = _token_scores(layer, x_TD[t], m)
        allowed = _allowed(layer.config, m)
        chosen = sorted(allowed, key=lambda e: -float(s[e]))[:layer.config.top_k]
        out.append((m, chosen, p))
    return out


def test_global_batch_loss_counts_the_steps_earlier_micro_batches():
    """Micro batch 2's loss: per modality m, E_m * sum_e F_me P_me with F from micro batches 1 and 2
    (recorded as the trainer does), P from micro batch 2, weighted by m's share of its tokens."""
    layer = _balance_layer("global_batch")
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(16, D, generator=gen, dtype=torch.float64) for _ in range(2)]
    mods = [torch.randint(0, 2, (16,), generator=gen) for _ in range(2)]
    first = layer(xs[0], modality=mods[0])
    layer.load_tracker.record(first.load_ME)
    x2 = xs[1].clone().requires_grad_()
    second = layer(x2, modality=mods[1])

    selections = _selections(layer, xs[0], mods[0], None) + _selections(layer, x2, mods[1], None)
    now = _selections(layer, x2, mods[1], None)
    want = 0.0
    for m in (0, 1):
        counts = [sum(e in chosen for mm, chosen, _ in selections if mm == m) for e in range(E)]
        mine = [p for mm, _, p in now if mm == m]
        P = sum(mine) / len(mine)
        F_ = [c / sum(counts) for c in counts]
        n_open = len(_allowed(layer.config, m))
        want = want + len(mine) / len(now) * n_open * sum(F_[e] * P[e] for e in range(E))
    got = second.losses["load_balance"]
    assert rel_err(got, want) <= 1e-12
    w = layer.router.proj.weight
    assert rel_err(torch.autograd.grad(got, w, retain_graph=True)[0], torch.autograd.grad(want, w)[0]) <= 1e-10


def test_global_batch_loss_is_one_for_uniform_routing():
    """Hand-worked: a zero router gives uniform probabilities over each modality's open experts; with
    force-balanced routing F is uniform too, so every modality's term is E_m * E_m * (1/E_m)^2 = 1."""
    layer = _balance_layer("global_batch", force_balanced=True)
    with torch.no_grad():
        layer.router.proj.weight.zero_()
    x = torch.randn(24, D, dtype=torch.float64)
    modality = torch.arange(24) % 2
    assert math.isclose(float(layer(x, modality=modality).losses["load_balance"]), 1.0, rel_tol=1e-12)


def test_sequence_loss_averages_per_sequence_and_modality():
    layer = _balance_layer("sequence")
    B, L = 3, 6
    x = torch.randn(B, L, D, dtype=torch.float64)
    modality = torch.tensor([0, 1, 0])[:, None].expand(B, L).clone()
    modality[2, 4:] = 1  # a sequence with two modalities: two segments
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, 5] = True
    out = layer(x, modality=modality, padding_mask=padding)
    terms = []
    for b in range(B):
        sel = _selections(layer, x[b], modality[b], padding[b])
        for m in (0, 1):
            mine = [(chosen, p) for mm, chosen, p in sel if mm == m]
            if not mine:
                continue
            counts = [sum(e in chosen for chosen, _ in mine) for e in range(E)]
            P = sum(p for _, p in mine) / len(mine)
            n_open = len(_allowed(layer.config, m))
            terms.append(n_open * sum(counts[e] / sum(counts) * P[e] for e in range(E)))
    want = sum(terms) / len(terms)
    got = out.losses["load_balance"]
    assert len(terms) == 4 and rel_err(got, want) <= 1e-12
    w = layer.router.proj.weight
    assert rel_err(torch.autograd.grad(got, w, retain_graph=True)[0], torch.autograd.grad(want, w)[0]) <= 1e-10


def test_bias_update_hand_worked():
    bias = torch.zeros(2, 4)
    load = torch.tensor([[4, 0, 2, 2], [3, 9, 0, 0]])
    open_ = torch.tensor([[True] * 4, [True, True, False, True]])
    # row 0: mean 2 -> signs (-, +, 0, 0); row 1: open experts 0, 1, 3 with mean (3 + 9 + 0) / 3 = 4
    want = torch.tensor([[-0.1, 0.1, 0.0, 0.0], [0.1, -0.1, 0.0, 0.1]])
    assert torch.allclose(bias_update(bias, load, open_, 0.1), want, atol=1e-7, rtol=0)


def test_end_optimizer_step_moves_the_bias_by_the_steps_load_and_clears_it():
    """One process, two micro batches recorded: the bias moves once by the summed load."""
    cfg = MoEConfig(hidden_size=2, ffn_hidden_size=4, num_experts=4, top_k=1, router_bias=True,
                    router_bias_rate=0.5, load_balance_coef=0.0, dropless=True)
    layer = build_moe_layer(cfg).double()
    with torch.no_grad():  # logits (a, -a, 0, 0): token (a, 0) picks expert 0 when a >= 1, expert 1 when a <= -1
        layer.router.proj.weight.copy_(torch.tensor([[1.0, 0], [-1.0, 0], [0, 0], [0, 0]], dtype=torch.float64))
    for xs in ([[1.0, 0], [2.0, 0], [-1.0, 0]], [[3.0, 0], [-2.0, 0]]):
        out = layer(torch.tensor(xs, dtype=torch.float64))
        layer.load_tracker.record(out.load_ME)
    assert layer.load_tracker.step_load_ME[0].tolist() == [3, 2, 0, 0]
    end_optimizer_step([layer])
    # mean load 5/4: experts 0 and 1 above it (-0.5), 2 and 3 below (+0.5)
    assert layer.router.selection_bias_ME[0].tolist() == [-0.5, -0.5, 0.5, 0.5]
    assert int(layer.load_tracker.step_load_ME.abs().sum()) == 0


def test_the_bias_stays_fp32_when_the_model_is_cast():
    layer = build_moe_layer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=1, router_bias=True))
    layer.router.selection_bias_ME.fill_(1e-3)
    layer.bfloat16()
    assert layer.router.selection_bias_ME.dtype == torch.float32
    assert float(layer.router.selection_bias_ME[0, 0]) == pytest.approx(1e-3, rel=1e-7)
    assert layer.load_tracker.step_load_ME.dtype == torch.long
    assert "router.selection_bias_ME" in layer.state_dict()


# ----------------------------------------------------------------------------- refusals
BAD = [
    (dict(router="expert_chioce"), "MoEConfig.router='expert_chioce' is unknown; use one of"),
    (dict(load_balance="global"), "MoEConfig.load_balance='global' is unknown; use one of 'micro_batch'"),
    (dict(score_func="tanh"), "MoEConfig.score_func='tanh' is unknown"),
    (dict(router_bias=True, router_bias_rate=0.0), "MoEConfig.router_bias_rate=0.0 must be > 0"),
    (dict(router_bias_rate=-1e-3), "MoEConfig.router_bias_rate=-0.001 must be > 0"),
    (dict(router="soft", slots_per_expert=0), "MoEConfig.slots_per_expert=0 must be >= 1"),
    (dict(n_groups=3), "MoEConfig.n_groups=3 must divide num_experts=8"),
    (dict(n_groups=4, topk_groups=5), "MoEConfig.topk_groups=5 exceeds n_groups=4"),
    (dict(top_k=3, n_groups=4, topk_groups=1), "MoEConfig.top_k=3 exceeds the 2 experts that topk_groups=1"),
    (dict(score_func="sigmoid", entropy_local_coef=0.01), "entropy losses assume softmax"),
    (dict(router="threshold", router_bias=True), "router='threshold' with router_bias=True"),
    (dict(router="expert_choice", router_bias=True), "router='expert_choice' with router_bias=True"),
    (dict(router="expert_choice", force_balanced=True), "router='expert_choice' with force_balanced=True"),
    (dict(router="soft", modality_experts=(2, 2)), "router='soft' cannot use modality_experts"),
    (dict(router="soft", router_bias=True, score_func="sigmoid"),
     "router='soft' cannot use router_bias, score_func='sigmoid'"),
    (dict(granularity=3), "MoEConfig.granularity=3 must divide the FFN width ffn_hidden_size=16"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(top_k=3, n_groups=2, topk_groups=1, modality_experts=(2, 2)),
     "a modality-0 token can pick groups holding only 2 experts it may use, fewer than top_k=3"),
    (dict(router="top_p", score_func="sigmoid"), "router='top_p' with score_func='sigmoid'"),
    (dict(router="threshold", score_func="sigmoid"), "router='threshold' with score_func='sigmoid'"),
    (dict(router="expert_choice", renormalize=True), "renormalize=True"),
    (dict(shared_expert=True, num_shared_experts=1), "use num_shared_experts alone"),
]


@pytest.mark.parametrize("fields,message", BAD, ids=[m[:40] for _, m in BAD])
def test_bad_routing_configs_are_refused(fields, message):
    with pytest.raises(ValueError) as err:
        MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, **{"top_k": 1, **fields})
    assert message in str(err.value)


@pytest.mark.parametrize("model,overrides,message", [
    ("moe-clip-tiny", {"moe": {"router": "soft"}}, "model.text.moe: router='soft'"),
    ("moe-clip-tiny", {"moe": {"router": "expert_choice"}}, "model.text.moe: router='expert_choice'"),
    ("coca-tiny", {"decoder": {"moe": {"every": 1, "overrides": {"router": "soft"}}}}, "model.decoder.moe: router"),
    ("moe-clip-tiny", {"vision": {"moe": {"overrides": {"routre": "soft"}}}},
     "model.vision.moe.overrides has unknown fields ['routre']"),
    ("moe-clip-tiny", {"vision": {"moe": {"overrides": {"slots_per_expert": 0, "router": "soft"}}}},
     "model.vision.moe.overrides.slots_per_expert=0 must be >= 1"),
    ("moe-clip-tiny", {"moe": {"load_balance": "global"}}, "model.moe.load_balance='global' is unknown; use one of"),
])
def test_whole_sequence_routers_are_refused_in_causal_towers(model, overrides, message):
    with pytest.raises(ValueError) as err:
        load_model_config(model, overrides)
    assert message in str(err.value)


def test_per_tower_overrides_build_each_towers_router():
    from moe_dist.models import build_model

    cfg = load_model_config("moe-clip-tiny", {"vision": {"moe": {"overrides": {"router": "soft"}}},
                                              "moe": {"load_balance": "sequence"}})
    model = build_model(cfg)
    kinds = {name: type(m.moe).__name__ for name, m in model.named_modules() if hasattr(m, "moe")}
    assert set(v for k, v in kinds.items() if k.startswith("visual")) == {"SoftMoELayer"}
    assert set(v for k, v in kinds.items() if k.startswith("text")) == {"MoELayer"}
    limoe = load_model_config("limoe-tiny", {"moe": {"router": "expert_choice"}})  # bidirectional: allowed
    assert limoe.moe_config(limoe.vision.width, tower="vision").router == "expert_choice"


def test_load_tracker_rows_follow_the_modalities():
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=1, load_balance="global_batch",
                    modality_experts=(2, 2, 0))
    assert LoadTracker(cfg, None).step_load_ME.shape == (3, E)


def test_the_older_shared_expert_stays_one_gelu_ffn():
    """Checkpoints with shared_expert=True were trained with one GELU FFN of ffn_hidden_size, whatever the
    experts' activation: the layer still builds exactly that (same keys and shapes)."""
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=1, activation="swiglu", shared_expert=True)
    mlp = build_moe_layer(cfg).shared_mlp
    assert mlp[0].weight.shape == (H, D) and mlp[2].weight.shape == (D, H) and mlp[1].name == "gelu"
    fine = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=1, activation="swiglu",
                     num_shared_experts=2, granularity=4)
    mlp = build_moe_layer(fine).shared_mlp  # 2 x H/4 wide, SwiGLU's first projection twice that
    assert mlp[0].weight.shape == (2 * 2 * H // 4, D) and mlp[2].weight.shape == (D, 2 * H // 4)


@pytest.mark.parametrize("fields", [
    dict(router="expert_choice", capacity_factor=1.5, modality_experts=(2, 2)),
    dict(router="soft", slots_per_expert=2),
    dict(top_k=2, score_func="sigmoid", renormalize=True, n_groups=4, topk_groups=2, router_bias=True,
         num_shared_experts=1, granularity=2, load_balance="global_batch", capacity_factor=1.0, min_capacity=1),
    dict(top_k=2, load_balance="sequence", dropless=True, modality_experts=(2, 2)),
], ids=["expert_choice", "soft", "deepseek_global", "sequence"])
def test_new_routers_read_nothing_on_the_host(fields):
    """At ep_size 1 with grouped_mm (the accelerator path) a forward and backward read no device value on
    the host, losses included, with padding (and modality) given; the output is the loop backend's in fp64."""
    from moe_dist.host_reads import HostReads

    torch.manual_seed(4)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, expert_backend="grouped_mm", **fields)
    layer = build_moe_layer(cfg)
    x = torch.randn(4, 6, D, requires_grad=True)
    padding = torch.zeros(4, 6, dtype=torch.bool)
    padding[3, 2:] = True
    modality = torch.tensor([0, 1, 0, 1])[:, None].expand(4, 6) if cfg.uses_modality else None
    with HostReads() as reads:
        out = layer(x, modality=modality, padding_mask=padding)
        (out.output.square().sum() + out.aux_loss).backward()
    assert reads.count == 0, reads.reads
    ref = build_moe_layer(cfg.replace(expert_backend="loop")).double()
    ref.load_state_dict(layer.state_dict())
    want = ref(x.detach().double(), modality=modality, padding_mask=padding).output
    assert rel_err(out.output.double(), want) < 1e-5


@pytest.mark.parametrize("fields", [dict(router="expert_choice"), dict(router="soft"),
                                    dict(load_balance="sequence"), dict(load_balance="global_batch")],
                         ids=["expert_choice", "soft", "sequence", "global_batch"])
@pytest.mark.parametrize("shape", [(0, D), (2, 0, D), (0, 3, D)])
def test_empty_calls(fields, shape):
    """No tokens (or sequences of no tokens): an empty output, a zero aux loss, and a backward."""
    layer = build_moe_layer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=1, **fields))
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    (out.output.sum() + out.aux_loss).backward()
    assert out.output.shape == shape and float(out.aux_loss) == 0.0 and x.grad.shape == shape


def test_a_soft_moe_tower_under_a_model_wide_global_batch_loss_tracks_nothing():
    """Soft MoE has no routing loss: a model-wide load_balance=global_batch builds no load tracker there,
    so the step's update passes it by (the 2-rank run in tests/integration/test_routing_train.py too)."""
    layer = build_moe_layer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, router="soft",
                                      load_balance="global_batch"))
    assert layer.load_tracker is None and not layer.communicates
    out = layer(torch.randn(2, 5, D))
    assert out.load_ME is None
    end_optimizer_step([layer])
