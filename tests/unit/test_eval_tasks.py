"""The eval set (exact split over ranks, broken samples, image identity), ``evaluate`` on synth data with a
random tiny model (labels by index or name, bad class lists, capacity mode) and ``moe-dist eval``."""

import argparse
import json

import pytest
import torch

from helpers.data import good_sample, jpeg_bytes, write_tar
from helpers.train import make_synth
from moe_dist.data import EvalSet
from moe_dist.data.evalset import default_eval_transform, eval_batches, first_metadata
from moe_dist.evaluation import EvalResult, evaluate, parse_tasks
from moe_dist.models import create_model
from moe_dist.text.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=240)  # train: 6 shards, 219 samples; val: 1, 21


@pytest.fixture(scope="module")
def model_and_tokenizer(synth):
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny")
    return model, get_tokenizer(str(synth / "tok.model"), model.cfg.text.context_length)


def _keys(spec, tokenizer, rank, world_size, batch_size=16):
    evalset = EvalSet(spec, default_eval_transform(32), tokenizer, batch_size, rank, world_size)
    batches = list(eval_batches(evalset))
    assert all(len(b.keys) <= batch_size for b in batches)
    assert all(len({int(s) for s in b.keys[:, 0]}) <= 1 for b in batches)  # batches never span shards
    return [tuple(k) for b in batches for k in b.keys.tolist()]


@pytest.mark.parametrize("world_size", [1, 3, 8])  # 8 ranks for 6 shards: two ranks get none
def test_evalset_reads_every_sample_exactly_once_over_ranks(synth, model_and_tokenizer, world_size):
    tokenizer = model_and_tokenizer[1]
    per_rank = [_keys(str(synth / "train"), tokenizer, r, world_size) for r in range(world_size)]
    keys = [k for rank_keys in per_rank for k in rank_keys]
    assert len(keys) == len(set(keys)) == 219
    assert sum(1 for rank_keys in per_rank if not rank_keys) == max(0, world_size - 6)


def test_evalset_counts_broken_samples_and_identifies_images(tmp_path, model_and_tokenizer):
    same = jpeg_bytes(7)
    samples = [good_sample(0), {"__key__": "bad", "jpg": b"not a jpeg", "txt": b"broken"},
               {"__key__": "a", "jpg": same, "txt": b"one caption"}, {"__key__": "b", "jpg": same, "txt": b"another"},
               good_sample(1), {"__key__": "nocap", "jpg": jpeg_bytes(3)}]
    write_tar(tmp_path / "s.tar", samples)
    evalset = EvalSet(str(tmp_path / "s.tar"), default_eval_transform(32), model_and_tokenizer[1], batch_size=2)
    batches = list(eval_batches(evalset))
    assert [len(b.keys) for b in batches] == [2, 2, 0]  # the shard's closing batch: empty, with a failure
    failures = {}
    for b in batches:
        for reason, n in b.failures.items():
            failures[reason] = failures.get(reason, 0) + n
    assert failures == {"undecodable_image": 1, "missing_caption": 1}
    ids = [i for b in batches for i in b.image_ids]
    assert ids[1] == ids[2] != ids[0]  # one image stored with two captions is one image
    assert batches[-1].failures == {"missing_caption": 1}
    assert [tuple(k) for b in batches for k in b.keys.tolist()] == [(0, 0), (0, 2), (0, 3), (0, 4)]
    assert batches[0].images.shape == (2, 3, 32, 32)


def test_evaluate_on_synth_labels_by_index_or_name(synth, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    kwargs = dict(batch_size=8, classes=str(synth / "classes.json"), progress=False)
    by_index = evaluate(model, tokenizer, str(synth / "val"), **kwargs)
    by_name = evaluate(model, tokenizer, str(synth / "val"), tasks="zeroshot", label_key="class", **kwargs)
    assert isinstance(by_index, EvalResult)
    assert by_index.groups["zeroshot"] == by_name.groups["zeroshot"]
    assert by_index.groups["samples"] == {"evaluated": 21, "failed": 0, "failures": {}, "ranks": 1}
    scalars = by_index.scalars()
    for key in ("zeroshot/top1", "zeroshot/top5", "zeroshot/macro_f1", "retrieval/image_to_text_R@1",
                "retrieval/text_to_image_median_rank", "loss/contrastive", "loss/total", "samples/evaluated"):
        assert key in scalars, key
    assert "zeroshot/per_class_recall" not in scalars and "routing/dropped_fraction" not in scalars
    assert sum(map(sum, by_index.confusion)) == 21 and len(by_index.class_names) == 12
    assert 0 <= scalars["zeroshot/top1"] <= scalars["zeroshot/top5"] <= 1
    assert by_index.groups["retrieval"]["texts"] <= by_index.groups["retrieval"]["images"] == 21


def test_evaluate_refuses_class_names_that_do_not_match_the_labels(synth, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    spec = str(synth / "val")
    with pytest.raises(ValueError, match=r"label=\d+, outside the 2 class names .* do not match the labels"):
        evaluate(model, tokenizer, spec, tasks="zeroshot", classes=["cat", "dog"], progress=False)
    with pytest.raises(ValueError, match="which is not a class name in the given class list"):
        evaluate(model, tokenizer, spec, tasks="zeroshot", classes=["cat", "dog"], label_key="class",
                 progress=False)
    with pytest.raises(ValueError, match="has no 'species' in its json"):
        evaluate(model, tokenizer, spec, tasks="zeroshot", classes=["cat"], label_key="species", progress=False)
    with pytest.raises(ValueError, match="unknown eval task"):
        parse_tasks(["zeroshot,captioning"])
    assert parse_tasks(["loss", "zeroshot,loss"]) == ["zeroshot", "loss"]


def test_capacity_mode_reports_drops_and_restores_the_model(synth, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    model.train()
    policies = [m.policy for m in model.modules() if hasattr(m, "set_dropless")]
    result = evaluate(model, tokenizer, str(synth / "val"), tasks=["retrieval"], dropless=False, progress=False)
    routing = result.groups["routing"]
    assert 0 <= routing["dropped_fraction"] <= 1 and len(routing["dropped_fraction_per_layer"]) >= 2
    assert model.training and [m.policy for m in model.modules() if hasattr(m, "set_dropless")] == policies


def test_eval_command(synth, model_and_tokenizer, tmp_path, monkeypatch, capsys):
    import moe_dist.models
    from moe_dist.cli import eval as eval_cli

    monkeypatch.setattr(moe_dist.models, "load_pretrained", lambda path, ep_size=1: model_and_tokenizer,
                        raising=False)
    parser = argparse.ArgumentParser()
    eval_cli.add(parser.add_subparsers())
    out_json, out_png = tmp_path / "m.json", tmp_path / "c.png"
    args = parser.parse_args(["eval", "--checkpoint", "ckpt", "--data", str(synth / "val"), "--classes",
                              str(synth / "classes.json"), "--json", str(out_json), "--confusion-png", str(out_png),
                              "--workers", "1", "--batch", "8"])
    assert first_metadata(str(synth / "val"))["label"] in range(12)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "image_to_text_R@1" in printed and "top1" in printed
    report = json.loads(out_json.read_text())
    assert report["tasks"] == ["zeroshot", "retrieval", "loss"]  # zero-shot: --classes given, samples labelled
    assert {"top1", "top5", "macro_f1", "per_class_recall", "confusion"} <= set(report["zeroshot"])
    assert out_png.read_bytes()[:4] == b"\x89PNG"
    args = parser.parse_args(["eval", "--checkpoint", "c", "--data", str(synth / "val"), "--task", "loss",
                              "--confusion-png", str(out_png)])
    with pytest.raises(ValueError, match="--confusion-png needs the zeroshot task"):
        args.func(args)
