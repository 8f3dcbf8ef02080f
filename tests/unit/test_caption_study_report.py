"""experiments/caption_study.py: the three targets, the per-arm aggregate over seeds and the docs block,
on hand-made metrics.jsonl files shaped as the trainer writes them."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def caption_study():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import caption_study

        yield caption_study
    finally:
        sys.path.remove(os.path.join(ROOT, "experiments"))


def metrics(cider, retrieval_cider, f1, constant_f1, share):
    return {"cider_d": cider, "retrieval_cider_d": retrieval_cider, "token_f1": f1, "constant_token_f1": constant_f1,
            "top_caption_share": share}


def test_targets_are_the_issues_three(caption_study):
    assert caption_study.targets(metrics(0.3, 0.2, 0.375, 0.25, 0.10)) == {
        "CIDEr-D > retrieval": True, "F1 >= 1.5x constant": True, "top share <= 10 %": True}  # 0.375 = 1.5 x 0.25
    assert list(caption_study.targets(metrics(0.2, 0.2, 0.374, 0.25, 0.11)).values()) == [False, False, False]


def write_run(directory, seed, final):
    os.makedirs(directory)
    rows = [{"step": s, "loss/caption": 5.0 - s / 100 - seed} for s in range(10, 310, 10)]
    rows.append({"step": 300, "val/loss/caption": 4.0 + seed, "val/retrieval/image_to_text_R@10": 0.2,
                 **{f"val/caption/{k}": v for k, v in final.items()}})
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_collect_averages_seeds_and_counts_targets(caption_study, tmp_path):
    good = {**metrics(0.3, 0.2, 0.2, 0.1, 0.05), "bleu4": 0.1, "distinct": 0.5}
    bad = {**metrics(0.1, 0.2, 0.1, 0.1, 0.5), "bleu4": 0.0, "distinct": 0.1}
    write_run(tmp_path / "coca-moe" / "seed0", 0, good)
    write_run(tmp_path / "coca-moe" / "seed1", 1, bad)
    os.makedirs(tmp_path / "coca-moe" / "seed2")  # unfinished: no metrics, left out
    result = caption_study.collect(str(tmp_path), ["coca-moe", "coca-dense"])
    assert list(result) == ["coca-moe"] and result["coca-moe"]["seeds"] == 2
    final = result["coca-moe"]["final"]
    assert final["token_f1"]["mean"] == pytest.approx(0.15) and final["val caption loss"]["mean"] == 4.5
    # train caption loss: the mean of the last 5 logged values (steps 260..300): 5 - 2.8 - seed, seeds 0 and 1
    assert final["train caption loss"]["mean"] == pytest.approx(2.2 - 0.5)
    assert result["coca-moe"]["targets"] == {"CIDEr-D > retrieval": 1, "F1 >= 1.5x constant": 1,
                                             "top share <= 10 %": 1}
    table = caption_study.main_table(result, ["coca-moe"])
    assert "| coca-moe | 2 | 1.70 ± 0.71 |" in table and "CIDEr-D > retrieval: 1/2" in table


def test_docs_block_uses_the_caption_markers(caption_study, tmp_path):
    import study

    page = tmp_path / "results.md"
    page.write_text(f"intro\n{study.DOCS_BEGIN}\nrouting\n{study.DOCS_END}\n{caption_study.BEGIN}\nold\n"
                    f"{caption_study.END}\nend\n")
    assert study.write_docs_block(str(page), "new table", caption_study.BEGIN, caption_study.END)
    assert page.read_text() == (f"intro\n{study.DOCS_BEGIN}\nrouting\n{study.DOCS_END}\n{caption_study.BEGIN}\n"
                                f"new table\n{caption_study.END}\nend\n")
