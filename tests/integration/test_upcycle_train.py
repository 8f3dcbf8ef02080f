"""``model.init`` in real runs (2 ranks, ep_size=2, ZeRO-2): a fresh start upcycles the dense export, a resume
loads its checkpoint and never reads ``model.init`` (it may be gone by then), and a wrong kind stops the run
before any process group starts."""

import os

import pytest

from helpers.train import make_synth, overrides, run, torchrun_cmd


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=240)


@pytest.fixture(scope="module")
def dense(synth, tmp_path_factory):
    """A dense CLIP trained 3 steps on 2 ranks: its checkpoint directory."""
    out = tmp_path_factory.mktemp("dense")
    res = run(torchrun_cmd(overrides(synth, out, **{"model.name": "clip-tiny-dense", "ep_size": 1, "steps": 3})))
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "checkpoints"


def test_fresh_start_upcycles_and_resume_ignores_init(synth, dense, tmp_path):
    export = tmp_path / "dense.safetensors"
    res = run(["moe-dist", "export", "--checkpoint", str(dense), "--out", str(export)])
    assert res.returncode == 0, res.stderr

    args = overrides(synth, tmp_path / "moe", **{"model.init": export, "steps": 2})
    res = run(torchrun_cmd(args))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"model.init: 4 MoE layers upcycled from {export}" in res.stdout + res.stderr

    os.remove(export)  # a resume loads the checkpoint; model.init is not read any more
    res = run(torchrun_cmd(args[:-2] + ["--set", "steps=3"]))
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "resumed from" in out and "upcycled" not in out


def test_wrong_kind_stops_before_the_process_group(synth, dense, tmp_path):
    res = run(torchrun_cmd(overrides(synth, tmp_path / "limoe", **{"model.name": "limoe-tiny", "steps": 1,
                                                                   "model.init": dense})))
    assert res.returncode != 0
    assert "error: model.init:" in res.stderr and "one-tower LIMoE" in res.stderr
    assert not os.path.exists(tmp_path / "limoe" / "checkpoints")
