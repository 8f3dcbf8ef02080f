"""`moe-dist caption` and `moe-dist vqa` end to end on exports of untrained models (the mechanics, not the
quality: tests/integration/test_caption_overfit.py trains): images of different sizes, an empty prompt, a
maximum length of 1, beam and top-p, JSONL out, and one clear line for each bad input."""

import base64
import json

import pytest
import torch
from PIL import Image


WORDS = "a large small red green blue yellow circle square triangle circles squares two three left right of " \
        "question: what colour is the how many are there? shape object answer: yes no one is"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from safetensors.torch import save_file

    from moe_dist.models import create_model
    from moe_dist.models.pretrained import EXPORT_FORMAT, portable_config
    from moe_dist.text.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("exports")
    tok = train_sentencepiece([WORDS] * 20 + WORDS.split(), vocab_size=64, model_type="word")
    out = {}
    for name, kind in (("coca-tiny", "coca"), ("moe-clip-tiny", "clip")):
        torch.manual_seed(0)
        model = create_model(name, overrides={"text": {"tokenizer": "openclip-bpe", "vocab_size": 64}})
        meta = {"format": EXPORT_FORMAT, "model_config": json.dumps(portable_config(model.cfg, tok)), "dtype": "fp32",
                "step": "", "source": "test", "tokenizer": "sentencepiece",
                "tokenizer_model": base64.b64encode(tok).decode()}
        weights = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(root / f"{kind}.safetensors"), metadata=meta)
        save_file(weights, str(root / f"{kind}-notok.safetensors"), metadata={**meta, "tokenizer": ""})
        out[kind] = root / f"{kind}.safetensors"
        out[f"{kind}-notok"] = root / f"{kind}-notok.safetensors"
    return out


def test_caption_folder_of_mixed_sizes_and_decoding_options(exports, tmp_path, cli):
    images = tmp_path / "images"
    images.mkdir()
    for i, (w, h) in enumerate([(32, 32), (100, 60), (17, 45)]):
        Image.new("RGB", (w, h), (40 * i, 200, 90)).save(images / f"im{i}.png")
    out = tmp_path / "caps.jsonl"
    code, stdout, err = cli("caption", "--checkpoint", exports["coca"], "--images", images, "--out", out,
                            "--max-length", "4")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["im0.png", "im1.png", "im2.png"]
    for args in (["--max-length", "1"], ["--strategy", "beam", "--beam-width", "2", "--max-length", "3"],
                 ["--strategy", "top_p", "--top-p", "0.5", "--max-length", "3"]):
        code, stdout, err = cli("caption", "--checkpoint", exports["coca"], "--images", images, *args)
        assert code == 0, err
        rows = [json.loads(line) for line in stdout.splitlines()]
        assert len(rows) == 3
        if args[1] == "1":
            assert all(len(r["caption"].split()) <= 1 for r in rows)


def test_vqa_runs_on_vqa_shards_and_bad_inputs_give_one_line(exports, tmp_path, cli):
    from data_tools.cli import main as data_cli

    assert data_cli(["synth", "--vqa", "--out", str(tmp_path / "vqa"), "--n", "6", "--per-shard", "50", "-q"]) == 0
    assert data_cli(["synth", "--out", str(tmp_path / "plain"), "--n", "4", "-q"]) == 0
    code, stdout, err = cli("vqa", "--checkpoint", exports["coca"], "--data", tmp_path / "vqa",
                            "--max-length", "2", "--json", tmp_path / "vqa.json")
    assert code == 0, err
    scores = json.loads((tmp_path / "vqa.json").read_text())
    assert scores["questions"] > 0 and "majority_baseline" in scores
    images = tmp_path / "one"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.jpg")
    cases = [
        (["vqa", "--checkpoint", exports["coca"], "--data", tmp_path / "plain"], "is not VQA data"),
        (["caption", "--checkpoint", exports["clip"], "--images", images], "not a captioning model"),
        (["vqa", "--checkpoint", exports["clip"], "--data", tmp_path / "vqa"], "not a captioning model"),
        (["caption", "--checkpoint", exports["coca-notok"], "--images", images], "tokenizer"),
        (["caption", "--checkpoint", exports["coca"], "--images", tmp_path / "vqa" / "nothing"], "shard spec"),
        (["caption", "--checkpoint", exports["coca"], "--images", images, "--strategy", "beam", "--beam-width", "0"],
         "beam width 0"),
    ]
    for args, expected in cases:
        code, stdout, err = cli(*args)
        lines = [line for line in err.splitlines() if "WARNING" not in line]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)


def test_caption_folder_of_odd_and_bad_images_captions_the_good_and_counts_the_bad(exports, tmp_path, cli):
    import io
    import os

    images = tmp_path / "odd"
    images.mkdir()
    pal = Image.new("P", (20, 12))
    pal.putpalette([0, 0, 0, 200, 30, 30])
    pal.putpixel((3, 3), 1)
    pal.save(images / "a_palette.png", transparency=0)
    Image.new("RGBA", (16, 16), (0, 0, 255, 100)).save(images / "b_rgba.png")
    Image.new("CMYK", (24, 18), (0, 255, 255, 0)).save(images / "c_cmyk.jpg")
    Image.new("RGB", (1, 1), (1, 2, 3)).save(images / "d_tiny.png")
    Image.new("L", (1, 500), 90).save(images / "e_thin.png")
    grey16 = Image.new("I;16", (10, 10))
    grey16.putpixel((1, 1), 60000)
    grey16.save(images / "f_grey16.png")
    (images / "g_corrupt.jpg").write_bytes(os.urandom(300))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, format="PNG")
    (images / "h_truncated.png").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    out = tmp_path / "odd.jsonl"
    code, stdout, err = cli("caption", "--checkpoint", exports["coca"], "--images", images, "--out", out,
                            "--max-length", "3", "--batch", "3")
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    good = ["a_palette.png", "b_rgba.png", "c_cmyk.jpg", "d_tiny.png", "e_thin.png", "f_grey16.png"]
    bad = ["g_corrupt.jpg", "h_truncated.png"]
    assert [r["key"] for r in rows] == good + bad  # file-name order, failures in their place
    assert all(isinstance(r["caption"], str) and "error" not in r for r in rows[:6])
    assert all("caption" not in r and r["error"] for r in rows[6:])
    failed_lines = [line for line in err.splitlines() if line.startswith("caption: failed ")]
    assert [line.split()[2].rstrip(":") for line in failed_lines] == bad
    assert err.strip().splitlines()[-1] == "captioned 6, failed 2"
    # every file bad: one clear line, non-zero
    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "x.jpg").write_bytes(b"not an image")
    code, stdout, err = cli("caption", "--checkpoint", exports["coca"], "--images", only_bad)
    assert code == 2 and "none of its 1 image files could be read" in err.strip().splitlines()[-1], err


def test_caption_scores_with_baselines_agree_between_caption_json_and_eval(exports, tmp_path, cli):
    """`moe-dist caption --json --caption-pool` and `moe-dist eval --task caption --caption-pool` score the same
    greedy captions the same way; the constant is a pool caption and retrieval is the model's own nearest one."""
    from data_tools.cli import main as data_cli

    from moe_dist.evaluation.caption_baselines import read_caption_pool

    assert data_cli(["synth", "--out", str(tmp_path / "d"), "--n", "24", "--val-fraction", "0.25", "-q"]) == 0
    train, val = tmp_path / "d" / "train", tmp_path / "d" / "val"
    code, _, err = cli("caption", "--checkpoint", exports["coca"], "--images", val, "--max-length", "3",
                       "--json", tmp_path / "cap.json", "--caption-pool", train, "--out", tmp_path / "cap.jsonl")
    assert code == 0, err
    assert "constant*" in err and "retrieval" in err  # the table goes to stderr
    scores = json.loads((tmp_path / "cap.json").read_text())["caption"]
    code, stdout, err = cli("eval", "--checkpoint", exports["coca"], "--data", val, "--task", "caption",
                            "--max-length", "3", "--caption-pool", train, "--json", tmp_path / "eval.json",
                            "--workers", "0")
    assert code == 0, err
    evaluated = json.loads((tmp_path / "eval.json").read_text())["caption"]
    assert evaluated == pytest.approx(scores)
    assert scores["constant_caption"] in read_caption_pool(str(train)) and scores["pool_captions"] > 1
    assert scores["constant_chosen_in_hindsight"] is True
    assert 0 < scores["retrieval_distinct"] <= 1 and "retrieval_cider_d" in scores
    code, stdout, _ = cli("eval", "--checkpoint", exports["coca"], "--data", val, "--task", "caption",
                          "--max-length", "2", "--workers", "0")
    assert code == 0 and "give --caption-pool SPEC" in stdout  # without a pool: says how to get the baselines
    images = tmp_path / "folder"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "x.jpg")
    for args, expected in (
            (["--images", images, "--json", tmp_path / "x.json"], "give a shard spec, not the image folder"),
            (["--images", val, "--caption-pool", train], "--caption-pool needs --json OUT")):
        code, _, err = cli("caption", "--checkpoint", exports["coca"], *args)
        lines = [line for line in err.splitlines() if "WARNING" not in line]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
