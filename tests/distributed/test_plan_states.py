"""The planner's exact figures held against a real DeepSpeed run on 2 ranks (CPU, gloo).

One 2-rank run loops over the layouts (so the suite pays for one process start):
- state sizes: ZeRO 0/1/2 x ep_size 1/2 for moe-clip-tiny (and ZeRO 0/2 for limoe-tiny); the bytes of
  the parameter, gradient and optimizer-state tensors DeepSpeed holds after ``deepspeed.initialize``
  and one step equal ``planner.state_bytes`` for that rank;
- all-to-all bytes: with ep_size 2, the bytes the dispatch sends (``TokenDispatcher.traffic``) in one
  step equal the planner's figure: from that step's token counts when dropless, and the fixed
  capacity-sized blocks in capacity mode (also with forced-balanced routing, where every expert fills).
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
]


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one flat buffer count once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


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
    if stage == 0:
        grads = _storage_bytes(p.grad for p in model.parameters())
    else:
        grads = _storage_bytes(t for v in engine.optimizer.averaged_gradients.values() if v is not None for t in v)
    engine.step()
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    states = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    states += getattr(engine.optimizer, "single_partition_of_fp32_groups", [])
    measured = {"parameters": _storage_bytes(model.parameters()), "gradients": grads,
                "optimizer": _storage_bytes(states)}

    local = sum(p.numel() for p in model.parameters())
    local_expert = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True) is False)
    counts = {"local": (local, sum(g.numel for g in facts.groups(ep))),
              "expert": (local_expert * ep, facts.params["expert"]),
              "total": (local - local_expert + local_expert * ep, facts.params["total"])}

    import deepspeed.comm as ds_comm

    kept_by_rank = [None] * world_size  # every rank's kept assignments per expert, per layer
    ds_comm.all_gather_object(kept_by_rank, {m.layer_name: out.moe.layer_stats[m.layer_name]["tokens_per_expert"]
                                             .tolist() for m in mlps})
    traffic = []
    for m in mlps:
        stats = out.moe.layer_stats[m.layer_name]
        kept, tokens = stats["tokens_per_expert"].tolist(), int(stats["num_tokens"])
        D, E = m.moe.config.hidden_size, m.moe.config.num_experts
        group = [kept_by_rank[q][m.layer_name] for q in range(rank - rank % ep, rank - rank % ep + ep)]
        sent, received = comm.remote_rows(kept, ep, rank % ep), comm.received_rows(group, rank % ep)
        from_counts = comm.all_to_all_bytes(D, 4, ep, E, sent, received)["total"]
        planned_rows = comm.planned_rows(facts, tokens, ep)
        capacity_figure = comm.all_to_all_bytes(D, 4, ep, E, planned_rows, counted=False)["total"]
        t = m.moe.dispatcher.traffic
        traffic.append({"layer": m.layer_name, "sent": t.rows + t.counts, "from_counts": from_counts,
                        "dropless": m.moe.config.dropless,
                        "capacity_figure": capacity_figure, "full": min(kept) == comm.capacity(facts, tokens)})
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
