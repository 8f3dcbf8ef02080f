"""Planner formulas on hand-worked numbers, the activation estimate against autograd's saved tensors,
and ``moe-dist plan`` output and errors (single process; the DeepSpeed comparison is in
tests/distributed/test_plan_states.py)."""

import json

import pytest
import torch

from helpers.reference import saved_bytes
from moe_dist.cli import main
from moe_dist.engine.config import load_run_config
from moe_dist.planner import Cluster, Hardware, Layout, ParamGroup, activation_bytes, model_facts, state_bytes
from moe_dist.planner import comm
from moe_dist.engine.zero_bucket import planned_bucket_elements
from moe_dist.planner.params import expert_rows

TINY = "configs/runs/tiny-synth.yaml"


def test_state_bytes_hand_worked():
    # one non-expert group of tensors [5, 3] (8 elements) and one expert group [6] at ep_size 2, W = 4
    groups = [ParamGroup("decay", False, (5, 3)), ParamGroup("experts", True, (6,))]
    # ZeRO 0, fp32: params 4 x 14, grads 4 x 14, moments 8 x 14 + a 4-byte step per tensor (3)
    assert state_bytes(groups, 4, 2, 0, "fp32").as_dict() == {"parameters": 56, "gradients": 56, "optimizer": 124,
                                                              "backward_buffers": 0, "step_buffers": 4 * 8,
                                                              "buffers": 32}
    # ZeRO 2, fp32, rank 1. Non-expert: 8 padded to a multiple of 2 x 4 = 8, partition 2 = elements [2, 4),
    # inside the first tensor (5). Expert: d = W / R = 2, 6 -> 8 (multiple of 4), partition 4; rank 1 is
    # member 0 -> [0, 4), inside the only tensor (6).
    s = state_bytes(groups, 4, 2, 2, "fp32", rank=1, bucket_elements=10)
    assert s.parameters == 4 * (8 + 8)
    assert s.gradients == 4 * (5 + 6)            # the overlapping tensors, whole
    assert s.optimizer == 12 * (2 + 4) + 4 * 2   # master + 2 moments per partition element, a step per group
    assert (s.backward_buffers, s.step_buffers) == (4 * 10, 4 * (2 + 4))  # reduce bucket; fp32 grad partition
    # the peak: a bucket of 10 < the rank's 14 elements fills before the backward ends, so the gradient
    # partition (44 B) comes while the activations are held: params + optimizer + activations + 44 + bucket
    assert s.peak(1000) == 64 + 80 + 1000 + 44 + 40 and s.peak(0) == 64 + 80 + 44 + 40
    # a bucket of all 14 elements is reduced at the backward's end: activations or gradients, with the bucket
    late = state_bytes(groups, 4, 2, 2, "fp32", rank=1, bucket_elements=14)
    assert late.peak(1000) == 64 + 80 + 1000 + 56 and late.peak(0) == 64 + 80 + 44 + 56
    # rank 3: non-expert partition [6, 8) holds tensor 2 (3 elements); expert member 1 -> [4, 8): the
    # tensor (6) plus 2 elements of padding
    assert state_bytes(groups, 4, 2, 2, "fp32", rank=3).gradients == 4 * (3 + 6 + 2)
    # bf16, ZeRO 1: 2-byte params and gradients, fp32 master and moments
    s = state_bytes(groups, 4, 2, 1, "bf16", rank=1, bucket_elements=10)
    assert (s.parameters, s.gradients, s.optimizer) == (2 * 16, 2 * 11, 12 * 6 + 8)


def test_planned_bucket_elements():
    # 1/16 of the parameters when that exceeds the largest tensor: 16 tensors of 1,000 -> 1,000; 3 more of
    # 10,000 make 46,000 / 16 = 2,875 < 10,000, the largest; 40 of 10,000 -> 25,000
    assert planned_bucket_elements([1000] * 16) == 1000
    assert planned_bucket_elements([1000] * 16 + [10_000] * 3) == 10_000
    assert planned_bucket_elements([10_000] * 40) == 25_000
    assert planned_bucket_elements([7, 5]) == 8  # rounded up to a multiple of 2 (DeepSpeed's alignment)
    # at most DeepSpeed's default 5e8, unless one tensor is larger
    assert planned_bucket_elements([10 ** 8] * 100) == 500_000_000
    assert planned_bucket_elements([6 * 10 ** 8, 10]) == 600_000_000
    # the run config and the planner's memory model use one number: a set value, else the choice per ep_size
    for sets in ([], ["ep_size=2"], ["zero_bucket_elements=1000"]):
        cfg = load_run_config(TINY, sets)
        planned = model_facts(cfg).bucket(cfg.ep_size)
        assert cfg.deepspeed_config(2)["zero_optimization"]["reduce_bucket_size"] == planned
    assert model_facts(load_run_config(TINY, ["zero_bucket_elements=1000"])).bucket(2) == 1000


def test_all_to_all_and_gradient_formulas():
    # sends 10 rows of D = 8 fp32 (dispatch, combine backward) and returns 6 received ones (combine, dispatch
    # backward): 2 x (10 + 6) x 8 x 4 B, + counts L x 8 B (L = 2) once per forward
    assert comm.all_to_all_bytes(8, 4, 2, 4, 10, 6) == {"rows": 1024, "counts": 16, "total": 1040}
    assert comm.all_to_all_bytes(8, 4, 2, 4, 10) == {"rows": 1280, "counts": 16, "total": 1296}
    assert comm.all_to_all_bytes(8, 4, 2, 4, 10, recompute=True)["total"] == 3 * 20 * 32 + 32
    # experts 0,1 on EP rank 0, experts 2,3 on rank 1: rank 0 sends 3 + 4 rows, receives rank 1's 2 + 0
    assert comm.remote_rows([5, 1, 3, 4], 2, 0) == 7
    assert comm.received_rows([[5, 1, 3, 4], [2, 0, 6, 6]], 0) == 2
    facts = model_facts(load_run_config(TINY, []))  # E=4, K=1, capacity factor 1.5, min capacity 4
    vision = facts.layer("vision.1")  # micro batch 4 x 17 image tokens = 68 tokens a call
    assert comm.capacity(vision, 4) == 26  # ceil(1.5 x 68 / 4)
    assert comm.planned_rows(vision, 4, 2) == 26 * 2 * 1  # C x L x (R - 1)
    assert comm.planned_rows(vision, 4, 2, dropless=True) == 34
    # EP groups of 4 on nodes of 2 GPUs: 2 of a rank's 3 peers are on the other node
    assert comm.Cluster(2, 2).inter_fraction(4) == pytest.approx(2 / 3)
    assert comm.Cluster(2, 8).inter_fraction(8) == 0
    # ZeRO 0 over 4 ranks on 2 nodes: ring all-reduce 2 x 3/4 x 8 x 4 B, inter-node
    g = comm.gradient_bytes([ParamGroup("decay", False, (8,))], comm.Cluster(2, 2), 1, 0, "fp32")
    assert g["all_reduce"] == 48 == g["inter_node"]
    # ZeRO 2, 2 micro batches: DeepSpeed all-reduces every bucket after each (2 x 48), and all-gathers the
    # group padded to a multiple of 2 x 4 ranks once: 10 elements -> 16, 3/4 x 16 x 4 B
    g = comm.gradient_bytes([ParamGroup("decay", False, (10,))], comm.Cluster(2, 2), 1, 2, "fp32", grad_accum=2)
    assert (g["all_reduce"], g["bucket_all_reduce"], g["param_all_gather"]) == (0, 2 * 60, 48)
    # ZeRO 1 reduces once, at the accumulation boundary (DeepSpeedEngine.allreduce_gradients)
    g = comm.gradient_bytes([ParamGroup("decay", False, (10,))], comm.Cluster(2, 2), 1, 1, "fp32", grad_accum=2)
    assert (g["bucket_all_reduce"], g["param_all_gather"]) == (60, 48)
    # expert rows: T K assignments, but at ep_size > 1 with a capacity the whole [E, C] exchange buffer
    assert expert_rows(vision, 4, 1) == 68 and expert_rows(vision, 4, 2) == 4 * 26
    assert expert_rows(model_facts(load_run_config(TINY, ["model.moe.dropless=true"])).layer("vision.1"), 4, 2) == 68


def _measured_and_estimated(name, sets=()):
    from moe_dist.models import build_model
    from moe_dist.models.loss import ContrastiveLoss

    cfg = load_run_config(None, [f"model.name={name}", *sets])
    facts, mc, B = model_facts(cfg), cfg.model_config(), 16
    torch.manual_seed(0)
    model = build_model(mc)
    images = torch.randn(B, 3, mc.vision.image_size, mc.vision.image_size)
    text = torch.randint(4, mc.text.vocab_size, (B, mc.text.context_length))
    text[:, -1] = mc.text.eos_id  # full-length captions: the planner plans for the longest batch
    measured = saved_bytes(lambda: ContrastiveLoss(mc.loss)(model(images, text)).total)
    return measured, activation_bytes(facts, B, 1, "fp32", "none")


@pytest.mark.parametrize("name", ["moe-clip-tiny", "limoe-tiny"])
def test_activation_estimate_within_15_percent_of_saved_tensors(name):
    measured, estimated = _measured_and_estimated(name)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_activation_estimate_counts_the_kept_expert_activation():
    """recompute_activation=false: what the planner adds is what autograd newly saves, within 10%."""
    measured, estimated = _measured_and_estimated("moe-clip-tiny")
    measured_saved, estimated_saved = _measured_and_estimated("moe-clip-tiny", ["model.moe.recompute_activation=false"])
    added, predicted = measured_saved - measured, estimated_saved - estimated
    assert added > 0 and abs(predicted - added) <= 0.1 * added, (predicted, added)


def _plan(capsys, *args):
    code = main(["plan", "--config", TINY, *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_keys_and_table(capsys):
    code, out, _ = _plan(capsys, "--nodes", "2", "--gpus-per-node", "2", "--json")
    assert code == 0
    report = json.loads(out)
    for key in ("params", "per_gpu_bytes", "all_to_all_bytes", "gradient_bytes", "contrastive_bytes", "flops",
                "step_time", "layouts"):
        assert key in report
    assert {"parameters", "gradients", "optimizer", "activations", "total"} <= set(report["per_gpu_bytes"])
    assert report["params"]["total"] == 887_553 and report["params"]["non_expert"] == 887_553 - 529_408
    assert [x["layer"] for x in report["all_to_all_bytes"]["per_layer"]] == ["vision.1", "vision.3", "text.1", "text.3"]
    rates = [row["samples_per_s"] for row in report["layouts"]]
    assert rates == sorted(rates, reverse=True) and {row["ep_size"] for row in report["layouts"]} == {1, 2, 4}
    code, out, _ = _plan(capsys, "--nodes", "1", "--gpus-per-node", "2")
    assert code == 0 and "layouts that fit" in out and "MoE all-to-all" in out


def test_plan_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as done:
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    for flag in ("--config", "--nodes", "--gpus-per-node", "--gpu-memory-gb", "--ep-size", "--zero-stage",
                 "--micro-batch", "--gpu-tflops", "--intra-node-gbps", "--inter-node-gbps", "--set", "--top", "--json"):
        assert flag in out


def test_plan_bad_input(capsys):
    code, _, err = _plan(capsys, "--nodes", "1", "--gpus-per-node", "2", "--ep-size", "3")
    assert code == 2 and "ep_size=3 must divide" in err and "use one of [1, 2]" in err
    # the L/14 MoE (4.4 B parameters) on one 16 GB GPU: no layout fits; the message says what would
    code, _, err = _plan(capsys, "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "16",
                         "--set", "model.name=moe-clip-l14", "--set", "ep_size=1", "--set", "precision=bf16")
    assert code == 2 and "no layout of moe-clip-l14 fits" in err and "GPUs of at least" in err and " nodes of " in err


# ----------------------------------------------------------------------------- routing options, per tower
# moe-clip-tiny: width 64, MLP hidden H = 256, E = 4, top-1, capacity factor 1.5, MoE in blocks 1 and 3 of
# each tower; 17 image tokens, 32 text tokens. One expert row costs 2 x 64 x 256 x 2 = 65,536 FLOPs (two
# projections) and one expert holds 64 x 256 + 256 + 256 x 64 + 64 = 33,088 parameters.
BASE_FLOPS = {"image": 7_399_424, "text": 13_672_448}
BASE_ACTIVE = {"image": 218_241, "text": 272_257}


def _report(*sets):
    from moe_dist.config import parse_overrides
    from moe_dist.models.params import params_report

    return params_report("moe-clip-tiny", parse_overrides(list(sets), prefix="model."))


def test_fine_grained_and_shared_experts_cost_what_the_coarse_top1_does():
    # granularity 4: 16 experts of width 64, top-3, plus one shared expert of width 64: 3 x 2 x 64 x 64 x 2 +
    # 2 x 64 x 64 x 2 = 65,536 FLOPs a token, the coarse top-1's; only the router grows, 2 x 64 x (16 - 4) =
    # 1,536 FLOPs a token and layer
    from moe_dist.moe import MoEConfig, cost

    coarse = MoEConfig(hidden_size=64, ffn_hidden_size=256, num_experts=4, top_k=1)
    fine = MoEConfig(hidden_size=64, ffn_hidden_size=256, num_experts=16, top_k=3, granularity=4, num_shared_experts=1)
    for cfg in (coarse, fine):
        assert cost.layer_flops(cfg, 10) - cost.router_flops(cfg, 10) == 10 * 65_536
    assert (cost.router_flops(coarse, 10), cost.router_flops(fine, 10)) == (5_120, 20_480)
    report = _report("moe.granularity=4", "moe.num_experts=16", "moe.top_k=3", "moe.num_shared_experts=1")
    assert report["flops"]["image"] == BASE_FLOPS["image"] + 2 * 17 * 1_536 == 7_451_648
    assert report["flops"]["text"] == BASE_FLOPS["text"] + 2 * 32 * 1_536 == 13_770_752
    # active per layer: 3 experts of 64 x 64 + 64 + 64 x 64 + 64 = 8,320 and the shared one (8,320) = 33,280
    # against one coarse expert's 33,088 (+192), and a router of 64 x 16 against 64 x 4 (+768)
    assert report["params"]["active/image"] == BASE_ACTIVE["image"] + 2 * (192 + 768) == 220_161
    assert report["params"]["expert"] == 4 * 16 * 8_320  # the shared experts are not expert-parallel
    # SwiGLU doubles the first projection of the routed and the shared experts: 2 D He (2 + 1) a row
    swiglu = fine.replace(activation="swiglu")
    assert cost.layer_flops(swiglu, 10) - cost.router_flops(swiglu, 10) == 10 * 4 * 2 * 64 * 64 * 3


def test_soft_moe_counts_its_dispatch_and_combine_matmuls():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from moe_dist.moe import MoEConfig, build_moe_layer, cost

    # D = 8, H = 32, E = 2 experts of P = 3 slots (S = 6), 2 sequences of L = 5 tokens (T = 10): logits x @ phi
    # 2 x 10 x 8 x 6 = 960, dispatch^T x and combine @ outputs 960 each; E P = 6 slot rows a sequence, 12 rows
    # of 2 x 8 x 32 x 2 = 1,024 FLOPs
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=32, num_experts=2, router="soft", slots_per_expert=3)
    assert cost.router_flops(cfg, 10) == 2_880
    assert cost.expert_rows(cfg, 10, 2) == 12 == cost.expert_rows(cfg, 10, 2, ep_size=2)
    assert cost.layer_flops(cfg, 10, 2) == 2_880 + 12 * 1_024
    with FlopCounterMode(display=False) as counter:  # the layer's own matmuls (the experts' loop is opaque)
        build_moe_layer(cfg).train()(torch.randn(2, 5, 8))
    assert counter.get_total_flops() == 2_880
    # a Soft MoE image tower: per layer 6 x 17 x 64 x 4 = 26,112 mixing FLOPs and 4 slot rows (262,144)
    # replace the top-1's router (8,704) and 17 rows (1,114,112); the active image parameters count 4 / 17
    # of the 4 experts (the other 64 / 17 experts' worth of 33,088 is left out of 416,771)
    report = _report("vision.moe.overrides.router=soft")
    assert report["flops"]["image"] == BASE_FLOPS["image"] - 2 * (8_704 + 1_114_112 - 26_112 - 262_144) == 5_730_304
    assert report["params"]["active/image"] == round(416_771 - 2 * 64 / 17 * 33_088) == 167_638


def test_expert_choice_computes_exactly_e_times_c_rows():
    import torch

    from moe_dist.moe import MoEConfig, cost
    from moe_dist.moe.router import build_router

    # E = 4, factor 1.25, T = 10: C = ceil(12.5 / 4) = 4, so 16 rows (not T K = 40), at any ep_size
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=32, num_experts=4, router="expert_choice", capacity_factor=1.25)
    assert cost.expert_rows(cfg, 10) == 16 == cost.expert_rows(cfg, 10, ep_size=2)
    assert int(build_router(cfg)(torch.randn(10, 8)).valid_TK.sum()) == 16  # the router's own choice
    assert cost.buffer_rows(cfg, 10) == 40  # but the dispatcher gathers all T E slots at ep_size 1
    assert cost.active_experts(cfg, 10) == 1.25
    # an Expert-Choice image tower at factor 1.5: C = ceil(1.5 x 17 / 4) = 7 per expert, 28 rows a sample
    # instead of 17; micro batch 4: T = 68, C = 26, and ep_size 2 sends C x 2 local experts x 1 remote rank
    report = _report("vision.moe.overrides.router=expert_choice")
    assert report["flops"]["image"] == BASE_FLOPS["image"] + 2 * 11 * 65_536 == 8_841_216
    assert report["params"]["active/image"] == BASE_ACTIVE["image"] + 2 * 0.5 * 33_088 == 251_329
    facts = model_facts(load_run_config(TINY, ["model.vision.moe.overrides.router=expert_choice"]))
    vision = facts.layer("vision.1")
    assert (vision.rows(1), vision.rows(4)) == (28, 104)
    assert (comm.capacity(vision, 4), comm.planned_rows(vision, 4, 2)) == (26, 52)


def test_vision_only_override_counts_each_tower_with_its_own_config():
    sets = ["model.vision.moe.overrides.router=soft", "model.vision.moe.overrides.num_experts=8",
            "model.vision.moe.overrides.slots_per_expert=2"]
    facts = model_facts(load_run_config(TINY, sets))
    assert [(x.name, x.config.router, x.config.num_experts) for x in facts.moe_layers] == [
        ("vision.1", "soft", 8), ("vision.3", "soft", 8), ("text.1", "topk", 4), ("text.3", "topk", 4)]
    assert facts.num_experts == 4  # an ep_size must divide both towers' counts
    # the text tower is moe-clip-tiny's; the image tower: 6 x 17 x 64 x 16 = 104,448 mixing FLOPs and
    # 8 x 2 = 16 slot rows (1,048,576) per layer instead of 8,704 + 1,114,112
    assert facts.flops["text"] == BASE_FLOPS["text"] and facts.params["active/text"] == BASE_ACTIVE["text"]
    assert facts.flops["image"] == BASE_FLOPS["image"] + 2 * (104_448 + 1_048_576 - 8_704 - 1_114_112) == 7_459_840
    # all-to-all at ep_size 2, micro batch 4, fp32, each exchanged twice: the Soft MoE layer sends its
    # remote experts' 4 x 2 x 4 = 32 slot rows of 64 values (no counts: 2 x 64 x 64 x 4 B); the top-1 text
    # layer the fixed [2, 48] block, C = ceil(1.5 x 128 / 4) = 48 (2 x 192 x 64 x 4 B)
    per_layer = comm.moe_all_to_all(facts, Cluster(1, 2), 2, 4, 1, "fp32")["per_layer"]
    assert [x["bytes"] for x in per_layer] == [32_768, 32_768, 98_304, 98_304]
    assert comm.capacity(facts.layer("vision.1"), 4) == 8  # 2 slots x 4 sequences per expert and rank


def test_sigmoid_costs_what_softmax_does_and_balance_all_reduces_are_counted():
    base = model_facts(load_run_config(TINY, []))
    facts = model_facts(load_run_config(TINY, ["model.moe.score_func=sigmoid", "model.moe.router_bias=true",
                                               "model.moe.load_balance=global_batch", "model.moe.n_groups=2"]))
    assert facts.flops == base.flops and facts.params == base.params
    assert comm.balance_bytes(base, Cluster(1, 4), 2) == {"forward_all_reduce": 0, "step_all_reduce": 0,
                                                          "intra_node": 0, "inter_node": 0}
    # 4 layers of M x E = 2 x 4 loads, 8 bytes each, ring over W = 4: 2 x 3/4 x 64 = 96 B per all-reduce:
    # every forward of the 2 micro batches (twice with checkpointing), and once per step
    assert comm.balance_bytes(facts, Cluster(1, 4), 2) == {"forward_all_reduce": 4 * 96 * 2, "step_all_reduce": 4 * 96,
                                                           "intra_node": 1_152, "inter_node": 0}
    assert comm.balance_bytes(facts, Cluster(2, 2), 2, "blocks")["inter_node"] == 4 * 96 * 4 + 4 * 96
    bias_only = model_facts(load_run_config(TINY, ["model.text.moe.overrides.router_bias=true"]))
    assert comm.balance_bytes(bias_only, Cluster(1, 4), 2)["step_all_reduce"] == 2 * 96  # the text layers only


@pytest.mark.parametrize("sets", [["model.vision.moe.overrides.router=soft"],
                                  ["model.vision.moe.overrides.router=expert_choice"],
                                  ["model.moe.granularity=4", "model.moe.num_experts=16", "model.moe.top_k=3",
                                   "model.moe.num_shared_experts=1", "model.moe.activation=swiglu"]])
def test_activation_estimate_of_routing_options_within_15_percent(sets):
    measured, estimated = _measured_and_estimated("moe-clip-tiny", sets)
    assert abs(estimated - measured) <= 0.15 * measured, (estimated, measured)


def test_model_configs_params_comments_are_current():
    """Each shipped model JSON's "_params" line states what ``moe-dist params`` counts."""
    import glob
    import re

    from moe_dist.models.params import params_report

    for path in sorted(glob.glob("configs/models/*.json")):
        with open(path) as f:
            line = json.load(f)["_params"]
        report = params_report(path)
        p, flops = report["params"], report["flops"]
        number = r"([\d,]+)"
        stated = {"total": re.search(rf"total {number} params", line),
                  "expert": re.search(rf"\({number} in experts", line),
                  "active/image": re.search(rf"image {number}", line),
                  "active/text": re.search(rf"text {number}", line),
                  "per_sample": re.search(rf"FLOPs per sample {number}", line)}
        for key, match in stated.items():
            assert match, (path, key, line)
            actual = flops[key] if key == "per_sample" else p[key]
            assert int(match.group(1).replace(",", "")) == actual, (path, key, actual, line)
