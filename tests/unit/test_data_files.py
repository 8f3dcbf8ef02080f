"""Issue 25, data side: what spec resolution and the loaders open, and what they refuse.

    item 4   shards that count no sample are refused at resolution; an epoch that can yield nothing is an
             error, never an endless run of empty epochs
    item 6   the files a spec names are regular files (no FIFO, device or directory), a directory's entries
             stay inside it, index files have a size limit; nothing blocks on a FIFO
    item 9   a malformed manifest.json / sizes.json / classes.json is one ValueError line naming the file
    small    a sample's unparsable .json is a broken sample for validate and resharding; the tokenizer is
             written atomically
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from data_tools.cli import main as data_cli
from helpers.data import ZeroTokenizer, blank_transform, good_sample, jpeg_bytes, write_tar
from moe_dist.data import DataError, LoaderConfig, ShardLoader, resolve_spec
from moe_dist.data.spec import Shard

SAMPLES = 5


def loader(spec, **kw):
    cfg = dict(spec=str(spec), batch_size=2, workers=0, shuffle_buffer=1)
    cfg.update(kw)
    world, rank = cfg.pop("world", 1), cfg.pop("rank", 0)
    return ShardLoader(LoaderConfig(**cfg), ZeroTokenizer(4), rank=rank, world_size=world, transform=blank_transform(4))


def shard_dir(root, names=("a.tar", "b.tar"), samples=SAMPLES):
    """``root`` with tars of ``samples`` good samples each (no index)."""
    root.mkdir(parents=True, exist_ok=True)
    for n, name in enumerate(names):
        write_tar(root / name, [good_sample(100 * n + i) for i in range(samples)])
    return root


def one_error_line(err):
    text = str(err)
    assert "\n" not in text, text
    return text


# ------------------------------------------------------------------ item 9: malformed index files
SIZES_CASES = {
    "list_not_object": ([["a.tar", 5], ["b.tar", 5]], "not an object"),
    "string_count": ({"a.tar": "5", "b.tar": 5}, "not a whole number"),
    "bool_count": ({"a.tar": True, "b.tar": 5}, "not a whole number"),
    "float_count": ({"a.tar": 2.5, "b.tar": 5}, "not a whole number"),
    "whole_float_count": ({"a.tar": 5.0, "b.tar": 5}, "not a whole number"),
    "null_count": ({"a.tar": None, "b.tar": 5}, "not a whole number"),
    "nested_count": ({"a.tar": {"samples": 5}, "b.tar": 5}, "not a whole number"),
    "a_bare_string": ("a.tar", "not an object"),
}
MANIFEST_CASES = {
    "list_not_object": ([{"name": "a.tar", "samples": 5}], "not an object"),
    "shards_not_a_list": ({"shards": {"a.tar": 5}}, '"shards"'),
    "entry_not_an_object": ({"shards": ["a.tar", "b.tar"]}, "shards[0]"),
    "missing_samples": ({"shards": [{"name": "a.tar"}]}, '"samples"'),
    "missing_name": ({"shards": [{"samples": 5}]}, '"name"'),
    "neither_shards_nor_splits": ({"format": "webdataset"}, '"shards"'),
    "number_name": ({"shards": [{"name": 7, "samples": 5}]}, "not a file name"),
    "nested_name": ({"shards": [{"name": ["a.tar"], "samples": 5}]}, "not a file name"),
    "string_count": ({"shards": [{"name": "a.tar", "samples": "5"}]}, "not a whole number"),
    "bool_count": ({"shards": [{"name": "a.tar", "samples": True}]}, "not a whole number"),
    "float_count": ({"shards": [{"name": "a.tar", "samples": 4.5}]}, "not a whole number"),
    "duplicate_name": ({"shards": [{"name": "a.tar", "samples": 5}, {"name": "a.tar", "samples": 5}]}, "twice"),
    "splits_a_list": ({"splits": ["train"]}, '"splits"'),
    "split_not_an_object": ({"splits": {"train": "train"}}, 'splits["train"]'),
    "split_path_a_number": ({"splits": {"train": {"path": 5, "shards": 1}}}, "not a file name"),
    "split_count_a_string": ({"splits": {"train": {"path": "train", "shards": "8", "samples": 1}}}, "whole number"),
}
RAW_CASES = {  # bytes of either index file
    "invalid_json": (b'{"a.tar": 5,', "not valid JSON"),
    "empty_file": (b"", "not valid JSON"),
    "not_utf8": (b'{"caf\xe9.tar": 5}', "not UTF-8"),
}
INDEX_CASES = [("sizes.json", k, *v) for k, v in SIZES_CASES.items()] + \
              [("manifest.json", k, *v) for k, v in MANIFEST_CASES.items()] + \
              [(index, k, *v) for index in ("sizes.json", "manifest.json") for k, v in RAW_CASES.items()]


@pytest.mark.parametrize("index, case, content, says", INDEX_CASES,
                         ids=[f"{index}-{case}" for index, case, _, _ in INDEX_CASES])
def test_a_malformed_index_is_one_line_naming_the_file(index, case, content, says, tmp_path, capsys):
    directory = shard_dir(tmp_path / "shards")
    path = directory / index
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    with pytest.raises(ValueError) as err:
        resolve_spec(str(directory))
    message = one_error_line(err.value)
    assert str(path) in message and says in message, message
    # the command line: exit 2 with that one line, no traceback
    assert data_cli(["validate", str(directory), "-q"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"moe-dist-data validate: error: {message}"]


def test_a_malformed_remote_index_names_its_url(tmp_path):
    from helpers.remote import serve_http

    directory = shard_dir(tmp_path / "shards")
    (directory / "sizes.json").write_text(json.dumps([["a.tar", 5]]))
    with serve_http(tmp_path) as server:
        with pytest.raises(ValueError, match=rf"{server.url}/shards/sizes.json .*not an object"):
            resolve_spec(f"{server.url}/shards/")


def test_a_well_formed_index_still_gives_the_counts(tmp_path):
    directory = shard_dir(tmp_path / "shards")
    (directory / "sizes.json").write_text(json.dumps({"a.tar": 3, "b.tar": 4}))
    assert [(os.path.basename(s.url), s.samples, s.index) for s in resolve_spec(str(directory))] == \
        [("a.tar", 3, "sizes.json"), ("b.tar", 4, "sizes.json")]


@pytest.mark.parametrize("manifest", [["a list"], {"shards": "all"}, {"shards": [["train-000000.tar", 5], {"x": 1}]}],
                         ids=["list", "shards_a_string", "entries_of_garbage"])
def test_a_malformed_manifest_in_an_s3_prefix_is_refused_or_ignored(manifest, monkeypatch, tmp_path):
    """Sibling readers: resuming an upload reads the prefix's manifests. A top manifest that is not ours is
    refused in one line; split manifest entries of the wrong shape are not trusted (their shards are uploaded
    again) instead of raising AttributeError / KeyError."""
    from data_tools import publish

    monkeypatch.setattr(publish.remote, "read_json", lambda url, *a, **k: manifest)
    assert publish.S3Publisher("s3://bucket/prefix", str(tmp_path)).existing == {}
    if isinstance(manifest, list):
        with pytest.raises(ValueError, match=r"s3://bucket/prefix/manifest.json is not a JSON object.*--overwrite"):
            publish.check_prefix("s3://bucket/prefix", "src", {}, overwrite=False)


@pytest.mark.parametrize("content, says", [(b'{"images": [', "not UTF-8 JSON"), (b'\xff\xfe', "not UTF-8 JSON"),
                                           (b'[{"images": []}]', "not a COCO captions file"),
                                           (b'{"images": {}, "annotations": []}', "not a COCO captions file")],
                         ids=["invalid_json", "not_utf8", "a_list", "images_not_a_list"])
def test_a_malformed_coco_file_is_one_line_naming_it(content, says, tmp_path, capsys):
    (tmp_path / "captions.json").write_bytes(content)
    assert data_cli(["shard", str(tmp_path / "captions.json"), "--out", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "captions.json") in err[0] and says in err[0], err


def test_coco_entries_of_the_wrong_shape_are_failed_inputs(tmp_path):
    from data_tools.shard import ShardOptions, shard

    (tmp_path / "0.jpg").write_bytes(jpeg_bytes(0))
    images = [{"id": 0, "file_name": "0.jpg"}, "not an image entry"]
    anns = [{"id": 1, "image_id": 0, "caption": "a caption"}, {"id": 2, "caption": "no image id"}, ["garbage"]]
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    manifest = shard(str(tmp_path / "captions.json"), str(tmp_path / "out"), ShardOptions(), progress=False)
    assert (manifest["written"], manifest["failed_count"]) == (1, 2)
    assert [f["reason"] for f in manifest["failed"]] == ["invalid_coco_entry"] * 2


CLASS_CASES = {
    "invalid_json": (b'{"classes": [', "not valid JSON"),
    "not_utf8": (b'{"classes": ["caf\xe9"]}', "not UTF-8"),
    "list_not_object": (b'["cat", "dog"]', '"classes"'),
    "nested_class": (b'{"classes": ["cat", {"name": "dog"}]}', "classes[1]"),
    "bool_class": (b'{"classes": ["cat", true]}', "classes[1]"),
    "template_not_a_string": (b'{"classes": ["cat"], "templates": [3]}', "template"),
}


@pytest.mark.parametrize("case", sorted(CLASS_CASES))
def test_a_malformed_class_file_is_one_line_naming_it(case, tmp_path):
    from moe_dist.evaluation.zeroshot import load_classes

    content, says = CLASS_CASES[case]
    path = tmp_path / "classes.json"
    path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_classes(str(path))
    message = one_error_line(err.value)
    assert str(path) in message and says in message, message


# ------------------------------------------------------------------ item 6: what a spec may make us open
@pytest.mark.timeout(60, method="signal")
@pytest.mark.parametrize("name", ["a.tar", "manifest.json", "sizes.json"])
def test_a_fifo_in_a_shard_directory_is_refused_without_blocking(name, tmp_path):
    directory = shard_dir(tmp_path / "shards", names=("b.tar", "c.tar"))
    os.mkfifo(directory / name)
    if name == "a.tar":
        (directory / "sizes.json").write_text(json.dumps({"a.tar": 5, "b.tar": 5, "c.tar": 5}))
    with pytest.raises(ValueError, match=rf"{directory / name}' is a FIFO \(named pipe\), not a regular file"):
        resolve_spec(str(directory))


@pytest.mark.timeout(60, method="signal")
@pytest.mark.parametrize("kind", ["fifo", "device", "directory"])
def test_a_shard_must_be_a_regular_file(kind, tmp_path):
    """A FIFO named by the spec, a device, a directory that *.tar matches: refused by what they are, never
    opened (a FIFO would block), and never called "missing"."""
    directory = shard_dir(tmp_path / "shards", names=("b.tar",))
    spec = {"fifo": tmp_path / "s.tar", "device": "/dev/null", "directory": directory}[kind]
    if kind == "fifo":
        os.mkfifo(spec)
    elif kind == "directory":
        (directory / "x.tar").mkdir()
    with pytest.raises(ValueError, match=r"is a (FIFO|character device|directory).*not a regular file"):
        resolve_spec(str(spec))


@pytest.mark.timeout(60, method="signal")
def test_reading_a_shard_never_blocks_on_a_fifo(tmp_path):
    """A shard replaced by a FIFO after resolution (the worker opens it later) is a broken shard, counted."""
    from moe_dist.data.stream import SampleCounter, raw_samples

    os.mkfifo(tmp_path / "a.tar")
    counter = SampleCounter()
    assert list(raw_samples(iter([Shard(str(tmp_path / "a.tar"), 5, 0, "sizes.json")]), counter)) == []
    assert dict(counter.failures) == {"broken_tar": 1, "short_shard": 5}


@pytest.mark.parametrize("listed_by", ["manifest.json", "sizes.json", "glob"])
def test_a_directory_entry_may_not_link_outside_it(listed_by, tmp_path):
    outside = shard_dir(tmp_path / "elsewhere", names=("x.tar",))
    directory = shard_dir(tmp_path / "shards", names=("b.tar",))
    (directory / "a.tar").symlink_to(outside / "x.tar")
    (directory / "c.tar").symlink_to("b.tar")  # a link that stays inside is fine
    counts = {"a.tar": 5, "b.tar": 5, "c.tar": 5}
    if listed_by == "manifest.json":
        entries = [{"name": k, "samples": v} for k, v in counts.items()]
        (directory / listed_by).write_text(json.dumps({"shards": entries}))
    elif listed_by == "sizes.json":
        (directory / listed_by).write_text(json.dumps(counts))
    real = os.path.realpath(outside / "x.tar")
    found = r"a.tar' \((listed in|found in) .*\)"
    with pytest.raises(ValueError, match=rf"{found} is a symlink to {real}, outside {directory}"):
        resolve_spec(str(directory))
    (directory / "a.tar").unlink()
    if listed_by == "glob":
        assert len(resolve_spec(str(directory))) == 2
    assert len(resolve_spec(str(directory / "c.tar"))) == 1  # named by the spec itself: a link is the user's own


def test_an_index_may_not_link_outside_its_directory(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "sizes.json").write_text(json.dumps({"a.tar": 5, "b.tar": 5}))
    directory = shard_dir(tmp_path / "shards")
    (directory / "sizes.json").symlink_to(tmp_path / "elsewhere" / "sizes.json")
    with pytest.raises(ValueError, match=r"sizes.json' \(the index of .*\) is a symlink to .*, outside"):
        resolve_spec(str(directory))


def test_a_split_directory_may_not_link_outside_its_dataset(tmp_path):
    outside = shard_dir(tmp_path / "elsewhere")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train").symlink_to(outside)
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"splits": {"train": {"path": "train", "shards": 2}}}))
    with pytest.raises(ValueError, match=r"train' \(listed in .*manifest.json\) is a symlink to .*, outside"):
        resolve_spec(str(tmp_path / "data"))
    assert len(resolve_spec(str(outside))) == 2


def test_an_index_has_a_size_limit(tmp_path, monkeypatch):
    from moe_dist.data import localfiles

    directory = shard_dir(tmp_path / "shards")
    (directory / "sizes.json").write_text(json.dumps({"a.tar": 5, "b.tar": 5, "pad": "x" * 2000}))
    monkeypatch.setattr(localfiles, "INDEX_MAX_BYTES", 1 << 10)
    with pytest.raises(ValueError, match=rf"index {directory / 'sizes.json'} is larger than"):
        resolve_spec(str(directory))


@pytest.mark.timeout(60, method="signal")
def test_a_class_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from moe_dist.evaluation.zeroshot import load_classes

    os.mkfifo(tmp_path / "classes.json")
    with pytest.raises(ValueError, match="is a FIFO"):
        load_classes(str(tmp_path / "classes.json"))


# ------------------------------------------------------------------ item 4: nothing to read is an error
def _empty_tar(path):
    with tarfile.open(path, "w"):
        pass


EMPTY_CASES = {
    "sizes_zero": ("sizes.json", {"a.tar": 0, "b.tar": 5}, "a.tar' with 0 samples"),
    "sizes_negative": ("sizes.json", {"a.tar": 5, "b.tar": -2}, "b.tar' with -2 samples"),
    "manifest_zero": ("manifest.json", {"shards": [{"name": "a.tar", "samples": 0}]}, "a.tar' with 0 samples"),
    "empty_tar_no_index": (None, "empty", "a.tar' holds no sample"),
    "garbage_tar_no_index": (None, "garbage", "a.tar' holds no sample"),
}


@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
def test_shards_that_count_no_sample_are_refused(case, tmp_path):
    index, content, says = EMPTY_CASES[case]
    directory = shard_dir(tmp_path / "shards")
    if index:
        (directory / index).write_text(json.dumps(content))
    elif content == "empty":
        _empty_tar(directory / "a.tar")
    else:
        (directory / "a.tar").write_bytes(os.urandom(3000))
    with pytest.raises(ValueError) as err:
        loader(directory, world=2, rank=1)
    message = one_error_line(err.value)
    assert says in message and ("remove" in message or "rebuild" in message), message


def test_exact_mode_refuses_shards_of_unknown_size(tmp_path):
    """A pipe: shard cannot be counted without running it: exact mode planned it as 0 samples, so every
    epoch had no step and training looped on empty epochs."""
    directory = shard_dir(tmp_path / "shards", names=("a.tar",))
    with pytest.raises(ValueError, match=r"pipe:cat .*a.tar'.* no known sample count.*data.mode=resampled"):
        loader(f"pipe:cat {directory / 'a.tar'}", allow_pipe=True)
    assert len(list(loader(f"pipe:cat {directory / 'a.tar'}", allow_pipe=True, mode="resampled",
                           epoch_samples=4))) == 2


def test_an_epoch_with_no_step_is_an_error_unless_a_resume_finished_it(tmp_path):
    from moe_dist.data import merge_states

    directory = shard_dir(tmp_path / "shards")
    empty = loader(directory)
    empty.shards = [Shard(s.url, 0, s.source, s.index) for s in empty.shards]  # what resolution now refuses
    with pytest.raises(DataError, match="epoch 0 .* no sample to deliver"):
        list(empty)
    # an elastic resume whose saved state had delivered the whole epoch: nothing left, the next epoch follows
    first = loader(directory)
    batches = list(first)
    assert len(batches) == 5 and first.epoch == 1
    done = loader(directory)
    for _ in done:  # read epoch 0 whole without the iterator's epoch change: the state of its last step
        if done._step == done.steps_per_epoch:
            state = done.state_dict()
            break
    resumed = loader(directory, world=2, rank=0)  # another layout: an elastic resume
    resumed.load_state_dict(merge_states([state]))
    assert list(resumed) == [] and resumed.epoch == 1
    assert len(list(resumed)) == 3  # epoch 1 at 2 ranks: one shard of 5 samples, batches of 2


def test_an_elastic_resume_that_leaves_a_rank_no_shard_keeps_the_ranks_in_step(tmp_path):
    """Guard: the one way a fresh plan gives a rank nothing now that every shard counts >= 1. Rank 1 repeats
    recent samples for as many steps as rank 0 reads, instead of stopping, and nothing is delivered twice."""
    from moe_dist.data import merge_states

    directory = shard_dir(tmp_path / "shards")
    first = loader(directory)
    batches = iter(first)
    head = [next(batches).tokens for _ in range(3)]  # 6 of the 10 samples: one shard whole, one begun
    state = merge_states([first.state_dict()])
    ranks = [loader(directory, world=2, rank=r) for r in range(2)]
    for rank in ranks:
        rank.load_state_dict(state)
    assert [len(list(rank)) for rank in ranks] == [2, 2] and len(head) == 3
    assert [r.last_epoch_stats["good"] for r in ranks] == [4, 0] and ranks[1].last_epoch_stats["padded"] == 4


@pytest.mark.timeout(120, method="signal")
def test_resampled_mode_stops_on_shards_that_hold_nothing(tmp_path):
    """Shards of unknown size (no index, a pipe: or a remote URL) that are empty: every draw read nothing, and
    the worker drew forever without a message."""
    _empty_tar(tmp_path / "empty.tar")
    endless = loader(f"pipe:cat {tmp_path / 'empty.tar'}", allow_pipe=True, mode="resampled", epoch_samples=4)
    with pytest.raises(DataError, match=r"none of the 1 shards held a sample on rank 0 \(each was read: empty_shard"):
        list(endless)


@pytest.mark.timeout(120, method="signal")
def test_resampled_mode_stops_when_nothing_decodes(tmp_path):
    """Every sample fails: the worker never filled a chunk, so the loader never saw a failure to count, and waited
    forever."""
    write_tar(tmp_path / "bad.tar", [{"__key__": f"k{i}", "jpg": b"<html/>", "txt": b"x"} for i in range(5)])
    endless = loader(tmp_path / "bad.tar", mode="resampled", epoch_samples=4, workers=1)
    with pytest.raises(DataError, match=r"64 of 64 samples failed on rank 0 \(undecodable_image: 64\)"):
        list(endless)


def test_validate_reports_an_empty_shard(tmp_path, capsys):
    directory = shard_dir(tmp_path / "shards", names=("b.tar",))
    _empty_tar(directory / "a.tar")
    assert data_cli(["validate", str(directory), "-q"]) == 1
    out = capsys.readouterr().out
    assert f"BROKEN {directory / 'a.tar'} key=None reason=empty_shard" in out, out


# ------------------------------------------------------------------ small items
def _bad_json_shard(path):
    samples = [dict(good_sample(i), json=b'{"label": 1}') for i in range(3)]
    samples.append({"__key__": "badjson", "jpg": jpeg_bytes(9), "txt": b"bad json", "json": b'{"label": '})
    write_tar(path, samples)


def test_validate_counts_an_unparsable_json_member(tmp_path, capsys):
    _bad_json_shard(tmp_path / "a.tar")
    assert data_cli(["validate", str(tmp_path / "a.tar"), "-q"]) == 1
    out = capsys.readouterr().out
    assert "key=badjson reason=bad_json" in out and "4 samples, 3 ok, 1 broken" in out, out


def test_resharding_counts_an_unparsable_json_member(tmp_path):
    from data_tools.shard import ShardOptions, shard

    _bad_json_shard(tmp_path / "a.tar")
    manifest = shard(str(tmp_path / "a.tar"), str(tmp_path / "out"), ShardOptions(), progress=False)
    assert (manifest["written"], manifest["failed_count"]) == (3, 1)
    assert [f["reason"] for f in manifest["failed"]] == ["bad_json"]


def test_a_folder_sidecar_json_that_does_not_parse_is_counted(tmp_path):
    from data_tools.shard import ShardOptions, shard

    for i, meta in enumerate(['{"url": "x"}', '{"url": ']):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        (tmp_path / "in" / f"{i}.txt").write_text(f"caption {i}")
        (tmp_path / "in" / f"{i}.json").write_text(meta)
    manifest = shard(str(tmp_path / "in"), str(tmp_path / "out"), ShardOptions(), progress=False)
    assert (manifest["written"], manifest["failed_count"]) == (1, 1)
    assert [f["reason"] for f in manifest["failed"]] == ["bad_json"]


def test_the_tokenizer_is_written_atomically(tmp_path):
    """A write that fails half-way (here: the file-size limit, as a full disk would) keeps the old model whole."""
    write_tar(tmp_path / "a.tar", [dict(good_sample(i), txt=f"caption number {i} of many".encode())
                                    for i in range(60)])
    out = tmp_path / "tok.model"
    assert data_cli(["tokenizer", str(tmp_path / "a.tar"), "--out", str(out), "--vocab-size", "40", "-q"]) == 0
    old = out.read_bytes()
    limit_kb = len(old) // 1024 - 8  # the new model (same size or larger) cannot be written whole
    script = (f"ulimit -f {limit_kb}; exec {sys.executable} -m data_tools.cli tokenizer {tmp_path / 'a.tar'} "
              f"--out {out} --vocab-size 60 -q")
    res = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0, f"the file-size limit was not hit\n{res.stdout}\n{res.stderr}"
    assert out.read_bytes() == old, "a failed write left a partial tokenizer in place of the old one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "tok.model"]
