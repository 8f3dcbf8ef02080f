"""One 2-rank run (ep_size 2, ZeRO-2, grad_accum 2): a Soft MoE image tower beside a text tower with the
selection bias (DeepSeek-V3) and the global-batch balance loss. After every optimizer step each text
layer's bias moved by rate * sign(mean - load) with the load that TensorBoard shows for that step (every
rank, both micro batches); it is in the checkpoint and a resume continues it bit for bit; analyze-routing
reads the Soft MoE layers (their experts were on 2 ranks)."""

import json
import os

import pytest
import torch

from helpers.train import deepspeed_cmd, make_synth, overrides, run

RATE = 0.01
SETS = {"batch.grad_accum": 2, "batch.micro_batch": 8, "model.moe.dropless": "true", "model.moe.router_bias": "true",
        "model.moe.router_bias_rate": RATE, "model.moe.load_balance": "global_batch", "logging.every": 1,
        "checkpoint.every": 1, "ep_size": 2, "zero_stage": 2, "model.vision.moe.overrides.router": "soft",
        "model.vision.moe.overrides.slots_per_expert": 2, "model.vision.moe.overrides.router_bias": "false"}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def biased_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("bias") / "run"
    res = run(deepspeed_cmd(overrides(synth, out, steps=2, **SETS)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def _biases(step_dir):
    state = torch.load(os.path.join(step_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return {k: v for k, v in state["module"].items() if k.endswith("router.selection_bias_ME")}


def _loads(run_dir):
    """{(step, layer, modality): per-expert load} from the TensorBoard expert-load histograms."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    loads = {}
    for tag in acc.Tags()["histograms"]:
        parts = tag.split("/")  # moe/expert_load/<modality>/<layer>
        if len(parts) != 4 or parts[1] != "expert_load":
            continue
        for event in acc.Histograms(tag):
            h = event.histogram_value  # bucket e holds expert e's count (engine/metrics.py)
            loads[(event.step, parts[3], parts[2])] = torch.tensor(list(h.bucket), dtype=torch.float64)
    return loads


def test_the_bias_moves_once_per_step_by_every_ranks_and_micro_batchs_load(biased_run):
    loads = _loads(biased_run)
    before = None
    for step in (1, 2):
        biases = _biases(biased_run / "checkpoints" / f"step{step:08d}")
        assert sorted(biases) == [f"text.transformer.resblocks.{i}.mlp.moe.router.selection_bias_ME" for i in (1, 3)]
        for key, bias in biases.items():
            layer = "text." + key.split(".transformer.resblocks.")[1].split(".")[0]
            load = loads[(step, layer, "text")]
            assert float(load.sum()) > 0
            row = 1  # text tokens
            step_change = RATE * torch.sign(load.mean() - load)
            previous = torch.zeros_like(bias[row]) if before is None else before[key][row]
            assert torch.allclose(bias[row].double() - previous.double(), step_change, atol=1e-7), (key, step)
            assert float(bias[1 - row].abs().max()) == 0.0  # no token of the other modality passed
        before = biases


def test_a_resume_continues_the_bias_exactly(synth, biased_run, tmp_path):
    out = tmp_path / "resumed"
    res = run(deepspeed_cmd(overrides(synth, out, steps=2, **SETS)
                            + ["--resume", str(biased_run / "checkpoints" / "step00000001")]))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    got, want = _biases(out / "checkpoints" / "step00000002"), _biases(biased_run / "checkpoints" / "step00000002")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_analyze_routing_reads_the_soft_moe_image_tower(synth, biased_run, tmp_path):
    res = run(["moe-dist", "analyze-routing", "--checkpoint", str(biased_run / "checkpoints" / "step00000002"),
               "--data", str(synth / "val"), "--out", str(tmp_path / "routing")])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    layers = json.loads((tmp_path / "routing" / "routing.json").read_text())["layers"]
    vision = {name: layer["image"] for name, layer in layers.items() if name.startswith("vision")}
    assert len(vision) == 2, layers
    for report in vision.values():  # each token's combine weights sum to 1
        per_token = sum(report["assignments"]) / report["tokens"]
        assert report["unit"] == "slot_weight" and per_token == pytest.approx(1.0, rel=1e-6)
    text = {name: layer["text"] for name, layer in layers.items() if name.startswith("text")}
    assert all(report["unit"] == "assignments" for report in text.values()) and len(text) == 2
