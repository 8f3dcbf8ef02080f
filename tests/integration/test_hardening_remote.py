"""Issue 25, remote data: each test reproduces one hole against real servers on loopback (Python's HTTP
server with injected faults, tests/helpers/remote.py) and real shards.

    item 1   no userinfo in a spec, no secret in a message, a log or a record; permanent errors are not retried
    item 5   redirects keep to the URL rule, at most MAX_REDIRECTS; a ~/.netrc login never follows a redirect
    item 10  remote index files and sample members have a size cap: larger ones are refused or counted, not read
    index    remote index reads honour data.remote_retries and data.remote_timeout_s
    pace     a server that drips bytes cannot hold a reader: a throughput floor per window of remote_timeout_s
    206      a resumed read starts where it was asked to (Content-Range), on the same object, or not at all
    qs       moe-dist quickstart --data / --val take remote specs, like train, eval and validate
"""

import argparse
import base64
import io
import os
import json
import logging
import tarfile
import time

import pytest

from data_tools.shard import ShardOptions, shard
from helpers.data import ZeroTokenizer, blank_transform, jpeg_bytes, make_csv
from helpers.remote import Drip, Drop, Partial, Redirect, Stall, Status, serve_http
from moe_dist.data import RemoteError, RemoteOptions
from moe_dist.data.remote import MAX_REDIRECTS, open_remote

N = 40
SECRET = "s3cr3t"
FAST = RemoteOptions(retries=2, timeout_s=10, backoff_s=0.01)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 samples in 4 train shards of 10 under ROOT/out (the --out layout)."""
    root = tmp_path_factory.mktemp("remote")
    shard(make_csv(root, N), str(root / "out"), ShardOptions(per_shard=10), progress=False)
    return root


@pytest.fixture(scope="module")
def server(data):
    with serve_http(data) as srv:
        yield srv


@pytest.fixture
def http(server):
    """The module's server with no faults left over from another test."""
    return server.reset()


def data_cli(*args):
    """``moe-dist-data ARGS -q`` in this process: (exit code, stdout + stderr)."""
    import contextlib
    import io

    from data_tools.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main([str(a) for a in args] + ["-q"])
    return code, out.getvalue()


def one_error_line(text):
    lines = [line for line in text.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# ------------------------------------------------------------------ item 1: credentials never reach text
def with_userinfo(url):
    return url.replace("http://", f"http://user:{SECRET}@")


def test_userinfo_in_a_spec_is_refused_before_any_request(http, tmp_path):
    """Every command that takes a spec refuses userinfo with one line that names the spec without the
    secret and says where credentials go instead; nothing is fetched."""
    from moe_dist.engine import load_run_config

    spec = with_userinfo(f"{http.url}/out")
    code, text = data_cli("validate", spec)
    line = one_error_line(text)
    assert code == 2 and SECRET not in text, text
    assert "***@127.0.0.1" in line and "user name or password" in line and "presigned" in line, line
    assert not http.requests, http.requests
    config = load_run_config(None, [f"data.train={http.url}/out", f"data.val={with_userinfo(http.url)}/out/train"])
    with pytest.raises(ValueError, match=r"^data.val: .*user name or password") as err:
        config.check_inputs(resume="none")
    assert SECRET not in str(err.value)


def test_secrets_in_s3_urls_reach_no_retry_warning_and_no_error(caplog):
    """boto3 rejects ``user:secret@bucket`` as a bucket name in a message that quotes it; that error was
    transient (retried, each retry a warning with the secret). Now the URL is refused before boto3 sees it."""
    with caplog.at_level(logging.WARNING, logger="moe_dist.data.remote"), pytest.raises(RemoteError) as err:
        open_remote(f"s3://AKIAEXAMPLE:{SECRET}@bucket/a.tar", FAST)
    assert err.value.permanent and SECRET not in str(err.value), str(err.value)
    assert "s3://***@bucket/a.tar" in str(err.value) and "user name or password" in str(err.value)
    assert not caplog.records, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize("url", ["http://user:{secret}@127.0.0.1:99999x/a.tar", "http://127.0.0.1:99999x/a.tar",
                                 "http://127.0.0.1:0/a.tar", "http:///a.tar", "http://[::1/a.tar",
                                 "http://127.0.0.1/a b.tar"])
def test_a_malformed_url_is_one_line_and_never_retried(url, caplog):
    """A port that is not a number broke the code that hides userinfo (a ValueError from inside the
    error handler) and was retried with backoff as if it were a fault of the server."""
    url = url.format(secret=SECRET)
    with caplog.at_level(logging.WARNING, logger="moe_dist.data.remote"), pytest.raises(RemoteError) as err:
        open_remote(url, FAST)
    assert err.value.permanent and SECRET not in str(err.value) and "\n" not in str(err.value), str(err.value)
    assert not caplog.records, [r.getMessage() for r in caplog.records]
    code, text = data_cli("validate", url)
    assert code == 2 and SECRET not in text and "shard URL" in one_error_line(text), text


def test_a_refused_pipe_command_is_shown_without_its_secrets(tmp_path):
    marker = tmp_path / "ran"
    code, text = data_cli("validate", f"pipe:curl -s https://user:{SECRET}@host/a.tar?token={SECRET} && touch {marker}")
    assert code == 2 and not marker.exists(), text
    assert SECRET not in text and "https://***@host/a.tar" in one_error_line(text), text


def test_a_remote_directory_with_a_query_string_is_refused(http):
    """A query string belongs to one object; joined to a directory it swallowed the index's name."""
    code, text = data_cli("validate", f"{http.url}/out?token={SECRET}")
    assert code == 2 and SECRET not in text and "query string" in one_error_line(text), text
    assert not http.requests, http.requests


def test_query_strings_never_reach_run_config_json():
    """run_config.json (run directory and every checkpoint) records the config's ``to_dict()``: a presigned
    URL's token is used to read, never recorded."""
    from moe_dist.engine import load_run_config

    spec = f"https://host/a.tar?X-Amz-Signature={SECRET}::https://host/b.tar?X-Amz-Signature={SECRET}"
    recorded = load_run_config(None, [f"data.train={spec}", f"data.val={spec}"]).to_dict()
    assert SECRET not in json.dumps(recorded)
    assert recorded["data"]["train"] == "https://host/a.tar::https://host/b.tar"


# ------------------------------------------------------------------ item 5: redirects
SHARD = "/out/train/train-000000.tar"


@pytest.mark.parametrize("target", ["ftp://127.0.0.1:9/a.tar", "file:///etc/passwd", "s3://bucket/a.tar",
                                    "http://user:{secret}@127.0.0.1/a.tar", "http://127.0.0.1:99999x/a.tar"])
def test_a_redirect_is_held_to_the_url_rule(target, http, caplog):
    """urllib followed a redirect to ftp:// (and retried refused ones, quoting the Location); now every
    hop passes the rule that the spec's own URLs pass, and a refusal is permanent."""
    http.faults[SHARD] = [Redirect(target.format(secret=SECRET))]
    with caplog.at_level(logging.WARNING, logger="moe_dist.data.remote"), pytest.raises(RemoteError) as err:
        open_remote(http.url + SHARD, FAST)
    message = str(err.value)
    assert err.value.permanent and "redirect to" in message and SECRET not in message, message
    assert http.requests == [SHARD] and not caplog.records


def test_redirect_chains_are_bounded(http, data):
    """MAX_REDIRECTS hops are followed (to any http host: 127.0.0.1 and localhost); one more is refused
    (urllib followed ten)."""
    hops = [f"/hop{i}" for i in range(MAX_REDIRECTS + 1)]
    for i, hop in enumerate(hops[:-1]):
        host = "localhost" if i % 2 else "127.0.0.1"
        http.faults[hop] = [Redirect(f"{http.url.replace('127.0.0.1', host)}{hops[i + 1]}")] * 2
    http.faults[hops[-1]] = [Redirect(SHARD)] * 2
    with open_remote(http.url + hops[1], FAST) as stream:  # MAX_REDIRECTS hops to the shard
        assert stream.read() == (data / SHARD.lstrip("/")).read_bytes()
    with pytest.raises(RemoteError, match=f"at most {MAX_REDIRECTS} are followed") as err:
        open_remote(http.url + hops[0], FAST)
    assert err.value.permanent


def test_a_netrc_login_is_sent_to_its_host_only(http, data, tmp_path, monkeypatch):
    """Credentials come from $NETRC (or ~/.netrc) instead of the URL, for the host they name; a redirect to
    another host (localhost) does not carry them, and a `default` entry is never used."""
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1 login user password {SECRET}\ndefault login x password y\n")
    (tmp_path / "netrc").chmod(0o600)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    login = "Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()
    host = http.url.split("//")[1]
    http.logins[host] = login
    http.faults["/moved.tar"] = [Redirect(http.url.replace("127.0.0.1", "localhost") + SHARD)]
    expected = (data / SHARD.lstrip("/")).read_bytes()
    with open_remote(f"{http.url}{SHARD}", FAST) as stream:
        assert stream.read() == expected
    with open_remote(f"{http.url}/moved.tar", FAST) as stream:
        assert stream.read() == expected
    assert http.seen == [(host, SHARD, login), (host, "/moved.tar", login),
                         (host.replace("127.0.0.1", "localhost"), SHARD, None)], http.seen


# ------------------------------------------------------------------ item 10: size caps
def test_a_remote_index_past_its_cap_is_refused_unread(http, data, monkeypatch):
    """A hostile sizes.json past the cap was read whole (then failed to parse as counts); now its size is
    refused from the reply's Content-Length, with the URL and the cap (here lowered to 1 MiB, from
    128 MiB, to keep the test small)."""
    from moe_dist.data import remote, resolve_spec

    MAX_INDEX_BYTES = 1 << 20
    monkeypatch.setattr(remote, "MAX_INDEX_BYTES", MAX_INDEX_BYTES)

    (data / "huge").mkdir(exist_ok=True)
    pad = MAX_INDEX_BYTES - len('{"a.tar": 1, "pad": ""}') + 1
    (data / "huge" / "sizes.json").write_text(json.dumps({"a.tar": 1, "pad": "x" * pad}))
    with pytest.raises(ValueError, match=f"huge/sizes.json holds {MAX_INDEX_BYTES + 1} bytes; .* at most "
                                         f"{MAX_INDEX_BYTES}") as err:
        resolve_spec(f"{http.url}/huge", need_counts=False)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def capped(data):
    """ROOT/caps/caps.tar: 8 samples (jpg, txt, json); sample 3's caption, sample 5's metadata and sample 7's
    image are one byte past their caps (the image is junk: read, it would fail as undecodable)."""
    from moe_dist.data.decode import MAX_CAPTION_BYTES, MAX_IMAGE_BYTES, MAX_METADATA_BYTES

    (data / "caps").mkdir()
    path = data / "caps" / "caps.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(8):
            members = {"jpg": jpeg_bytes(i), "txt": f"caption number {i}".encode(), "json": b"{}"}
            members.update({3: {"txt": b"c" * (MAX_CAPTION_BYTES + 1)},
                            5: {"json": json.dumps({"pad": "m" * MAX_METADATA_BYTES}).encode()},
                            7: {"jpg": b"\xff" * (MAX_IMAGE_BYTES + 1)}}.get(i, {}))
            for suffix, payload in members.items():
                info = tarfile.TarInfo(f"{i:09d}.{suffix}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (data / "caps" / "manifest.json").write_text(json.dumps({"shards": [{"name": "caps.tar", "samples": 8}]}))
    return path


def test_oversized_members_are_counted_failures_never_read(capped, http):
    """A caption of any size was read and tokenized whole (and an image of any size read whole); now a
    member past its cap is passed over unread and its sample is a counted failure, under
    data.max_failure_fraction. ``moe-dist-data validate`` reports the same, and never a URL's query."""
    from moe_dist.data import LoaderConfig, ShardLoader
    from moe_dist.data.decode import SampleError, decode_metadata
    from moe_dist.data.stream import SampleCounter, raw_samples
    from moe_dist.data.spec import resolve_spec

    cfg = LoaderConfig(spec=str(capped), batch_size=2, workers=0, shuffle_buffer=0, max_failure_fraction=0.5)
    loader = ShardLoader(cfg, ZeroTokenizer(), transform=blank_transform())
    for _ in loader:
        pass
    stats = loader.last_epoch_stats
    assert stats["failures"] == {"caption_too_large": 1, "image_too_large": 1} and stats["good"] == 6, stats
    reasons = []
    for sample in raw_samples(iter(resolve_spec(str(capped))), SampleCounter()):
        try:
            decode_metadata(sample)
        except SampleError as err:
            reasons.append((sample["__key__"], err.reason))
    assert reasons == [("000000005", "metadata_too_large")]
    code, text = data_cli("validate", f"{http.url}/caps/caps.tar?token={SECRET}")
    assert code == 1 and SECRET not in text, text
    assert f"BROKEN {http.url}/caps/caps.tar key=000000003 reason=caption_too_large" in text, text
    assert "key=000000007 reason=image_too_large" in text, text


# ------------------------------------------------------------------ index reads honour data.remote_*
@pytest.mark.parametrize("fault", [Stall(2.0), Status(503)], ids=["stall", "503"])
@pytest.mark.parametrize("entry", ["loader", "run_config"])
def test_index_reads_honour_remote_retries_and_timeout(entry, fault, http):
    """The index beside remote shards was read with the built-in 60 s timeout and 5 retries whatever the
    config said: a stalled or failing manifest.json held the run (here a 2 s stall, or a 503 retried
    after a 1 s backoff, both then answered). With data.remote_retries=0 and remote_timeout_s=0.3 the
    first fault ends the resolution, in well under a second."""
    from moe_dist.data import LoaderConfig, ShardLoader
    from moe_dist.engine import load_run_config

    cfg = LoaderConfig(spec=f"{http.url}/out", batch_size=2, workers=0, remote=RemoteOptions(retries=0, timeout_s=0.3))
    run_config = load_run_config(None, [f"data.train={http.url}/out", "data.remote_retries=0",
                                        "data.remote_timeout_s=0.3"])
    http.faults["/out/manifest.json"] = [fault]
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"cannot read http://127.0.0.1:\d+/out/manifest.json: "
                                         r"(.*timed out|HTTP 503 \(Service Unavailable\)); gave up after 0 retries"):
        if entry == "loader":
            ShardLoader(cfg, ZeroTokenizer(), transform=lambda image: image)
        else:
            run_config.check_inputs(resume="none")
    assert time.monotonic() - start < 1.5 and http.requests == ["/out/manifest.json"], http.requests


# ------------------------------------------------------------------ a throughput floor
def test_a_dripping_server_cannot_hold_a_reader(http, data, caplog):
    """A byte every 50 ms never trips a 0.25 s read timeout: the reader waited for the whole drip (and a
    drip of a million bytes would hold a rank for days). Now each 0.25 s window of waiting that brings
    fewer than 1000 bytes is a fault, reopened at the byte reached, and retries such windows in a row
    end the read, in about (retries + 1) windows."""
    options = RemoteOptions(retries=1, timeout_s=0.25, backoff_s=0.01, min_bytes_per_s=1000)
    http.faults[SHARD] = [Drip(0.05, 40)] * 3
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="moe_dist.data.remote"), pytest.raises(RemoteError) as err:
        open_remote(http.url + SHARD, options).read()
    assert not err.value.permanent and time.monotonic() - start < 1.5, time.monotonic() - start
    assert "below the floor data.remote_min_bytes_per_s=1000; gave up after 1 retries" in str(err.value), err.value
    assert [r.getMessage().split(" after ")[1].split(" bytes/s")[0].isdigit() for r in caplog.records] == [True]


def test_a_paused_consumer_is_not_a_slow_server(http, data):
    """Only the time spent waiting for the server counts: a consumer that stops reading for longer than
    the window (a training step, an evaluation) is no fault."""
    from moe_dist.data.remote import RemoteStream

    options = RemoteOptions(retries=0, timeout_s=0.25, backoff_s=0.01, min_bytes_per_s=1000)
    expected = (data / SHARD.lstrip("/")).read_bytes()
    with RemoteStream(http.url + SHARD, options) as stream:  # unbuffered: each read asks the server
        parts = [stream.read(1000)]
        time.sleep(0.4)
        while parts[-1]:
            parts.append(stream.read(1000))
    assert b"".join(parts) == expected and stream.retries == 0


# ------------------------------------------------------------------ 206 replies are checked
@pytest.mark.parametrize("reply, retries", [(Partial(start=0), 1), (Partial(start=6000), 2),
                                            (Partial(start=None), 2)], ids=["earlier", "later", "no-content-range"])
def test_a_resumed_read_never_splices_wrong_bytes(reply, retries, http, data):
    """After a drop at byte 5000 the Range request is answered 206 from the wrong byte (or without a
    Content-Range): the old code appended that body as if it started at 5000. Now a reply from an
    earlier byte is passed over up to 5000, and one from a later byte (or an unstated one) is a fault,
    retried; the bytes read are the file's either way."""
    http.faults[SHARD] = [Drop(5000), reply]
    with open_remote(http.url + SHARD, FAST) as stream:
        assert stream.read() == (data / SHARD.lstrip("/")).read_bytes()
        assert stream.raw.retries == retries


def test_an_object_that_changes_while_it_is_read_is_an_error(http):
    """A resumed reply whose Content-Range states another size is another version of the object: the
    stream stops (permanent) instead of splicing two versions."""
    http.faults[SHARD] = [Drop(5000), Partial(start=None, grown=10)]
    with pytest.raises(RemoteError, match="changed while it was read") as err:
        open_remote(http.url + SHARD, FAST).read()
    assert err.value.permanent and len(http.requests) == 2


# ------------------------------------------------------------------ quickstart takes remote specs
@pytest.fixture(scope="module")
def with_val(data):
    """ROOT/qs: a moe-dist-data shard --out with train and val splits."""
    shard(make_csv(data / "qs-input", 40), str(data / "qs"), ShardOptions(per_shard=10, val_fraction=0.25),
          progress=False)
    return data / "qs"


def test_quickstart_takes_a_remote_spec_like_train_does(with_val, http, tmp_path, capsys):
    """--data http://... found no val split (only local directories were looked into) and --val SPEC
    became <cwd>/http:/..., which its validate step could not read. Now both stay URLs, the data steps
    validate them over HTTP, and what the quickstart records holds the URL (without a query string)."""
    from moe_dist.cli.quickstart import Runner, _data_steps, plan

    args = argparse.Namespace(out=str(tmp_path), steps=None, model="moe-clip-tiny", ranks=1,
                              data=f"{http.url}/qs", val=None, classes=None)
    p = plan(args)
    assert (p.train, p.val) == (f"{http.url}/qs", f"{http.url}/qs/val")
    args.val = f"{http.url}/qs/val/val-000000.tar?token={SECRET}"
    p = plan(args)
    assert p.val == args.val and f"data.val={args.val}" in p.sets
    tokenizer = tmp_path / "tokenizer"  # made before: the step reuses it when its record names this spec
    tokenizer.mkdir()
    (tokenizer / "tok.model").write_bytes(b"")
    (tokenizer / "source.json").write_text(json.dumps({"spec": p.train, "vocab_size": 1000, "data": None}))
    _data_steps(p, Runner(p, dict(os.environ)))
    printed = capsys.readouterr().out
    assert f"moe-dist-data validate '{http.url}/qs/val/val-000000.tar'" in printed and SECRET not in printed, printed
    assert f"reusing {tokenizer / 'tok.model'}" in printed, printed
    assert f"/qs/val/val-000000.tar?token={SECRET}" in http.requests, http.requests  # read over HTTP, token sent


def test_a_redirect_never_leaves_https_for_plain_http():
    """The redirect rule on an https request (no TLS test server here: the handler itself, as urllib calls
    it): a Location on plain http is a permanent error; one on another https host becomes the next request."""
    import email.message
    import urllib.request

    from moe_dist.data import remote

    def location(url):
        headers = email.message.Message()
        headers["Location"] = url
        return headers

    request = urllib.request.Request("https://bucket.example/data/a.tar?X-Amz-Signature=" + SECRET)
    with pytest.raises(RemoteError, match="leave https for plain http") as err:
        remote._Redirects().http_error_302(request, io.BytesIO(), 302, "Found", location("http://bucket.example/a"))
    assert err.value.permanent and SECRET not in str(err.value)
    target = "https://cdn.example/a.tar"
    following = remote._Redirects().redirect_request(request, io.BytesIO(), 302, "Found", location(target), target)
    assert following.full_url == target and following.hops == 1
