"""``moe-dist export --format open_clip|hub`` (and the refusals of every format) on tiny models built in
process: open_clip loads the folder and computes our embeddings with our preprocessing; a Hub folder loads
back bit for bit and carries a card from the run; tampered folders, missing tokens and failing pushes are
refused in one line that never shows the token."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from moe_dist.models.build import build_model
from moe_dist.models.config import load_model_config
from moe_dist.models.pretrained import (OPENCLIP_BPE, PretrainedState, consolidated_state_dict, load_pretrained,
                                        write_export)
from moe_dist.text.tokenizer import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BPE = {"text": {"vocab_size": 49408, "eos_id": 49407, "pool_type": "argmax", "tokenizer": OPENCLIP_BPE}}
CAPTIONS = ["a red circle above a blue square", "Two  green TRIANGLES!", "x " * 40]  # the last one is cut


def _state(name, overrides, tokenizer, seed=0, source="built in the test"):
    """A model of ``name`` with random weights (biases too), as PretrainedState."""
    cfg = load_model_config(name, overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return PretrainedState(cfg, model.state_dict(), tokenizer, source, step=7)


def _export(tmp_path, state, name="model.safetensors"):
    path = str(tmp_path / name)
    write_export(state, path)
    return path


@pytest.fixture(scope="module")
def spm_bytes():
    sentences = [f"a {c} {s} number {i}" for i in range(60) for c, s in [("red", "circle"), ("blue", "square")]]
    return train_sentencepiece(sentences, vocab_size=48)


def _open_clip(folder):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def _embeddings(model, images, tokens):
    with torch.no_grad():
        return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


@pytest.mark.parametrize("logit_bias,quick_gelu", [(None, False), (-10.0, True)])
def test_open_clip_loads_a_dense_clip_with_our_embeddings_and_preprocessing(tmp_path, cli, logit_bias, quick_gelu):
    from moe_dist.data.evalset import default_eval_transform

    overrides = {**BPE, "init_logit_bias": logit_bias, "quick_gelu": quick_gelu}
    src = _export(tmp_path, _state("clip-tiny-dense", overrides, OPENCLIP_BPE))
    code, out, err = cli("export", "--checkpoint", src, "--format", "open_clip", "--out", tmp_path / "oc")
    assert code == 0, err
    assert "open_clip" in out
    theirs, preprocess, their_tok = _open_clip(tmp_path / "oc")
    ours, our_tok = load_pretrained(src)
    # preprocessing: the same tokens (a caption longer than the context is cut the same way) and pixels
    assert torch.equal(their_tok(CAPTIONS), our_tok(CAPTIONS))
    rgb = np.random.default_rng(0).integers(0, 256, (45, 61, 3), dtype=np.uint8)  # not square: resize + crop
    image = Image.fromarray(rgb)
    assert torch.equal(preprocess(image), default_eval_transform(32)(image))
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _embeddings(ours, images, our_tok(CAPTIONS))
    for got, want in zip(_embeddings(theirs, images, their_tok(CAPTIONS)), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert theirs.logit_scale.item() == ours.logit_scale.item()
    if logit_bias is None:
        assert theirs.logit_bias is None and ours.logit_bias is None
    else:
        assert theirs.logit_bias.item() == ours.logit_bias.item()


def _moe_bpe(equal_experts):
    """moe-clip-tiny with the BPE tokenizer; ``equal_experts``: every expert a copy of expert 0, gates that
    sum to 1 and no dropped token (the case where collapsing is exact)."""
    exact = {"moe": {"renormalize": True, "dropless": True}} if equal_experts else {}
    state = _state("moe-clip-tiny", {**BPE, **exact}, OPENCLIP_BPE, seed=3)
    if equal_experts:
        for name, tensor in state.state_dict.items():
            if ".deepspeed_experts." in name:
                tensor.copy_(state.state_dict[_expert0(name)])
    return state


def _expert0(name):
    head, tail = name.split(".deepspeed_experts.")
    return f"{head}.deepspeed_experts.0.{tail.split('.', 1)[1]}"


def test_collapse_rules_pick_or_average_experts_and_are_exact_for_equal_experts(tmp_path, cli):
    moe = _moe_bpe(equal_experts=False)
    src = _export(tmp_path, moe)
    code, _, err = cli("export", "--checkpoint", src, "--format", "open_clip", "--out", tmp_path / "refused")
    assert code == 2 and err.count("\n") == 1 and "--collapse expert:I or --collapse mean" in err
    assert not os.path.exists(tmp_path / "refused")
    layer = "visual.transformer.resblocks.1.mlp"
    experts = [moe.state_dict[f"{layer}.moe.deepspeed_moe.experts.deepspeed_experts.{e}.w1"] for e in range(4)]
    routing = tmp_path / "routing.json"  # what moe-dist analyze-routing writes, cut to the assignments
    routing.write_text(json.dumps({"layers": {
        **{f"vision.{i}": {"image": {"assignments": [3, 1, 0, 0]}, "image_fraction": [1, 1, 0, 0]} for i in (1, 3)},
        **{f"text.{i}": {"text": {"assignments": [0, 0, 5, 5]}} for i in (1, 3)}}}))
    rules = [("expert:2", experts[2]), ("mean", torch.stack(experts).double().mean(0).float()),
             (f"routed-mass:{routing}", (0.75 * experts[0].double() + 0.25 * experts[1].double()).float())]
    for i, (rule, want) in enumerate(rules):
        out = tmp_path / f"rule{i}"
        code, stdout, err = cli("export", "--checkpoint", src, "--format", "open_clip", "--collapse", rule,
                                "--out", out)
        assert code == 0, err
        assert "differs from the MoE one unless all experts are equal" in stdout
        theirs = _open_clip(out)[0]
        assert torch.equal(theirs.state_dict()[f"{layer}.c_fc.weight"], want.t())
    # all experts equal, renormalised top-1 gates, dropless: the collapsed model is the MoE model
    equal = _moe_bpe(equal_experts=True)
    src = _export(tmp_path, equal, "equal.safetensors")
    assert cli("export", "--checkpoint", src, "--format", "open_clip", "--collapse", "mean", "--out",
               tmp_path / "eq")[0] == 0
    theirs, _, tok = _open_clip(tmp_path / "eq")
    ours, _ = load_pretrained(src)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for got, want in zip(_embeddings(theirs, images, tok(CAPTIONS)), _embeddings(ours, images, tok(CAPTIONS))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_models_open_clip_cannot_load_are_refused_with_the_reason(tmp_path, cli, spm_bytes):
    sp = _export(tmp_path, _state("clip-tiny-dense", None, spm_bytes), "sp.safetensors")
    limoe = _export(tmp_path, _state("limoe-tiny-dense", None, spm_bytes), "limoe.safetensors")
    dense = _export(tmp_path, _state("clip-tiny-dense", BPE, OPENCLIP_BPE), "bpe.safetensors")
    moe = _export(tmp_path, _state("moe-clip-tiny", BPE, OPENCLIP_BPE), "moe.safetensors")
    moe_sp = _export(tmp_path, _state("moe-clip-tiny", None, spm_bytes), "moe_sp.safetensors")
    mixed = _export(tmp_path, _state("moe-clip-tiny", {**BPE, "quick_gelu": True}, OPENCLIP_BPE), "mixed.safetensors")
    routing = tmp_path / "routing.json"
    routing.write_text(json.dumps({"layers": {"vision.1": {"image": {"assignments": [1, 1, 1, 1]}}}}))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": {"vision.1": [1, 2]}}))
    bad2 = tmp_path / "bad2.json"
    bad2.write_text(json.dumps({"layers": {"vision.1": {"image": {"assignments": 3}}}}))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("x")
    cases = [
        (["--checkpoint", sp, "--format", "open_clip"], "sentencepiece tokenizer, which open_clip cannot load"),
        (["--checkpoint", limoe, "--format", "open_clip"], "LIMoE shares one transformer"),
        (["--checkpoint", moe_sp, "--format", "open_clip", "--collapse", "mean"], "sentencepiece tokenizer"),
        (["--checkpoint", dense, "--format", "open_clip", "--collapse", "mean"], "dense model"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", "expert:4"], "ids 0..3"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", "median"], "is not a rule"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", f"routed-mass:{routing}"],
         "no assignments of 4 experts for layer 'vision.3'"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", f"routed-mass:{tmp_path}/none.json"],
         "cannot read a routing.json"),
        (["--checkpoint", mixed, "--format", "open_clip", "--collapse", "mean"],
         "experts use model.moe.activation='gelu' but the dense MLPs (model.quick_gelu=true)"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", f"routed-mass:{bad}"], "layer 'vision.1'"),
        (["--checkpoint", moe, "--format", "open_clip", "--collapse", f"routed-mass:{bad2}"], "layer 'vision.1'"),
        (["--checkpoint", moe, "--format", "hub", "--collapse", "mean"], "--format open_clip only"),
        (["--checkpoint", moe, "--format", "hub", "--out", tmp_path / "afile" / "sub"], "--out"),
        (["--checkpoint", moe, "--format", "hub", "--out", ""], "--out"),
        (["--checkpoint", moe, "--format", "torch_dcp", "--push", "me/m"], "--format hub only"),
    ]
    (tmp_path / "afile").write_text("x")
    for args, phrase in cases:
        code, out, err = cli("export", *args, *([] if "--out" in args else ["--out", tmp_path / "never"]))
        assert code == 2 and err.count("\n") == 1 and phrase in err and "Traceback" not in err, (args, err)
        assert "collapsed" not in out, out  # a refused model prints only the refusal
        assert not os.path.exists(tmp_path / "never")
    code, _, err = cli("export", "--checkpoint", dense, "--format", "hub", "--out", tmp_path / "full")
    assert code == 2 and "exists and is not an empty directory" in err


def _fake_run(tmp_path):
    """A run directory's record (run_config.json in the step directory, metrics.jsonl two levels up)."""
    step_dir = tmp_path / "run" / "checkpoints" / "step00000007"
    step_dir.mkdir(parents=True)
    run = {"model": {"name": "moe-clip-tiny", "overrides": {"moe": {"top_k": 1}}}, "steps": 10, "seed": 5,
           "data": {"train": "datasets/synth/train::https://host/x.tar?token=SECRET::pipe:aws s3 cp s3://b/SECRET2 -",
                    "val": "datasets/synth/val"}}
    (step_dir / "run_config.json").write_text(json.dumps(run))
    records = [{"step": 5, "loss/total": 3.0, "val/loss/loss": 2.5},
               {"step": 7, "loss/total": 2.0, "val/retrieval/image_to_text_R@1": 0.375,
                "moe/load_max_over_mean/vision.1": 1.25, "moe/dead_experts/vision.1": 0.0, "val/a|b`c": 0.5},
               {"step": 9, "val/loss/loss": 1.0}]  # after the checkpoint: not this model's
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"cut')
    return str(step_dir)


def test_hub_folder_loads_back_bit_for_bit_and_carries_a_card_from_the_run(tmp_path, spm_bytes):
    from moe_dist.models.hub import write_hub

    state = _state("moe-clip-tiny", None, spm_bytes, source=_fake_run(tmp_path))
    write_hub(state, str(tmp_path / "hub"))
    assert sorted(os.listdir(tmp_path / "hub")) == ["README.md", "config.json", "model.safetensors", "tokenizer.model"]
    model, tokenizer = load_pretrained(str(tmp_path / "hub"))
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(state.state_dict)
    assert all(torch.equal(loaded[k], v) for k, v in state.state_dict.items())
    assert torch.equal(tokenizer(CAPTIONS[:2]), state.make_tokenizer()(CAPTIONS[:2]))
    card = (tmp_path / "hub" / "README.md").read_text()
    config = json.loads((tmp_path / "hub" / "config.json").read_text())
    assert config["params"]["total"] == 887553 and config["step"] == 7
    for phrase in ("license:", "# moe-clip-tiny", "| total | 887,553 |", "| in experts | 529,408 |",
                   "active per image token | 218,241", "datasets/synth/val", "steps: 7 of 10 planned",
                   "val/retrieval/image_to_text_R@1 | 0.375", "| vision.1 | 0 | 1.25 |", "4 experts, router `topk`"):
        assert phrase in card, phrase
    assert "SECRET" not in card and "val/loss/loss | 1" not in card
    assert "pipe:<command hidden>" in card and "| val/a\\|b\\`c | 0.5 |" in card
    # no absolute path in the folder: the source is shown relative to the run directory
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hub" / "model.safetensors"), "pt") as f:
        metadata = f.metadata()
    for text in (card, json.dumps(config), json.dumps(metadata)):
        assert str(tmp_path) not in text and "checkpoints/step00000007" in text
    # a Hub folder exported again takes no metrics.jsonl of a run it happens to sit in
    state = consolidated_state_dict(str(tmp_path / "hub"))
    (tmp_path / "run" / "exports").mkdir()
    write_hub(state, str(tmp_path / "run" / "exports" / "again"))
    again = (tmp_path / "run" / "exports" / "again" / "README.md").read_text()
    assert "image_to_text_R@1" not in again and "not recorded beside the checkpoint" in again


def test_a_tampered_hub_folder_is_refused_naming_what_differs(tmp_path, spm_bytes):
    from moe_dist.models.hub import write_hub

    write_hub(_state("moe-clip-tiny", None, spm_bytes), str(tmp_path / "hub"))
    path = tmp_path / "hub" / "config.json"
    config = json.loads(path.read_text())
    config["model_config"]["vision"]["mlp_ratio"] = 2.0  # the config now disagrees with the experts' shapes
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        load_pretrained(str(tmp_path / "hub"))
    assert "\n" not in str(err.value)
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight has shape [256, 64], the config gives [128, 64]" in str(
        err.value)
    config["model_config"]["moe"]["num_experts"] = 2
    config["model_config"]["vision"]["mlp_ratio"] = 4.0
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensors unexpected \(e.g. .*deepspeed_experts\.2\.w1\)|unexpected"):
        load_pretrained(str(tmp_path / "hub"))
    os.remove(tmp_path / "hub" / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is not a safetensors file"):
        load_pretrained(str(tmp_path / "hub"))


def _push(tmp_path, src, **env):
    """``moe-dist export --format hub --push`` in a process with a fresh, empty HF_HOME and no network."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    (tmp_path / "hf_home").mkdir(exist_ok=True)
    base.update(PYTHONPATH=REPO, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1", **env)
    out = tmp_path / f"hub{len(os.listdir(tmp_path))}"
    return out, subprocess.run([sys.executable, "-m", "moe_dist", "export", "--checkpoint", src, "--format", "hub",
                                "--out", str(out), "--push", "someone/tiny-moe"], capture_output=True, text=True,
                               env=base, timeout=120)


def test_push_without_a_token_says_what_to_do_and_a_token_never_shows(tmp_path, monkeypatch):
    src = _export(tmp_path, _state("moe-clip-tiny", BPE, OPENCLIP_BPE))
    out, res = _push(tmp_path, src)
    assert res.returncode == 2, res.stderr
    if importlib.util.find_spec("huggingface_hub") is None:  # says what to install instead
        assert "--push needs huggingface_hub: pip install huggingface_hub" in res.stderr
        return
    assert "needs a Hugging Face token: set HF_TOKEN or run `hf auth login`" in res.stderr
    assert res.stderr.count("\n") == 1 and os.path.isfile(os.path.join(out, "model.safetensors"))
    token = "hf_" + "Zq7" * 12
    out, res = _push(tmp_path, src, HF_TOKEN=token)
    assert res.returncode == 2 and "--push someone/tiny-moe failed" in res.stderr, res.stderr
    assert token not in res.stdout + res.stderr and token[3:15] not in res.stdout + res.stderr
    # an error that quotes the token where the message is cut: masked before the cut, no prefix shows
    import huggingface_hub

    from moe_dist.models.hub import push_folder

    def fail(*args, **kwargs):
        raise RuntimeError("x" * 270 + f" Authorization: Bearer {token}\n again {token}")

    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", fail)
    with pytest.raises(ValueError) as err:
        push_folder(str(tmp_path), "me/repo")
    assert "\n" not in str(err.value) and "Bearer ***" in str(err.value)
    assert not any(token[:n] in str(err.value) for n in range(8, len(token) + 1))
