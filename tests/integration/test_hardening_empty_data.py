"""Issue 25 item 4, with real ranks: a dataset with nothing in it ends the run on every rank with one message.

Before, shards that count no sample (an index whose counts are 0, empty tars without an index) made every
epoch plan no step, and ``moe-dist train`` looped on empty epochs forever without a word. Each case starts
2 ranks (gloo, srun-style) and wants both to exit non-zero with the same line, well before the timeout.
"""

import shutil
import tarfile

import pytest

from helpers.train import kill_all, make_synth, overrides, start_srun_style

TIMEOUT_S = 240


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=120)


def _empty_tar(path):
    with tarfile.open(path, "w"):
        pass


def _two_shards(synth, directory, empty=(), sizes=None):
    """a.tar and b.tar copied from the synth shards (or empty tars), with an optional sizes.json."""
    import json

    directory.mkdir()
    for name, source in zip(("a.tar", "b.tar"), sorted((synth / "train").glob("*.tar"))):
        if name in empty:
            _empty_tar(directory / name)
        else:
            shutil.copy(source, directory / name)
    if sizes is not None:
        (directory / "sizes.json").write_text(json.dumps(sizes))
    return directory


CASES = {
    # refused when the config's inputs are resolved, before the process group starts
    "index_counts_zero": (dict(sizes={"a.tar": 0, "b.tar": 0}), 2, "error: data.train: ", "with 0 samples"),
    # refused by every rank's loader (a tar no index describes is counted there)
    "empty_tars_no_index": (dict(empty=("a.tar", "b.tar")), 2, "error: ", "holds no sample"),
    # the index promises samples, one rank's share holds none: that rank's error stops both at the same step
    "one_rank_share_empty": (dict(empty=("b.tar",), sizes={"a.tar": 40, "b.tar": 40}), 1, "stopped: ",
                             "could be used on rank"),
}


@pytest.mark.world_size(2)
@pytest.mark.parametrize("case", list(CASES))
def test_a_dataset_with_nothing_to_read_stops_every_rank(case, synth, tmp_path):
    layout, code, prefix, says = CASES[case]
    data = _two_shards(synth, tmp_path / "data", **layout)
    sets = {"data.train": data, "data.mode": "exact", "steps": 4, "ep_size": 2}
    procs = start_srun_style(overrides(synth, tmp_path / "run", **sets), log_dir=str(tmp_path))
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    finally:
        kill_all(procs)
    logs = [(tmp_path / f"rank{r}.log").read_text() for r in range(2)]
    shown = logs[0][-2000:] + "\n--- rank 1\n" + logs[1][-2000:]
    lines = [[line for line in log.splitlines() if line.startswith(f"moe-dist train: {prefix}")] for log in logs]
    assert codes == [code, code], shown
    assert all(len(found) == 1 for found in lines) and lines[0] == lines[1], lines
    assert says in lines[0][0] and "Traceback" not in logs[0] + logs[1], shown
    ckpts = tmp_path / "run" / "checkpoints"  # (a start locks the directory: .lock)
    assert not ckpts.exists() or not [p for p in ckpts.iterdir() if p.name.startswith("step")]
