"""The planner's exact figures held against real DeepSpeed runs on 2 and 8 ranks (CPU, gloo).

One 2-rank run loops over the layouts (so the suite pays for one process start):
- state sizes: ZeRO 0/1/2 x ep_size 1/2 for moe-clip-tiny (and ZeRO 0/2 for limoe-tiny); the bytes of
  the parameter, gradient and optimizer-state tensors DeepSpeed holds after ``deepspeed.initialize``
  and one step equal ``planner.state_bytes`` for that rank;
- all-to-all bytes: with ep_size 2, the bytes the dispatch sends (``TokenDispatcher.traffic``) in one
  step equal the planner's figure: from that step's token counts when dropless, and the fixed
  capacity-sized blocks in capacity mode (also with forced-balanced routing, where every expert fills,
  and with an Expert-Choice or Soft MoE image tower beside the top-1 text tower).
"""

import pytest
import torch

from helpers.harness import run_ranks

B = 4

# (model, zero_stage, ep_size, moe overrides): the state-size layouts, then two all-to-all modes
CASES = [("moe-clip-tiny", z, ep, []) for ep in (1, 2) for z in (0, 1, 2)] + [
    ("limoe-tiny", 0, 2, []), ("limoe-tiny", 2, 1, []),
    ("moe-clip-tiny", 2, 2, ["model.moe.dropless=true"]),
    ("moe-clip-tiny", 1, 2, ["model.moe.force_balanced=true", "model.moe.capacity_factor=0.5",
                              "model.moe.min_capacity=0"]),
    # an image tower with its own router: Expert-Choice's exact C, Soft MoE's slot rows (no padding)
    ("moe-clip-tiny", 2, 2, ["model.vision.moe.overrides.router=expert_choice"]),
    ("moe-clip-tiny", 2, 2, ["model.vision.moe.overrides.router=soft"]),
]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def _gradient_bytes(engine, model, stage) -> int:
    """Bytes of the gradients DeepSpeed holds after a backward (ZeRO 0: .grad; ZeRO 1/2: the partition's)."""
    if stage == 0:
        return _storage_bytes(p.grad for p in model.parameters())
    return _storage_bytes(t for v in engine.optimizer.averaged_gradients.values() if v is not None for t in v)


def _state_bytes(engine, model, gradients: int):
    """Parameter, gradient and optimizer-state bytes after a step (fp32 master copies and Adam moments)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    states += getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
    return {"parameters": _storage_bytes(model.parameters()), "gradients": gradients,
            "optimizer": _storage_bytes(states)}


def _measure(rank, world_size, model_name, stage, ep, overrides):
    import deepspeed

    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.optim import build_optimizer
    from moe_dist.models import build_model
    from moe_dist.models.loss import ContrastiveLoss
    from moe_dist.models.moe_blocks import moe_mlps
    from moe_dist.moe.dispatch import Traffic
    from moe_dist.planner import comm, model_facts, state_bytes

    cfg = load_run_config(None, [f"model.name={model_name}", f"zero_stage={stage}", f"ep_size={ep}",
                                 f"batch.micro_batch={B}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model_config(), ep_size=ep)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                      config=cfg.deepspeed_config(world_size))
    facts = model_facts(cfg)
    planned = state_bytes(facts.groups(ep), world_size, ep, stage, cfg.precision, rank)
    mlps = list(moe_mlps(model))
    for m in mlps:
        m.moe.dispatcher.traffic = Traffic()

    gen = torch.Generator().manual_seed(rank)
    mc = cfg.model_config()
    images = torch.randn(B, 3, mc.vision.image_size, mc.vision.image_size, generator=gen)
    text = torch.randint(4, mc.text.vocab_size, (B, mc.text.context_length), generator=gen)
    text[:, -1] = mc.text.eos_id  # every text position is a real token
    out = engine(images, text)
    engine.backward(ContrastiveLoss(mc.loss, rank, world_size)(out).total)
    grads = _gradient_bytes(engine, model, stage)
    engine.step()
    measured = _state_bytes(engine, model, grads)

    local = sum(p.numel() for p in model.parameters())
    local_expert = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    counts = {"local": (local, sum(g.numel for g in facts.groups(ep))),
              "expert": (local_expert * ep, facts.params["expert"]),
              "total": (local - local_expert + local_expert * ep, facts.params["total"])}

    import deepspeed.comm as ds_comm

    kept_by_rank = [None] * world_size  # every rank's kept assignments per expert, per layer
    def kept_per_expert(m):  # Soft MoE reports slot weights: every expert gets its slots
        stats = out.moe.layer_stats[m.layer_name]
        return stats["tokens_per_expert"].tolist() if "tokens_per_expert" in stats else [0] * m.moe.num_experts

    ds_comm.all_gather_object(kept_by_rank, {m.layer_name: kept_per_expert(m) for m in mlps})
    traffic = []
    for m in mlps:
        kept = kept_per_expert(m)
        D, E = m.moe.config.hidden_size, m.moe.config.num_experts
        group = [kept_by_rank[q][m.layer_name] for q in range(rank - rank % ep, rank - rank % ep + ep)]
        sent, received = comm.remote_rows(kept, ep, rank % ep), comm.received_rows(group, rank % ep)
        from_counts = comm.all_to_all_bytes(D, 4, ep, E, sent, received)["total"]
        layer = facts.layer(m.layer_name)
        planned_rows = comm.planned_rows(layer, B, ep)
        capacity_figure = comm.all_to_all_bytes(D, 4, ep, E, planned_rows, counted=False)["total"]
        t = m.moe.dispatcher.traffic
        traffic.append({"layer": m.layer_name, "sent": t.rows + t.counts, "from_counts": from_counts,
                        "dropless": m.moe.config.dropless,
                        "capacity_figure": capacity_figure, "full": min(kept) == comm.capacity(layer, B)})
    return {"measured": measured, "planned": planned.__dict__, "counts": counts, "traffic": traffic}


def _run_all(rank, world_size):
    return [_measure(rank, world_size, *case) for case in CASES]


@pytest.mark.world_size(2)
def test_planner_matches_deepspeed_states_and_dispatch_traffic():
    results = run_ranks(_run_all, world_size=2, timeout=400)
    for rank, per_case in enumerate(results):
        for (model, stage, ep, overrides), r in zip(CASES, per_case):
            where = f"{model} ZeRO {stage} ep_size {ep} {overrides} rank {rank}"
            for key in ("parameters", "gradients", "optimizer"):
                assert r["planned"][key] == r["measured"][key], f"{where}: {key} {r['planned']} != {r['measured']}"
            for key, (actual, planned) in r["counts"].items():
                assert actual == planned, f"{where}: {key} parameter count {actual} != planned {planned}"
            for layer in r["traffic"]:
                if ep == 1:
                    assert layer["sent"] == 0 == layer["from_counts"], f"{where}: {layer}"
                    continue
                expected = layer["from_counts"] if layer["dropless"] else layer["capacity_figure"]
                assert layer["sent"] > 0 and layer["sent"] == expected, f"{where}: {layer}"
                if "model.moe.force_balanced=true" in overrides:  # every expert at capacity
                    assert layer["full"], f"{where}: {layer}"


# ----------------------------------------------------------------------------- 8 ranks (issue 26)
W8_SETS = ["model.name=moe-clip-tiny", "model.moe.num_experts=8", "batch.micro_batch=2"]
# (ep_size, ZeRO stage, precision); each ep_size > 1 layout follows its ep_size-1 loss reference
W8_CASES = [(1, 2, "fp32"), (4, 2, "fp32"), (1, 0, "fp32"), (2, 0, "fp32"), (4, 2, "bf16")]


def _train_w8(rank, world_size, ep, stage, precision, steps=2):
    """Two steps of one layout from the ep_size-1 model of seed 0, on batch 100 + rank (the same for
    every layout): losses, the last step's all-to-all and collective bytes, the state bytes."""
    import deepspeed

    from moe_dist.distributed.comm_count import CommCounter
    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.optim import build_optimizer
    from moe_dist.models import build_model, expert_parallel_share
    from moe_dist.models.loss import ContrastiveLoss
    from moe_dist.models.moe_blocks import moe_mlps
    from moe_dist.moe.dispatch import Traffic

    cfg = load_run_config(None, [*W8_SETS, f"ep_size={ep}", f"zero_stage={stage}", f"precision={precision}"])
    mc = cfg.model_config()
    torch.manual_seed(0)
    share = expert_parallel_share(build_model(mc), ep, rank % ep)
    model = build_model(mc, ep_size=ep)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(share[name])
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg),
                                      config=cfg.deepspeed_config(world_size))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    gen = torch.Generator().manual_seed(100 + rank)
    B = cfg.batch.micro_batch
    loss_fn, losses = ContrastiveLoss(mc.loss, rank, world_size), []
    for _ in range(steps):
        images = torch.randn(B, 3, mc.vision.image_size, mc.vision.image_size, generator=gen)
        text = torch.randint(4, mc.text.vocab_size, (B, mc.text.context_length), generator=gen)
        text[:, -1] = mc.text.eos_id
        for m in moe_mlps(model):
            m.moe.dispatcher.traffic = Traffic()
        with CommCounter() as counter:
            loss = loss_fn(engine(images.to(dtype=dtype), text)).total
            counter.phase = "backward"
            engine.backward(loss)
            grads = _gradient_bytes(engine, model, stage)
            counter.phase = "step"
            engine.step()
        losses.append(loss.item())
    sent = sum(m.moe.dispatcher.traffic.rows + m.moe.dispatcher.traffic.counts for m in moe_mlps(model))
    return {"losses": losses, "all_to_all": sent, "comm": counter.report(),
            "states": _state_bytes(engine, model, grads)}


def _run_w8(rank, world_size):
    return [_train_w8(rank, world_size, *case) for case in W8_CASES]


@pytest.mark.world_size(8)
def test_planner_at_8_ranks_losses_traffic_and_states():
    from moe_dist.engine.config import load_run_config
    from moe_dist.planner import Cluster, comm, model_facts, state_bytes

    results = run_ranks(_run_w8, world_size=8, timeout=600)
    by_case = {case: [per_rank[i] for per_rank in results] for i, case in enumerate(W8_CASES)}
    for (ep, stage, precision), ranks in by_case.items():
        where = f"W=8 ep_size {ep} ZeRO {stage} {precision}"
        cfg = load_run_config(None, [*W8_SETS, f"ep_size={ep}", f"zero_stage={stage}", f"precision={precision}"])
        facts, cluster = model_facts(cfg), Cluster(1, 8)
        groups = facts.groups(ep)
        planned_a2a = comm.moe_all_to_all(facts, cluster, ep, 2, 1, precision)["total"]
        grads = comm.gradient_bytes(groups, cluster, ep, stage, precision)
        for rank, r in enumerate(ranks):
            planned = state_bytes(groups, 8, ep, stage, precision, rank).as_dict()
            for key in ("parameters", "gradients", "optimizer"):
                assert r["states"][key] == planned[key], f"{where} rank {rank}: {key} {r['states']} != {planned}"
            assert r["all_to_all"] == planned_a2a, f"{where} rank {rank}: all-to-all {r['all_to_all']} != {planned_a2a}"
            sent = {k: sum(p["bytes"].get(k, 0) for p in r["comm"].values()) for k in ("all_reduce", "all_gather")}
            # the counter rounds each call's ring share, the planner each group's: a few bytes apart at most
            assert abs(sent["all_reduce"] - grads["all_reduce"] - grads["bucket_all_reduce"]) <= 64, (where, sent, grads)
            assert abs(sent["all_gather"] - grads["param_all_gather"]) <= 64, (where, sent, grads)
    # hand-worked all-to-all at ep_size 4 (L = 2 local experts, R - 1 = 3 remote ranks), micro batch 2, fp32,
    # D = 64, capacity mode (factor 1.5, K = 1, E = 8): vision T = 2 x 17 tokens, C = ceil(1.5 x 34 / 8) = 7,
    # rows sent = received = C L (R - 1) = 42, each exchanged twice (forward, backward): 2 x 84 x 64 x 4 B =
    # 43,008 per layer; text T = 64, C = 12, 72 rows: 2 x 144 x 256 = 73,728; two MoE layers per tower
    assert by_case[(4, 2, "fp32")][0]["all_to_all"] == 2 * 43_008 + 2 * 73_728
    assert by_case[(4, 2, "bf16")][0]["all_to_all"] == (2 * 43_008 + 2 * 73_728) // 2
    # expert parallelism changes where experts run, not what is computed: every rank's losses equal the
    # ep_size-1 run's (fp32 summation order only)
    for layout, reference in (((4, 2, "fp32"), (1, 2, "fp32")), ((2, 0, "fp32"), (1, 0, "fp32"))):
        for r, ref in zip(by_case[layout], by_case[reference]):
            assert r["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), (layout, r["losses"], ref["losses"])
    # ZeRO 2 over 8 data-parallel ranks holds less than ZeRO 0 (the same layout, ep_size 1)
    total = {case: max(sum(r["states"].values()) for r in by_case[case]) for case in ((1, 2, "fp32"), (1, 0, "fp32"))}
    assert total[(1, 2, "fp32")] < total[(1, 0, "fp32")], total
