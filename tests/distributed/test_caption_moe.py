"""The CoCa decoder's MoE layers under expert parallelism: ep_size=2 on 2 ranks equals ep_size=1, fp64.

Each rank runs its own batch through the whole model (image, text and decoder MoE layers, capacity per rank);
the single-process reference runs the same batch with all experts. Outputs and dense gradients match the
reference's on that batch; an expert's gradient collects tokens from both ranks, so it matches the sum of
the reference's gradients over the two batches.
"""

import pytest
import torch

from helpers.data import IdTokenizer
from helpers.harness import run_ranks
from helpers.reference import rel_err

MODEL = {"text": {"tokenizer": "openclip-bpe", "vocab_size": 64, "context_length": 12},
         "decoder": {"layers": 2, "moe": {"every": 1}, "cross_moe": {"every": 1}}}


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    text = torch.randint(4, 64, (3, 12), generator=g)
    text[:, 0] = 2
    for row, eos in enumerate((11, 6, 3)):  # uneven lengths: padding after EOS is never routed
        text[row, eos] = 3
        text[row, eos + 1:] = 0
    return images, text


def _loss_and_grads(model, loss_fn, batch, names):
    out = model(*batch)
    loss = loss_fn(out).total
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return out, dict(zip(names, grads))


def _compare(rank, world_size):
    return [f for dropless in (True, False) for f in _compare_one(rank, world_size, dropless)] + _rerank(rank)


def _rerank(rank):
    """Beam search reranked by the towers, expert-parallel and in lockstep: rank 0 captions 3 images, rank 1
    decodes 2 after a prompt (a prompt length rank 0 lacks), and each equals the single-process model."""
    from moe_dist.generation import GenerationConfig, generate
    from moe_dist.models import create_model
    from moe_dist.models.pretrained import _local_experts

    moe = {"num_experts": 4, "top_k": 2, "modality_experts": [1, 1, 1], "dropless": True}
    torch.manual_seed(6)
    ref = create_model("coca-tiny", overrides={**MODEL, "moe": moe}).double().eval()
    ep = create_model("coca-tiny", ep_size=2, overrides={**MODEL, "moe": moe}).double().eval()
    ep.load_state_dict(_local_experts(ref.state_dict(), rank, 2))
    images = _batch(10 + rank)[0][:3 - rank]
    prompts = None if rank == 0 else ["5 6", "7 8"]
    cfg = dict(strategy="beam", beam_width=3, max_new=4, rerank=5.0)
    got = generate(ep, IdTokenizer(12), images, prompts, GenerationConfig(**cfg, lockstep=True))
    want = generate(ref, IdTokenizer(12), images, prompts, GenerationConfig(**cfg))
    return [] if got == want else [f"rerank rank {rank}: {got} != {want}"]


def _compare_one(rank, world_size, dropless):
    from moe_dist.models import build_loss, create_model
    from moe_dist.models.pretrained import _local_experts

    moe = {"num_experts": 4, "top_k": 2, "modality_experts": [1, 1, 1], "dropless": dropless,
           "capacity_factor": 1.0, "min_capacity": 1}
    torch.manual_seed(5)
    ref = create_model("coca-tiny", overrides={**MODEL, "moe": moe}).double()
    ep = create_model("coca-tiny", ep_size=2, overrides={**MODEL, "moe": moe}).double()
    ep.load_state_dict(_local_experts(ref.state_dict(), rank, 2))
    loss_fn = build_loss(ref.cfg)  # per rank: its own batch's loss (world size 1 in the loss)
    dense = ["decoder.cross_attn.1.mlp.moe.router.proj.weight", "decoder.resblocks.0.attn.in_proj_weight",
             "decoder.text_projection", "visual.conv1.weight"]
    experts = [n for n, _ in ep.named_parameters() if "decoder" in n and "deepspeed_experts" in n and n.endswith("w1")]
    out, got = _loss_and_grads(ep, loss_fn, _batch(rank), dense + experts)
    ref_names = dense + [n.replace(f"deepspeed_experts.{n.split('deepspeed_experts.')[1].split('.')[0]}.",
                                   f"deepspeed_experts.{rank * 2 + int(n.split('deepspeed_experts.')[1][0])}.")
                         for n in experts]
    runs = [_loss_and_grads(ref, loss_fn, _batch(r), ref_names) for r in range(world_size)]
    ref_out, want = runs[rank]
    failures = []
    checks = {"logits": (out.logits, ref_out.logits), "image_features": (out.image_features, ref_out.image_features)}
    checks.update({n: (got[n], want[n]) for n in dense})
    checks.update({n: (got[n], sum(run[1][r] for run in runs)) for n, r in zip(experts, ref_names[len(dense):])})
    for name, (a, b) in checks.items():
        err = rel_err(a, b)
        if not err < 1e-12:
            failures.append(f"dropless={dropless} {name}: rel err {err:.3g}")
    for layer, stats in ref_out.moe.layer_stats.items():
        for key in ("tokens_per_expert", "routed_per_expert/cross"):
            if not torch.equal(out.moe.layer_stats[layer][key], stats[key]):
                failures.append(f"dropless={dropless} {layer} {key}")
    return failures


@pytest.mark.world_size(2)
def test_decoder_moe_ep2_matches_single_process():
    assert run_ranks(_compare, world_size=2) == [[], []]
