"""Shards over HTTP and S3 (issue 14), against real servers on loopback started here: Python's HTTP
server (with Range support and injected faults: dropped connections at byte offsets, 503s, 403, 404)
and moto's standalone S3 server.

Every test counts captions: the CSV's 200 captions are unique, so "each sample exactly once" is
``sorted(seen) == sorted(all)``.
"""

import json
import logging
import os

import pytest
import torch

from data_tools.shard import ShardOptions, shard
from helpers.data import make_csv
from helpers.remote import Drop, S3Server, Status, serve_http
from moe_dist.data import DataError, LoaderConfig, RemoteOptions, ShardLoader
from moe_dist.text import SentencePieceTokenizer, train_sentencepiece

N = 200
ALL = sorted(f"caption number {i}" for i in range(N))
FAST = RemoteOptions(retries=3, timeout_s=10, backoff_s=0.01)


@pytest.fixture(scope="module", autouse=True)
def s3_server():
    """Started first: moto's imports then overlap the HTTP tests."""
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer(train_sentencepiece([f"caption number {i}" for i in range(300)], vocab_size=40),
                                  context_length=24)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """200 samples in 8 train shards of 25 under ROOT/out (the --out layout), and the CSV they came from."""
    root = tmp_path_factory.mktemp("remote")
    csv = make_csv(root, N)
    shard(csv, str(root / "out"), ShardOptions(per_shard=25), progress=False)
    return root


@pytest.fixture(scope="module")
def server(data):
    with serve_http(data) as srv:
        yield srv


@pytest.fixture
def http(server):
    """The module's server with no faults left over from another test."""
    return server.reset()


def _loader(spec, tokenizer, rank=0, world=1, **kw):
    cfg = dict(spec=str(spec), batch_size=10, workers=2, image_size=16, train_transform=False, shuffle_buffer=20,
               remote=FAST)
    cfg.update(kw)
    return ShardLoader(LoaderConfig(**cfg), tokenizer, rank=rank, world_size=world)


def _captions(loader, tokenizer):
    return [c for batch in loader for c in tokenizer.decode(batch.tokens)]


def test_http_exact_2_ranks_x_2_workers_equals_local(data, http, tokenizer):
    """Acceptance 1: a dataset directory URL (read through its manifest.json): every sample once per epoch
    over 2 ranks x 2 workers, two epochs, and the same batches as the same run on the local files."""
    remote = [_loader(f"{http.url}/out", tokenizer, rank=r, world=2) for r in range(2)]
    local = [_loader(data / "out", tokenizer, rank=r, world=2) for r in range(2)]
    for _ in range(2):
        seen = []
        for r in range(2):
            for a, b in zip(remote[r], local[r], strict=True):
                assert torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
                seen += tokenizer.decode(a.tokens)
        assert sorted(seen) == ALL
    assert any(p.endswith(".tar") for p in http.requests)


@pytest.mark.parametrize("spec", ["{url}/out", "{url}/out/", "{url}/out/train",
                                  "{url}/out/train/train-{{000000..000007}}.tar"])
def test_remote_specs_resolve_like_local_ones(spec, data, http):
    """A dataset directory (its train split), a split directory or a brace pattern: the shards and the
    sample counts (from the manifest beside them) of the local spec, without reading a shard."""
    from moe_dist.data import resolve_spec

    local = resolve_spec(str(data / "out"))
    remote = resolve_spec(spec.format(url=http.url))
    prefix = len(str(data))
    assert [(s.url, s.samples) for s in remote] == [(http.url + s.url[prefix:], s.samples) for s in local]
    assert not any(p.endswith(".tar") for p in http.requests)


def test_http_resampled_mode_needs_no_index(data, http, tokenizer):
    """A brace pattern whose directory has no index still feeds resampled mode; exact mode says what is missing."""
    pattern = f"{http.url}/flat/train-{{000000..000007}}.tar"
    os.makedirs(data / "flat", exist_ok=True)
    for i in range(8):
        name = f"train-{i:06d}.tar"
        if not (data / "flat" / name).exists():
            os.link(data / "out" / "train" / name, data / "flat" / name)
    seen = _captions(_loader(pattern, tokenizer, mode="resampled", epoch_samples=60, workers=1), tokenizer)
    assert len(seen) == 60 and set(seen) <= set(ALL)
    with pytest.raises(ValueError, match=r"has no sample count: .*manifest.json or sizes.json.*data.mode=resampled"):
        _loader(pattern, tokenizer)


def _inject(server):
    """Drops in the middle of two shards at three byte offsets, and 503s; returns the number of faults."""
    server.faults["/out/train/train-000001.tar"] = [Drop(100), Drop(5000), Status(503)]
    server.faults["/out/train/train-000005.tar"] = [Status(503), Drop(20000)]
    return 5


@pytest.mark.parametrize("ranges", [True, False], ids=["range", "no-range"])
def test_dropped_connections_and_503s_are_retried_each_sample_once(ranges, http, tokenizer, caplog):
    """Acceptance 3: the epoch still delivers every sample exactly once (resumed at the byte with Range;
    re-read and skipped when the server ignores Range), and every retry is counted and logged."""
    http.ranges = ranges
    try:
        faults = _inject(http)
        loader = _loader(f"{http.url}/out", tokenizer, workers=0)  # in this process: caplog sees the logs
        with caplog.at_level(logging.WARNING, logger="moe_dist.data.remote"):
            seen = _captions(loader, tokenizer)
    finally:
        http.ranges = True
    assert sorted(seen) == ALL
    assert loader.last_epoch_stats["retries"] == faults and loader.last_epoch_stats["failed"] == 0
    retries = [r.getMessage() for r in caplog.records if r.getMessage().startswith("retry ")]
    assert len(retries) == faults, retries
    resumed_at = 5100 if ranges else 5000  # with Range the second answer starts at byte 100
    assert any(f"train-000001.tar at byte {resumed_at} " in line for line in retries), retries


def test_faults_in_worker_processes_are_counted(http, tokenizer):
    faults = _inject(http)
    loader = _loader(f"{http.url}/out", tokenizer)
    assert sorted(_captions(loader, tokenizer)) == ALL
    assert loader.last_epoch_stats["retries"] == faults


@pytest.mark.parametrize("fault, expected, requests", [
    (Status(404), "HTTP 404 (not found)", 1), (Status(403), "HTTP 403 (forbidden)", 1),
    (Status(400), "HTTP 400 (Bad Request)", 1), (Status(416), "HTTP 416 (Requested Range Not Satisfiable)", 1),
    ([Status(503)] * 9, "HTTP 503 (Service Unavailable); gave up after 3 retries", 4),
    ([Status(429)] * 9, "HTTP 429 (Too Many Requests); gave up after 3 retries", 4)])
def test_missing_forbidden_and_endless_faults_stop_with_one_line(fault, expected, requests, http, tokenizer):
    """A missing or forbidden object, or any other 4xx but 408 and 429 (a request that cannot succeed), is
    not retried; endless 503s or 429s stop after data.remote_retries. Each stops the epoch with one line
    naming the URL."""
    path = "/out/train/train-000003.tar"
    http.faults[path] = list(fault) if isinstance(fault, list) else [fault]
    with pytest.raises(DataError) as err:
        list(_loader(f"{http.url}/out", tokenizer, workers=1))
    message = str(err.value)
    assert "\n" not in message and f"{http.url}{path}: {expected}" in message, message
    assert http.requests.count(path) == requests


def test_unreadable_shard_skipped_and_counted_when_allowed(http, tokenizer):
    http.forbidden.add("/out/train/train-000003.tar")
    loader = _loader(f"{http.url}/out", tokenizer, workers=1, skip_unreadable_shards=True, max_failure_fraction=0.5)
    seen = _captions(loader, tokenizer)
    stats = loader.last_epoch_stats
    assert stats["failures"] == {"unreadable_shard": 25} and stats["good"] == N - 25
    assert len(set(seen)) == N - 25 and len(seen) == N - 25 + stats["padded"]


def test_resume_on_remote_shards_equals_uninterrupted(http, tokenizer):
    """Acceptance 4: a state taken mid-epoch on remote shards resumes into the same batches."""
    spec = f"{http.url}/out"
    full = [b.tokens for b in _loader(spec, tokenizer, rank=1, world=2)]
    first = _loader(spec, tokenizer, rank=1, world=2)
    it = iter(first)
    head = [next(it).tokens for _ in range(4)]
    resumed = _loader(spec, tokenizer, rank=1, world=2)
    resumed.load_state_dict(first.state_dict())
    tail = [b.tokens for b in resumed]
    assert len(head + tail) == len(full) == 10
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))


def test_s3_shards_written_by_the_cli_feed_the_loader(data, tokenizer, s3_server, monkeypatch, capsys):
    """Acceptance 2: moe-dist-data shard --out s3://... into moto's server (credentials and endpoint from
    the AWS_* variables); a re-run after an interruption uploads only the missing shard; the manifests and
    shards match a local --out; the loader reads every sample once over 2 ranks."""
    import boto3

    from data_tools.cli import main as data_cli

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="datasets")
    command = ["shard", str(data / "data.csv"), "--out", "s3://datasets/mine", "--per-shard", "25", "-q"]
    assert data_cli(command) == 0  # the console script's code, in this process (no second start-up)
    assert "testing" not in "".join(capsys.readouterr())  # no secret is printed

    def manifest(key):
        return json.loads(s3.get_object(Bucket="datasets", Key=key)["Body"].read())

    # what a run interrupted while uploading its last shard leaves: 7 shards listed, no top manifest
    split = manifest("mine/train/manifest.json")
    split["shards"] = split["shards"][:7]
    s3.put_object(Bucket="datasets", Key="mine/train/manifest.json", Body=json.dumps(split).encode())
    s3.delete_object(Bucket="datasets", Key="mine/manifest.json")
    s3.delete_object(Bucket="datasets", Key="mine/train/train-000007.tar")
    assert data_cli(command) == 0
    assert "7 complete shards were already in s3://datasets/mine and were not uploaded again; 1 uploaded" in \
        capsys.readouterr().out

    local = json.loads((data / "out" / "train" / "manifest.json").read_text())
    uploaded = manifest("mine/train/manifest.json")
    assert [{k: s[k] for k in ("name", "samples", "bytes")} for s in uploaded["shards"]] == \
        [{k: s[k] for k in ("name", "samples", "bytes")} for s in local["shards"]]
    top = manifest("mine/manifest.json")
    assert top["written"] == N and top["splits"]["train"]["shards"] == 8
    for s in uploaded["shards"]:
        body = s3.get_object(Bucket="datasets", Key=f"mine/train/{s['name']}")["Body"].read()
        assert body == (data / "out" / "train" / s["name"]).read_bytes()  # byte-identical to a local --out
    seen = []
    for r in range(2):
        seen += _captions(_loader("s3://datasets/mine", tokenizer, rank=r, world=2, workers=1), tokenizer)
    assert sorted(seen) == ALL
    with pytest.raises(DataError, match=r"s3://datasets/mine/train/train-000009.tar: S3 NoSuchKey \(not found\)"):
        list(_loader("s3://datasets/mine/train/train-000009.tar", tokenizer, mode="resampled", epoch_samples=20,
                     workers=0))


def test_messages_never_show_the_query_or_userinfo_of_a_url(http, tokenizer):
    """Presigned URLs carry their token in the query string: it never reaches a message or a log line."""
    from moe_dist.data.remote import shown_url

    assert shown_url("https://user:pw@host:8080/a/b.tar?X-Amz-Signature=s3cr3t#f") == "https://***@host:8080/a/b.tar"
    http.forbidden.add("/out/train/train-000003.tar?X-Amz-Signature=s3cr3t")
    with pytest.raises(DataError) as err:
        list(_loader(f"{http.url}/out/train/train-000003.tar?X-Amz-Signature=s3cr3t", tokenizer, mode="resampled",
                     epoch_samples=10, workers=0))
    assert "HTTP 403 (forbidden)" in str(err.value) and "s3cr3t" not in str(err.value)
