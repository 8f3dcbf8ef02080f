"""Shard tools and the streaming pipeline: round trip, compatibility, bad input, resume, tokenizer."""

import json
import multiprocessing
import os
import pickle
import shutil

import pytest
import torch

from data_tools.cli import main as data_cli
from data_tools.shard import ShardOptions, shard
from helpers.data import PickleBomb, bomb_png, good_sample, jpeg_bytes, make_csv, write_tar
from moe_dist.data import DataError, LoaderConfig, ShardLoader
from moe_dist.text import SentencePieceTokenizer, train_sentencepiece

CAPTION_WORDS = ["caption number"] + [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer(train_sentencepiece([f"caption number {i}" for i in range(300)] +
                                                      [f"good {i}" for i in range(50)], vocab_size=40),
                                  context_length=24)


@pytest.fixture(scope="module")
def csv_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("csv")
    path = make_csv(root, 200)
    manifest = shard(path, str(root / "out"), ShardOptions(per_shard=25), progress=False)
    return root, manifest


def _loader(spec, tokenizer, rank=0, world=1, **kw):
    cfg = dict(spec=str(spec), batch_size=10, workers=2, image_size=16, train_transform=False, shuffle_buffer=20)
    cfg.update(kw)
    return ShardLoader(LoaderConfig(**cfg), tokenizer, rank=rank, world_size=world)


def test_round_trip_exactly_once_over_2_ranks_x_2_workers(csv_shards, tokenizer):
    root, manifest = csv_shards
    assert manifest["inputs"] == manifest["written"] == 200 and manifest["failed"] == []
    assert manifest["splits"]["train"]["shards"] == 8
    assert data_cli(["validate", str(root / "out" / "train"), "-q"]) == 0
    loaders = [_loader(root / "out" / "train", tokenizer, rank=r, world=2) for r in range(2)]
    orders = []
    for epoch in range(2):
        seen = []
        for loader in loaders:
            assert loader.steps_per_epoch == 10
            for batch in loader:
                assert batch.images.shape == (10, 3, 16, 16)
                seen += tokenizer.decode(batch.tokens)
            assert loader.last_epoch_stats["padded"] == 0
        assert sorted(seen) == sorted(f"caption number {i}" for i in range(200))  # each exactly once
        orders.append(seen)
    assert orders[0] != orders[1], "the epoch order must be reshuffled"


def test_metadata_columns_are_kept(csv_shards):
    root, _ = csv_shards
    import tarfile

    with tarfile.open(root / "out" / "train" / "train-000000.tar") as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
        meta = json.load(tar.extractfile(member))
    assert meta["group"] == "0" and meta["source_image"] == "img/0000.jpg"


def test_open_clip_train_reads_our_shards(csv_shards):
    """open_clip_train's own webdataset pipeline (its eval path: its train path breaks on the
    end-of-shard marker of webdataset >= 1.0, see the data issue) reads every sample we wrote."""
    import types

    from open_clip.transform import image_transform
    from open_clip_train.data import get_wds_dataset

    from moe_dist.text import get_tokenizer

    root, _ = csv_shards
    spec = str(root / "out" / "train" / "train-{000000..000007}.tar")
    args = types.SimpleNamespace(val_data=spec, train_data=None, val_num_samples=None, workers=1, batch_size=16,
                                 dataset_resampled=False)
    info = get_wds_dataset(args, image_transform(16, is_train=False), is_train=False,
                           tokenizer=get_tokenizer("openclip-bpe", 16))
    assert sum(images.shape[0] for images, _ in info.dataloader) == 200


def test_img2dataset_folder_layout_is_accepted(tmp_path):
    for i in range(6):
        sub = tmp_path / "in" / f"{i // 3:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:09d}.jpg").write_bytes(jpeg_bytes(i))
        (sub / f"{i:09d}.txt").write_text(f"caption number {i}")
        (sub / f"{i:09d}.json").write_text(json.dumps({"url": f"http://x/{i}.jpg", "status": "success"}))
    manifest = shard(str(tmp_path / "in"), str(tmp_path / "out"), ShardOptions(per_shard=4), progress=False)
    assert manifest["written"] == 6 and manifest["splits"]["train"]["shards"] == 2


def test_shard_bad_inputs_are_reported_in_manifest(tmp_path):
    truncated = jpeg_bytes(1, size=64)[:200]
    extra = [("img/html.jpg", "an html page", b"<html><body>not an image</body></html>"),
             ("img/trunc.jpg", "a truncated jpeg", truncated),
             ("img/empty.jpg", "   ", jpeg_bytes(2)),
             ("img/latin1.jpg", b"caf\xe9 latin-1", jpeg_bytes(3)),
             ("img/missing.jpg", "no such file", None),
             ("img/bomb.png", "a decompression bomb", bomb_png())]
    path = make_csv(tmp_path, 10, extra)
    manifest = shard(path, str(tmp_path / "out"), ShardOptions(per_shard=100, workers=2), progress=False)
    reasons = {os.path.basename(f["input"].split(":")[0]) + ":" + f["input"].split(":")[1]: f["reason"]
               for f in manifest["failed"]}
    assert sorted(reasons.values()) == sorted(["undecodable_image", "undecodable_image", "empty_caption",
                                               "caption_not_utf8", "missing_image_file", "image_too_large"])
    assert manifest["inputs"] == 16 and manifest["written"] == 10 and manifest["failed_count"] == 6
    on_disk = json.load(open(tmp_path / "out" / "manifest.json"))
    assert on_disk["written"] + on_disk["failed_count"] == on_disk["inputs"]


@pytest.fixture()
def broken_shards(tmp_path):
    marker = tmp_path / "pickle-payload-ran"
    bad = [
        {"__key__": "html", "jpg": b"<html>not an image</html>", "txt": b"html"},
        {"__key__": "trunc", "jpg": jpeg_bytes(5, 64)[:150], "txt": b"truncated"},
        {"__key__": "empty", "jpg": jpeg_bytes(6), "txt": b"  "},
        {"__key__": "latin", "jpg": jpeg_bytes(7), "txt": b"caf\xe9"},
        {"__key__": "bomb", "png": bomb_png(), "txt": b"bomb"},
        {"__key__": "pickled", "pickle": pickle.dumps(PickleBomb(str(marker))), "txt": b"pickle only"},
    ]
    d = tmp_path / "shards"
    d.mkdir()
    write_tar(d / "a-000.tar", [good_sample(i) for i in range(10)] + bad[:3])
    write_tar(d / "a-001.tar", [good_sample(i) for i in range(10, 20)] + bad[3:])
    # a tar cut in the middle of its 12th member
    write_tar(tmp_path / "full.tar", [good_sample(i) for i in range(20, 30)])
    data = (tmp_path / "full.tar").read_bytes()
    (d / "a-002.tar").write_bytes(data[: len(data) * 2 // 3])
    return d, marker


def test_a_partial_last_batch_is_not_a_warning(csv_shards, tokenizer, broken_shards, caplog):
    """200 samples in batches of 30: the 7th batch holds 20 and repeats 10 (expected, logged at info); samples
    that fail and leave a rank short are what the warning is for."""
    root, _ = csv_shards
    loader = _loader(root / "out" / "train", tokenizer, batch_size=30)
    with caplog.at_level("INFO", logger="moe_dist.data.loader"):
        captions = [c for batch in loader for c in tokenizer.decode(batch.tokens)]
    assert len(captions) == 210 and len(set(captions)) == 200 and loader.last_epoch_stats["padded"] == 10
    assert [r.levelname for r in caplog.records if "repeat" in r.getMessage()] == ["INFO"]
    caplog.clear()
    d, _ = broken_shards  # 26 samples, 7 of them fail: 19 good in batches of 5 -> 4 padded, ended early
    loader = _loader(f"{d}/a-{{000..002}}.tar", tokenizer, workers=1, max_failure_fraction=1.0, batch_size=5)
    with caplog.at_level("INFO", logger="moe_dist.data.loader"):
        list(loader)
    assert [r.levelname for r in caplog.records if "repeat" in r.getMessage()] == ["WARNING"]


def test_loader_skips_and_counts_broken_samples(broken_shards, tokenizer):
    d, marker = broken_shards
    loader = _loader(f"{d}/a-{{000..002}}.tar", tokenizer, workers=1, max_failure_fraction=1.0, batch_size=5)
    captions = [c for batch in loader for c in tokenizer.decode(batch.tokens)]
    stats = loader.last_epoch_stats
    assert stats["failures"] == {"undecodable_image": 2, "empty_caption": 1, "caption_not_utf8": 1,
                                 "image_too_large": 1, "missing_image": 1, "broken_tar": 1}
    assert {c for c in captions} >= {f"good {i}" for i in range(20)}
    assert not any("pickle" in c or "bomb" in c or "html" in c for c in captions)
    assert not marker.exists(), "a .pickle member was unpickled"
    assert data_cli(["validate", str(d), "-q"]) == 1


def test_loader_stops_when_too_many_samples_fail(broken_shards, tokenizer):
    d, _ = broken_shards
    loader = _loader(f"{d}/a-{{000..001}}.tar", tokenizer, workers=1, max_failure_fraction=0.1,
                     min_samples_before_failure_check=10)
    with pytest.raises(DataError, match=r"failed on rank 0 \(.*undecodable_image: 2.*max_failure_fraction=0.1"):
        list(loader)


def test_workers_end_with_an_error_or_an_early_stop(csv_shards, broken_shards, tokenizer):
    """Workers ignore SIGTERM (SLURM signals every process of a job), so the loader ends them itself: when a
    caller stops mid-epoch, and when an error's kept traceback still holds the iterator. Left alive, they
    held the interpreter's exit forever (it joins its children after a SIGTERM they ignore)."""
    before = set(multiprocessing.active_children())
    root, _ = csv_shards
    batches = iter(_loader(root / "out" / "train", tokenizer, workers=2))
    next(batches)
    assert len(set(multiprocessing.active_children()) - before) == 2
    batches.close()
    assert set(multiprocessing.active_children()) - before == set()
    d, _ = broken_shards
    with pytest.raises(DataError) as kept:
        list(_loader(f"{d}/a-{{000..001}}.tar", tokenizer, workers=2, max_failure_fraction=0.1,
                     min_samples_before_failure_check=5, batch_size=2))
    assert set(multiprocessing.active_children()) - before == set(), kept.value  # kept: its traceback lives on


def test_loader_names_the_cause_when_every_sample_fails(tmp_path, tokenizer):
    write_tar(tmp_path / "bad.tar", [{"__key__": f"k{i}", "jpg": b"<html/>", "txt": b"x"} for i in range(5)])
    loader = _loader(tmp_path / "bad.tar", tokenizer, workers=0, max_failure_fraction=1.0)
    with pytest.raises(DataError, match=r"no sample of .* could be used .*5 failed: undecodable_image: 5"):
        list(loader)


def test_spec_matching_nothing_and_too_few_shards(tmp_path, tokenizer, csv_shards):
    with pytest.raises(ValueError, match="matches no shard file"):
        _loader(tmp_path / "nothing-{000..003}.tar", tokenizer)
    assert data_cli(["validate", str(tmp_path / "nothing.tar"), "-q"]) == 2
    root, _ = csv_shards
    with pytest.raises(DataError, match="8 shards cannot feed 4 ranks x 4 workers"):
        _loader(root / "out" / "train", tokenizer, world=4, workers=4)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_the_same_batches_in_exact_mode(csv_shards, tokenizer, workers):
    root, _ = csv_shards
    spec = root / "out" / "train"
    full = [b.tokens for b in _loader(spec, tokenizer, rank=1, world=2, workers=workers)]
    first = _loader(spec, tokenizer, rank=1, world=2, workers=workers)
    it = iter(first)
    head = [next(it).tokens for _ in range(4)]
    state = first.state_dict()
    resumed = _loader(spec, tokenizer, rank=1, world=2, workers=workers)
    resumed.load_state_dict(state)
    tail = [b.tokens for b in resumed]
    assert len(head) + len(tail) == len(full) == 10
    for a, b in zip(head + tail, full):
        assert torch.equal(a, b)


def test_tokenizer_command_is_deterministic_and_loads(csv_shards, tmp_path):
    root, _ = csv_shards
    spec = str(root / "out" / "train")
    for name in ("a.model", "b.model"):
        assert data_cli(["tokenizer", spec, "--out", str(tmp_path / name), "--vocab-size", "50", "-q"]) == 0
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    tok = SentencePieceTokenizer(str(tmp_path / "a.model"), context_length=32)
    assert tok.decode(tok(["caption number 17"])) == ["caption number 17"]


def test_synth_and_stats(tmp_path, capsys):
    assert data_cli(["synth", "--out", str(tmp_path / "s"), "--n", "40", "--per-shard", "10", "-q"]) == 0
    classes = json.load(open(tmp_path / "s" / "classes.json"))["classes"]
    assert len(classes) == 12
    capsys.readouterr()
    assert data_cli(["stats", str(tmp_path / "s" / "train"), "--json", "-q"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples"] == 40 and stats["shards"] == 4 and stats["key_sets"] == {"jpg,json,txt": 40}
    shutil.rmtree(tmp_path / "s2", ignore_errors=True)
    data_cli(["synth", "--out", str(tmp_path / "s2"), "--n", "40", "--per-shard", "10", "-q"])
    assert (tmp_path / "s" / "train" / "train-000002.tar").read_bytes() == \
        (tmp_path / "s2" / "train" / "train-000002.tar").read_bytes()


def test_reshard_existing_shards(csv_shards, tmp_path):
    root, _ = csv_shards
    manifest = shard(str(root / "out" / "train"), str(tmp_path / "re"), ShardOptions(per_shard=64), progress=False)
    assert manifest["inputs"] == manifest["written"] == 200 and manifest["splits"]["train"]["shards"] == 4


def test_coco_captions_input(tmp_path):
    (tmp_path / "images").mkdir()
    images = [{"id": i, "file_name": f"{i:012d}.jpg"} for i in range(3)]
    for img in images:
        (tmp_path / "images" / img["file_name"]).write_bytes(jpeg_bytes(img["id"]))
    anns = [{"id": 10 * i + j, "image_id": i, "caption": f"caption number {i} {j}"} for i in range(3) for j in range(2)]
    anns.append({"id": 99, "image_id": 7, "caption": "an annotation of a missing image"})
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    manifest = shard(str(tmp_path / "captions.json"), str(tmp_path / "out"), ShardOptions(),
                     images_dir=str(tmp_path / "images"), progress=False)
    assert manifest["inputs"] == 7 and manifest["written"] == 6
    assert [f["reason"] for f in manifest["failed"]] == ["missing_image_file"]


def test_pipe_specs_need_explicit_permission(tokenizer):
    with pytest.raises(ValueError, match="pipe: URL, which runs a shell command; set data.allow_pipe=true"):
        _loader("pipe:cat /etc/passwd", tokenizer)


@pytest.mark.parametrize("url, allow_pipe, refused", [
    ("data/a.tar", False, None), ("./http:x.tar", False, None), ("pipe:cat a.tar", True, None),
    ("pipe:cat a.tar", False, "pipe: URL"), ("http://h/a.tar", False, None), ("https://h/a.tar", False, None),
    ("s3://b/a.tar", False, None), ("http:a.tar", False, "http: scheme"), ("file:a.tar", True, "file: scheme"),
    ("gs://b/a.tar", False, "gs:"), ("ftp://h/a.tar", True, "ftp:")])
def test_one_rule_decides_what_a_shard_url_may_be(url, allow_pipe, refused):
    from moe_dist.data.spec import check_url

    if refused is None:
        assert check_url(url, allow_pipe) == url
    else:
        with pytest.raises(ValueError, match=refused):
            check_url(url, allow_pipe)


def test_an_allowed_pipe_feeds_the_loader(csv_shards, tokenizer):
    root, _ = csv_shards
    shard = root / "out" / "train" / "train-000000.tar"
    loader = _loader(f"pipe:cat {shard}", tokenizer, workers=0, allow_pipe=True, mode="resampled", epoch_samples=20)
    assert sum(batch.tokens.shape[0] for batch in loader) == 20


def test_resampled_mode_follows_source_weights(csv_shards, tmp_path, tokenizer):
    root, _ = csv_shards
    other = tmp_path / "other"
    other.mkdir()
    for s in range(2):
        write_tar(other / f"o-{s}.tar", [good_sample(100 * s + i) for i in range(40)])
    spec = f"{root / 'out' / 'train'}::{other}/o-{{0..1}}.tar"
    loader = _loader(spec, tokenizer, mode="resampled", weights=[3.0, 1.0], epoch_samples=2000, workers=2,
                     shuffle_buffer=1)
    captions = [c for batch in loader for c in tokenizer.decode(batch.tokens)]
    assert len(captions) == 2000 and loader.last_epoch_stats["padded"] == 0
    share = sum(c.startswith("caption") for c in captions) / len(captions)
    # weights 3:1 -> 3/4 of the samples from the first source; weighting shards instead of samples
    # would give 3*25 / (3*25 + 40) = 0.65 here (its shards hold 25 samples, the other's 40)
    assert 0.70 < share < 0.80, share
