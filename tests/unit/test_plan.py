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
    assert comm.capacity(facts, 68) == 26  # ceil(1.5 x 68 / 4)
    assert comm.planned_rows(facts, 68, 2) == 26 * 2 * 1  # C x L x (R - 1)
    assert comm.planned_rows(facts, 68, 2, dropless=True) == 34
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
    assert expert_rows(facts, 68, 1) == 68 and expert_rows(facts, 68, 2) == 4 * 26
    assert expert_rows(model_facts(load_run_config(TINY, ["model.moe.dropless=true"])), 68, 2) == 68


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
