"""Issue 10, engine side, with real processes: checkpoints never complete over broken files and a broken
newest one falls back; a fresh run never touches another run's checkpoints; a crash or a stuck stop
ends every rank; a data error on one rank stops all ranks with its message; a stop during setup is clean."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers.proc import popen, run
from helpers.train import RUN_CONFIG, ROOT, clean_env, kill_all, make_synth, overrides, start_srun_style, wait_for
from moe_dist.engine import checkpoint

ONE_RANK = {"ep_size": 1, "data.workers": 0, "batch.micro_batch": 8}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


def _train(synth, out, *extra, env=None, **sets):
    cmd = [sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG] + overrides(synth, out, **sets)
    return run(cmd + list(extra), timeout=300, cwd=ROOT, env=dict(clean_env(), **(env or {})))


def _tags(out):
    return checkpoint.complete_tags(str(out / "checkpoints"))


def _largest_file(tag_dir):
    return max((os.path.join(tag_dir, n) for n in os.listdir(tag_dir)), key=os.path.getsize)


def _session_alive(pid):
    """Processes left in the session a test started with start_new_session (its leader's pid)."""
    out = subprocess.run(["ps", "-eo", "sid=,pid=,stat="], capture_output=True, text=True).stdout.split("\n")
    return [line for line in out if line.split() and line.split()[0] == str(pid) and "Z" not in line.split()[2]]


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(synth, tmp_path):
    out = tmp_path / "run"
    res = _train(synth, out, steps=4, **ONE_RANK, **{"checkpoint.every": 2})
    assert res.returncode == 0, res.stderr[-3000:]
    assert _tags(out) == ["step00000002", "step00000004"]
    victim = _largest_file(out / "checkpoints" / "step00000004")
    with open(victim, "r+b") as f:  # what a full disk or a kill used to leave under a COMPLETE marker
        f.truncate(os.path.getsize(victim) // 2)
    res = _train(synth, out, steps=6, **ONE_RANK, **{"checkpoint.every": 2})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "skipping checkpoint" in res.stdout and "truncated or corrupt" in res.stdout
    assert "resumed from" in res.stdout and res.stdout.split("resumed from")[1].split()[0].endswith("step00000002")
    assert _tags(out) == ["step00000004", "step00000006"]  # step 4 was saved again, over the broken one
    checkpoint.verify_safe(str(out / "checkpoints" / "step00000004"), rank=0)


def test_resuming_an_older_checkpoint_then_a_kill_while_saving_loses_nothing(synth, tmp_path):
    out = tmp_path / "run"
    assert _train(synth, out, steps=4, **ONE_RANK, **{"checkpoint.every": 2}).returncode == 0
    ckpts = out / "checkpoints"
    before = sorted(os.listdir(ckpts / "step00000004"))
    # resume the older checkpoint: step 4 belongs to a branch this run leaves; kill the run inside its next save
    log = tmp_path / "resumed.log"
    args = overrides(synth, out, steps=6, **ONE_RANK, **{"checkpoint.every": 2, "debug.pause_in_save_s": 30})
    with open(log, "w") as f:
        proc = popen([sys.executable, "-m", "moe_dist", "train", "--config", RUN_CONFIG, "--resume",
                      str(ckpts / "step00000002")] + args, cwd=ROOT, env=clean_env(), stdout=f,
                     stderr=subprocess.STDOUT)
        saving = ckpts / "saving.rank0"
        assert wait_for(lambda: saving.exists() and saving.read_text() == "step00000004", timeout=120)
        kill_all([proc])
        proc.wait()
    assert "renamed to *.abandoned" in log.read_text()
    abandoned = [n for n in os.listdir(ckpts) if n.startswith("step00000004.abandoned")]
    assert len(abandoned) == 1 and sorted(os.listdir(ckpts / abandoned[0])) == before  # kept, untouched
    assert (ckpts / "step00000004.saving").is_dir() and _tags(out) == ["step00000002"]
    checkpoint.verify_safe(str(ckpts / "step00000002"), rank=0)
    res = _train(synth, out, steps=6, **ONE_RANK, **{"checkpoint.every": 2})  # auto: the resumed branch
    assert res.returncode == 0 and "step00000002 at step 2" in res.stdout, res.stderr[-3000:]
    assert _tags(out) == ["step00000004", "step00000006"]
    assert not [n for n in os.listdir(ckpts) if ".saving" in n or ".replaced" in n or ".tmp." in n]


def test_fresh_run_refuses_a_directory_holding_another_runs_checkpoints(synth, tmp_path):
    """Issue 25, item 3: a refused start deletes nothing (another run's save in progress, files that only
    look like leftovers), and a run that holds the directory's lock keeps a second start out."""
    out = tmp_path / "run"
    assert _train(synth, out, steps=4, **ONE_RANK, **{"checkpoint.every": 2}).returncode == 0
    ckpts = out / "checkpoints"
    run_id = checkpoint.read_marker(str(ckpts / "step00000004"))["run_id"]
    (ckpts / "step00000006.saving").mkdir()  # that run's save in progress
    (ckpts / "step00000006.saving" / checkpoint.OWNER).write_text(json.dumps({"run_id": run_id}))
    (ckpts / "latest.tmp.77").write_text("step00000006")
    strangers = ["notes.saving", "my.replaced.txt", "data.tmp.123"]
    for name in strangers:
        (ckpts / name).write_text("someone else's")
    planted = sorted(os.listdir(ckpts))
    res = _train(synth, out, "--resume", "none", steps=2, **ONE_RANK)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "already holds another run's checkpoints" in res.stderr and "Traceback" not in res.stderr
    assert sorted(os.listdir(ckpts)) == planted  # the old code deleted the save in progress and the strangers
    markers = {checkpoint.read_marker(str(ckpts / t))["run_id"] for t in _tags(out)}
    assert markers == {run_id} and _tags(out) == ["step00000002", "step00000004"]
    # a live run holds the directory: even its own continuation is refused until it ends
    holder = popen([sys.executable, "-c", "import time; from moe_dist.engine import checkpoint; "
                    f"lock = checkpoint.lock_root({str(ckpts)!r}); print('held', flush=True); time.sleep(120)"],
                   stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        res = _train(synth, out, steps=6, **ONE_RANK, **{"checkpoint.every": 2})
        assert res.returncode == 2 and "in use by another live run" in res.stderr, res.stderr[-2000:]
        assert sorted(os.listdir(ckpts)) == planted
    finally:
        kill_all([holder])
        holder.wait()
    # continuing the run recovers its own leftovers only
    res = _train(synth, out, steps=6, **ONE_RANK, **{"checkpoint.every": 2})
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    left = sorted(n for n in os.listdir(ckpts) if not n.startswith("zero_to_"))  # DeepSpeed's scripts
    assert left == sorted([".lock", "latest", "step00000004", "step00000006"] + strangers)


def test_a_crash_on_one_rank_ends_every_rank_and_its_workers(synth, tmp_path):
    out = tmp_path / "run"
    start = time.monotonic()
    procs = start_srun_style(overrides(synth, out, steps=50, ep_size=2, **{"debug.raise_at_step": 3,
                                                                          "debug.raise_rank": 1}),
                             log_dir=str(tmp_path))
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        kill_all(procs)
    assert all(code not in (0, None) for code in codes), codes
    assert time.monotonic() - start < 120
    assert "injected failure on rank 1" in (tmp_path / "rank1.log").read_text()
    assert wait_for(lambda: not any(_session_alive(p.pid) for p in procs), timeout=20), \
        [_session_alive(p.pid) for p in procs]


def test_a_stop_that_cannot_finish_still_ends_the_process(synth, tmp_path):
    out = tmp_path / "run"
    procs = start_srun_style(overrides(synth, out, steps=500, ep_size=2, stop_timeout_s=5), log_dir=str(tmp_path))
    try:
        assert wait_for(lambda: (out / "metrics.jsonl").exists(), timeout=180), (tmp_path / "rank0.log").read_text()
        os.killpg(procs[1].pid, signal.SIGSTOP)  # rank 1 freezes: rank 0's next step can never finish
        time.sleep(1)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=60) == 124
        assert "has not finished" in (tmp_path / "rank0.log").read_text()
    finally:
        kill_all(procs)
        os.killpg(procs[1].pid, signal.SIGCONT)


def test_a_data_error_on_one_rank_stops_all_ranks_with_its_message(synth, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth / "train", data / "train")
    shard = sorted((data / "train").glob("*.tar"))[0]
    shard.write_bytes(os.urandom(shard.stat().st_size))  # one rank's shard is garbage
    extra = {"data.train": data / "train", "data.max_failure_fraction": 0.0, "data.mode": "exact"}
    procs = start_srun_style(overrides(synth, tmp_path / "run", steps=40, ep_size=2, **extra), log_dir=str(tmp_path))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        kill_all(procs)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    stopped = [[line for line in log.splitlines() if line.startswith("moe-dist train: stopped:")] for log in logs]
    assert codes == [1, 1], logs[0][-2000:] + logs[1][-2000:]
    assert len(stopped[0]) == 1 and stopped[0] == stopped[1], stopped
    assert "failed on rank" in stopped[0][0]


def test_a_stop_requested_during_setup_is_a_clean_exit(synth, tmp_path):
    stop_file = tmp_path / "stop"
    stop_file.write_text("")
    res = _train(synth, tmp_path / "run", steps=4, **ONE_RANK, env={"MOE_DIST_STOP_FILE": str(stop_file)})
    assert res.returncode == 75, res.stderr[-3000:]
    assert "stop requested before step 1; nothing new to save" in res.stdout
    assert not (tmp_path / "run" / "checkpoints").exists() or not _tags(tmp_path / "run")


def test_a_resume_into_another_model_is_refused_and_touches_nothing(synth, tmp_path):
    """Issue 26, bad input: a checkpoint of another model (other expert count, other width) is refused
    before the first step with what differs, and the checkpoint directory is left as it was; an option
    that changes no parameter (the capacity factor) may change on resume."""
    out = tmp_path / "run"
    assert _train(synth, out, steps=2, **ONE_RANK, **{"checkpoint.every": 2}).returncode == 0
    ckpts = out / "checkpoints"
    def files():  # (the lock records who holds it: not the checkpoints)
        return {p: os.path.getmtime(p) for p in ckpts.rglob("*") if p.name != checkpoint.LOCK}

    before = files()
    for override, differs in (("model.overrides.moe.num_experts=8", "experts"), ("model.overrides.embed_dim=32", "")):
        res = _train(synth, out, steps=4, **ONE_RANK, **{override.split("=")[0]: override.split("=")[1]})
        assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
        assert "holds another model" in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
        assert differs in res.stderr
        assert files() == before
    res = _train(synth, out, steps=3, **ONE_RANK, **{"model.overrides.moe.capacity_factor": 2.0})
    assert res.returncode == 0 and "resumed from" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
