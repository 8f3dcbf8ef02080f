"""compile=model inside DeepSpeed's engine on 2 ranks: the engine's forward pre-hook (its timers) stays out
of the graph, so fullgraph holds at ep_size 1; at ep_size 2 the MoE layers run eager between graphs (their
all-to-alls). A training step's loss and gradients equal the eager model's. Dynamo's "eager" backend:
this checks tracing and the engine, not inductor's kernels (tests/unit/test_compile.py runs those)."""

import functools

import pytest
import torch

from helpers.harness import run_ranks
from helpers.reference import rel_err


def _step(rank, world_size, ep_size, compile):
    import deepspeed

    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.optim import build_optimizer
    from moe_dist.models import build_loss, create_model
    from moe_dist.models.moe_blocks import configure_blocks

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = load_run_config(None, ["zero_stage=0", "batch.micro_batch=4", f"ep_size={ep_size}", "data.train=x"])
    model = create_model("moe-clip-tiny", ep_size=ep_size).train()
    configure_blocks(model, compile=compile)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                      config=cfg.deepspeed_config(world_size))
    gen = torch.Generator().manual_seed(rank)
    mc = model.cfg
    images = torch.randn(4, 3, mc.vision.image_size, mc.vision.image_size, generator=gen)
    text = torch.randint(4, mc.text.vocab_size, (4, mc.text.context_length), generator=gen)
    text[:, 9] = mc.text.eos_id
    loss = build_loss(mc, rank, world_size)(engine(images, text)).total
    engine.backward(loss)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss), grads


def _compare(rank, world_size):
    torch.compile = functools.partial(torch.compile, backend="eager")  # this spawned rank only
    failures = []
    for ep_size in (1, 2):
        (loss, grads), (loss_c, grads_c) = (_step(rank, world_size, ep_size, c) for c in ("none", "model"))
        if abs(loss_c - loss) > 1e-5 * abs(loss):
            failures.append(f"ep_size {ep_size}: loss {loss_c} != {loss}")
        if grads.keys() != grads_c.keys():
            failures.append(f"ep_size {ep_size}: gradients of {sorted(grads.keys() ^ grads_c.keys())[:3]}")
        for name in grads.keys() & grads_c.keys():  # relative to the gradient's norm: the text runs at full
            err = rel_err(grads_c[name], grads[name])  # length compiled, trimmed eager (other sums' order)
            if err > 1e-5:
                failures.append(f"ep_size {ep_size}: gradient of {name}, relative error {err:.3g}")
    return failures


@pytest.mark.world_size(2)
def test_compiled_model_trains_in_the_engine_with_and_without_expert_parallelism():
    assert run_ranks(_compare, world_size=2, timeout=400) == [[], []]
