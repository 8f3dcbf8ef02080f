"""BLEU-4, CIDEr-D and VQA accuracy: hand-worked values, and the coco-caption reference implementation's numbers."""

import math

import pytest

from moe_dist.evaluation.captioning import bleu, caption_metrics, cider_d, normalize_answer, tokenize, vqa_accuracy


def test_bleu_hand_worked():
    # hyp "the cat is on the mat" vs ref "the cat sat on the mat" (both 6 words, so no brevity penalty):
    # unigrams 5/6 (the x2, cat, on, mat), bigrams 3/5 (the cat, on the, the mat), trigrams 1/4 (on the mat),
    # 4-grams 0/3. BLEU-2 = sqrt(5/6 * 3/5) = sqrt(1/2); BLEU-3 = (5/6 * 3/5 * 1/4)^(1/3) = 1/2.
    out = bleu({"a": "The cat is on the mat."}, {"a": ["the cat sat on the mat"]})
    assert out["bleu1"] == pytest.approx(5 / 6)
    assert out["bleu2"] == pytest.approx(math.sqrt(0.5))
    assert out["bleu3"] == pytest.approx(0.5)
    assert out["bleu4"] < 1e-3  # no 4-gram matches: only coco-caption's 1e-15 smoothing is left


def test_bleu_brevity_penalty_and_closest_reference():
    # "the cat" against a 6-word reference: every n-gram matches (p1 = 2/2, p2 = 1/1), BP = exp(1 - 6/2)
    out = bleu({"a": "the cat"}, {"a": ["the cat sat on the mat"]}, n_max=2)
    assert out["bleu2"] == pytest.approx(math.exp(-2))
    # the closest reference length (3 words, not 6) is the one the penalty uses: BP = exp(1 - 3/2)
    out = bleu({"a": "the cat"}, {"a": ["the cat sat on the mat", "the cat sat"]}, n_max=2)
    assert out["bleu2"] == pytest.approx(math.exp(-0.5))


def test_cider_d_hand_worked():
    # two images, each hypothesis equal to its only reference and sharing no n-gram with the other image:
    # every n-gram has df = 1, weight log(2); cosine 1 for n = 1, 2; no trigrams / 4-grams (value 0);
    # equal lengths (Gaussian 1): 10 x (1 + 1 + 0 + 0) / 4 = 5.
    refs = {"a": ["red circle"], "b": ["blue square"]}
    assert cider_d({"a": "red circle", "b": "blue square"}, refs) == pytest.approx(5.0)
    # one image alone: log N = log 1 = 0, every weight vanishes
    assert cider_d({"a": "red circle"}, {"a": ["red circle"]}) == 0.0


# Reference numbers: pycocoevalcap 1.2 (coco-caption's Python scorers), Bleu(4).compute_score and
# Cider().compute_score on exactly these inputs (already lowercase words, as its PTB tokenizer leaves them).
GTS = {
    "1": ["a cat sits on the mat", "there is a cat on the mat"],
    "2": ["a dog runs in the park", "the dog is running across the grass"],
    "3": ["two red circles left of a blue square"],
    "4": ["a man riding a horse on a beach", "a person rides a horse along the shore"],
}
RES = {"1": "the cat is on the mat", "2": "a dog runs across the park", "3": "two red circles left of a green square",
       "4": "a man rides a horse"}
REF_BLEU = [0.8159668017145075, 0.6945970688391574, 0.5606173804465348, 0.4357782589881983]
# per image: 3.5233798835856405, 2.8365921065840514, 7.095238095238096, 2.2789726486785273
REF_CIDER_D = 3.933545683521579


def test_matches_coco_caption_reference_numbers():
    out = bleu(RES, GTS)
    assert [out[f"bleu{n}"] for n in range(1, 5)] == pytest.approx(REF_BLEU, rel=1e-12)
    assert cider_d(RES, GTS) == pytest.approx(REF_CIDER_D, rel=1e-12)
    assert cider_d({"3": RES["3"]}, {"3": GTS["3"]}) == 0.0  # alone, image 3 has log N = 0 (its 7.10 needs the set)


def test_caption_metrics_exact_match_and_missing_reference():
    out = caption_metrics({"a": "A red circle.", "b": "a blue square"}, {"a": ["a red circle"], "b": ["a square"]})
    assert out["exact_match"] == 0.5 and out["images"] == 2
    with pytest.raises(ValueError, match="no reference"):
        caption_metrics({"a": "x"}, {})


def test_vqa_normalisation_and_accuracy():
    assert tokenize("Left, of a STAR!") == ["left", "of", "a", "star"]
    assert normalize_answer("Two.") == "2"
    assert normalize_answer("The Red") == "red"
    assert normalize_answer("an apple") == "apple"
    out = vqa_accuracy(["red", "Two", "yes", "no"], ["red", "2", "no", "no"], ["colour", "count", "yes/no", "yes/no"])
    assert out["accuracy"] == 0.75
    assert out["per_type"]["yes/no"] == {"accuracy": 0.5, "questions": 2, "majority_baseline": 1.0}
    assert out["majority_baseline"] == 1.0  # every type's most frequent answer covers all of its questions
    assert out["single_answer_baseline"] == 0.5  # "no" answers 2 of the 4


def test_token_f1_and_diversity_hand_worked():
    from moe_dist.evaluation.captioning import token_f1

    # "a red circle" vs "a big red square": 2 shared words; P = 2/3, R = 2/4, F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert token_f1("A red circle.", "a big red square") == pytest.approx(4 / 7, abs=1e-12)
    assert token_f1("", "a cat") == 0.0 and token_f1("dog", "a cat") == 0.0
    hyp = {"a": "a red circle", "b": "A red circle!", "c": "a blue square"}
    refs = {"a": ["a big red square", "a red circle"], "b": ["two cats"], "c": ["a blue square"]}
    out = caption_metrics(hyp, refs)
    # token F1: image a takes its best reference (1.0), b shares no word (0), c is exact (1.0)
    assert out["token_f1"] == pytest.approx(2 / 3, abs=1e-12)
    # two distinct captions after tokenisation over 3 images; the most frequent one is given to 2 of them
    assert out["distinct"] == pytest.approx(2 / 3) and out["top_caption_share"] == pytest.approx(2 / 3)
