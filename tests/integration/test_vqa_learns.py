"""Acceptance 2 of the captioning issue: a tiny CoCa-MoE trained for ~2 minutes on 2 CPU ranks (ep_size=2,
ZeRO-2) on synth VQA answers questions about scenes it never saw far above the baselines, and the periodic
VQA eval during training scores what `moe-dist vqa` scores.

The issue asks for 3x "the majority-answer baseline of its question types". Taken per type (each type
answered with its own most frequent answer: 0.39 here) that would need 117 % accuracy, since yes/no and
count questions have type baselines near 0.5. The test asserts 3x the one-answer baseline (every
question answered with the most frequent answer: 0.125) and a clear lead over the per-type baseline.

Measured here (300 steps of 2 x 32, word tokenizer; 936 questions about ~200 unseen scenes, those of 300
another seed draws whose main object is not a held-out pair):
    all 0.674 (per-type baseline 0.390, one answer 0.125); colour 0.80 (0.27), shape 0.60 (0.38),
    count 0.56 (0.51), yes/no 0.74 (0.55).
On the compositional split (colour-shape pairs training shows only as second objects) shape drops to
0.11: the model answers the shape it saw with that colour in training (docs/captioning.md).
"""

import json
import os
import sys

from helpers.harness import free_port
from helpers.train import ROOT, metrics, run

CONFIG = os.path.join(ROOT, "configs", "runs", "coca-tiny-vqa.yaml")


def test_vqa_on_unseen_scenes_beats_the_baselines(tmp_path):
    from data_tools.cli import main as data_cli
    from moe_dist.cli import main

    assert data_cli(["synth", "--vqa", "--out", str(tmp_path / "data"), "--n", "1500", "--per-shard", "500",
                     "--size", "32", "-q"]) == 0
    # unseen scenes of the same kinds: another seed's non-held-out questions
    assert data_cli(["synth", "--vqa", "--out", str(tmp_path / "unseen"), "--n", "300", "--per-shard", "1000",
                     "--size", "32", "--seed", "7", "-q"]) == 0
    tok = tmp_path / "tok.model"
    assert data_cli(["tokenizer", str(tmp_path / "data"), "--out", str(tok), "--model-type", "word",
                     "--vocab-size", "60", "-q"]) == 0
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "moe_dist", "train", "--config", CONFIG, "--set", f"data.train={tmp_path / 'data' / 'train'}",
           "--set", f"data.tokenizer={tok}", "--set", f"output_dir={out}", "--set", "logging.progress=false",
           "--set", "model.text.vocab_size=64", "--set", f"data.val={tmp_path / 'unseen' / 'train'}",
           "--set", "eval.every=300", "--set", "eval.tasks=[vqa]"]  # the periodic eval, at the last step
    res = run(cmd, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    scores_path = tmp_path / "vqa.json"
    assert main(["vqa", "--checkpoint", str(out / "checkpoints"), "--data", str(tmp_path / "unseen" / "train"),
                 "--json", str(scores_path)]) == 0
    scores = json.loads(scores_path.read_text())
    types = scores["per_type"]
    assert set(types) == {"colour", "shape", "count", "yes/no"} and scores["questions"] > 800
    assert scores["accuracy"] >= 3 * scores["single_answer_baseline"], scores
    assert scores["accuracy"] >= scores["majority_baseline"] + 0.15, scores
    assert types["colour"]["accuracy"] >= 2 * types["colour"]["majority_baseline"], types
    assert types["shape"]["accuracy"] >= types["shape"]["majority_baseline"] + 0.1, types
    # the periodic eval during training (2 ranks, ep_size=2, decoding in lockstep) scored the same answers;
    # its batches differ from the CLI's, so a near-tie may flip one answer
    during = [m for m in metrics(out) if "val/vqa/accuracy" in m]
    assert [m["step"] for m in during] == [300]
    assert abs(during[0]["val/vqa/accuracy"] - scores["accuracy"]) <= 2 / scores["questions"], (during, scores)
