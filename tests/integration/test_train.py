"""``moe-dist train`` end to end with real ranks: launchers, TensorBoard, kill/resume, signals, NaN."""

import glob
import os
import signal
import subprocess

import pytest

from helpers.proc import popen
from helpers.train import (ROOT, deepspeed_cmd, kill_all, losses_by_step, make_synth, metrics, overrides, run,
                           start_srun_style, torchrun_cmd, wait_for, clean_env)
from moe_dist.engine import checkpoint

SCALARS = ["loss/total", "loss/contrastive", "loss/load_balance", "loss/z_loss", "loss/entropy_local",
           "loss/entropy_global", "train/lr", "train/grad_norm", "train/logit_scale", "perf/samples_per_s",
           "perf/step_time_s", "perf/data_wait_fraction", "memory/host_max_rss_mb"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


def _tensorboard(out_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out_dir, "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_two_ranks_ep2_zero2_deepspeed_launcher(synth, tmp_path):
    out = tmp_path / "run"
    cmd = deepspeed_cmd(overrides(synth, out, steps=4, ep_size=2, zero_stage=2, **{"eval.every": 2}))
    res = run(cmd)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "checkpoint" in res.stdout and "TensorBoard logs" in res.stdout
    # DeepSpeed's CPU all-reduce op ran (the launcher sets LOCAL_SIZE) and its per-rank shared-memory
    # workspaces were unlinked, not left in /dev/shm
    assert "shm_comm_op built successfully" in res.stdout + res.stderr
    port = cmd[cmd.index("--master_port") + 1]
    assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*")
    acc = _tensorboard(out)
    tags = acc.Tags()["scalars"]
    for tag in SCALARS + ["val/loss/contrastive"]:
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3, 4]
    assert any(t.startswith("moe/dropped_fraction/vision.") for t in tags)
    assert any(t.startswith("moe/router_entropy/text.") for t in tags)
    hist = acc.Tags()["histograms"]
    assert any(t.startswith("moe/expert_load/image/vision.") for t in hist)
    assert any(t.startswith("moe/expert_load/text/text.") for t in hist)
    assert [m["step"] for m in metrics(out) if "loss/total" in m] == [1, 2, 3, 4]
    assert checkpoint.complete_tags(str(out / "checkpoints")) == ["step00000004"]


def test_two_ranks_ep1_zero1_grad_accum_torchrun(synth, tmp_path):
    out = tmp_path / "run"
    res = run(torchrun_cmd(overrides(synth, out, steps=3, ep_size=1, zero_stage=1, **{"batch.grad_accum": 2,
                                                                                      "batch.micro_batch": 8})))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    acc = _tensorboard(out)
    assert [e.step for e in acc.Scalars("loss/total")] == [1, 2, 3]
    samples = acc.Scalars("perf/samples_per_s")[0].value
    assert samples > 0
    ds = __import__("json").load(open(out / "deepspeed_config.json"))
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2


def test_kill_and_resume_matches_uninterrupted_run(synth, tmp_path):
    steps = dict(steps=8, ep_size=2, **{"checkpoint.every": 3})
    ref = tmp_path / "ref"
    res = run(deepspeed_cmd(overrides(synth, ref, **steps)))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "killed"
    proc = popen(deepspeed_cmd(overrides(synth, out, **steps)), env=clean_env(), cwd=ROOT,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = str(out / "checkpoints")
    assert wait_for(lambda: checkpoint.complete_tags(ckpts) != [], timeout=180)
    kill_all([proc])
    proc.wait()
    assert checkpoint.complete_tags(ckpts)[-1] in ("step00000003", "step00000006")
    res = run(deepspeed_cmd(overrides(synth, out, **steps) + ["--resume", "auto"]))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    want, got = losses_by_step(ref), losses_by_step(out)
    assert set(got) == set(want) == set(range(1, 9))
    assert got == want, "losses after resume differ from the uninterrupted run (fp32, exact data mode)"
    # (another layout goes on with the optimizer state: test_checkpoint_layouts.py, test_optimizer_layouts.py)


def test_kill_during_save_keeps_previous_checkpoint(synth, tmp_path):
    out = tmp_path / "run"
    args = overrides(synth, out, steps=8, ep_size=2, **{"checkpoint.every": 2, "debug.pause_in_save_s": 3})
    procs = start_srun_style(args, log_dir=str(tmp_path))
    ckpts = out / "checkpoints"
    saving = ckpts / "saving.rank0"
    assert wait_for(lambda: saving.exists() and saving.read_text() == "step00000004", timeout=180), \
        (tmp_path / "rank0.log").read_text()[-3000:]
    kill_all(procs)
    for p in procs:
        p.wait()
    assert checkpoint.find_resume(str(ckpts), "auto") == (str(ckpts), "step00000002")
    assert not (ckpts / "step00000004").exists()  # the save wrote only its staging directory
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.find_resume(str(ckpts), str(ckpts / "step00000004.saving"))
    (ckpts / "latest").write_text("step00000004")  # a dangling latest falls back under auto
    assert checkpoint.find_resume(str(ckpts), "auto")[1] == "step00000002"
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.find_resume(str(ckpts), "latest")


def test_sigterm_saves_complete_checkpoint_and_exits_cleanly(synth, tmp_path):
    out = tmp_path / "run"
    procs = start_srun_style(overrides(synth, out, steps=500, ep_size=2), log_dir=str(tmp_path))
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2, timeout=180), \
        (tmp_path / "rank0.log").read_text()[-3000:]
    kill_all(procs, signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
    log = (tmp_path / "rank0.log").read_text()
    assert codes == [75, 75], log[-3000:]
    tags = checkpoint.complete_tags(str(out / "checkpoints"))
    assert len(tags) == 1 and "stopped by signal" in log
    step = int(tags[0][4:])
    assert 2 <= step < 500 and max(m["step"] for m in metrics(out)) == step


def test_injected_nan_is_skipped_on_all_ranks_then_stops_when_repeated(synth, tmp_path):
    out = tmp_path / "once"
    res = run(deepspeed_cmd(overrides(synth, out, steps=4, ep_size=2, **{"debug.nan_loss_steps": "[2]",
                                                                         "debug.nan_loss_rank": 1})))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "non-finite loss at micro step 3: skipped on all ranks (1 skipped so far)" in res.stdout
    final = [m for m in metrics(out) if "loss/total" in m][-1]
    assert final["step"] == 4 and final["train/skipped_steps"] == 1.0
    out = tmp_path / "repeated"
    res = run(deepspeed_cmd(overrides(synth, out, steps=6, ep_size=2, max_nonfinite_steps=3,
                                      **{"debug.nan_loss_steps": "[1,2,3,4,5]", "debug.nan_loss_rank": 0})))
    assert res.returncode != 0
    message = "3 consecutive micro steps had a non-finite loss (max_nonfinite_steps=3); stopping"
    assert message in res.stdout + res.stderr
