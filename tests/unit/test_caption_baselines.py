"""The caption baselines (issue 28): the best constant caption's exact search against a brute force over
``token_f1``, retrieval captioning by hand, the pool reader, and the flat keys the eval logs."""

import random

import pytest
import torch

from moe_dist.evaluation.caption_baselines import (best_constant, caption_baselines, caption_scores,
                                                   constant_token_f1, read_caption_pool, retrieval_captions)
from moe_dist.evaluation.captioning import caption_metrics, token_f1

WORDS = ["a", "red", "blue", "circle", "square", "big", "small", "face", "with", "the"]


def brute_constant_f1(candidate, references):
    """The definition: the mean over images of the best token F1 against that image's references."""
    return sum(max(token_f1(candidate, r) for r in refs) for refs in references.values()) / len(references)


def random_sentence(rng, low=0, high=6):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))  # repeats and empty sentences


@pytest.mark.parametrize("chunk", [3, 4096])
def test_constant_f1_equals_the_definition_with_repeated_words(chunk):
    rng = random.Random(chunk)
    candidates = [random_sentence(rng) for _ in range(40)] + ["red red red", "Red, red circle!", ""]
    references = {f"img{i}": [random_sentence(rng, 1) for _ in range(rng.randint(1, 3))] for i in range(25)}
    references["img0"] = ["red red circle"]  # a repeat on both sides: min(3, 2) + min(1, 1) shared words
    got = constant_token_f1(candidates, references, chunk=chunk)
    want = torch.tensor([brute_constant_f1(c, references) for c in candidates])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # hand-worked: "red red red" vs "red red circle" shares 2 of 3 and 3 words: F1 = 2 * 2 / (3 + 3)
    assert token_f1("red red red", "red red circle") == pytest.approx(2 / 3)
    assert float(constant_token_f1(["red red red"], {"x": ["red red circle"]})[0]) == pytest.approx(2 / 3)


def test_best_constant_is_the_argmax_and_scored_as_given_to_every_image():
    references = {"a": ["a red circle", "red circle"], "b": ["a blue square"], "c": ["a red square"]}
    pool = ["blue", "a red square", "red circle", "the"]
    out = best_constant(pool, references)
    scores = [brute_constant_f1(c, references) for c in pool]
    assert out["caption"] == pool[scores.index(max(scores))] == "a red square"
    assert out["token_f1"] == pytest.approx(max(scores))
    assert out["cider_d"] == pytest.approx(caption_metrics({k: "a red square" for k in references}, references)["cider_d"])


def test_retrieval_captions_pick_the_nearest_pool_caption():
    pool = ["east", "north", "west"]
    pool_ND = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    images_ID = torch.tensor([[0.6, 0.8], [-0.8, 0.6], [0.8, -0.6]])  # nearest: north, west, east
    assert retrieval_captions(images_ID, pool_ND, pool) == ["north", "west", "east"]


def test_caption_scores_put_both_baselines_beside_the_model():
    rows = [{"image_id": "i1", "caption": "red circle", "generated": "red circle", "image_features": torch.tensor([1., 0.])},
            {"image_id": "i1", "caption": "a red circle", "generated": "ignored", "image_features": torch.tensor([1., 0.])},
            {"image_id": "i2", "caption": "blue square", "generated": "red circle", "image_features": torch.tensor([0., 1.])}]
    pool = ["red circle", "blue square"]
    out = caption_scores(rows, pool, torch.eye(2))
    references = {"i1": ["red circle", "a red circle"], "i2": ["blue square"]}
    model = caption_metrics({"i1": "red circle", "i2": "red circle"}, references)
    assert {k: out[k] for k in model} == model  # the model's own numbers are unchanged
    retrieval = caption_metrics({"i1": "red circle", "i2": "blue square"}, references)
    assert out["retrieval_token_f1"] == retrieval["token_f1"] == 1.0 and out["retrieval_distinct"] == 1.0
    assert out["constant_chosen_in_hindsight"] is True and out["pool_captions"] == 2
    assert out["constant_caption"] == "red circle" and out["constant_token_f1"] == pytest.approx(0.5)
    # without image features only the constant baseline is there
    assert "retrieval_token_f1" not in caption_baselines({"i1": "x"}, {"i1": ["red"]}, ["red"])


def test_pool_reads_distinct_captions_in_order_up_to_the_limit(tmp_path):
    from helpers.data import jpeg_bytes, write_tar

    captions = ["A red circle.", "a red circle", "blue square", "  ", "green", "blue square", "yellow"]
    samples = [{"__key__": f"s{i:03d}", "jpg": jpeg_bytes(i), "txt": c.encode()} for i, c in enumerate(captions)]
    write_tar(tmp_path / "shard-000.tar", samples[:4])
    write_tar(tmp_path / "shard-001.tar", samples[4:])
    spec = str(tmp_path / "shard-{000..001}.tar")
    assert read_caption_pool(spec) == ["A red circle.", "blue square", "green", "yellow"]
    assert read_caption_pool(spec, limit=2) == ["A red circle.", "blue square"]
    with pytest.raises(ValueError, match="must be >= 1"):
        read_caption_pool(spec, limit=0)
    write_tar(tmp_path / "empty.tar", [{"__key__": "e", "jpg": jpeg_bytes(0), "txt": b"   "}])
    with pytest.raises(ValueError, match="holds no caption"):
        read_caption_pool(str(tmp_path / "empty.tar"))
