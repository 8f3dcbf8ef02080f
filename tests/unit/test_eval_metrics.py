"""Evaluation metrics against hand-worked values: accuracy, macro P/R/F1, recall@K, ranks, confusion PNG."""

import pytest
import torch

from moe_dist.evaluation import retrieval_metrics, save_confusion_png, zeroshot_metrics

CLASSES = ["cat", "dog", "bird"]


def _logits_for(preds, C):
    """[N, C] logits whose arg-max is ``preds[n]`` (score 1 there, 0 elsewhere)."""
    return torch.nn.functional.one_hot(torch.tensor(preds), C).float()


def test_zeroshot_accuracy_and_macro_f1_hand_worked():
    # labels [cat, cat, dog, dog, bird, bird], predictions [cat, dog, dog, dog, cat, bird]
    # confusion (rows true):  cat [1, 1, 0]   dog [0, 2, 0]   bird [1, 0, 1]
    #   top1 = 4/6
    #   recall:    cat 1/2, dog 2/2, bird 1/2             -> macro 2/3
    #   precision: cat 1/2 (column sum 2), dog 2/3, bird 1/1 -> macro (1/2 + 2/3 + 1) / 3 = 13/18
    #   F1:        cat 1/2, dog 2*(2/3)/(5/3) = 4/5, bird 2*(1/2)/(3/2) = 2/3 -> macro 59/90
    out = zeroshot_metrics(_logits_for([0, 1, 1, 1, 0, 2], 3), torch.tensor([0, 0, 1, 1, 2, 2]), CLASSES)
    assert out["top1"] == pytest.approx(4 / 6)
    assert out["top5"] == 1.0  # top-min(5, C): three classes, the truth is always among them
    assert out["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert out["per_class_recall"] == pytest.approx({"cat": 0.5, "dog": 1.0, "bird": 0.5})
    assert out["macro_recall"] == pytest.approx(2 / 3)
    assert out["macro_precision"] == pytest.approx(13 / 18)
    assert out["macro_f1"] == pytest.approx(59 / 90)
    assert out["samples"] == 6 and out["classes_with_support"] == 3


def test_zeroshot_top5_among_six_classes():
    # sample 0 (true class 0) has its class ranked last (6th); sample 1 (true class 1) ranks it 5th
    logits = torch.tensor([[0.0, 5, 4, 3, 2, 1], [5.0, 1, 4, 3, 2, 0]])
    out = zeroshot_metrics(logits, torch.tensor([0, 1]), list("abcdef"))
    assert out["top1"] == 0.0
    assert out["top5"] == 0.5


def test_zeroshot_class_without_support_and_class_never_predicted():
    # labels [cat, cat, dog], predictions [cat, bird, dog]: bird has no support, so the macro averages run
    # over cat and dog only; bird's wrong prediction already costs cat recall.
    #   cat: P 1/1, R 1/2, F1 2/3;  dog: P 1, R 1, F1 1  -> macro P 1, R 3/4, F1 5/6
    out = zeroshot_metrics(_logits_for([0, 2, 1], 3), torch.tensor([0, 0, 1]), CLASSES)
    assert set(out["per_class_recall"]) == {"cat", "dog"}
    assert out["classes_with_support"] == 2
    assert (out["macro_precision"], out["macro_recall"]) == pytest.approx((1.0, 0.75))
    assert out["macro_f1"] == pytest.approx(5 / 6)
    # labels [cat, dog], predictions [cat, cat]: dog is never predicted -> its precision is 0, F1 0
    #   cat: P 1/2, R 1, F1 2/3 -> macro P 1/4, R 1/2, F1 1/3
    out = zeroshot_metrics(_logits_for([0, 0], 3), torch.tensor([0, 1]), CLASSES)
    assert (out["macro_precision"], out["macro_recall"], out["macro_f1"]) == pytest.approx((0.25, 0.5, 1 / 3))


def test_zeroshot_chunks_repeated_names_and_bad_labels():
    logits = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(50) % 4
    names = ["crane", "dog", "crane", "cat"]  # open_clip's ImageNet names repeat "crane"
    whole, chunked = zeroshot_metrics(logits, labels, names), zeroshot_metrics(logits, labels, names, chunk=7)
    assert whole == chunked
    assert set(whole["per_class_recall"]) == {"crane [0]", "dog", "crane [2]", "cat"}
    with pytest.raises(ValueError, match="labels range over"):
        zeroshot_metrics(logits[:2], torch.tensor([0, 4]), names)
    with pytest.raises(ValueError, match="3 class names for 4"):
        zeroshot_metrics(logits, labels, names[:3])


def _hand_retrieval():
    # Images are the unit axes, so a caption's score for image i is its i-th component.
    images = torch.eye(3)
    texts = torch.tensor([[0.9, 0.1, 0.0],   # t0: image 0
                          [0.2, 0.5, 0.3],   # t1: image 0 (its second caption)
                          [0.1, 0.3, 0.6],   # t2: images 1 and 2 (the same string on two images)
                          [0.7, 0.2, 0.1]])  # t3: image 1
    return images, texts, [[0], [0], [1, 2], [1]]


@pytest.mark.parametrize("chunk", [1024, 2])
def test_retrieval_multiple_and_duplicate_captions_hand_worked(chunk):
    # text -> image (rank = 1 + wrong images scoring >= the best correct one):
    #   t0 [.9 .1 0] correct 0: rank 1;  t1 [.2 .5 .3] correct 0: .5 and .3 beat it -> rank 3
    #   t2 [.1 .3 .6] correct {1, 2}: best .6 -> rank 1;  t3 [.7 .2 .1] correct 1: .7 beats it -> rank 2
    #   ranks [1, 3, 1, 2]: R@1 2/4, R@5 1, mean 7/4, median (1 + 2)/2
    # image -> text (any caption of the image is a hit; scores are the columns above):
    #   i0 [.9 .2 .1 .7] correct {t0, t1}: .9 -> rank 1
    #   i1 [.1 .5 .3 .2] correct {t2, t3}: .3; t1 (.5) beats it -> rank 2
    #   i2 [0 .3 .6 .1] correct {t2}: .6 -> rank 1
    #   ranks [1, 2, 1]: R@1 2/3, mean 4/3, median 1
    out = retrieval_metrics(*_hand_retrieval(), chunk=chunk)
    assert out["text_to_image_R@1"] == 0.5
    assert out["text_to_image_R@5"] == out["text_to_image_R@10"] == 1.0
    assert out["text_to_image_mean_rank"] == 1.75 and out["text_to_image_median_rank"] == 1.5
    assert out["image_to_text_R@1"] == pytest.approx(2 / 3)
    assert out["image_to_text_R@5"] == 1.0
    assert out["image_to_text_mean_rank"] == pytest.approx(4 / 3) and out["image_to_text_median_rank"] == 1.0
    assert (out["images"], out["texts"], out["duplicate_captions"]) == (3, 4, 1)


def test_retrieval_recall_at_5_and_10_and_ties_count_against_the_query():
    # 12 images (unit axes); every caption scores image i as 12 - i, and caption j belongs to image j, so
    # text -> image ranks are 1..12: R@1 1/12, R@5 5/12, R@10 10/12, mean = median = 6.5.
    # image -> text: image i scores every caption 12 - i, a 12-way tie; ties count against the query, so
    # each rank is 12 and every recall 0.
    images = torch.eye(12)
    texts = (12 - torch.arange(12.0)).expand(12, 12)
    out = retrieval_metrics(images, texts, [[j] for j in range(12)], chunk=5)
    assert [out[f"text_to_image_R@{k}"] for k in (1, 5, 10)] == pytest.approx([1 / 12, 5 / 12, 10 / 12])
    assert out["text_to_image_mean_rank"] == 6.5 and out["text_to_image_median_rank"] == 6.5
    assert [out[f"image_to_text_R@{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 0.0]
    assert out["image_to_text_mean_rank"] == 12.0


def test_retrieval_refuses_inconsistent_inputs():
    images, texts, owners = _hand_retrieval()
    with pytest.raises(ValueError, match="images have no caption"):
        retrieval_metrics(images, texts[:2], owners[:2])
    with pytest.raises(ValueError, match="each caption needs images"):
        retrieval_metrics(images, texts, [[0], [0], [5], [1, 2]])


@pytest.mark.parametrize("C", [3, 100])
def test_confusion_png(tmp_path, C):
    confusion = torch.randint(0, 5, (C, C)).tolist()
    confusion[1] = [0] * C  # a class without support stays blank
    path = tmp_path / "confusion.png"
    save_confusion_png(confusion, [f"class {c}" for c in range(C)], str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(tmp_path.glob("*.tmp.*"))
