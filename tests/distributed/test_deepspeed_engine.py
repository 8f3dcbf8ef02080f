"""deepspeed.initialize with ZeRO-1/2 and ep_size=2 on 2 ranks treats MoELayer's experts as experts."""

import os

import pytest
import torch
from torch import nn

from helpers.harness import run_ranks

D = 16


class ToyModel(nn.Module):
    def __init__(self, ep_size):
        super().__init__()
        from moe_dist.moe import MoEConfig, MoELayer

        self.inp = nn.Linear(8, D)
        self.moe = MoELayer(MoEConfig(hidden_size=D, ffn_hidden_size=32, num_experts=4, top_k=2, dropless=True),
                            ep_size=ep_size)
        self.out = nn.Linear(D, 1)

    def forward(self, x):
        moe = self.moe(self.inp(x))
        return self.out(moe.output).square().mean() + moe.aux_loss


def _train_save_load(rank, world_size, stage, ckpt_dir):
    import deepspeed
    import deepspeed.comm as ds_comm
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    torch.manual_seed(0)  # same non-expert init on both ranks; experts then differ per rank
    model = ToyModel(ep_size=2)
    with torch.no_grad():
        model.moe.experts.w1.add_(rank)  # make "each rank's experts are its own" observable
    expert_init = model.moe.experts.w1.detach().clone()
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "params"})
    assert any(g.get("moe") for g in groups)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 6, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    assert engine.has_moe_layers

    gen = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        loss = engine(torch.randn(6, 8, generator=gen))
        engine.backward(loss)
        engine.step()

    shared = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" not in n}
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
    gathered = [None] * world_size
    ds_comm.all_gather_object(gathered, {"shared": shared, "experts": experts})
    for name, value in shared.items():
        assert torch.equal(value, gathered[1 - rank]["shared"][name]), f"non-expert {name} differs across ranks"
    for name, value in experts.items():
        assert not torch.equal(value, gathered[1 - rank]["experts"][name]), f"expert {name} equal on both ranks"
    assert not torch.equal(experts["moe.experts.w1"], expert_init), "experts were not trained"
    # each rank's experts stayed near their own init (+rank offset), not averaged with the other rank
    assert float((experts["moe.experts.w1"] - expert_init).abs().max()) < 0.2

    engine.save_checkpoint(ckpt_dir, tag="step3")
    ds_comm.barrier()
    loss = engine(torch.randn(6, 8, generator=gen))
    engine.backward(loss)
    engine.step()
    assert not torch.equal(model.moe.experts.w1, experts["moe.experts.w1"])
    path, _ = engine.load_checkpoint(ckpt_dir, tag="step3")
    assert path is not None
    for name, p in model.named_parameters():
        want = shared.get(name, experts.get(name))
        assert torch.equal(p.detach(), want), f"{name} not restored exactly"
    return sorted(os.listdir(os.path.join(ckpt_dir, "step3")))


@pytest.mark.world_size(2)
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_with_expert_parallel(stage, tmp_path):
    files = run_ranks(_train_save_load, world_size=2, args=(stage, str(tmp_path)))[0]
    # one file per global expert, written by the rank that owns it
    for expert in range(4):
        assert f"layer_0_expert_{expert}_mp_rank_00_model_states.pt" in files
    assert "mp_rank_00_model_states.pt" in files
