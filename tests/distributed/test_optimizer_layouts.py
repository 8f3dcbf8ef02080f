"""Adam's state survives a layout change (issue 26, item 2): a checkpoint taken at one (world size, ep_size,
ZeRO stage) resumes at another with its master weights, moments and step count.

Each phase runs real ranks through the trainer's own pieces (``Trainer``, ``Resumer``, ``checkpoint.save``)
and feeds every step the same *global* batch, each rank its slice, so that runs of different world sizes
see the same data. The contrastive loss is global (gathered with gradients, local rows: the ranks' mean is
the global batch's loss); the MoE auxiliary losses are computed per rank, so their sum depends on how the
batch is split over ranks: they are off here (coefficients 0), and routing is dropless, so that the same
global batch gives the same gradient at every layout.

Checks: (1) right after the resume, every parameter's master weights, moments and step equal what the
saving run held (exactly); (2) after K more steps the parameters equal those of the run that went on at
the old layout (fp32 tolerance); (3) a weights-only resume (fresh moments) ends measurably elsewhere, so
(2) can fail.
"""

import numpy as np
import pytest
import torch

from helpers.harness import run_ranks
from helpers.train import RUN_CONFIG, make_synth

STEPS_BEFORE, STEPS_AFTER, GLOBAL_BATCH = 3, 2, 16
KEYS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=200)


def _sets(synth, out, world, ep_size, zero, precision="fp32"):
    return {"data.train": str(synth / "train"), "data.val": str(synth / "val"),
            "data.tokenizer": str(synth / "tok.model"),
            "data.workers": 0, "output_dir": str(out), "logging.progress": "false", "logging.tensorboard": "false",
            "steps": 100, "ep_size": ep_size, "zero_stage": zero, "precision": precision,
            "batch.micro_batch": GLOBAL_BATCH // world, "model.moe.dropless": "true",
            "model.moe.load_balance_coef": 0, "model.moe.z_loss_coef": 0, "optimizer.lr": 3e-3,
            "schedule.warmup_steps": 1}


def _global_batch(model_cfg, step):
    from helpers.data import model_batch

    return model_batch(model_cfg, GLOBAL_BATCH, seed=100 + step)


def _full_state(trainer):
    """name -> {key: this rank's rows (fp32)}, plus the step, read back through DeepSpeed's getters."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt, out, steps = trainer.engine.optimizer, {}, set()
    named = [(n, p) for n, p in trainer.engine.module.named_parameters() if p.requires_grad]
    if hasattr(opt, "bit16_groups"):  # DeepSpeed links only the first group's fragments to Adam's state
        from moe_dist.engine.optim_state import _link_fragments

        _link_fragments(opt)
    if isinstance(opt, FP16_UnfusedOptimizer):
        masters = {id(p): m for lp, fp in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(lp, fp)}
    for name, p in named:
        if hasattr(p, "_hp_mapping"):  # ZeRO 1/2: collective over the parameter's data-parallel group
            out[name] = {"fp32": safe_get_full_fp32_param(p).float(),
                         **{k: safe_get_full_optimizer_state(p, k).float() for k in KEYS[1:]}}
            steps |= {float(s["step"]) for s in opt.optimizer.state.values()}
        elif isinstance(opt, FP16_UnfusedOptimizer):
            master = masters[id(p)]
            state = opt.optimizer.state[master]
            out[name] = {"fp32": master.clone(), **{k: state[k].clone() for k in KEYS[1:]}}
            steps.add(float(state["step"]))
        else:
            state = opt.state[p]
            out[name] = {"fp32": p.detach().float().clone(), **{k: state[k].clone() for k in KEYS[1:]}}
            steps.add(float(state["step"]))
    return {"params": out, "steps": sorted(steps)}


def _phase(rank, world, sets, resume, weights_only, save_after, steps):
    """Train ``steps`` steps from ``resume`` on the fixed global batches, saving after ``save_after`` of
    them; returns the state right after the resume and at the save, and the weights at the end."""
    from deepspeed.utils import groups

    from moe_dist.data import Batch
    from moe_dist.distributed import detect_env
    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.trainer import Trainer

    cfg = load_run_config(RUN_CONFIG, [f"{k}={v}" for k, v in sets.items()])
    cfg.validate(world)
    trainer = Trainer(cfg, detect_env(), resume=resume)
    try:
        trainer.resumer.lock()
        at = trainer.resumer.resume(resume, weights_only, trainer.engine, trainer.scheduler, trainer.loader,
                                    print=lambda line: None)
        trainer.run_id, trainer.step = at.run_id, at.step
        result = {"resumed": _full_state(trainer) if at.step and not weights_only else None, "step": at.step}
        if save_after == 0:  # the state as resumed, saved again at this layout
            result["checkpoint"] = trainer.save()
        B = cfg.batch.micro_batch
        for i in range(steps):
            images, tokens = _global_batch(trainer.model_cfg, trainer.step)
            out = trainer._forward(Batch(images[rank * B:(rank + 1) * B], tokens[rank * B:(rank + 1) * B]))
            trainer.engine.backward(out.loss)
            if trainer._clip is not None:  # as Trainer.train does (ZeRO-0 fp32 clips in the trainer)
                trainer._clip(trainer.engine.module.parameters(), cfg.grad_clip)
            trainer.engine.step()
            trainer.step += 1
            if i + 1 == save_after:
                result["saved"] = _full_state(trainer)
                result["checkpoint"] = trainer.save()
        result["final"] = {n: p.detach().float().clone() for n, p in trainer.engine.module.named_parameters()}
        result["ep_rank"] = groups._get_expert_parallel_rank(f"ep_size_{cfg.ep_size}")
        return _numpy(result)  # tensors would travel as shared memory that dies with the rank
    finally:
        trainer.close()


def _numpy(value):
    if isinstance(value, dict):
        return {k: _numpy(v) for k, v in value.items()}
    return value.detach().float().cpu().numpy() if torch.is_tensor(value) else value


def _global(results, field):
    """Per-rank rows -> global tensors: expert tensors ([L, ...] per ep rank) are concatenated in ep-rank
    order, every other tensor is taken from rank 0 (checked equal on every rank)."""
    results = {r: _tensors(v) for r, v in enumerate(results)}
    merged = {}
    for name in results[0][field] if field == "final" else results[0][field]["params"]:
        def get(r):
            return results[r][field][name] if field == "final" else results[r][field]["params"][name]

        by_ep = {}
        for r in sorted(results):
            by_ep.setdefault(results[r]["ep_rank"], get(r))
            if ".experts." not in name:  # replicated: every rank holds the same (ZeRO-0 ranks >= 1 too)
                assert _equal(get(r), by_ep[0]), (name, r)
        if ".experts." in name:
            if isinstance(by_ep[0], dict):
                merged[name] = {k: torch.cat([by_ep[e][k] for e in sorted(by_ep)]) for k in by_ep[0]}
            else:
                merged[name] = torch.cat([by_ep[e] for e in sorted(by_ep)])
        else:
            merged[name] = by_ep[0]
    return merged


def _tensors(value):
    if isinstance(value, dict):
        return {k: _tensors(v) for k, v in value.items()}
    return torch.from_numpy(value) if isinstance(value, np.ndarray) else value


def _assert_carried(first, moved):
    """1. What the resume put in is exactly what the saving run held, element for element."""
    saved, resumed = _global(first, "saved"), _global(moved, "resumed")
    assert sorted(saved) == sorted(resumed)
    for name in saved:
        for key in KEYS:
            assert torch.equal(saved[name][key], resumed[name][key]), (name, key)
    assert moved[0]["step"] == STEPS_BEFORE
    assert first[0]["saved"]["steps"] == moved[0]["resumed"]["steps"] == [float(STEPS_BEFORE)]


def _equal(a, b):
    if isinstance(a, dict):
        return all(torch.equal(a[k], b[k]) for k in a)
    return torch.equal(a, b)


def _max_rel(a, b):
    return max(((x - y).norm() / y.norm().clamp_min(1e-12)).item() for x, y in zip(a, b))


@pytest.mark.parametrize("before, after, control, via_reshard", [
    # 4 ranks ep4 ZeRO-2 -> 2 ranks ep2 ZeRO-1 (the case), with a fresh-moments control run
    ((4, 4, 2), (2, 2, 1), True, False),
    # 2 -> 4 ranks, ep 2 -> 1, ZeRO 0 (fp32 master from the model files) -> 2, through reshard --with-optimizer
    ((2, 2, 0), (4, 1, 2), False, True),
], ids=["w4-ep4-z2_to_w2-ep2-z1", "w2-ep2-z0_to_reshard_to_w4-ep1-z2"])
def test_adam_state_survives_a_layout_change(synth, tmp_path, before, after, control, via_reshard):
    (w0, ep0, z0), (w1, ep1, z1) = before, after
    first = run_ranks(_phase, w0, args=(_sets(synth, tmp_path / "a", w0, ep0, z0), "none", False,
                                        STEPS_BEFORE, STEPS_BEFORE + STEPS_AFTER), timeout=400)
    checkpoint = first[0]["checkpoint"]
    if via_reshard:
        from moe_dist.cli.reshard import reshard

        checkpoint = reshard(checkpoint, str(tmp_path / "resharded"), ep1, w1, with_optimizer=True)
    moved = run_ranks(_phase, w1, args=(_sets(synth, tmp_path / "b", w1, ep1, z1), checkpoint, False, -1,
                                        STEPS_AFTER), timeout=400)
    _assert_carried(first, moved)
    # 2. K more steps on the same global batches: the same parameters as the run that stayed
    stayed, went = _global(first, "final"), _global(moved, "final")
    names = sorted(stayed)
    # fp32 tolerance: summation order differs between layouts (1e-7 relative per gradient), and Adam
    # divides by sqrt(v): where the true gradient is zero (the key part of attention's in_proj_bias: the
    # softmax ignores it) it turns rounding noise into lr-sized steps; that part sets the bound (2.7e-5)
    went_by = {n: _max_rel([went[n]], [stayed[n]]) for n in names}
    assert max(went_by.values()) < 1e-4, sorted(went_by.items(), key=lambda item: -item[1])[:3]
    if not control:
        return
    # 3. ... and fresh moments end elsewhere (the median tensor 6% apart after two steps): (2) can fail
    fresh = run_ranks(_phase, w1, args=(_sets(synth, tmp_path / "c", w1, ep1, z1), checkpoint, True, -1,
                                        STEPS_AFTER), timeout=400)
    restarted = _global(fresh, "final")
    fresh_by = sorted(_max_rel([restarted[n]], [stayed[n]]) for n in names)
    assert fresh_by[len(fresh_by) // 2] > 1e-2, fresh_by


def test_bf16_master_weights_and_moments_survive_w4_ep2_zero2_to_w2_ep1_zero0(synth, tmp_path):
    """bf16: the fp32 master copy (finer than the bf16 weights) carries over too, from ZeRO-2's partitions
    (4 ranks at ep_size 2: each expert's state split over its 2 expert-data-parallel ranks) into ZeRO-0's
    FP16 optimizer (an fp32 master per parameter) on 2 ranks at ep_size 1; saved there, its files read back
    (the ZeRO-0 bf16 reader) give the same state again."""
    first = run_ranks(_phase, 4, args=(_sets(synth, tmp_path / "a", 4, 2, 2, "bf16"), "none", False,
                                       STEPS_BEFORE, STEPS_BEFORE), timeout=400)
    moved = run_ranks(_phase, 2, args=(_sets(synth, tmp_path / "b", 2, 1, 0, "bf16"), first[0]["checkpoint"],
                                       False, 0, 0), timeout=400)
    _assert_carried(first, moved)
    saved = _global(first, "saved")
    weights = _global(moved, "final")  # the bf16 weights are the master rounded
    assert all(torch.equal(weights[n], saved[n]["fp32"].bfloat16().float()) for n in saved)
    assert any(not torch.equal(saved[n]["fp32"], weights[n]) for n in saved)  # so the master is not them
    from moe_dist.engine.optim_state import OptimizerStates
    from moe_dist.models import load_model_config

    again = OptimizerStates.from_checkpoint(moved[0]["checkpoint"], load_model_config("moe-clip-tiny", {}))
    assert again.step == STEPS_BEFORE
    for name in saved:
        for key in KEYS:
            assert torch.equal(again.read(name, key), saved[name][key]), (name, key)
