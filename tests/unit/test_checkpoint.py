"""Checkpoint bookkeeping without an engine: resume selection and the weights-only allow-list."""

import json
import os

import pytest
import torch

from helpers.data import PickleBomb
from moe_dist.engine import checkpoint


def _tag(root, step, complete=True):
    d = root / checkpoint.tag_for(step)
    d.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, d / "mp_rank_00_model_states.pt")
    if complete:
        (d / checkpoint.MARKER).write_text(json.dumps({"step": step}))
    return d


def test_auto_picks_newest_complete_and_paths_must_be_complete(tmp_path):
    assert checkpoint.find_resume(str(tmp_path), "auto") is None  # fresh start
    _tag(tmp_path, 2)
    _tag(tmp_path, 10)
    _tag(tmp_path, 12, complete=False)
    (tmp_path / "latest").write_text("step00000012")  # dangling: points at the incomplete one
    assert checkpoint.find_resume(str(tmp_path), "auto") == (str(tmp_path), "step00000010")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        checkpoint.find_resume(str(tmp_path), "latest")
    with pytest.raises(ValueError, match="incomplete"):
        checkpoint.find_resume(str(tmp_path), str(tmp_path / "step00000012"))
    assert checkpoint.find_resume(str(tmp_path), str(tmp_path / "step00000002")) == (str(tmp_path), "step00000002")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.find_resume(str(tmp_path), str(tmp_path / "elsewhere"))
    assert checkpoint.find_resume(str(tmp_path), "none") is None


def test_prune_keeps_newest_and_drops_stale_incomplete(tmp_path):
    for step in (2, 4, 6):
        _tag(tmp_path, step)
    _tag(tmp_path, 5, complete=False)
    checkpoint._prune(str(tmp_path), keep=2, run_id="")
    assert sorted(os.listdir(tmp_path)) == ["step00000004", "step00000006"]


def test_pickled_objects_are_refused_before_loading(tmp_path):
    d = _tag(tmp_path, 1)
    checkpoint.verify_safe(str(d))  # tensors and dicts pass
    marker = tmp_path / "payload-ran"
    torch.save({"state": PickleBomb(str(marker))}, d / "client_rank0.pt")
    with pytest.raises(ValueError, match="refusing to load .*client_rank0.pt"):
        checkpoint.verify_safe(str(d))
    assert not marker.exists()


def test_recover_puts_back_a_step_interrupted_inside_its_commit(tmp_path):
    from moe_dist.checkpoint_files import OWNER, recover

    _tag(tmp_path, 2)
    # killed between "move the old step 4 aside" and "rename the new one into place": two complete copies
    new, old = tmp_path / "step00000004.saving", tmp_path / "step00000004.replaced.123"
    for d, which in ((new, "new"), (old, "old")):
        d.mkdir()
        (d / "which").write_text(which)
        (d / checkpoint.MARKER).write_text(json.dumps({"step": 4, "run_id": "r1"}))
    # killed while saving step 6: an unfinished staging directory and a temporary file
    (tmp_path / "step00000006.saving").mkdir()
    (tmp_path / "step00000006.saving" / OWNER).write_text(json.dumps({"run_id": "r1"}))
    (tmp_path / "latest.tmp.999").write_text("step00000006")
    # not r1's: another run's save in progress, an old save without an owner, and names that only look alike
    (tmp_path / "step00000008.saving").mkdir()
    (tmp_path / "step00000008.saving" / OWNER).write_text(json.dumps({"run_id": "r2"}))
    (tmp_path / "step00000010.saving").mkdir()
    strangers = ["notes.saving", "my.replaced.txt", "data.tmp.123", "step00000012.saving.bak", "latest.tmp.x"]
    for name in strangers:
        (tmp_path / name).write_text("not a checkpoint's")
    assert recover(str(tmp_path), "r1") == ["step00000004"]
    assert (tmp_path / "step00000004" / "which").read_text() == "new"  # the committed newer save wins
    assert sorted(os.listdir(tmp_path)) == sorted(["step00000002", "step00000004", "step00000008.saving",
                                                   "step00000010.saving"] + strangers)
    # only a moved-aside copy left: it comes back
    (tmp_path / "step00000004").rename(tmp_path / "step00000004.replaced.7")
    assert recover(str(tmp_path), "r1") == ["step00000004"]
    assert checkpoint.complete_tags(str(tmp_path))[-1] == "step00000004"
    assert recover(str(tmp_path), "r2") == [] and not (tmp_path / "step00000008.saving").exists()


def test_a_second_holder_of_the_checkpoint_lock_is_refused(tmp_path):
    import subprocess
    import sys

    held = subprocess.Popen([sys.executable, "-c", "import sys, time; from moe_dist.engine import checkpoint; "
                             f"lock = checkpoint.lock_root({str(tmp_path)!r}); print('held', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"in use by another live run .*\"pid\": {held.pid}"):
            checkpoint.lock_root(str(tmp_path))
    finally:
        held.kill()
        held.wait()
    checkpoint.lock_root(str(tmp_path)).close()  # the holder is gone: the lock is free again


def test_the_lock_ends_with_its_process_not_with_forked_workers(tmp_path):
    """A POSIX lock: a data worker forked by rank 0 does not keep it after rank 0 is killed, so a restart
    is not refused by an orphan (an flock would have been inherited)."""
    import signal
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import os, time; from moe_dist.engine import checkpoint; "
                               f"lock = checkpoint.lock_root({str(tmp_path)!r}); child = os.fork(); "
                               "time.sleep(30) if child == 0 else None; print(child, flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    worker = int(holder.stdout.readline())
    try:
        with pytest.raises(ValueError, match="in use by another live run"):
            checkpoint.lock_root(str(tmp_path))
        holder.kill()
        holder.wait()
        os.kill(worker, 0)  # the forked worker is still alive
        checkpoint.lock_root(str(tmp_path)).close()
    finally:
        os.kill(worker, signal.SIGKILL)


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "ckpt").mkdir()
    os.symlink(victim, tmp_path / "ckpt" / checkpoint.LOCK)
    with pytest.raises(ValueError, match="cannot open the lock file"):
        checkpoint.lock_root(str(tmp_path / "ckpt"))
    assert victim.read_text() == "precious"  # open("a+") followed the link and truncate() emptied it


@pytest.mark.parametrize("marker", ['{"step": 4, "files": {"a.pt": null}}', '{"step": 4, "files": [1]}', "[1, 2]",
                                    "not json"])
def test_a_damaged_marker_is_refused_not_taken_for_an_old_checkpoint(tmp_path, marker):
    from moe_dist.checkpoint_files import verify_files

    d = _tag(tmp_path, 4)
    (d / checkpoint.MARKER).write_text(marker)
    with pytest.raises(ValueError, match="marker"):
        verify_files(str(d))
    (d / checkpoint.MARKER).write_text('{"step": 4}')  # written before file lists: passes
    verify_files(str(d))
