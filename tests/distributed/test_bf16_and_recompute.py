"""2 ranks, ep_size=2: bf16 training under ZeRO-2 (router and losses fp32, loss falls, a checkpoint round
trip continues bit for bit), and activation checkpointing whose recomputation re-runs the all-to-alls
gives the gradients of the plain model; ZeRO-0 fp32 clipping in the trainer equals DeepSpeed's."""

import pytest
import torch

from helpers.data import model_batch
from helpers.harness import run_ranks


def _engine(world_size, *sets, trainer_clips=False):
    import deepspeed

    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.optim import build_optimizer
    from moe_dist.models import build_model
    from moe_dist.models.moe_blocks import configure_blocks

    cfg = load_run_config(None, ["model.name=moe-clip-tiny", "ep_size=2", "batch.micro_batch=8",
                                 "optimizer.lr=0.003", "optimizer.weight_decay=0", *sets])
    torch.manual_seed(0)  # the same dense init on both ranks
    model = build_model(cfg.model_config(), ep_size=2)
    configure_blocks(model, cfg.activation_checkpointing)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                      config=cfg.deepspeed_config(world_size, trainer_clips))
    return engine, model.cfg


def _bf16_train_resume(rank, world_size, ckpt_dir):
    from moe_dist.models.loss import ContrastiveLoss
    from moe_dist.models.moe_blocks import moe_mlps

    engine, cfg = _engine(world_size, "precision=bf16", "zero_stage=2")
    assert engine.bfloat16_enabled() and engine.zero_optimization_stage() == 2
    router_dtypes = set()
    for m in moe_mlps(engine.module):
        m.moe.router.register_forward_hook(lambda mod, args, out: router_dtypes.add((out.logits_TE.dtype,
                                                                                     out.weights_TK.dtype)))
    loss_fn = ContrastiveLoss(cfg.loss, rank, world_size)
    images, text = model_batch(cfg, n=8, seed=100 + rank)  # each rank its own data

    def step():
        out = engine(images.to(torch.bfloat16), text)
        result = loss_fn(out)
        engine.backward(result.total)
        engine.step()
        return out, result

    losses = []
    for _ in range(8):
        out, result = step()
        losses.append(float(result.total.detach()))
    assert out.image_features.dtype == torch.bfloat16  # the towers run in bf16 ...
    assert router_dtypes == {(torch.float32, torch.float32)}  # ... the routers in fp32
    assert result.total.dtype == torch.float32 and out.moe.aux_loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in result.parts.values())
    assert losses[-1] < 0.8 * losses[0], losses  # one fixed batch per rank: the loss must fall

    engine.save_checkpoint(ckpt_dir, tag="s8")
    after = [float(step()[1].total.detach()) for _ in range(2)]
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    path, _ = engine.load_checkpoint(ckpt_dir, tag="s8")
    assert path is not None
    again = [float(step()[1].total.detach()) for _ in range(2)]
    assert again == after  # bf16 weights, fp32 master weights and Adam moments all restored
    for n, p in engine.module.named_parameters():
        assert torch.equal(p.detach(), params[n]), n
    return losses


@pytest.mark.world_size(2)
def test_bf16_ep2_zero2_trains_and_resumes(tmp_path):
    losses = run_ranks(_bf16_train_resume, world_size=2, args=(str(tmp_path),))
    assert losses[0] != losses[1]  # different data per rank, the same model


def _grads(rank, world_size, mode, capacity):
    from moe_dist.models.loss import ContrastiveLoss

    engine, cfg = _engine(world_size, "zero_stage=0", f"activation_checkpointing={mode}",
                          f"model.moe.dropless={str(not capacity).lower()}")
    images, text = model_batch(cfg, n=8, seed=100 + rank)  # each rank its own data
    torch.manual_seed(7)
    result = ContrastiveLoss(cfg.loss, rank, world_size)(engine(images, text))
    result.total.backward()  # plain autograd: the gradients before any reduction
    return {n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None}


def _compare_recompute(rank, world_size):
    for capacity in (False, True):  # dropless, then capacity drops (both in one start of the ranks)
        plain = _grads(rank, world_size, "none", capacity)
        recomputed = _grads(rank, world_size, "blocks", capacity)
        assert plain.keys() == recomputed.keys() and any("experts" in n for n in plain)
        for n in plain:
            torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-4, atol=1e-6, msg=f"{n} capacity={capacity}")
    return len(plain)


@pytest.mark.world_size(2)
def test_block_checkpointing_with_all_to_all_keeps_gradients():
    run_ranks(_compare_recompute, world_size=2)


def _clip_both_ways(rank, world_size):
    """Two ZeRO-0 fp32 engines from the same init and data: DeepSpeed clips one, ``clip_grad_norm`` the
    other (as the trainer does). A clip threshold far below the norm makes every step clip."""
    from deepspeed.runtime.utils import clip_grad_norm_ as deepspeed_clip

    from moe_dist.engine.optim import clip_grad_norm
    from moe_dist.models.loss import ContrastiveLoss

    runs = []
    for ours in (False, True):
        engine, cfg = _engine(world_size, "zero_stage=0", "grad_clip=0.01", trainer_clips=ours)
        assert engine.gradient_clipping() == (0.0 if ours else 0.01)
        loss_fn = ContrastiveLoss(cfg.loss, rank, world_size)
        images, text = model_batch(cfg, n=8, seed=100 + rank)  # each rank its own data
        norms = []
        for _ in range(2):
            engine.backward(loss_fn(engine(images, text)).total)
            if ours:
                norms.append(float(clip_grad_norm(engine.module.parameters(), 0.01)))
            else:  # DeepSpeed's norm (it keeps none on this path); a huge threshold leaves the gradients
                norms.append(float(deepspeed_clip(engine.module.parameters(), max_norm=1e30)))
            engine.step()
        runs.append((norms, {n: p.detach().clone() for n, p in engine.module.named_parameters()}))
    (ds_norms, ds_params), (our_norms, our_params) = runs
    assert min(ds_norms) > 0.1  # clipping really happened
    assert our_norms == pytest.approx(ds_norms, rel=1e-5)
    assert any("experts" in n for n in ds_params)
    for n in ds_params:
        torch.testing.assert_close(our_params[n], ds_params[n], rtol=1e-5, atol=1e-7, msg=n)
    return ds_norms


@pytest.mark.world_size(2)
def test_trainer_clipping_matches_deepspeed():
    """ep_size=2: expert gradients differ per rank, and both norms average over the data-parallel group."""
    norms = run_ranks(_clip_both_ways, world_size=2)
    assert norms[0] == pytest.approx(norms[1], rel=1e-6)  # one global norm on every rank
