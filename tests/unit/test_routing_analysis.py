"""Routing analysis on a tiny model: counts add up to the tokens routed, forced balance is uniform,
per-class shares are distributions, and the plots and JSON are written."""

import json
import os

import pytest
import torch

from moe_dist.evaluation.routing import RoutingProbe, save_plots
from moe_dist.models import create_model

B, C = 6, 3  # samples, classes
TEXT = {"tokenizer": "openclip-bpe"}  # the tiny configs name a sentencepiece file the tests do not need


def _batch(cfg):
    torch.manual_seed(0)
    images = torch.randn(B, 3, cfg.vision.image_size, cfg.vision.image_size)
    lengths = torch.tensor([3, 5, 8, 2, 6, 4])  # tokens up to and including EOS
    tokens = torch.randint(4, cfg.text.vocab_size, (B, cfg.text.context_length))
    positions = torch.arange(cfg.text.context_length)[None, :]
    tokens[positions == (lengths - 1)[:, None]] = cfg.text.eos_id
    tokens[positions >= lengths[:, None]] = cfg.text.pad_id
    return images, tokens, int(lengths.sum())


def _probe(model, labels=None, capacity_factor=1.0):
    images, tokens, text_tokens = _batch(model.cfg)
    probe = RoutingProbe(model, C if labels is not None else 0, capacity_factor)
    with torch.no_grad(), probe:
        probe.set_batch(B, labels)
        model(images, tokens)
    return probe.summary([f"class {c}" for c in range(C)] if labels is not None else ()), text_tokens


@pytest.mark.parametrize("name", ["moe-clip-tiny", "limoe-tiny"])
def test_counts_add_up_to_the_tokens_routed(name):
    model = create_model(name, text=TEXT).eval()
    summary, text_tokens = _probe(model)
    patches = (model.cfg.vision.image_size // model.cfg.vision.patch_size) ** 2 + 1
    assert summary["samples"] == B
    for layer, report in summary["layers"].items():
        if "image" in report:
            assert report["image"]["tokens"] == B * patches
            assert sum(report["image"]["assignments"]) == B * patches  # top-1: one assignment per token
            assert abs(sum(report["image"]["share"]) - 1) < 1e-9
        if "text" in report:
            assert report["text"]["tokens"] == text_tokens  # padding after EOS is never routed
            assert sum(report["text"]["assignments"]) == text_tokens
    kinds = {m for report in summary["layers"].values() for m in ("image", "text") if m in report}
    assert kinds == {"image", "text"}


def test_forced_balance_shows_uniform_load():
    model = create_model("moe-clip-tiny", text=TEXT, moe={"num_experts": 4, "top_k": 1, "force_balanced": True})
    summary, _ = _probe(model.eval())
    for report in summary["layers"].values():
        if "image" in report:  # image token t takes expert t mod 4 (text padding, never routed, breaks the cycle)
            counts = report["image"]["assignments"]
            assert max(counts) - min(counts) <= 1, counts
        for modality in ("image", "text"):
            if modality in report:
                assert report[modality]["never_chosen"] == [] and report[modality]["rare"] == []


def test_capacity_drops_and_class_shares(tmp_path):
    model = create_model("moe-clip-tiny", text=TEXT, moe={"num_experts": 4, "top_k": 1, "min_capacity": 0}).eval()
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    summary, _ = _probe(model, labels, capacity_factor=0.25)
    layer = next(n for n, r in summary["layers"].items() if "image" in r)
    image = summary["layers"][layer]["image"]
    # capacity per expert and call = ceil(0.25 * T / 4) of T = 102 tokens: 7, so at most 28 of 102 are kept
    assert image["dropped_fraction"] >= 1 - 28 / 102 - 1e-9
    for row in image["class_share"]:
        assert abs(sum(row) - 1) < 1e-9
    paths = save_plots(summary, str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert "expert_share.png" in names and "modality_split.png" in names
    assert any(n.startswith("class_preference_vision.") for n in names)
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    json.dumps(summary)  # the summary is JSON as it is


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_whole_sequence_routers_in_the_analysis(router):
    """LIMoE (bidirectional, both modalities through each layer): Expert-Choice counts each expert's
    capacity of the call exactly (ceil(1.25 T / E) of the T tokens, padding included); Soft MoE reports
    each token's combine weight per expert, so a modality's row sums to its real tokens."""
    overrides = {"router": router, "capacity_factor": 1.25, "slots_per_expert": 2}
    if router == "soft":
        overrides["modality_experts"] = (0, 0)
    model = create_model("limoe-tiny", text=TEXT, moe=overrides).eval()
    summary, text_tokens = _probe(model)
    for layer in summary["layers"].values():
        image, text = layer["image"], layer["text"]
        assert image["tokens"] == B * 17 and text["tokens"] == text_tokens
        if router == "soft":
            assert image["unit"] == "slot_weight"
            assert sum(image["assignments"]) == pytest.approx(B * 17, rel=1e-6)  # fp32 weights
            assert sum(text["assignments"]) == pytest.approx(text_tokens, rel=1e-6)
        else:  # one call of 2B sequences of L tokens, E experts: each takes ceil(1.25 * 2B * L / E)
            E, L = len(image["assignments"]), 32  # limoe-tiny pads both modalities to the text length
            per_expert = [i + t for i, t in zip(image["assignments"], text["assignments"])]
            assert per_expert == [-(-125 * 2 * B * L // (100 * E))] * E
