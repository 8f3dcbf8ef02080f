"""A trained model on its own: ``load_pretrained``, ``moe-dist export`` and ``moe-dist reshard`` on real
checkpoints. Two short runs are shared by every test: 2 ranks with ep_size=2, ZeRO-2, fp32 (4 steps), and
1 process with ZeRO-0, bf16 (2 steps)."""

import filecmp
import json
import os
import shutil
import sys

import pytest
import torch

from helpers.harness import run_ranks
from helpers.train import RUN_CONFIG, deepspeed_cmd, make_synth, overrides, run
from moe_dist.checkpoint_files import EXPERT_STATES_RE, MODEL_FILE_RE, MODEL_STATES, load_weights_only
from moe_dist.models.pretrained import consolidated_state_dict, export, load_pretrained
from moe_dist.text import SentencePieceTokenizer

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star", "nothing"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def ep2(synth, tmp_path_factory):
    """The step directory of a 2-rank, ep_size=2, ZeRO-2 fp32 run."""
    out = tmp_path_factory.mktemp("ep2") / "run"
    res = run(deepspeed_cmd(overrides(synth, out, steps=4, ep_size=2, zero_stage=2)))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out / "checkpoints" / "step00000004"


@pytest.fixture(scope="module")
def bf16(synth, tmp_path_factory):
    """The checkpoint root of a 1-process ZeRO-0 bf16 run."""
    out = tmp_path_factory.mktemp("bf16") / "run"
    res = run([sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG, "--resume", "none"]
              + overrides(synth, out, steps=2, ep_size=1, zero_stage=0, precision="bf16",
                          **{"data.workers": 0, "batch.micro_batch": 8}))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out / "checkpoints"


def _features(model, tokenizer, dtype=torch.float32, seed=0):
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        out = model(images, tokenizer(CAPTIONS))
    return out.image_features, out.text_features


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_load_gathers_every_expert_file_of_a_two_rank_checkpoint(ep2, synth):
    raw = dict(load_weights_only(str(ep2 / MODEL_STATES))["module"])
    expert_files = [n for n in os.listdir(ep2) if EXPERT_STATES_RE.match(n)]
    assert len(expert_files) == 4 * 4  # 4 MoE layers x 4 global experts, written by 2 ranks
    for name in expert_files:
        raw.update(load_weights_only(str(ep2 / name)))
    model, tokenizer = load_pretrained(str(ep2.parent))  # the root: its newest complete checkpoint
    assert not model.training
    loaded = model.state_dict()
    assert sorted(loaded) == sorted(raw)
    assert all(torch.equal(loaded[k], raw[k]) for k in raw)
    reference = SentencePieceTokenizer(str(synth / "tok.model"), context_length=32)
    assert torch.equal(tokenizer(CAPTIONS), reference(CAPTIONS))
    assert consolidated_state_dict(str(ep2)).step == 4


def test_export_is_bit_identical_and_stands_alone(ep2, tmp_path, cli):
    moved = tmp_path / "moved" / "step00000004"  # a checkpoint copied elsewhere still loads
    shutil.copytree(ep2, moved)
    out = tmp_path / "model.safetensors"
    code, stdout, _ = cli("export", "--checkpoint", moved, "--out", out)
    assert code == 0 and stdout.startswith(f"wrote {out}") and "4 MoE layers x 4 experts" in stdout
    shutil.rmtree(moved)

    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "moe_dist.export/1" and meta["tokenizer"] == "sentencepiece"
    assert json.loads(meta["model_config"])["text"]["tokenizer"] == "sentencepiece:tokenizer.model"
    from_dir, from_file = load_pretrained(str(ep2)), load_pretrained(str(out))
    assert _equal(_features(*from_dir), _features(*from_file))


def test_bf16_export_halves_the_weights_and_loads(ep2, tmp_path):
    fp32 = consolidated_state_dict(str(ep2)).state_dict
    export(str(ep2), str(tmp_path / "bf16.safetensors"), dtype="bf16")
    half = consolidated_state_dict(str(tmp_path / "bf16.safetensors")).state_dict
    nbytes = lambda sd: sum(t.numel() * t.element_size() for t in sd.values())  # noqa: E731
    assert nbytes(half) * 2 == nbytes(fp32)
    assert all(torch.equal(half[k], fp32[k].to(torch.bfloat16)) for k in fp32)
    model, tokenizer = load_pretrained(str(tmp_path / "bf16.safetensors"))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert all(torch.isfinite(f).all() for f in _features(model, tokenizer, torch.bfloat16))


def test_hub_and_dcp_exports_of_a_two_rank_checkpoint_hold_every_tensor(ep2, tmp_path, cli):
    """The 2-rank ep_size=2 checkpoint on one process: a Hub folder (its card from the run's record) and a
    DCP directory that ``dcp.load`` reads back, both bit for bit."""
    import torch.distributed.checkpoint as dcp

    want = consolidated_state_dict(str(ep2)).state_dict
    assert cli("export", "--checkpoint", ep2, "--format", "hub", "--out", tmp_path / "hub")[0] == 0
    hub = load_pretrained(str(tmp_path / "hub"))[0].state_dict()
    assert sorted(hub) == sorted(want) and all(torch.equal(hub[k], want[k]) for k in want)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "steps: 4 of 4 planned" in card and "| vision.1 |" in card and "| in experts |" in card
    assert cli("export", "--checkpoint", ep2, "--format", "torch_dcp", "--out", tmp_path / "dcp")[0] == 0
    got = {k: torch.full_like(v, float("nan")) for k, v in want.items()}
    dcp.load(got, checkpoint_id=str(tmp_path / "dcp"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_bf16_checkpoint_loads_its_saved_weights(bf16):
    model, tokenizer = load_pretrained(str(bf16))
    saved = consolidated_state_dict(str(bf16)).state_dict
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.bfloat16
    wide, _ = load_pretrained(str(bf16), dtype="fp32")
    assert all(torch.equal(wide.state_dict()[k], saved[k].float()) for k in saved)


def test_reshard_two_to_one_to_two_keeps_every_tensor(ep2, tmp_path, cli):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli("reshard", "--checkpoint", ep2, "--ep-size", 1, "--out", one)[0] == 0
    code, stdout, _ = cli("reshard", "--checkpoint", one, "--ep-size", 2, "--world-size", 4, "--out", two)
    assert code == 0 and "--weights-only" in stdout
    for root, ep_size, world in ((one, 1, 1), (two, 2, 4)):
        step = root / "step00000004"
        model_files = sorted(n for n in os.listdir(ep2) if MODEL_FILE_RE.match(n))
        assert sorted(n for n in os.listdir(step) if n.endswith(".pt")) == model_files  # no optimizer/client state
        assert all(filecmp.cmp(ep2 / n, step / n, shallow=False) for n in model_files)
        marker = json.loads((step / "COMPLETE").read_text())
        assert (marker["step"], marker["world_size"], marker["weights_only"]) == (4, world, True)
        run_config = json.loads((step / "run_config.json").read_text())
        assert (run_config["ep_size"], run_config["_world_size"]) == (ep_size, world)
        assert (root / "latest").read_text() == "step00000004"
    assert _equal(_features(*load_pretrained(str(two))), _features(*load_pretrained(str(ep2))))


def test_reshard_with_optimizer_carries_adam_state_and_resumes_on_one_process(ep2, synth, tmp_path, cli):
    """2 ranks, ep_size 2, ZeRO-2 -> one layout-free file -> 1 process, ep_size 1, ZeRO-0: the file holds
    exactly the moments and masters the ZeRO partitions held, and the resume continues them."""
    from moe_dist.engine.optim_state import KEYS_READ, OptimizerStates

    out = tmp_path / "one"
    code, stdout, _ = cli("reshard", "--checkpoint", ep2, "--ep-size", 1, "--with-optimizer", "--out", out)
    step = out / "step00000004"
    assert code == 0 and "weights and optimizer state" in stdout and "--weights-only" not in stdout
    marker = json.loads((step / "COMPLETE").read_text())
    assert marker["optimizer"] == "layout-free" and "weights_only" not in marker
    assert sorted(n for n in os.listdir(step) if n.startswith("client_rank")) == ["client_rank0.pt", "client_rank1.pt"]
    from moe_dist.config import from_dict
    from moe_dist.models.config import ModelConfig

    model_cfg = from_dict(ModelConfig, json.loads((ep2 / "model_config.json").read_text()), "model_config.json")
    zero = OptimizerStates.from_checkpoint(str(ep2), model_cfg)
    free = OptimizerStates.from_checkpoint(str(step), model_cfg)
    assert zero.step == free.step == 4.0 and sorted(zero.shapes) == sorted(free.pieces)
    for name in zero.shapes:
        for key in KEYS_READ:
            assert torch.equal(zero.read(name, key), free.read(name, key)), (name, key)
    res = run([sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG, "--resume", str(step)]
              + overrides(synth, tmp_path / "run", steps=5, ep_size=1, zero_stage=0, **{"data.workers": 0}))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "at step 4 on another layout" in res.stdout and "step count (4) carried over" in res.stdout
    assert "the data stream continues epoch 0 where the 2 rank(s) of the checkpoint left it" in res.stdout


def _ep2_rank(rank, world_size, step_dir):
    model, tokenizer = load_pretrained(step_dir, ep_size=2)
    moe = model.visual.transformer.resblocks[1].mlp.moe
    return moe.experts.w1.detach().clone(), _features(model, tokenizer, seed=rank)


@pytest.mark.world_size(2)
def test_ep_size_2_ranks_hold_their_experts_and_compute_the_same(ep2):
    full, tokenizer = load_pretrained(str(ep2))
    w1 = full.visual.transformer.resblocks[1].mlp.moe.experts.w1
    for rank, (local_w1, features) in enumerate(run_ranks(_ep2_rank, 2, args=(str(ep2),))):
        assert torch.equal(local_w1, w1[2 * rank: 2 * rank + 2])
        for got, want in zip(features, _features(full, tokenizer, seed=rank)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _bad_inputs(ep2, synth, tmp_path):
    """(args, phrase its one-line error must contain) for each refused input."""
    (tmp_path / "empty").mkdir()
    incomplete = tmp_path / "incomplete" / "step00000004"
    shutil.copytree(ep2, incomplete)
    (incomplete / "COMPLETE").unlink()
    wide = tmp_path / "wide.json"
    config = json.loads((ep2 / "model_config.json").read_text())
    config["text"]["vocab_size"] = 2048
    wide.write_text(json.dumps(config))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    export_args = ["export", "--out", tmp_path / "x.safetensors", "--checkpoint"]
    return [
        (export_args + [tmp_path / "empty"], "holds no complete checkpoint"),
        (export_args + [incomplete], "is incomplete (no COMPLETE marker"),
        (export_args + [ep2, "--tokenizer", "openclip-bpe"], "tokenizer has 49408 tokens but the model's vocab_size"),
        (export_args + [ep2, "--model-config", wide], "has shape [1024, 64], the config gives [2048, 64]"),
        (export_args + [tmp_path / "other.safetensors"], "not a moe_dist export"),
        (export_args + [synth / "tok.model"], "is not a safetensors file"),
        (["reshard", "--checkpoint", ep2, "--ep-size", 3, "--out", tmp_path / "r"], "must divide the number of experts"),
        (["reshard", "--checkpoint", ep2, "--ep-size", 2, "--world-size", 3, "--out", tmp_path / "r"], "multiple of"),
    ]


def test_bad_inputs_give_one_clear_line_each(ep2, synth, tmp_path, cli):
    for args, phrase in _bad_inputs(ep2, synth, tmp_path):
        code, _, err = cli(*args)
        assert code == 2 and err.startswith(f"moe-dist {args[0]}: error: ") and phrase in err, (args, err)
        assert err.strip().count("\n") == 0, err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "r").exists()


def test_old_checkpoint_without_model_config_names_the_fix_and_takes_it(ep2, synth, tmp_path, cli):
    old = tmp_path / "old" / "step00000004"
    shutil.copytree(ep2, old)
    (old / "tokenizer.model").unlink()
    code, _, err = cli("export", "--checkpoint", old, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "names tokenizer" in err and "--tokenizer PATH" in err
    (old / "model_config.json").unlink()
    code, _, err = cli("export", "--checkpoint", old, "--out", tmp_path / "m.safetensors")
    assert code == 2 and "has no model_config.json" in err and "--model-config NAME_OR_JSON --tokenizer PATH" in err
    assert "names model 'moe-clip-tiny'" in err  # from its run_config.json
    code, _, err = cli("export", "--checkpoint", old, "--out", tmp_path / "m.safetensors",
                       "--model-config", "moe-clip-tiny", "--tokenizer", synth / "tok.model")
    assert code == 0, err
    model, tokenizer = load_pretrained(str(tmp_path / "m.safetensors"))
    assert _equal(_features(model, tokenizer), _features(*load_pretrained(str(ep2))))


def test_an_export_of_another_model_kind_is_refused(ep2, tmp_path):
    export(str(ep2), str(tmp_path / "clip.safetensors"))
    with pytest.raises(ValueError, match=r"holds a 'clip' model \(moe-clip-tiny\), not the 'limoe' model"):
        load_pretrained(str(tmp_path / "clip.safetensors"), kind="limoe")
