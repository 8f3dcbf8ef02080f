"""The routing methods of issue 27 on 2 real ranks:

1. ep_size=2 equals ep_size=1 (both data-parallel over the 2 ranks, each rank routing its own tokens) for
   Expert-Choice, Soft MoE, sigmoid + group-limited + biased top-k with shared fine-grained experts, and
   the global-batch and sequence balance losses: outputs, aux losses and gradients in fp64. The ep_size=1
   layer holds every expert, so its expert gradients are summed over the ranks before comparing.
2. The selection bias moves once per optimizer step by the load of every micro batch on every rank,
   against a hand-worked update.
"""

import pytest
import torch

from helpers.harness import run_ranks
from helpers.reference import rel_err
from moe_dist.moe import MoEConfig, build_moe_layer, end_optimizer_step, record_loads

D, H, E = 8, 16, 4
EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
CASES = {
    "expert_choice": dict(router="expert_choice", capacity_factor=1.5),
    "soft": dict(router="soft", slots_per_expert=2),
    "deepseek": dict(top_k=2, score_func="sigmoid", renormalize=True, n_groups=2, topk_groups=1, router_bias=True,
                     granularity=2, num_shared_experts=1, capacity_factor=1.0, min_capacity=1),
    "global_batch": dict(top_k=1, dropless=True, load_balance="global_batch"),
    "sequence": dict(top_k=2, load_balance="sequence", capacity_factor=1.0, min_capacity=1),
}


def _compare(rank, world_size, case, training):
    import deepspeed.comm as dist

    torch.manual_seed(7)
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, **CASES[case])
    one, two = build_moe_layer(cfg).double(), build_moe_layer(cfg, ep_size=2).double()
    local = slice(rank * two.num_local_experts, (rank + 1) * two.num_local_experts)
    with torch.no_grad():
        if cfg.router_bias:
            one.router.selection_bias_ME.copy_(0.2 * torch.randn_like(one.router.selection_bias_ME))
        state = one.state_dict()
        for name in EXPERT_PARAMS:  # DeepSpeed's per-expert keys: this rank's experts, renumbered
            for i in range(E):
                state.pop(f"deepspeed_moe.experts.deepspeed_experts.{i}.{name}")
            stacked = getattr(one.experts, name)[local]
            for i in range(two.num_local_experts):
                state[f"deepspeed_moe.experts.deepspeed_experts.{i}.{name}"] = stacked[i]
        two.load_state_dict(state)
    one.train(training)
    two.train(training)
    # sequences of 6 tokens; in evaluation the ranks hold different counts (the counted exchange)
    B = 3 if training else 2 + rank
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(B, 6, D, generator=gen, dtype=torch.float64)
    weight = torch.randn(B, 6, D, generator=gen, dtype=torch.float64)
    padding = torch.zeros(B, 6, dtype=torch.bool)
    padding[-1, 4:] = True
    results = []
    for layer in (one, two):
        xi = x.clone().requires_grad_()
        out = layer(xi, padding_mask=padding)
        loss = (out.output * weight).sum() + out.aux_loss
        params = [xi] + [p for n, p in layer.named_parameters() if not n.startswith("experts.")]
        experts = [getattr(layer.experts, n) for n in EXPERT_PARAMS]
        grads = torch.autograd.grad(loss, params + experts)
        results.append((out, grads[:len(params)], grads[len(params):]))
    (out1, g1, e1), (out2, g2, e2) = results
    failures = []
    checks = {"output": (out2.output, out1.output), "aux_loss": (out2.aux_loss, out1.aux_loss)}
    checks.update({f"losses[{k}]": (out2.losses[k], out1.losses[k]) for k in out1.losses})
    checks.update({f"grad {i}": (a, b) for i, (a, b) in enumerate(zip(g2, g1))})
    for name, got, want in zip(EXPERT_PARAMS, e2, e1):
        dist.all_reduce(want)  # every rank's tokens reach an expert-parallel expert
        checks[f"grad {name}"] = (got, want[local])
    for name, (a, b) in checks.items():
        err = rel_err(a, b) if b.norm() > 0 else float((a - b).abs().sum())
        if err > 1e-12:
            failures.append(f"{case} training={training} {name}: rel err {err:.3g}")
    return failures


@pytest.mark.world_size(2)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_ep2_matches_ep1_for_each_routing_method(training):
    assert run_ranks(_all_cases_entry, world_size=2, args=(training,)) == [[], []]


def _all_cases_entry(rank, world_size, training):
    return [f for case in CASES for f in _compare(rank, world_size, case, training)]


def _bias_step(rank, world_size):
    """Logits (a, -a, 0, 0): a token (a, 0) picks expert 0 when a >= 1 and expert 1 when a <= -1.
    Micro batches (rank 0): [1, 2, 3] then [] ; (rank 1): [-1] then [-2, -3, -4, -5].
    Step load: expert 0: 3, expert 1: 5, experts 2, 3: 0; mean 2 -> steps (-, -, +, +) x rate.
    Rank 0 alone (3, 0, 0, 0) would give (-, +, +, +); the first micro batches alone (3, 1, 0, 0), mean 1,
    would give (-, 0, +, +): only every rank and every micro batch together give the hand-worked step."""
    cfg = MoEConfig(hidden_size=2, ffn_hidden_size=4, num_experts=4, top_k=1, router_bias=True, router_bias_rate=0.25,
                    load_balance_coef=0.0, dropless=True)
    layer = build_moe_layer(cfg).double()
    with torch.no_grad():
        layer.router.proj.weight.copy_(torch.tensor([[1.0, 0], [-1.0, 0], [0, 0], [0, 0]], dtype=torch.float64))
    micro = {0: [[1, 2, 3], []], 1: [[-1], [-2, -3, -4, -5]]}[rank]
    for values in micro:
        x = torch.tensor([[float(a), 0.0] for a in values], dtype=torch.float64).reshape(-1, 2)
        out = layer(x)
        record_loads({"layer": layer}, {"layer": out.load_ME})
    end_optimizer_step([layer])
    return layer.router.selection_bias_ME[0].tolist()


@pytest.mark.world_size(2)
def test_bias_moves_by_the_load_of_every_micro_batch_and_rank():
    assert run_ranks(_bias_step, world_size=2) == [[-0.25, -0.25, 0.25, 0.25]] * 2
