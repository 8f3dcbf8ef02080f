"""Issue 25, remote data: each test reproduces one hole against real servers on loopback (Python's HTTP
server with injected faults, tests/helpers/remote.py) and real shards.

    item 1   no userinfo in a spec, no secret in a message, a log or a record; permanent errors are not retried
"""

import json
import logging

import pytest

from data_tools.shard import ShardOptions, shard
from helpers.data import make_csv
from helpers.remote import serve_http
from moe_dist.data import RemoteError, RemoteOptions
from moe_dist.data.remote import open_remote

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
    server.faults.clear()
    server.forbidden.clear()
    server.requests.clear()
    return server


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
