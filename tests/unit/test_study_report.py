"""experiments/study.py's routing report: the load, dead-expert and step-time aggregates on hand-worked
numbers, and the expert loads read back from what engine/metrics.py really writes (float loads included)."""

import importlib.util
import json
import math
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", os.path.join(ROOT, "experiments", "study.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_load_imbalance_is_max_over_mean_of_all_experts(study):
    assert study.load_imbalance([10, 0, 30, 0]) == 3.0  # mean 40/4 = 10, max 30
    assert study.load_imbalance([5, 5, 5, 5]) == 1.0
    assert study.load_imbalance([0.5, 1.5, 2.0, 0.0]) == 2.0  # Soft MoE masses: mean 1.0, max 2.0
    assert study.load_imbalance([0, 100]) == 2.0  # every token on one of two experts: E
    assert math.isnan(study.load_imbalance([0, 0, 0]))
    assert math.isnan(study.load_imbalance([]))


def test_dead_experts_are_exactly_zero_load(study):
    assert study.dead_experts([10, 0, 30, 0]) == 2
    assert study.dead_experts([1e-9, 0.0, 3.5]) == 1  # a tiny mass is alive
    assert study.dead_experts([1, 2, 3]) == 0


def test_window_loads_sums_the_logging_windows_ending_in_the_window(study):
    histograms = [(10, [1, 2, 3]), (20, [4, 5, 6]), (30, [7, 8, 9.5])]
    assert study.window_loads(histograms, 30, 20) == [11.0, 13.0, 15.5]  # steps 20 and 30
    assert study.window_loads(histograms, 30, 30) == [12.0, 15.0, 18.5]
    assert study.window_loads(histograms, 30, 5) == [7.0, 8.0, 9.5]
    assert study.window_loads(histograms, 20, 10) == [4.0, 5.0, 6.0]  # a later histogram is not counted
    assert study.window_loads(histograms, 30, 0) is None
    with pytest.raises(ValueError):
        study.window_loads([(10, [1, 2]), (20, [1, 2, 3])], 20, 20)


def test_layer_load_summary_aggregates_over_layers(study):
    out = study.layer_load_summary({"vision.1": [10, 0, 30, 0], "text.1": [5, 5, 5, 5], "vision.3": [0, 0, 0, 0]})
    assert out["per_layer"]["vision.1"]["max_over_mean"] == 3.0
    assert out["per_layer"]["vision.1"]["dead"] == 2
    assert out["per_layer"]["vision.3"]["dead"] == 4
    assert out["max/mean load (worst layer)"] == 3.0
    assert out["max/mean load (mean of layers)"] == 2.0  # (3 + 1) / 2: the idle layer has no ratio
    assert out["dead experts (all layers)"] == 6.0
    assert out["dead experts (worst layer)"] == 4.0
    empty = study.layer_load_summary({})
    assert math.isnan(empty["max/mean load (worst layer)"]) and math.isnan(empty["dead experts (all layers)"])


def test_median_step_time_skips_the_first_steps_and_rows_without_a_time(study):
    rows = [{"step": 10, "perf/step_time_s": 0.9}, {"step": 20, "perf/step_time_s": 0.2},
            {"step": 30, "perf/step_time_s": 0.1}, {"step": 40, "perf/step_time_s": 0.3},
            {"step": 50, "perf/step_time_s": 0.25}, {"step": 50, "val/retrieval/image_to_text_R@1": 0.1}]
    assert study.median_step_time(rows, 20) == 0.25  # 0.1, 0.25, 0.3
    assert study.median_step_time(rows, 10) == pytest.approx(0.225)  # 0.1, 0.2, 0.25, 0.3
    assert study.median_step_time(rows, 0) == 0.25  # 0.1, 0.2, 0.25, 0.3, 0.9
    assert math.isnan(study.median_step_time(rows, 50))


def test_window_dropped_ignores_the_per_modality_copies(study):
    rows = [{"step": 10, "moe/dropped_fraction/vision.1": 0.5},
            {"step": 20, "moe/dropped_fraction/vision.1": 0.1, "moe/dropped_fraction/image/vision.1": 0.9},
            {"step": 30, "moe/dropped_fraction/vision.1": 0.3, "moe/dropped_fraction/text.1": 0.0}]
    assert study.window_dropped(rows, 30, 20) == {"vision.1": pytest.approx(0.2), "text.1": 0.0}


def test_run_numbers_from_what_the_trainer_logs(study, tmp_path):
    """metrics.jsonl and the TensorBoard histograms written by the trainer's own logger, float loads (Soft
    MoE's slot mass) read back unrounded, aggregated over the window by hand."""
    from moe_dist.engine.metrics import MetricsLogger

    log = MetricsLogger(str(tmp_path), rank=0, total_steps=20, start_step=0, tensorboard=True, progress=False)
    loads = {10: ([0.5, 2.25, 0.0, 1.25], [3.0, 1.0, 0.0, 0.0]), 20: ([1.5, 0.75, 0.0, 2.75], [1.0, 1.0, 1.0, 1.0])}
    for step, (vision, text) in loads.items():
        stats = {"vision.1": {"tokens_per_expert": torch.tensor(vision, dtype=torch.float64),
                              "tokens_per_expert/image": torch.tensor([9.0, 0.0, 0.0, 0.0], dtype=torch.float64)},
                 "text.1": {"tokens_per_expert": torch.tensor(text, dtype=torch.float64)}}
        log.log(step, {"loss/contrastive": 4.0 - step / 10, "perf/step_time_s": step / 100,
                       "moe/dropped_fraction/vision.1": step / 100}, stats)
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 20, **{f"val/retrieval/{k}": v for k, v in (
            ("image_to_text_R@1", 0.1), ("image_to_text_R@10", 0.5), ("text_to_image_R@1", 0.2),
            ("text_to_image_R@10", 0.6))}}) + "\n")

    histograms = study.read_load_histograms(str(tmp_path / "tensorboard"))
    assert sorted(histograms) == ["text.1", "vision.1"]  # moe/expert_load/image/vision.1 is not a layer
    assert histograms["vision.1"] == [(10, [0.5, 2.25, 0.0, 1.25]), (20, [1.5, 0.75, 0.0, 2.75])]

    both = study.run_numbers(str(tmp_path), 20, window=20, skip=10)
    # vision.1 over steps 10 and 20: [2.0, 3.0, 0.0, 4.0], mean 2.25, max 4 -> 16/9; one dead
    # text.1: [4.0, 2.0, 1.0, 1.0], mean 2, max 4 -> 2.0; none dead
    assert both["layers"]["vision.1"]["max_over_mean"] == pytest.approx(16 / 9)
    assert both["layers"]["vision.1"]["loads"] == [2.0, 3.0, 0.0, 4.0]
    assert both["layers"]["text.1"]["max_over_mean"] == 2.0
    assert both["max/mean load (worst layer)"] == 2.0
    assert both["max/mean load (mean of layers)"] == pytest.approx((16 / 9 + 2.0) / 2)
    assert both["dead experts (all layers)"] == 1.0 and both["dead experts (worst layer)"] == 1.0
    assert both["dropped"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2, vision.1 only
    assert both["step time (s)"] == 0.2  # step 20 only
    assert both["train loss"] == pytest.approx(2.5)  # (3.0 + 2.0) / 2
    assert (both["i->t R@1"], both["i->t R@10"], both["t->i R@1"], both["t->i R@10"]) == (0.1, 0.5, 0.2, 0.6)

    last = study.run_numbers(str(tmp_path), 20, window=10, skip=0)
    # step 20 alone: vision.1 [1.5, 0.75, 0, 2.75], mean 1.25 -> 2.2, one dead; text.1 even -> 1.0
    assert last["layers"]["vision.1"]["max_over_mean"] == pytest.approx(2.2)
    assert last["max/mean load (mean of layers)"] == pytest.approx(1.6)
    assert last["step time (s)"] == pytest.approx(0.15)  # median of 0.1 and 0.2
    assert study.run_numbers(str(tmp_path), 30, window=10, skip=0) is None  # no final eval at step 30


def test_comparison_marks_only_differences_beyond_the_spread(study):
    def arm(r1, std):
        final = {c: None for c in study.ROUTING_COLUMNS}
        final.update({c: {"mean": r1, "std": std, "min": r1 - std, "max": r1 + std, "n": 3} for c in study.RETRIEVAL})
        return {"seeds": [0, 1, 2], "final": final, "layers": {}, "per_seed": {}}

    text = study.routing_tables({"moe": arm(0.05, 0.01), "moe-bias": arm(0.08, 0.02), "moe-ec": arm(0.04, 0.02)},
                                ["moe", "moe-bias", "moe-ec", "moe-soft"], 50)
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| moe-")}
    assert "| +0.030* |" in rows["moe-bias"] and rows["moe-bias"].endswith("| 4 / 0 |")  # 0.03 > 0.02
    assert "| -0.010 |" in rows["moe-ec"] and rows["moe-ec"].endswith("| 0 / 0 |")  # 0.01 < 0.02
    assert "moe-soft" not in rows  # not run: left out
