"""Issue 25, items 6 and 11, with a real training run: a checkpoint's marker lists its files with sizes
and SHA-256, so a file copied in from another step (same shapes, same size) or added later is refused
like a truncated one; the files a checkpoint names stay inside it and are regular files."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers.proc import run
from helpers.train import RUN_CONFIG, ROOT, clean_env, make_synth, overrides
from moe_dist.checkpoint_files import MARKER, read_marker, verify_files
from moe_dist.engine import checkpoint

ONE_RANK = {"ep_size": 1, "data.workers": 0, "batch.micro_batch": 8, "checkpoint.every": 2}
EXPERT = "layer_0_expert_1_mp_rank_00_model_states.pt"


def _train(synth, out, *extra, **sets):
    cmd = [sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG] + overrides(synth, out, **sets)
    return run(cmd + list(extra), timeout=300, cwd=ROOT, env=clean_env())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-rank run of 4 steps with checkpoints at steps 2 and 4."""
    root = tmp_path_factory.mktemp("ckpt")
    synth = make_synth(root / "synth")
    res = _train(synth, root / "run", steps=4, **ONE_RANK)
    assert res.returncode == 0, res.stderr[-3000:]
    return synth, root / "run"


def _copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained[1], out)
    return out, out / "checkpoints"


def test_the_marker_lists_every_file_with_its_size_and_digest(trained):
    step = trained[1] / "checkpoints" / "step00000004"
    files = read_marker(str(step))["files"]
    assert sorted(files) == sorted(n for n in os.listdir(step) if n != MARKER)
    assert all(size == os.path.getsize(step / name) for name, (size, _) in files.items())
    verify_files(str(step))


def test_a_file_from_another_step_or_an_added_file_is_refused(trained, tmp_path):
    from moe_dist.models import load_pretrained

    synth, _ = trained
    out, ckpts = _copy(trained, tmp_path)
    # an expert file of step 2 copied over step 4's: same shapes, same size, loads without a word before
    assert os.path.getsize(ckpts / "step00000002" / EXPERT) == os.path.getsize(ckpts / "step00000004" / EXPERT)
    shutil.copyfile(ckpts / "step00000002" / EXPERT, ckpts / "step00000004" / EXPERT)
    with pytest.raises(ValueError, match=f"{EXPERT} is not the file its save wrote .*SHA-256"):
        load_pretrained(str(ckpts / "step00000004"))
    res = _train(synth, out, steps=6, **ONE_RANK)  # resume auto falls back past it, as past a truncated one
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "skipping checkpoint" in res.stdout and "SHA-256" in res.stdout, res.stdout[-3000:]
    assert res.stdout.split("resumed from")[1].split()[0].endswith("step00000002")
    # a file added to a checkpoint (an expert of a larger model, say) is not one its save wrote
    added = "layer_0_expert_99_mp_rank_00_model_states.pt"
    shutil.copyfile(ckpts / "step00000006" / EXPERT, ckpts / "step00000006" / added)
    with pytest.raises(ValueError, match="did not write .*layer_0_expert_99"):
        checkpoint.verify_safe(str(ckpts / "step00000006"), rank=0)
    with pytest.raises(ValueError, match="layer_0_expert_99.* is not one of the files its save wrote"):
        load_pretrained(str(ckpts / "step00000006"))


def _load_in_child(step_dir, timeout=60):
    """load_pretrained in a child process, so that a read that blocks (a FIFO) fails the test instead of
    hanging it; returns (exit code, stderr)."""
    code = f"from moe_dist.models import load_pretrained; load_pretrained({str(step_dir)!r})"
    try:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {step_dir} blocked for {timeout} s")
    return res.returncode, res.stderr


@pytest.mark.parametrize("case", ["parent", "absolute", "fifo", "symlink"])
def test_files_a_checkpoint_names_stay_inside_it_and_are_regular(trained, tmp_path, case):
    out, ckpts = _copy(trained, tmp_path)
    step = ckpts / "step00000004"
    outside = tmp_path / "outside.model"
    shutil.copyfile(step / "tokenizer.model", outside)
    if case in ("parent", "absolute"):
        config = json.loads((step / "model_config.json").read_text())
        name = "../../../outside.model" if case == "parent" else str(outside)
        config["text"]["tokenizer"] = "sentencepiece:" + name
        (step / "model_config.json").write_text(json.dumps(config))
        expected = "not a file of the checkpoint"
    elif case == "fifo":
        os.remove(step / "tokenizer.model")
        os.mkfifo(step / "tokenizer.model")
        expected = "not a regular file"
    else:
        os.remove(step / "tokenizer.model")
        os.symlink(outside, step / "tokenizer.model")
        expected = "symlink"
    code, err = _load_in_child(step)
    assert code != 0 and expected in err and "tokenizer" in err, err[-2000:]
