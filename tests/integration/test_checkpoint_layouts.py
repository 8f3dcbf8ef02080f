"""A checkpoint written by 2 ranks with ep_size=2 trains on as 1 process, with its Adam state or with
--weights-only (its data epoch continued from the two ranks' global position either way), and the
expert load TensorBoard shows is summed over all ranks and micro-batches of the logging window."""

import os

import pytest

from helpers.train import RUN_CONFIG, deepspeed_cmd, make_synth, metrics, overrides, run

IMAGE_TOKENS = (32 // 8) ** 2 + 1  # moe-clip-tiny: 32 px images, 8 px patches, plus the class token


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"))


@pytest.fixture(scope="module")
def two_rank_run(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2") / "run"
    res = run(deepspeed_cmd(overrides(synth, out, steps=4, ep_size=2, zero_stage=2,
                                      **{"batch.grad_accum": 2, "batch.micro_batch": 8,
                                         "model.moe.dropless": "true", "logging.every": 2})))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return out


def test_expert_load_is_summed_over_ranks_and_micro_batches(two_rank_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(two_rank_run, "tensorboard"), size_guidance={"histograms": 0})
    acc.Reload()
    tag = next(t for t in acc.Tags()["histograms"] if t.startswith("moe/expert_load/image/vision."))
    # logged every 2 steps: 2 steps x 2 ranks x 2 micro-batches x 8 images x 17 tokens, top-1 dropless
    assert [h.step for h in acc.Histograms(tag)] == [2, 4]
    assert [h.histogram_value.num for h in acc.Histograms(tag)] == [2 * 2 * 2 * 8 * IMAGE_TOKENS] * 2


def test_weights_only_resume_on_another_world_size_trains_on(synth, two_rank_run, tmp_path):
    step_dir = two_rank_run / "checkpoints" / "step00000004"
    out = tmp_path / "one"
    cmd = ["moe-dist", "train", "--config", RUN_CONFIG, "--resume", str(step_dir)]
    sets = overrides(synth, out, steps=6, ep_size=1, **{"data.workers": 0})
    res = run(cmd + sets + ["--weights-only"])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "weights-only resume from" in res.stdout and "at step 4" in res.stdout
    assert "the data stream continues epoch 0 where the 2 rank(s) of the checkpoint left it" in res.stdout
    steps = [m["step"] for m in metrics(out) if "loss/total" in m]
    assert steps == [5, 6]
    assert os.path.isdir(out / "checkpoints" / "step00000006")
    # the one-rank run went on from the two ranks' global position: what they delivered stays delivered
    from moe_dist.data import merge_states
    from moe_dist.data.stream import Consumed
    from moe_dist.engine.checkpoint import loader_states

    before = Consumed.from_state(merge_states(loader_states(str(step_dir)))["consumed"])
    (after,) = loader_states(str(out / "checkpoints" / "step00000006"))
    after = Consumed.from_state(after["consumed"])
    ids = lambda c: {(s, -1) for s in c.done} | {(s, i) for s, o in c.partial.items() for i in o}  # noqa: E731
    grown = {s for s, _ in ids(before)} <= {s for s, _ in ids(after)} and len(ids(after)) > 0
    assert grown and all(s in after.done or o <= after.partial.get(s, set())
                         for s, o in before.partial.items()), (before, after)


def test_a_full_resume_on_another_layout_carries_the_optimizer_state(synth, two_rank_run, tmp_path):
    step_dir = two_rank_run / "checkpoints" / "step00000004"
    res = run(["moe-dist", "train", "--config", RUN_CONFIG, "--resume", str(step_dir)]
              + overrides(synth, tmp_path / "one", steps=5, ep_size=1, zero_stage=1, **{"data.workers": 0}))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert ("on another layout (world_size 2, ep_size 2, zero_stage 2, precision fp32 -> world_size 1, ep_size 1, "
            "zero_stage 1, precision fp32): the weights, Adam's moments and step count (4) carried over") in res.stdout
    assert "the data stream continues epoch 0 where the 2 rank(s) of the checkpoint left it" in res.stdout
    assert [m["step"] for m in metrics(tmp_path / "one") if "loss/total" in m] == [5]


def _tree(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


@pytest.mark.parametrize("listed", [True, False], ids=["file-list", "no-file-list"])
def test_a_missing_optimizer_shard_is_refused_before_the_first_step(synth, two_rank_run, tmp_path, listed):
    """Rank 1's ZeRO file gone: the resume on another layout names it and what to do, and touches nothing.
    Checkpoints that list their files are refused by the list; older ones (no list) by the optimizer index."""
    import json
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(two_rank_run / "checkpoints", root)
    step_dir = root / "step00000004"
    (step_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    if not listed:
        marker = json.loads((step_dir / "COMPLETE").read_text())
        marker.pop("files")
        (step_dir / "COMPLETE").write_text(json.dumps(marker))
    before = _tree(root)
    res = run(["moe-dist", "train", "--config", RUN_CONFIG, "--resume", str(step_dir)]
              + overrides(synth, tmp_path / "one", steps=5, ep_size=1, **{"data.workers": 0}))
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-3000:]
    error = res.stderr.strip().splitlines()[-1]
    want = ("zero_pp_rank_1_mp_rank_00_optim_states.pt" if listed else
            "rank 1's ZeRO optimizer file (of 2) (zero_pp_rank_1_mp_rank_00_optim_states.pt) is missing")
    assert want in error and ("--weights-only" in error or not listed), error
    assert _tree(root) == before
    assert not list((tmp_path / "one" / "checkpoints").glob("step*"))  # only the new run's lock file
