"""Issue 11 end to end: a tiny model trained 200 steps on synth with 2 ranks and ep_size=2 is scored
three ways (its export on 1 process, its checkpoint through load_pretrained on 1 process, its checkpoint
on 2 ranks) with the same metrics, learns something real, and its routing analysis adds up."""

import json
import os
import sys

import pytest

from helpers.harness import free_port
from helpers.train import deepspeed_cmd, make_synth, metrics, overrides, run

STEPS = 200
CLASSES = 12  # data_tools/synth.py: 4 colours x 3 shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    synth = make_synth(root / "synth", n=2000)
    out = root / "run"
    sets = {"steps": STEPS, "ep_size": 2, "batch.micro_batch": 32, "checkpoint.every": 0, "eval.every": 100,
            "eval.tasks": "[loss,zeroshot,retrieval]", "eval.classes": synth / "classes.json"}
    res = run(deepspeed_cmd(overrides(synth, out, **sets)), timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return synth, out


def _eval(synth, checkpoint, json_out, ranks=1):
    args = ["eval", "--checkpoint", str(checkpoint), "--data", str(synth / "val"), "--classes",
            str(synth / "classes.json"), "--task", "zeroshot,retrieval,loss", "--json", str(json_out),
            "--no-progress", "--workers", "0"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "moe_dist"] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
               str(free_port()), "-m", "moe_dist"] + args
    res = run(cmd)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    with open(json_out) as f:
        return json.load(f)


def test_one_model_three_ways_agree_and_learned_something(trained, tmp_path):
    synth, out = trained
    export = tmp_path / "model.safetensors"
    res = run([sys.executable, "-m", "moe_dist", "export", "--checkpoint", str(out / "checkpoints"), "--out",
               str(export)])
    assert res.returncode == 0, res.stderr[-3000:]
    by_export = _eval(synth, export, tmp_path / "export.json")
    by_checkpoint = _eval(synth, out / "checkpoints", tmp_path / "ckpt.json")
    by_two_ranks = _eval(synth, out / "checkpoints", tmp_path / "ranks.json", ranks=2)
    for group in ("zeroshot", "retrieval", "loss"):
        assert by_export[group] == by_checkpoint[group] == by_two_ranks[group], group
    assert by_two_ranks["samples"]["evaluated"] == by_export["samples"]["evaluated"] > 0
    # measured here (200 steps of 32 on 1,824 train samples; 176 val images): zero-shot top-1 0.35 and top-5
    # 0.87 against 1/12 = 0.083 and 5/12 by chance; R@1 0.48 (image->text) and 0.51 (text->image) against
    # 1/176 = 0.006
    z, r = by_export["zeroshot"], by_export["retrieval"]
    assert z["top1"] > 3 / CLASSES and z["top5"] > 1.5 * 5 / CLASSES, z
    assert r["text_to_image_R@1"] > 20 / r["images"] and r["image_to_text_R@1"] > 20 / r["images"], r
    val = [m for m in metrics(out) if "val/zeroshot/top1" in m]
    assert [m["step"] for m in val] == [100, 200]  # eval during training: every 100 steps and the end


def test_routing_analysis_of_the_trained_model(trained, tmp_path):
    synth, out = trained
    res = run([sys.executable, "-m", "moe_dist", "analyze-routing", "--checkpoint", str(out / "checkpoints"),
               "--data", str(synth / "val"), "--classes", str(synth / "classes.json"), "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "routing.json").read_text())
    n = summary["samples"]
    vision = [r for name, r in summary["layers"].items() if name.startswith("vision.")]
    assert vision and all(r["image"]["tokens"] == n * 17 == sum(r["image"]["assignments"]) for r in vision)
    pngs = sorted(p for p in os.listdir(tmp_path) if p.endswith(".png"))
    assert "expert_share.png" in pngs and "modality_split.png" in pngs
    assert sum(p.startswith("class_preference_") for p in pngs) == len(summary["layers"])
