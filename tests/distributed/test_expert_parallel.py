"""ep_size=2 on 2 ranks equals ep_size=1 on one process: outputs and gradients, fp64; and the host reads
per call (forward and backward) are the dispatcher's promise: one for the counted exchange (dropless,
evaluation), none for the fixed exchange (capacity in training).

The single-process reference runs the full layer (all E experts) on each rank's tokens separately,
since capacity is per rank (a rank's batch is its routing group). Expert gradients of the EP layer
collect tokens from every rank, so they are compared with the reference's gradients summed over the
ranks' token sets. The fixed exchange needs the same token count on both ranks; uneven counts run it in
evaluation (counted exchange, eval capacity).
"""

import pytest
import torch

from helpers.harness import run_ranks
from helpers.reference import rel_err
from moe_dist.host_reads import HostReads
from moe_dist.moe import MoEConfig, MoELayer

D, H, E = 8, 16, 4
TOKEN_COUNTS = {
    "uneven": (7, 13),
    "one_token_rank": (1, 9),  # with k=1, rank 0 sends nothing to 3 of the 4 experts
    "empty_rank": (0, 11),
    "even": (12, 12),
}
EXPERT_PARAMS = ("w1", "b1", "w2", "b2")


def _grads(layer, x, weight):
    out = layer(x)
    loss = (out.output * weight).sum() + out.aux_loss
    params = [x, layer.router.proj.weight] + [getattr(layer.experts, n) for n in EXPERT_PARAMS]
    return out, torch.autograd.grad(loss, params, allow_unused=True)


def _compare_ep_to_single(rank, world_size, dropless):
    failures = []
    for case, counts in TOKEN_COUNTS.items():
        for k in (1, 2):
            torch.manual_seed(7)  # identical reference weights on every rank
            cfg = MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, top_k=k, dropless=dropless,
                            capacity_factor=0.75, min_capacity=1, entropy_local_coef=0.01)
            ref = MoELayer(cfg).double()
            ep = MoELayer(cfg, ep_size=2).double()
            local = slice(rank * ep.num_local_experts, (rank + 1) * ep.num_local_experts)
            with torch.no_grad():
                ep.router.load_state_dict(ref.router.state_dict())
                for name in EXPERT_PARAMS:
                    getattr(ep.experts, name).copy_(getattr(ref.experts, name)[local])
            gen = torch.Generator().manual_seed(11)
            xs = [torch.randn(n, D, generator=gen, dtype=torch.float64) for n in counts]
            weights = [torch.randn(n, D, generator=gen, dtype=torch.float64) for n in counts]

            training = dropless or case == "even"  # capacity in training: the fixed exchange, equal T
            ref.train(training)
            ep.train(training)
            x = xs[rank].clone().requires_grad_()
            with HostReads() as reads:
                out, got = _grads(ep, x, weights[rank])
            # the fixed exchange reads nothing, the counted one its split sizes; fp64 runs the loop backend,
            # which reads its offsets inside its forward and backward operators (a CPU path)
            expected_reads = (0 if training and not dropless else 1) + 2
            if reads.count != expected_reads:
                failures.append(f"{case} k={k}: {reads.count} host reads {reads.reads}, expected {expected_reads}")
            ref_runs = [_grads(ref, xs[r].clone().requires_grad_(), weights[r]) for r in range(world_size)]
            ref_out, want = ref_runs[rank]
            checks = {"output": (out.output, ref_out.output), "grad_x": (got[0], want[0]),
                      "grad_router": (got[1], want[1])}
            for i, name in enumerate(EXPERT_PARAMS):
                summed = sum(run[1][2 + i] for run in ref_runs)
                checks[f"grad_{name}"] = (got[2 + i], summed[local])
            for name, (a, b) in checks.items():
                err = rel_err(a, b) if b.numel() and b.norm() > 0 else float((a - b).abs().sum())
                if err > 1e-12:
                    failures.append(f"{case} k={k} {name}: rel err {err:.3g}")
            for name in ("tokens_per_expert", "dropped_fraction"):
                if not torch.equal(out.stats[name], ref_out.stats[name]):
                    failures.append(f"{case} k={k} stats {name}")
    if not dropless:  # no tokens and min_capacity 0: capacity 0, and still every rank exchanges
        empty = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=H, num_experts=E, min_capacity=0), ep_size=2)
        x = torch.randn(0, D, requires_grad=True)
        out = empty(x)
        (out.output.sum() + out.aux_loss).backward()
        if out.output.shape != (0, D) or x.grad.shape != (0, D):
            failures.append(f"no tokens, min_capacity 0: output {tuple(out.output.shape)}")
    return failures


@pytest.mark.world_size(2)
@pytest.mark.parametrize("dropless", [True, False], ids=["dropless", "capacity"])
def test_ep2_matches_single_process(dropless):
    failures = run_ranks(_compare_ep_to_single, world_size=2, args=(dropless,))
    assert failures == [[], []]
