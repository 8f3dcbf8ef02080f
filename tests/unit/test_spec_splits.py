"""Specs that fit together: the --out DIR of `moe-dist-data shard` is a spec (its train split), DIR/val names
the val split, and every message that points at a split names a path the next command accepts."""

import json

import pytest

from data_tools.cli import main as data_cli
from data_tools.shard import ShardOptions, shard
from helpers.data import make_csv
from moe_dist.data import LoaderConfig, ShardLoader, resolve_spec
from moe_dist.data.spec import dataset_splits
from moe_dist.engine.config import load_run_config
from moe_dist.text import SentencePieceTokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """200 CSV rows -> DIR/train (about 180 samples in 25-sample shards) and DIR/val (about 20), as a user makes them."""
    root = tmp_path_factory.mktemp("splits")
    manifest = shard(make_csv(root, 200), str(root / "out"), ShardOptions(per_shard=25, val_fraction=0.1),
                     progress=False)
    return root / "out", manifest


def _urls(spec):
    return [s.url for s in resolve_spec(str(spec))]


def test_the_output_dir_means_its_train_split(dataset):
    out, manifest = dataset
    assert _urls(out) == _urls(out / "train")
    assert sum(s.samples for s in resolve_spec(str(out))) == manifest["splits"]["train"]["samples"]
    # counts come from the split's manifest, as for DIR/train itself
    assert all(s.index == "manifest.json" for s in resolve_spec(str(out)))
    assert _urls(out / "val") and set(_urls(out / "val")).isdisjoint(_urls(out))


def test_dataset_splits_lists_what_shard_wrote(dataset):
    out, manifest = dataset
    splits = dataset_splits(str(out))
    assert sorted(splits) == ["train", "val"]
    assert splits["val"].path == str(out / "val") and splits["val"].shards == manifest["splits"]["val"]["shards"]
    assert dataset_splits(str(out / "train")) is None  # a split's own manifest lists shards, not splits


def test_a_colon_suffix_is_refused_with_the_split_directory(dataset):
    out, _ = dataset
    with pytest.raises(ValueError, match=rf"use {out}/val \({out} holds splits train \(\d+ shards\), val"):
        resolve_spec(f"{out}:val")
    with pytest.raises(ValueError, match=rf"use {out}/test \({out} holds splits"):
        resolve_spec(f"{out}:test")


def test_a_dataset_without_train_names_its_splits(tmp_path):
    out = tmp_path / "only-val"
    shard(make_csv(tmp_path, 40), str(out), ShardOptions(per_shard=40, val_fraction=0.5), progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["train"]  # as if only a val split had been written
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"holds split val \(1 shard\): use {out}/val for the val split"):
        resolve_spec(str(out))
    assert _urls(out / "val")


def test_a_parent_directory_points_at_its_shard_directories(dataset, tmp_path):
    out, _ = dataset
    with pytest.raises(ValueError, match=rf"matches no shard file.*shard directories {out.parent}/out: use one"):
        resolve_spec(str(out.parent))


@pytest.mark.parametrize("command", ["validate", "stats", "tokenizer"])
def test_data_commands_take_the_output_dir(dataset, tmp_path, capsys, command):
    out, manifest = dataset
    extra = ["--out", str(tmp_path / "tok.model"), "--vocab-size", "40"] if command == "tokenizer" else []
    assert data_cli([command, str(out), "-q"] + extra) == 0
    printed = capsys.readouterr().out
    train = manifest["splits"]["train"]["samples"]
    if command == "validate":
        assert f"{train} samples, {train} ok, 0 broken" in printed
    elif command == "stats":
        assert f"{train} samples" in printed
    else:
        assert (tmp_path / "tok.model").is_file()


def test_shard_prints_specs_the_next_command_accepts(tmp_path, capsys):
    assert data_cli(["shard", make_csv(tmp_path, 40), "--out", str(tmp_path / "d"), "--per-shard", "10",
                     "--val-fraction", "0.2", "-q"]) == 0
    printed = capsys.readouterr().out
    specs = [line.split("-> ")[1] for line in printed.splitlines() if "-> " in line]
    specs += [line.split(": ", 1)[1].split(" (")[0] for line in printed.splitlines() if line.startswith("spec")]
    assert str(tmp_path / "d") in specs and str(tmp_path / "d" / "val") in specs
    for spec in specs:
        assert resolve_spec(spec), spec


def test_train_config_and_loader_take_the_output_dir(dataset, tmp_path):
    out, manifest = dataset
    tok = tmp_path / "tok.model"
    tok.write_bytes(train_sentencepiece([f"caption number {i}" for i in range(100)], vocab_size=30))
    cfg = load_run_config(None, [f"data.train={out}", f"data.val={out}/val", f"data.tokenizer={tok}",
                                 f"output_dir={tmp_path / 'run'}"])
    cfg.check_inputs("none")
    loader = ShardLoader(LoaderConfig(spec=str(out), batch_size=10, workers=1, image_size=16,
                                      train_transform=False), SentencePieceTokenizer(str(tok)))
    seen = sum(len(batch.images) for batch in loader)
    assert seen == -(-manifest["splits"]["train"]["samples"] // 10) * 10  # one epoch, the last batch padded


def test_eval_reads_the_output_dir_and_its_val_split(dataset):
    from moe_dist.data.evalset import first_metadata

    out, _ = dataset
    for spec in (out, out / "val"):  # moe-dist eval / analyze-routing --data
        assert first_metadata(str(spec))  # the first sample of the split, with its metadata


def test_a_manifest_naming_a_split_outside_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"splits": {"train": {"path": "../x", "shards": 1}}}))
    with pytest.raises(ValueError, match="not a file name in its directory"):
        resolve_spec(str(tmp_path))
